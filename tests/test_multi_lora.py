"""Per-row LoRA (adapters_hub/multi_lora.py): a mixed batch of lisa-only adapters, lisa
adapters with LoRA parts, `lora`-kind adapters and the bare backbone gives each row what
that row gets alone; the gathered route equals the row-by-row reference. Tiny LLaMA (GQA:
4 heads, 2 KV heads), seconds.

    .venv/bin/python -m pytest -q tests/test_multi_lora.py
"""

from __future__ import annotations

import pytest
import torch

from adapters_hub import multi_lora
from adapters_hub.backbone import dense_plan, load_lisa_model
from adapters_hub.kinds import get_kind
from adapters_hub.lisa import LisaConfig, SharingPlan
from adapters_hub.lisa.config import LisaConfigError
from adapters_hub.multi_lora import LoraParts, LoraPartsError


def _randomize(lm, name, seed):
    """Non-trivial values for every tensor of adapter `name` (B of a fresh LoRA is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            parts = n.split(".")
            if name in parts and any(q.startswith(("lisa_", "lora_")) for q in parts):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    multi_lora.changed(lm.get_base_model())


@pytest.fixture(scope="module")
def mixed(tiny):
    """A LiSA backbone with: "plain" (lisa only), "parts" (lisa + LoRA parts on o/v/MLP),
    "lora" (lora kind on q/v) and "lora2" (lora kind, rank 4, on the MLP)."""
    plan = SharingPlan.for_model(tiny[0], [2, 3, 5])
    lm, tok = load_lisa_model("tiny-llama", plan)
    lisa, lora = get_kind("lisa"), get_kind("lora")
    lisa.add(lm, "plain", {})
    lisa.add(lm, "parts", {"lora_parts": LoraParts(r=4)})
    lora.add(lm, "lora", {})
    lora.add(lm, "lora2", {"r": 4, "target_modules": ["mlp"]})
    for i, name in enumerate(("plain", "parts", "lora", "lora2")):
        _randomize(lm, name, seed=i)
    lm.eval()
    tok.padding_side = "left"
    return lm, tok


NAMES = ["plain", "parts", "lora", "fresh", "lora2", "parts"]
PROMPTS = ["Question: 2+3?", "Hi", "The cat sat on the mat and", "x", "Once upon", "Hello there, friend"]


def _batch(tok):
    return tok(PROMPTS, return_tensors="pt", padding=True)  # left padding: rows of different lengths


def _logits(lm, batch, names, route):
    lm.fast_path = route == "gather"
    try:
        with torch.no_grad():
            return lm(**batch, adapter_names=names).logits
    finally:
        lm.fast_path = True


def test_gathered_lora_equals_the_row_by_row_reference_in_prefill(mixed):
    lm, tok = mixed
    batch = _batch(tok)
    fast, ref = _logits(lm, batch, NAMES, "gather"), _logits(lm, batch, NAMES, "loop")
    assert (fast - ref).abs().max() < 1e-4


def test_each_row_of_a_mixed_batch_gets_what_it_gets_alone(mixed):
    lm, tok = mixed
    batch = _batch(tok)
    together = _logits(lm, batch, NAMES, "gather")
    for i, name in enumerate(NAMES):
        alone = _logits(lm, {k: v[i : i + 1] for k, v in batch.items()}, [name], "gather")
        keep = batch["attention_mask"][i].bool()
        assert (together[i, keep] - alone[0, keep]).abs().max() < 1e-4, name
    # and every adapter matters: no row's update was silently dropped
    fresh = _logits(lm, batch, ["fresh"] * len(NAMES), "gather")
    for i, name in enumerate(NAMES):
        if name != "fresh":
            assert (together[i] - fresh[i]).abs().max() > 1e-3, name


def test_cached_decode_of_a_mixed_batch_equals_each_row_generated_alone(mixed):
    lm, tok = mixed
    batch = _batch(tok)
    with torch.no_grad():
        out = lm.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                          adapter_names=NAMES)
        for i, name in enumerate(NAMES):
            one = tok(PROMPTS[i], return_tensors="pt")
            alone = lm.generate(**one, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                adapter_names=[name])
            assert out[i, -6:].tolist() == alone[0, -6:].tolist(), name


def test_a_lora_row_never_changes_another_rows_logits(mixed):
    lm, tok = mixed
    batch = _batch(tok)
    with_lora = _logits(lm, batch, NAMES, "gather")
    without = _logits(lm, batch, [n if not n.startswith("lora") else "fresh" for n in NAMES], "gather")
    others = [i for i, n in enumerate(NAMES) if not n.startswith("lora")]
    assert (with_lora[others] - without[others]).abs().max() < 1e-5


def test_activating_a_lora_adapter_applies_it_to_every_row_and_deactivating_removes_it(mixed):
    lm, tok = mixed
    batch = _batch(tok)
    lora = get_kind("lora")
    per_row = _logits(lm, batch, ["lora"] * len(NAMES), "gather")
    lora.activate(lm, "lora")
    try:
        with torch.no_grad():
            active = lm(**batch).logits
    finally:
        lora.deactivate(lm, "lora")
    assert (active - per_row).abs().max() < 1e-5
    with torch.no_grad():
        assert (lm(**batch).logits - per_row).abs().max() > 1e-3


def test_lisa_adapter_with_lora_parts_round_trips_save_and_load(mixed, tmp_path):
    lm, tok = mixed
    batch = _batch(tok)
    folder = lm.save_adapter(tmp_path / "parts", "parts")
    state = lm.adapter_state_dict("parts")
    assert any(".lisa_lora_A." in k for k in state) and any("mlp.down_proj.lisa_lora_B" in k for k in state)
    lm.load_adapter(folder, "parts_again")
    try:
        a = _logits(lm, batch, ["parts"] * len(NAMES), "gather")
        b = _logits(lm, batch, ["parts_again"] * len(NAMES), "gather")
        assert (a - b).abs().max() == 0
        assert lm.peft_config["parts_again"].lora_parts == LoraParts(r=4)
    finally:
        lm.delete_adapter("parts_again")
    assert not multi_lora.has_parts(lm.get_base_model(), "parts_again")


def test_fresh_lora_parts_change_nothing_until_trained(tiny):
    plan = SharingPlan.for_model(tiny[0], [2, 3])
    lm, tok = load_lisa_model("tiny-llama", plan)
    ids = tok(["The cat sat"], return_tensors="pt")
    with torch.no_grad():
        before = lm(**ids).logits
        n = lm.add_lora_parts("fresh", LoraParts(r=2, targets=("v_proj",), layers="shared"))
        after = lm(**ids).logits
    assert n == 2 * 2 * (64 + 32)  # two shared layers x r x (in + out) of v_proj (hidden 64, 2 KV heads x 16)
    assert (before - after).abs().max() == 0
    trainable = [k for k, p in lm.named_parameters() if p.requires_grad]
    assert any("lisa_lora_A.fresh" in k for k in trainable) and any("lisa_aligner" in k for k in trainable)


def test_dense_backbone_serves_many_plain_lora_adapters_in_one_batch(tiny):
    lm, tok = load_lisa_model("tiny-llama", dense_plan("tiny-llama"))
    lora = get_kind("lora")
    for i, name in enumerate(("a", "b")):
        lora.add(lm, name, {"target_modules": ["q_proj", "v_proj", "o_proj"]})
        _randomize(lm, name, seed=10 + i)
    lm.eval()
    tok.padding_side = "left"
    batch = tok(PROMPTS[:4], return_tensors="pt", padding=True)
    names = ["a", "b", "fresh", "a"]
    together = _logits(lm, batch, names, "gather")
    assert (together - _logits(lm, batch, names, "loop")).abs().max() < 1e-4
    for i, name in enumerate(names):
        alone = _logits(lm, {k: v[i : i + 1] for k, v in batch.items()}, [name], "gather")
        keep = batch["attention_mask"][i].bool()
        assert (together[i, keep] - alone[0, keep]).abs().max() < 1e-4


def test_lora_parts_reject_bad_fields_by_name():
    with pytest.raises(LoraPartsError, match="^r:"):
        LoraParts(r=0)
    with pytest.raises(LoraPartsError, match="^targets:"):
        LoraParts(targets=("w_proj",))
    with pytest.raises(LoraPartsError, match="^layers:"):
        LoraParts(layers="some")
    with pytest.raises(LisaConfigError, match="^lora_parts.rank: unknown field"):
        LisaConfig.from_dict({**LisaConfig(plan=SharingPlan(num_layers=4, num_heads=2, head_dim=4)).to_dict(),
                              "lora_parts": {"rank": 4}})


def test_unknown_adapter_names_per_row_are_refused_with_the_loaded_list(mixed):
    lm, tok = mixed
    with pytest.raises(KeyError, match="nope"):
        with lm.adapter_per_row(["plain", "nope"]):
            pass
