"""Healing (adapters_hub/lisa/healing.py): low-rank updates of the backbone's own weights,
trained in conversion and merged before serving. Tiny LLaMA (GQA), seconds."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters_hub.lisa import healing
from adapters_hub.lisa.convert import Objective, self_distillation_loss
from tests.test_lisa_model import make, padded_batch, randomize


def ids(n=4, t=24, seed=0):
    return torch.randint(3, 259, (n, t), generator=torch.Generator().manual_seed(seed))


def randomize_healing(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in healing.parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_a_fresh_healing_changes_nothing_and_disabled_is_the_plain_model(tiny):
    lm = make(tiny)
    x = ids()
    with torch.no_grad():
        before = lm(input_ids=x).logits
        params = healing.attach(lm.model, healing.HealingConfig(rank=4), shared_layers=lm.plan.layers)
        assert params and all(p.requires_grad for p in params)
        assert torch.allclose(lm(input_ids=x).logits, before, atol=1e-6)  # B = 0, deltas = 0
        randomize_healing(lm.model)
        assert not torch.allclose(lm(input_ids=x).logits, before, atol=1e-3)
        with healing.disabled(lm.model):
            assert torch.allclose(lm(input_ids=x).logits, before, atol=1e-6)


@pytest.mark.parametrize("layers", ["all", "shared"])
def test_merged_healing_gives_the_unmerged_logits_and_the_same_parameter_count(tiny, tmp_path, layers):
    """What conversion trains (wrappers) and what serving runs (merged weights) agree, on the
    reference and the fast path, with left padding; serving has no extra parameter."""
    from adapters_hub.lisa import LisaConfig, LisaModel

    lm = make(tiny)
    randomize(lm)
    plain_count = sum(p.numel() for n, p in lm.model.named_parameters() if "lisa_" not in n)
    healing.attach(lm.model, healing.HealingConfig(rank=4, layers=layers), shared_layers=lm.plan.layers)
    randomize_healing(lm.model)
    lm.save_adapter(tmp_path / "adapter")
    folder = healing.save(lm.model, tmp_path / "healing")
    _, batch, mask = padded_batch([12, 7])
    lm.eval()
    with torch.no_grad():
        want = lm(input_ids=batch, attention_mask=mask).logits

    served = copy.deepcopy(tiny[0])
    digest = healing.merge(served, folder)
    assert digest == healing.digest_of(folder)
    slm = LisaModel(served, LisaConfig(plan=lm.plan), adapter_name="fresh", fingerprint=lm.base_fingerprint)
    slm.load_adapter(tmp_path / "adapter", "general", activate=True)
    assert sum(p.numel() for n, p in slm.model.named_parameters() if "lisa_" not in n) == plain_count
    slm.eval()
    for fast in (False, True):
        slm.fast_path = fast
        with torch.no_grad():
            got = slm(input_ids=batch, attention_mask=mask).logits
        real = mask.bool()
        assert (got - want)[real].abs().max() < 1e-4, fast


def test_healing_config_names_the_bad_field():
    with pytest.raises(healing.HealingError, match="heal_rank"):
        healing.HealingConfig(rank=0)
    with pytest.raises(healing.HealingError, match="heal_targets"):
        healing.HealingConfig(targets=("q_proj",))
    with pytest.raises(healing.HealingError, match="heal_layers"):
        healing.HealingConfig(layers="some")


def test_a_corrupted_healing_file_is_refused_with_its_path(tiny, tmp_path):
    lm = make(tiny)
    healing.attach(lm.model, healing.HealingConfig(rank=2))
    folder = healing.save(lm.model, tmp_path / "healing")
    (folder / healing.WEIGHTS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(healing.HealingError, match="healing"):
        healing.merge(copy.deepcopy(tiny[0]), folder)


def test_healing_only_changes_its_own_sites(tiny):
    lm = make(tiny)
    healing.attach(lm.model, healing.HealingConfig(rank=2, targets=("o_proj",), layers="shared", norms=False),
                   shared_layers=lm.plan.layers)
    names = sorted(healing.state_dict(lm.model))
    assert names and all(".self_attn.o_proj.heal_" in n for n in names)
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in names} == set(lm.plan.layers)


def test_distillation_with_healing_trains_the_updates_and_fits_closer_than_lisa_tensors_alone(tiny):
    """Same steps, same rows: healing the other weights gets closer to the teacher than the
    LiSA tensors alone (more capacity: the reason it exists; that it also generalises is
    measured on SmolLM2 by benchmarks/objectives_smollm2.py); the teacher never sees the
    updates, and the LiSA tensors and the updates train in their own optimizer groups."""
    from adapters_hub.lisa.convert import self_distill

    train = ids(8, 32, seed=3)
    results = {}
    for heal in (False, True):
        torch.manual_seed(0)
        lm = make(tiny)
        if heal:
            healing.attach(lm.model, healing.HealingConfig(rank=4), shared_layers=lm.plan.layers)
        state = self_distill(lm, train, minutes=10, max_steps=30, batch_size=4, lr=1e-2, heal_lr=3e-3,
                             objective=Objective(kd_temperature=2.0, hidden_weight=0.5))
        assert state.step == 30 and set(state.history[-1]) == {"step", "loss", "kd", "hidden"}
        with torch.no_grad():
            results[heal] = self_distillation_loss(lm, train)[1]["kd"]
        if heal:
            assert all(p.grad is not None and p.abs().sum() > 0 for p in healing.parameters(lm.model))
    assert results[True] < results[False], results


def test_objective_refuses_bad_weights():
    with pytest.raises(ValueError, match="kd_temperature"):
        Objective(kd_temperature=0)
    with pytest.raises(ValueError, match="nothing to train"):
        Objective(kd_weight=0)
    with pytest.raises(ValueError, match="hidden_weight"):
        Objective(hidden_weight=-1)


def test_adapters_of_a_healed_and_an_unhealed_backbone_of_one_plan_never_cross(tiny, tmp_path):
    from adapters_hub.backbone import load_lisa_model
    from adapters_hub.kinds import get_kind
    from adapters_hub.lisa import AdapterMismatchError

    lm = make(tiny)
    plan = lm.plan
    healing.attach(lm.model, healing.HealingConfig(rank=2), shared_layers=plan.layers)
    randomize_healing(lm.model)
    folder = healing.save(lm.model, tmp_path / "healing")

    healed, _ = load_lisa_model("tiny-llama", plan, healing=folder)
    plain, _ = load_lisa_model("tiny-llama", plan)
    assert healed.base_fingerprint == healing.healed_fingerprint(plain.base_fingerprint, healing.digest_of(folder))
    assert healed.base_fingerprint != plain.base_fingerprint
    lisa = get_kind("lisa")
    for name, source, target in (("on-healed", healed, plain), ("on-plain", plain, healed)):
        lisa.add(source, name, {})
        lisa.save(source, name, tmp_path / name)
        with pytest.raises(AdapterMismatchError, match="fingerprint"):
            lisa.load(target, tmp_path / name, name)
        assert name not in target.adapters


def test_eval_ppl_scores_a_healed_backbone_folder_as_conversion_measured_it(tiny, tmp_path, capsys):
    """`lisa-hub eval-ppl --backbone DIR --text FILE` loads the folder as serving does
    (healing merged, W_q/W_k pruned, general adapter active) and prints one JSON line with
    the perplexity last; it equals the unmerged model's perplexity on the same blocks."""
    import json

    from sdk.cli import main
    from adapters_hub.data import token_blocks
    from adapters_hub.evaluation import perplexity

    lm = make(tiny)
    randomize(lm, scale=0.1)
    healing.attach(lm.model, healing.HealingConfig(rank=2), shared_layers=lm.plan.layers)
    randomize_healing(lm.model)
    folder = tmp_path / "backbone"
    lm.plan.save(folder / "plan.json")
    lm.save_adapter(folder / "adapter")
    healing.save(lm.model, folder / "healing")
    healing.stamp_adapter(folder / "adapter", folder / "healing")  # as the conversion job does
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    want = perplexity(lm, token_blocks(tiny[1], text.read_text(), n_blocks=3, block_len=32), progress=False)

    assert main(["eval-ppl", "--base", "tiny-llama", "--backbone", str(folder), "--text", str(text),
                 "--blocks", "3", "--block-len", "32"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(line)[-1] == "perplexity" and line["healed"] is True
    assert line["perplexity"] == pytest.approx(want, rel=1e-4)

    assert main(["eval-ppl", "--base", "tiny-llama", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
