"""Turning a dense model into a LiSA backbone: local initialisation, the budget planner,
self-distillation. Tiny LLaMA (GQA), seconds."""

from __future__ import annotations

import pytest
import torch

from adapters_hub.lisa.local_init import local_init
from adapters_hub.lisa.plan import PlanError, choose_layers
from tests.test_lisa_model import make, randomize


def calib(n=8, t=24, seed=0):
    return torch.randint(3, 259, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [0, 1])
def test_local_init_lowers_every_layers_heldout_attention_kl(tiny, seed):
    torch.manual_seed(seed)  # the rank-r keys start random
    lm = make(tiny)
    fits = local_init(lm, calib(32, 32, seed=seed), steps=100, lr=1e-2, log=None)
    assert [f.layer for f in fits] == [2, 3, 5]
    for f in fits:
        assert f.kl_after < 0.9 * f.kl_before, f


def test_a_chain_is_fitted_against_the_donors_fitted_scores(tiny):
    """Layer 3's donor is layer 2 (substituted): layer 3 is fitted after layer 2 and against
    layer 2's fitted scores, so refitting 3 alone afterwards changes nothing it was fitted on,
    while fitting 3 before 2 (against 2's fresh scores) gives another adapter."""
    blocks = calib()
    torch.manual_seed(0)
    in_order = make(tiny)
    fits = local_init(in_order, blocks, steps=40, log=None)
    assert [f.layer for f in fits] == [2, 3, 5]
    torch.manual_seed(0)
    only_3 = make(tiny)  # same fresh start; layer 3 fitted while layer 2 is still fresh
    local_init(only_3, blocks, steps=40, layers=[3], log=None)
    w_in_order = in_order.lisa_layers[3].lisa_aligner["default"].weight
    w_alone = only_3.lisa_layers[3].lisa_aligner["default"].weight
    assert not torch.allclose(w_in_order, w_alone, atol=1e-4)
    # and the in-order fit of layer 3 is better for the real (fitted) donor than the other
    again = local_init(in_order, blocks, steps=1, lr=1e-9, layers=[3], log=None)[0]
    assert again.kl_before == pytest.approx(fits[1].kl_after, rel=1e-4)


def test_scores_at_sampled_queries_are_those_rows_of_the_full_scores(tiny):
    """Local init's sampled KL reads Z only at Q query positions; those rows must be exactly
    the rows of the full (B, H, T, T) scores, or the sample would not estimate the full KL."""
    torch.manual_seed(0)
    lm = make(tiny)
    randomize(lm)  # a fresh q_r is zero: its rows must carry something for the check to bite
    lm.eval()
    module = lm.lisa_layers[3]
    cfg = lm.model.config
    x = torch.randn(2, 24, cfg.hidden_size)
    cos, sin = lm.model.model.rotary_emb(x, torch.arange(24)[None].expand(2, -1))
    donor = torch.randn(2, cfg.num_attention_heads, 24, 24)
    q = torch.tensor([0, 5, 6, 23])
    with torch.no_grad():
        full, _ = module.scores("default", x, cos, sin, donor)
        some, _ = module.scores("default", x, cos, sin, donor[:, :, q], queries=q)
    assert some.shape == (2, cfg.num_attention_heads, 4, 24)
    torch.testing.assert_close(some, full[:, :, q], rtol=1e-5, atol=1e-6)


def test_local_init_on_sampled_queries_lowers_every_layers_heldout_attention_kl(tiny):
    torch.manual_seed(0)
    lm = make(tiny)
    fits = local_init(lm, calib(32, 32), steps=100, lr=1e-2, queries=8, log=None)
    for f in fits:
        assert f.kl_after < 0.9 * f.kl_before, f
    with pytest.raises(ValueError, match="queries"):
        local_init(lm, calib(8, 32), steps=1, queries=33, log=None)


def test_queries_for_keeps_a_long_blocks_step_at_the_cost_of_a_256_token_one():
    from adapters_hub.lisa.local_init import queries_for

    assert queries_for(256) is None and queries_for(128) is None
    assert queries_for(1024) == 64 and queries_for(1024) * 1024 == 256 * 256


def test_local_init_refuses_a_pruned_backbone(tiny):
    lm = make(tiny)
    lm.prune_qk()
    with pytest.raises(RuntimeError, match="pruned"):
        local_init(lm, calib(), steps=1, log=None)


SENS = {1: 0.50, 2: 0.01, 3: 0.02, 4: 0.30, 5: 0.03, 6: 0.04, 7: 0.20, 8: 0.05, 9: 0.06}


def test_planner_fraction_takes_the_least_sensitive_layers():
    assert choose_layers(SENS, num_layers=10, fraction=0.3) == [2, 3, 5]
    assert choose_layers(SENS, num_layers=10, fraction=0.5) == [2, 3, 5, 6, 8]


def test_planner_budget_takes_the_longest_prefix_within_the_budget():
    calls = []

    def combined(layers):  # additive model: base 10, each layer adds its sensitivity
        calls.append(layers)
        return 10.0 + sum(SENS[l] for l in layers)

    # prefixes by sensitivity: 2,3,5,6,8,9 add 0.01,0.03,0.06,0.10,0.15,0.21 -> budget 0.12 allows 4
    assert choose_layers(SENS, num_layers=10, max_ppl_increase=0.012, base_ppl=10.0, combined_ppl=combined) \
        == [2, 3, 5, 6]
    assert len(calls) <= 4  # bisection, not one measurement per prefix
    assert choose_layers(SENS, num_layers=10, max_ppl_increase=0.0, base_ppl=10.0, combined_ppl=combined) == []
    with pytest.raises(PlanError, match="fraction"):
        choose_layers(SENS, num_layers=10, fraction=0.3, max_ppl_increase=0.1)
    with pytest.raises(PlanError, match="fraction"):
        choose_layers(SENS, num_layers=20, fraction=0.5)  # 10 of 9 candidates


def test_self_distillation_lowers_the_logit_kl_to_the_dense_teacher(tiny):
    from adapters_hub.lisa.convert import Objective, self_distillation_loss

    torch.manual_seed(0)
    lm = make(tiny)
    train, held = calib(16, 32, seed=3), calib(4, 32, seed=4)
    with torch.no_grad():
        before = self_distillation_loss(lm, held)[1]["kd"]
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    lm.train()
    for step in range(60):
        loss, parts = self_distillation_loss(lm, train[step % 16 : step % 16 + 4], Objective(attn_weight=0.1))
        assert set(parts) == {"kd", "attn_kl"}
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.eval()
    with torch.no_grad():
        after = self_distillation_loss(lm, held)[1]["kd"]
    assert after < 0.8 * before, (before, after)
    assert all(p.grad is None or "lisa_" in n for n, p in lm.named_parameters())  # base weights untouched


def test_dense_backbone_lora_and_lisa_backbone_adapters_do_not_cross(tiny, tmp_path):
    from adapters_hub.backbone import load_lisa_model, dense_plan
    from adapters_hub.kinds import get_kind
    from adapters_hub.lisa import AdapterMismatchError, SharingPlan

    lora = get_kind("lora")
    dense, _ = load_lisa_model("tiny-llama", dense_plan("tiny-llama"))
    assert not dense.lisa_layers  # the unmodified model
    ids = calib(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, tiny[0](input_ids=ids).logits)
    lora.add(dense, "t", {})
    lora.save(dense, "t", tmp_path / "dense-lora")
    lisa, _ = load_lisa_model("tiny-llama", SharingPlan.for_model(tiny[0], [2, 3]))
    lora.add(lisa, "t", {})
    lora.save(lisa, "t", tmp_path / "lisa-lora")
    with pytest.raises(AdapterMismatchError, match="sharing plan"):
        lora.load(lisa, tmp_path / "dense-lora", "x")
    with pytest.raises(AdapterMismatchError, match="sharing plan"):
        lora.load(dense, tmp_path / "lisa-lora", "x")
    fresh_dense, _ = load_lisa_model("tiny-llama", dense_plan("tiny-llama"))
    lora.load(fresh_dense, tmp_path / "dense-lora", "x")  # and each loads into its own kind of backbone


def test_serving_backbone_is_pruned_loads_the_general_adapter_and_reports_memory(tiny, tmp_path):
    from adapters_hub.backbone import GENERAL, load_lisa_model
    from adapters_hub.kinds import get_kind
    from adapters_hub.lisa import SharingPlan
    from sdk.hotswap import Backbone

    plan = SharingPlan.for_model(tiny[0], [2, 3, 5])
    trained, _ = load_lisa_model("tiny-llama", plan)
    get_kind("lisa").add(trained, "general", {})
    with torch.no_grad():
        for t in trained.adapter_state_dict("general").values():
            t.add_(0.05)
    folder = tmp_path / "backbone"
    plan.save(folder / "plan.json")
    trained.save_adapter(folder / "adapter", "general")
    lora_dir = tmp_path / "lora"
    get_kind("lora").add(trained, "lora", {})  # LoRA on q_proj of substituted layers too
    get_kind("lora").save(trained, "lora", lora_dir)

    bb = Backbone.load(base_model="tiny-llama", plan_path=folder)
    assert bb.lm.pruned and bb.lm.active_adapter == GENERAL
    assert all(layer.q_proj is None for layer in bb.lm.lisa_layers.values())
    report = bb.memory_report()
    unpruned = Backbone.load(base_model="tiny-llama", plan_path=folder, prune=False).memory_report()
    assert report["parameter_bytes"] < unpruned["parameter_bytes"]
    assert report["kv_bytes_per_token"] < report["dense_kv_bytes_per_token"]
    ids = calib(1, 10)
    trained.set_adapter("general")
    get_kind("lora").deactivate(trained, "lora")
    with torch.no_grad():  # the pruned serving backbone computes what the training one did
        torch.testing.assert_close(bb.lm(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    bb.use(str(lora_dir))  # a LoRA adapter of the LiSA backbone still loads on the pruned one
    half = Backbone.load(base_model="tiny-llama", plan_path=folder, dtype="bfloat16").memory_report()
    assert half["kv_bytes_per_token"] * 2 == report["kv_bytes_per_token"]


def test_planner_judging_converted_quality_takes_the_longest_prefix_the_prediction_allows():
    """Constructed table: local-init probes of each prefix; the budget 5% admits 2 layers by
    the probe itself, 4 by the converted prediction with exponent 0.5 (1.09 ** 0.5 = 1.044)."""
    from adapters_hub.lisa.plan import predicted_converted_ppl

    probes = {0: 10.0, 1: 10.2, 2: 10.45, 3: 10.7, 4: 10.9, 5: 11.3, 6: 12.0, 7: 13.0, 8: 15.0, 9: 20.0}
    seen = []

    def probe(layers):
        seen.append(len(layers))
        return probes[len(layers)]

    by_init = choose_layers(SENS, num_layers=10, max_ppl_increase=0.05, base_ppl=10.0, combined_ppl=probe)
    by_converted = choose_layers(SENS, num_layers=10, max_ppl_increase=0.05, base_ppl=10.0,
                                 combined_ppl=lambda l: predicted_converted_ppl(probe(l), 10.0, 0.5))
    assert by_init == [2, 3]                 # 10.45 <= 10.5 < 10.7
    assert by_converted == [2, 3, 5, 6]      # 10 * 1.09 ** 0.5 = 10.44 <= 10.5 < 10 * 1.13 ** 0.5 = 10.63
    assert predicted_converted_ppl(12.0, 10.0, 1.0) == pytest.approx(12.0)
    with pytest.raises(PlanError, match="planner_exponent"):
        predicted_converted_ppl(12.0, 10.0, 0)
