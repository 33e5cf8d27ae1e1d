"""The adapter-kind contract, run over every registered kind (as PEFT's shared tuner tests
run over every tuner). Tiny LLaMA backbones, seconds."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters_hub.kinds import AdapterError, batching_kinds, get_kind, kind_state, known_kinds, trainable_kinds
from adapters_hub.lisa import AdapterMismatchError, SharingPlan

TRAINABLE = trainable_kinds()


def backbone(layers=(2, 3, 5), base=None):
    from adapters_hub.backbone import load_lisa_model
    from adapters_hub.lisa import LisaConfig, LisaModel
    from adapters_hub.models import load_base

    if base is None:
        model, _ = load_base("tiny-llama")
        return load_lisa_model("tiny-llama", SharingPlan.for_model(model, list(layers)))[0]
    return LisaModel(base, LisaConfig(plan=SharingPlan.for_model(base, list(layers))), adapter_name="fresh")


def ids():
    return torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))


def trained(kind, lm, name="a", seed=0):
    """Add an adapter of `kind` and give its tensors non-trivial values."""
    kind.add(lm, name, {})
    kind.activate(lm, name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if kind.prefix in n and f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return lm


def test_every_kind_declares_the_contract():
    assert {"lisa", "lora", "attn_drop"} <= set(known_kinds())
    assert TRAINABLE[:2] == ["lisa", "lora"] and "attn_drop" not in TRAINABLE
    for name in known_kinds():
        kind = get_kind(name)
        assert kind.name == name
        assert isinstance(kind.trainable, bool) and isinstance(kind.prefix, str) and isinstance(kind.needs_plan, bool)
        assert isinstance(kind.batches_per_row, bool) and isinstance(kind.composes_with_sharing, bool), name
        assert not kind.trainable or kind.prefix, name
        for method in ("add", "save", "load", "activate", "deactivate", "delete"):
            assert callable(getattr(kind, method)), (name, method)


@pytest.mark.parametrize("name", TRAINABLE)
def test_a_new_adapter_makes_only_its_own_tensors_trainable(name):
    kind = get_kind(name)
    lm = trained(kind, backbone())
    grads = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert grads and all(kind.prefix in n and ".a." in n for n in grads)


@pytest.mark.parametrize("name", TRAINABLE)
def test_save_load_round_trip_gives_the_same_outputs(name, tmp_path):
    kind = get_kind(name)
    lm = trained(kind, backbone())
    with torch.no_grad():
        expect = lm(input_ids=ids()).logits
    kind.save(lm, "a", tmp_path / "a")
    other = backbone()
    kind.load(other, tmp_path / "a", "b")
    kind.activate(other, "b")
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids()).logits, expect)


@pytest.mark.parametrize("name", TRAINABLE)
def test_an_adapter_is_refused_by_another_plan_and_another_base(name, tmp_path):
    kind = get_kind(name)
    kind.save(trained(kind, backbone()), "a", tmp_path / "a")
    if kind.needs_plan:
        with pytest.raises(AdapterMismatchError, match="plan"):
            kind.load(backbone(layers=(1, 4)), tmp_path / "a", "b")
    from adapters_hub.models import load_base

    model, _ = load_base("tiny-llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2.0)  # another base model of the same shape
    with pytest.raises(AdapterMismatchError, match="base"):
        kind.load(backbone(base=model), tmp_path / "a", "b")


@pytest.mark.parametrize("name", TRAINABLE)
def test_delete_removes_the_adapter_and_state_stays_per_model(name):
    kind = get_kind(name)
    first, second = trained(kind, backbone()), trained(kind, backbone(), seed=1)
    kind.delete(first, "a")
    assert not [n for n, _ in first.named_parameters() if kind.prefix in n and ".a." in n]
    assert [n for n, _ in second.named_parameters() if kind.prefix in n and ".a." in n]  # untouched
    assert "a" not in kind_state(first, name)  # the kind's per-model state went with the adapter ...
    if name == "lora":  # ... and a kind that keeps state keeps it per model, not per process
        assert "a" in kind_state(second, name) and "a" in kind_state(copy.deepcopy(second), name)


def test_kinds_that_cannot_be_trained_refuse_to_add():
    for name in sorted(set(known_kinds()) - set(TRAINABLE)):
        with pytest.raises(AdapterError):
            get_kind(name).add(backbone(), "x", {})


def test_each_built_in_kind_lives_in_its_own_module_and_serving_takes_the_batching_ones():
    for name in ("lisa", "lora", "attn_drop"):
        assert type(get_kind(name)).__module__ == f"adapters_hub.kinds.{name}"
    assert batching_kinds() == ["lisa", "lora"]  # attn_drop changes the structure of every row: Backbone.use
