"""Hybrid plans: each layer keeps its attention, shares a donor's (LiSA) or drops it (no
attention, no KV cache). Tiny LLaMA (6 layers, 4 query heads, 2 KV heads, head_dim 16).

    .venv/bin/python -m pytest -q tests/test_hybrid_plan.py
"""

from __future__ import annotations

import copy

import pytest
import torch

from adapters_hub.errors import AdapterMismatchError
from adapters_hub.lisa import LisaConfig, LisaModel, SharingPlan
from adapters_hub.lisa.layer import DroppedAttention
from adapters_hub.lisa.plan import PlanError, choose_hybrid, hybrid_steps
from tests.test_lisa_fast import both_paths, prefill_and_decode
from tests.test_lisa_model import padded_batch, randomize

SHARED, DROPPED = [2, 4, 5], [3]  # 4 takes 2's scores past dropped 3; 5 chains on 4


def make(tiny, layers=SHARED, dropped=DROPPED, **cfg):
    model = copy.deepcopy(tiny[0])
    plan = SharingPlan.for_model(model, layers, dropped=dropped)
    return LisaModel(model, LisaConfig(plan=plan, **cfg), fingerprint="tiny")


def test_a_shared_layer_above_a_dropped_one_takes_the_nearest_kept_or_shared_donor():
    plan = SharingPlan.explicit(num_layers=8, num_heads=4, head_dim=16, layers=[3, 5, 7], dropped=[4, 6])
    assert {s.layer: s.donor for s in plan.shared} == {3: 2, 5: 3, 7: 5}
    assert [plan.choice(i) for i in range(8)] == ["keep", "keep", "keep", "share", "drop", "share", "drop", "share"]
    assert plan.fraction == 5 / 8


@pytest.mark.parametrize("kwargs,field", [
    ({"layers": [3], "dropped": [0]}, "dropped[0]"),                    # layer 0 keeps its cache slot
    ({"layers": [3], "dropped": [3]}, "dropped[0]"),                    # shared and dropped
    ({"layers": [3], "dropped": [8]}, "dropped[0]"),                    # out of range
    ({"layers": [3], "dropped": [2], "donors": {3: 2}}, "shared[0].donor"),  # a dropped donor
    ({"layers": [3], "dropped": [5, 5]}, "dropped[1]"),                 # twice
])
def test_invalid_hybrid_plans_name_the_field(kwargs, field):
    with pytest.raises(PlanError) as err:
        SharingPlan.explicit(num_layers=8, num_heads=4, head_dim=16, **kwargs)
    assert str(err.value).startswith(field), str(err.value)


def test_hybrid_plan_round_trips_and_a_plan_that_drops_nothing_keeps_its_old_hash(tmp_path):
    plan = SharingPlan.explicit(num_layers=8, num_heads=4, head_dim=16, layers=[3, 5], dropped=[4, 6])
    again = SharingPlan.load(plan.save(tmp_path / "plan.json"))
    assert again == plan and again.hash == plan.hash and again.dropped == (4, 6)
    plain = SharingPlan.explicit(num_layers=8, num_heads=4, head_dim=16, layers=[3])
    assert plain.hash == "e089850c582bac10"  # the hash this plan had before plans could drop layers
    assert SharingPlan.explicit(num_layers=8, num_heads=4, head_dim=16, layers=[3], dropped=[5]).hash != plain.hash


def test_first_layer_of_each_attention_kind_cannot_be_dropped():
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM

    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 3)
    model = Gemma3ForCausalLM(cfg)
    with pytest.raises(PlanError, match="dropped: layer 2 is the first full_attention layer"):
        SharingPlan.for_model(model, [4], dropped=[2]).check_model(model)
    SharingPlan.for_model(model, [5], dropped=[3]).check_model(model)  # 5 shares sliding 4


def test_kv_cache_holds_nothing_for_dropped_layers_and_rank_r_keys_for_shared(tiny):
    from transformers import DynamicCache

    lm = make(tiny)
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        lm(input_ids=torch.randint(3, 259, (2, 12)), past_key_values=cache, use_cache=True)
    r = lm.plan.get(2).rank
    assert cache.layers[3].keys is None or cache.layers[3].keys.numel() == 0
    assert all(cache.layers[i].keys.shape == (2, 2, 12, r) for i in SHARED)
    assert all(cache.layers[i].keys.shape == (2, 2, 12, 16) for i in (0, 1))
    measured = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers if l.keys is not None) / (2 * 12)
    assert measured == lm.plan.kv_bytes_per_token(2)


def test_a_dropped_layer_is_what_the_attn_drop_kind_computes(tiny):
    """The plan's drop and LLM-Drop's (adapters_hub/drop) skip the same branch: same logits."""
    from adapters_hub.drop.model import apply_drop
    from adapters_hub.drop.plan import DropPlan

    lm = make(tiny, layers=[], dropped=[2, 4])
    dense = copy.deepcopy(tiny[0])
    apply_drop(dense, DropPlan(num_layers=6, attn=(2, 4)))
    ids = torch.randint(3, 259, (2, 10))
    with torch.no_grad():
        assert torch.allclose(lm(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fast_path_equals_reference_with_left_padding_cache_and_mixed_adapters(tiny, attn):
    lm = make(tiny)
    lm.model.set_attn_implementation(attn)
    lm.add_adapter("other", lm.peft_config["default"])
    lm.eval()
    randomize(lm, "default", seed=0)
    randomize(lm, "other", seed=1)
    _, ids, mask = padded_batch([11, 7, 4])
    steps = torch.randint(3, 259, (3, 4), generator=torch.Generator().manual_seed(1))
    for names in (None, ["default", "other", "default"]):
        (fast, m), (ref, _) = both_paths(lm, lambda: prefill_and_decode(lm, ids, mask, steps, adapter_names=names))
        keep = m.bool()
        assert (fast - ref)[keep].abs().max() < 1e-4
    mixed, m = prefill_and_decode(lm, ids, mask, steps, adapter_names=["default", "other", "default"])
    lm.set_adapter("other")
    alone, _ = prefill_and_decode(lm, ids[1:2], mask[1:2], steps[1:2])
    assert (mixed[1:2] - alone)[m[1:2].bool()].abs().max() < 1e-4  # a row gets its own adapter's logits


def test_disabled_adapters_give_the_dense_model_and_unload_restores_it(tiny):
    lm = make(tiny)
    randomize(lm)
    ids = torch.randint(3, 259, (2, 9))
    with torch.no_grad():
        dense = tiny[0](input_ids=ids).logits
        with lm.disable_adapter():
            assert torch.allclose(lm(input_ids=ids).logits, dense, atol=1e-5)
        assert not torch.allclose(lm(input_ids=ids).logits, dense, atol=1e-3)
        norm = lm.model.model.layers[3].input_layernorm
        x = torch.randn(1, 2, 64)
        assert torch.equal(norm(x), x)  # a dropped layer's input norm has no reader: skipped
        with lm.disable_adapter():
            assert not torch.equal(norm(x), x)  # ... but the dense teacher normalises
        base = lm.unload()
        assert not any(isinstance(l.self_attn, DroppedAttention) for l in base.model.layers)
        assert "forward" not in norm.__dict__
        assert torch.allclose(base(input_ids=ids).logits, dense, atol=1e-5)


def test_prune_frees_a_dropped_layers_attention_and_no_lora_part_goes_there(tiny):
    from adapters_hub.multi_lora import LoraParts

    lm = make(tiny, lora_parts=LoraParts(r=2, targets=("o_proj", "v_proj", "mlp")))
    names = {k for k in lm.adapter_state_dict()}
    assert not any(k.startswith("model.layers.3.self_attn.") for k in names)
    assert any(k.startswith("model.layers.3.mlp.") for k in names)
    attn = lm.model.model.layers[3].self_attn
    own = sum(p.numel() for n in ("q_proj", "k_proj", "v_proj", "o_proj") for p in getattr(attn, n).parameters())
    qk = sum(p.numel() for i in SHARED for n in ("q_proj", "k_proj")
             for p in getattr(lm.lisa_layers[i], n).parameters())
    assert lm.prune_qk() == own + qk
    with torch.no_grad():
        lm(input_ids=torch.randint(3, 259, (1, 5)))  # still runs: nothing pruned is used


def test_healing_skips_a_dropped_layers_attention_and_its_input_norm(tiny):
    from adapters_hub.lisa import healing

    lm = make(tiny)
    healing.attach(lm.model, healing.HealingConfig(rank=2), shared_layers=lm.plan.layers + lm.plan.dropped)
    sites = set(healing.state_dict(lm.model))
    assert not any(k.startswith("model.layers.3.self_attn.") or k.startswith("model.layers.3.input_layernorm")
                   for k in sites)
    assert any(k.startswith("model.layers.3.mlp.") for k in sites)
    assert any(k.startswith("model.layers.2.self_attn.o_proj") for k in sites)


def test_an_adapter_of_a_hybrid_backbone_refuses_a_backbone_of_another_plan(tiny, tmp_path):
    lm = make(tiny)
    folder = lm.save_adapter(tmp_path / "hybrid")
    sharing_only = make(tiny, dropped=[])
    with pytest.raises(AdapterMismatchError, match="plan"):
        sharing_only.load_adapter(folder, "h")
    make(tiny).load_adapter(folder, "h")  # the same plan takes it


# ------------------------------------------------------------------------------ planner

def test_hybrid_steps_spend_the_least_sensitivity_per_kv_byte_saved():
    # per-layer log-perplexity increases: layer 3 is cheap to drop, layer 2 cheap to share
    share = {1: 0.5, 2: 0.01, 3: 0.2, 4: 0.3}
    drop = {1: 2.0, 2: 1.0, 3: 0.02, 4: 0.9}
    steps = hybrid_steps(share, drop, head_dim=16, ranks={l: 2 for l in share})
    first = steps[0]
    assert first == ({}, [3])  # drop 3: 0.02 for 32 units
    assert steps[1] == ({2: 2}, [3])  # then share 2: 0.01 for 14 units
    shared, dropped = steps[-1]
    assert set(shared) | set(dropped) == {1, 2, 3, 4}  # every candidate changed in the end
    kv = [sum(16 + 2 if l in s else 0 if l in d else 32 for l in range(5)) for s, d in steps]
    assert kv == sorted(kv, reverse=True)  # every step saves bytes


def test_choose_hybrid_meets_a_kv_budget_or_the_longest_prefix_within_a_ppl_budget():
    share = {l: 0.01 * l for l in range(1, 8)}
    drop = {l: 0.05 * l for l in range(1, 8)}
    ranks = {l: 2 for l in share}
    shared, dropped = choose_hybrid(share, drop, num_layers=8, head_dim=16, ranks=ranks, kv_budget=0.6)
    kept = 8 - len(shared) - len(dropped)
    assert (kept * 32 + len(shared) * 18) / (8 * 32) <= 0.6
    calls = []

    def measure(s, d):
        calls.append((s, d))
        return 10.0 * (1 + sum(share[l] for l in s) + sum(drop[l] for l in d))

    shared, dropped = choose_hybrid(share, drop, num_layers=8, head_dim=16, ranks=ranks, max_ppl_increase=0.3,
                                    base_ppl=10.0, combined_ppl=measure)
    assert measure(shared, dropped) <= 13.0
    steps = hybrid_steps(share, drop, head_dim=16, ranks=ranks)
    nxt = steps[steps.index((shared, sorted(dropped))) + 1]
    assert measure(*nxt) > 13.0  # the next step would break the budget
    assert len(calls) <= 8  # bisection, not a scan


def test_conversion_job_plans_a_hybrid_backbone_within_a_kv_budget(tmp_path, capsys):
    """`python -m jobs.convert --kv-budget 0.6 --drop-attention --init-only` on tiny-llama:
    both scans run, the plan meets the budget and the folder shows the per-layer choices."""
    from jobs.convert import ConvertSpec, main

    spec = ConvertSpec(base="tiny-llama", kv_budget=0.6, drop_attention=True, init_only=True, eval_blocks=2,
                       eval_len=64, calib_blocks=8, init_steps=3, sensitivity_steps=2, seq_len=64, batch_size=2,
                       out=str(tmp_path / "bb"))
    result = main(spec)
    plan = SharingPlan.load(tmp_path / "bb" / "plan.json")
    assert plan.hash == result["plan_hash"] and plan.dropped == tuple(result["dropped"])
    assert plan.kv_bytes_per_token(2) <= 0.6 * 6 * 2 * 2 * 16 * 4
    assert (tmp_path / "bb" / "plan.png").is_file()
    from adapters_hub.lisa.analysis import AttentionReport

    report = AttentionReport.load(tmp_path / "bb")
    assert set(report.drop_sensitivity) == {1, 2, 3, 4, 5} and set(report.sensitivity) == {1, 2, 3, 4, 5}
    assert result["metrics"]["kv_ratio"] >= 1 / 0.6 - 1e-9


@pytest.mark.parametrize("kwargs,field", [
    ({"drop_attention": True}, "drop_attention"),            # no target for the planner
    ({"dropped": [3]}, "dropped"),                           # dropped without --layers
    ({"kv_budget": 1.5}, "kv_budget"),
    ({"kv_budget": 0.5, "fraction": 0.5}, "fraction"),       # two targets
    ({"layers": [2, 3], "dropped": [3]}, "dropped"),         # shared and dropped
    ({"layers": [2], "dropped": [4, 4]}, "dropped"),         # twice
])
def test_conversion_spec_refuses_unclear_hybrid_requests(kwargs, field):
    from jobs.convert import ConvertSpec

    with pytest.raises(ValueError) as err:
        ConvertSpec(base="tiny-llama", **kwargs)
    assert str(err.value).startswith(field), str(err.value)


def test_attn_drop_on_a_hybrid_backbone_keeps_cache_slots_consistent(tiny):
    """LLM-Drop's kind renumbers cache slots of the layers it keeps; a layer the plan
    already drops takes none, so cached decoding still equals a full forward."""
    from transformers import DynamicCache

    from adapters_hub.drop.model import apply_drop, restore
    from adapters_hub.drop.plan import DropPlan

    lm = make(tiny)
    randomize(lm)
    apply_drop(lm.model, DropPlan(num_layers=6, attn=(0,)))
    ids = torch.randint(3, 259, (1, 10))
    with torch.no_grad():
        full = lm(input_ids=ids).logits[:, -1]
        cache = DynamicCache(config=lm.config)
        lm(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        step = lm(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    assert (full - step).abs().max() < 1e-4
    assert lm.model.model.layers[3].self_attn.layer_idx == 3  # the plan's dropped layer kept its own index
    restore(lm.model)


def test_the_shipped_hybrid_plan_fits_smollm2_and_halves_its_kv_cache():
    """manifests/plans/smollm2-135m-hybrid-kv50.json: the plan benchmarks/hybrid_smollm2.py
    chose (scripts/gpu_check.sh times it on a GPU)."""
    from pathlib import Path

    from adapters_hub.models import base_config

    plan = SharingPlan.load(Path(__file__).resolve().parents[1] / "manifests/plans/smollm2-135m-hybrid-kv50.json")
    cfg = base_config("smollm2-135m")
    assert plan.kv_ratio(cfg.num_key_value_heads) >= 2.0 and plan.dropped
    assert (plan.num_layers, plan.num_heads) == (cfg.num_hidden_layers, cfg.num_attention_heads)


def test_a_hook_on_a_dropped_layers_norm_still_runs_for_the_teacher_and_comes_back(tiny):
    from types import MethodType

    model = copy.deepcopy(tiny[0])
    norm = model.model.layers[3].input_layernorm
    calls = []

    def hooked(self, x):  # e.g. an accelerate hook
        calls.append(1)
        return type(self).forward(self, x)

    norm.forward = MethodType(hooked, norm)
    own = norm.forward
    lm = LisaModel(model, LisaConfig(plan=SharingPlan.for_model(model, SHARED, dropped=DROPPED)), fingerprint="t")
    x = torch.randn(1, 2, 64)
    assert torch.equal(norm(x), x) and not calls
    with lm.disable_adapter():
        norm(x)
    assert calls == [1]
    lm.unload()
    assert norm.forward == own


def test_a_task_adapter_on_a_hybrid_backbone_learns_everywhere_but_the_dropped_attention(tiny):
    """One SFT-like step (LM loss, gradient checkpointing on): every trainable tensor of the
    adapter (aligners, low-rank Q/K, LoRA parts) gets a gradient; none sits in layer 3's
    dropped attention."""
    from adapters_hub.multi_lora import LoraParts

    lm = make(tiny, lora_parts=LoraParts(r=2, targets=("o_proj", "v_proj", "mlp")))
    randomize(lm, scale=0.1)
    lm.gradient_checkpointing_enable()
    lm.train()
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    lm(input_ids=ids, labels=ids).loss.backward()
    trainable = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert not any("layers.3.self_attn" in n for n in trainable)
    assert any("layers.3.mlp" in n for n in trainable)
