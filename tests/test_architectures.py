"""LiSA on every supported model family (tiny random models built from transformers configs):
the fast path equals the reference path, the dense donors are the base, adapters round-trip;
unsupported families are refused at once with the supported list."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from adapters_hub import architectures
from adapters_hub.lisa import LisaConfig, LisaModel, SharingPlan
from adapters_hub.lisa.plan import PlanError, attention_kinds, shareable_layers
from tests.test_lisa_fast import both_paths, prefill_and_decode
from tests.test_lisa_model import padded_batch, randomize

COMMON = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, initializer_range=0.1,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
FAMILIES = {  # model_type -> (config class, model class, what differs from LLaMA)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 6,
                                                  "max_window_layers": 3}),  # q/k/v biases; layers 3-5 windowed
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),  # q_norm / k_norm before RoPE
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",  # q/k norms, local + global RoPE, 1 KV head
                    {"num_key_value_heads": 1, "sliding_window": 6, "query_pre_attn_scalar": 16}),
}


def tiny(family: str, **overrides):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
        return getattr(transformers, model_cls)(config).eval()


def lisa(base, layers=None):
    """A LiSA model of `base`, three layers shared (each with the donor below of its own kind)."""
    model = copy.deepcopy(base)
    layers = layers or shareable_layers(model.config.num_hidden_layers, attention_kinds(model.config))[:3]
    lm = LisaModel(model, LisaConfig(plan=SharingPlan.for_model(model, list(layers))))
    lm.eval()
    randomize(lm)
    return lm


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_equals_reference_with_left_padding_cache_and_windows(family):
    lm = lisa(tiny(family))
    _, ids, mask = padded_batch([14, 9, 4])  # longer than the windows
    steps = torch.randint(3, 259, (3, 4), generator=torch.Generator().manual_seed(1))
    (fast, m), (ref, _) = both_paths(lm, lambda: prefill_and_decode(lm, ids, mask, steps))
    assert (fast - ref)[m.bool()].abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_donors_are_the_base_and_an_adapter_round_trips(family, tmp_path):
    base = tiny(family)
    lm = lisa(base)
    ids = torch.randint(3, 259, (2, 13), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        with lm.disable_adapter():
            fast, ref = both_paths(lm, lambda: lm(input_ids=ids).logits)
        plain = base(input_ids=ids).logits
        shared = lm(input_ids=ids).logits
    assert (fast - plain).abs().max() < 1e-4 and (ref - plain).abs().max() < 1e-4
    assert (shared - plain).abs().max() > 1e-3  # the shared layers really changed something
    lm.save_adapter(tmp_path / "a", lm.active_adapter)
    again = LisaModel(copy.deepcopy(base), LisaConfig(plan=lm.plan))
    again.load_adapter(tmp_path / "a", "a")
    again.set_adapter("a")
    again.eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, shared, atol=1e-5)


def test_a_plan_made_for_one_family_is_refused_by_another_and_no_donor_crosses_a_window_boundary():
    plan = SharingPlan.for_model(tiny("mistral"), [2])
    with pytest.raises(PlanError, match="model_type: the plan was made for a mistral model, this one is qwen2"):
        LisaModel(tiny("qwen2"), LisaConfig(plan=plan))
    model = tiny("qwen2")
    with pytest.raises(PlanError, match=r"layer 3 \(sliding_attention\) cannot take the scores of layer 2"):
        LisaModel(model, LisaConfig(plan=SharingPlan.for_model(model, [3])))


@pytest.mark.parametrize("config_cls, model_type", [("Phi3Config", "phi3"), ("GPT2Config", "gpt2"),
                                                    ("FalconConfig", "falcon")])
def test_unsupported_families_are_refused_at_once_with_the_supported_list(config_cls, model_type):
    import transformers

    config = getattr(transformers, config_cls)()
    start = time.perf_counter()
    with pytest.raises(architectures.UnsupportedArchitectureError,
                       match=f"model type '{model_type}'.*supported: llama, mistral, qwen2, qwen3, gemma3_text"):
        architectures.check(config)
    assert time.perf_counter() - start < 1.0
    if model_type == "phi3":  # the model wrapper refuses before touching a module
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**COMMON))
        with pytest.raises(architectures.UnsupportedArchitectureError, match="qkv_proj"):
            LisaModel(model, LisaConfig(plan=SharingPlan.for_model(model, [2])))
        assert type(model.model.layers[2].self_attn).__name__ == "Phi3Attention"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_trainable_kind_mixes_per_row_on_every_family(family):
    from adapters_hub import multi_lora
    from adapters_hub.kinds import get_kind
    from adapters_hub.multi_lora import LoraParts

    lm = lisa(tiny(family))
    get_kind("lisa").add(lm, "parts", {"lora_parts": LoraParts(r=2)})
    get_kind("lora").add(lm, "lora", {"r": 2, "target_modules": ["q_proj", "v_proj", "mlp"]})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if any(part in ("parts", "lora") for part in name.split(".")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    multi_lora.changed(lm.get_base_model())
    lm.eval()
    _, ids, mask = padded_batch([9, 5, 7])
    names = ["parts", "lora", lm.active_adapter]
    with torch.no_grad():
        (fast, ref) = both_paths(lm, lambda: lm(input_ids=ids, attention_mask=mask, adapter_names=names).logits)
        assert (fast - ref)[mask.bool()].abs().max() < 1e-4
        for i, name in enumerate(names):
            alone = lm(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], adapter_names=[name]).logits
            assert (fast[i][mask[i].bool()] - alone[0][mask[i].bool()]).abs().max() < 1e-4, name
            if name != lm.active_adapter:  # the row's adapter really acts: the bare backbone differs
                bare = lm(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1],
                          adapter_names=[lm.active_adapter]).logits
                assert (alone - bare).abs().max() > 1e-3, name


def test_analysis_and_scan_never_offer_a_layer_whose_predecessor_has_another_attention_kind():
    """Gemma 3 mixes sliding and full layers: with 8 layers, 0-4 and 6-7 slide and 5 is full,
    so 5 (donor 4 slides) and 6 (donor 5 is full) cannot share their predecessor's scores."""
    from adapters_hub.lisa.analysis import AttentionReport, analyze_attention, layer_sensitivity

    model = tiny("gemma3_text", num_hidden_layers=8)
    kinds = attention_kinds(model.config)
    assert kinds[5] == "full_attention" and kinds.count("full_attention") == 1
    assert shareable_layers(8, kinds) == [1, 2, 3, 4, 7]
    assert attention_kinds(tiny("llama").config) is None and shareable_layers(4) == [1, 2, 3]
    blocks = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(3))
    report = analyze_attention(model, blocks, progress=False)
    assert AttentionReport.from_dict(report.to_dict()).layer_types == kinds  # the plan choice survives a reload
    plan = SharingPlan.from_report(report, fraction=0.6, protect_first=1)  # 4 of the 5 shareable layers
    assert len(plan.layers) == 4 and not set(plan.layers) & {5, 6}
    plan.check_model(model)
    _, sens = layer_sensitivity(model, report, blocks, progress=False)
    assert sorted(sens) == [1, 2, 3, 4, 7]


def test_local_init_masks_each_layer_as_the_model_does():
    """Local initialisation fits a layer to its own attention: the mask it uses (causal, plus
    the window of a sliding layer) is the one transformers hands that layer."""
    from adapters_hub.lisa.local_init import _window, _windowed
    from adapters_hub.lisa.scores import additive_mask

    model = tiny("gemma3_text", attn_implementation="eager")  # eager: every layer gets its explicit mask
    seen = {}
    layers = model.model.layers
    handles = [layers[l].self_attn.register_forward_pre_hook(
        lambda m, a, kw, l=l: seen.update({l: kw["attention_mask"]}), with_kwargs=True) for l in (0, 5)]
    with torch.no_grad():
        model(input_ids=torch.randint(3, 259, (1, 16), generator=torch.Generator().manual_seed(0)))
    for h in handles:
        h.remove()
    causal = additive_mask(None, 16, 16, "cpu")
    assert _window(model.config, 0) == 6 and _window(model.config, 5) is None
    for l in (0, 5):
        ours = _windowed(causal, _window(model.config, l)) > torch.finfo(torch.float32).min / 2
        assert torch.equal(ours[0, 0], seen[l][0, 0] > torch.finfo(seen[l].dtype).min / 2), l


@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_fits_heals_and_merges_on_every_family(family, tmp_path):
    """The conversion's steps on each family: local initialisation lowers every fitted layer's
    attention KL, self-distillation with healing lowers the KD loss, and the served backbone
    (healing merged into a fresh copy of the base, W_q/W_k pruned) gives the trained logits."""
    from adapters_hub.lisa import healing
    from adapters_hub.lisa.convert import self_distill, self_distillation_loss
    from adapters_hub.lisa.local_init import local_init

    base = tiny(family)
    layers = shareable_layers(6, attention_kinds(base.config))[:3]
    lm = LisaModel(copy.deepcopy(base), LisaConfig(plan=SharingPlan.for_model(base, layers)))
    blocks = torch.randint(3, 259, (32, 16), generator=torch.Generator().manual_seed(5))  # longer than the windows
    torch.manual_seed(0)  # the rank-r keys start random
    fits = local_init(lm, blocks, steps=100, lr=1e-2, log=None)
    assert sorted(f.layer for f in fits) == sorted(layers)
    assert all(f.kl_after < f.kl_before for f in fits), fits
    healing.attach(lm.model, healing.HealingConfig(rank=2), shared_layers=lm.plan.layers)
    with torch.no_grad():
        before = self_distillation_loss(lm, blocks)[1]["kd"]
    torch.manual_seed(0)
    self_distill(lm, blocks, minutes=5, max_steps=24, batch_size=4, lr=2e-3, heal_lr=1e-3)
    with torch.no_grad():
        after = self_distillation_loss(lm, blocks)[1]["kd"]
    assert after < before, (before, after)

    lm.save_adapter(tmp_path / "adapter")
    folder = healing.save(lm.model, tmp_path / "healing")
    _, ids, mask = padded_batch([12, 7])
    lm.eval()
    with torch.no_grad():
        want = lm(input_ids=ids, attention_mask=mask).logits
    served = copy.deepcopy(base)
    healing.merge(served, folder)
    slm = LisaModel(served, LisaConfig(plan=lm.plan), adapter_name="fresh", fingerprint=lm.base_fingerprint)
    slm.load_adapter(tmp_path / "adapter", "general", activate=True)
    slm.prune_qk()
    slm.eval()
    for fast in (False, True):
        slm.fast_path = fast
        with torch.no_grad():
            got = slm(input_ids=ids, attention_mask=mask).logits
        assert (got - want)[mask.bool()].abs().max() < 1e-4, fast


# Attention drop skips a layer's whole attention branch and renumbers the kept layers' cache
# slots: sound only for x + attn(norm(x)); h + mlp(norm(h)) layers whose caches are all of one kind.
DROP_REFUSED = {"gemma3_text": "post_feedforward_layernorm",  # extra norms around each branch
                "qwen2": "mixes"}                                # sliding and full layers in this config


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_drop_on_every_family_or_a_refusal_before_any_change(family):
    """Where the attn_drop kind applies, a dropped layer's attention is exactly an attention with
    no output (o_proj zeroed), cached decoding equals the full forward and restore is exact;
    where it does not (DROP_REFUSED), it is refused with the reason and the model is left
    untouched, and a hybrid plan's dropped layer decodes with its cache instead."""
    from adapters_hub.drop import DropPlan, active_plan, apply_drop, restore
    from tests.test_drop_model import _cached_logits

    model = tiny(family)
    plan = DropPlan(num_layers=6, target="attn", attn=(2,))
    ids = torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    if family in DROP_REFUSED:
        with pytest.raises(NotImplementedError, match=DROP_REFUSED[family]):
            apply_drop(model, plan)
        assert active_plan(model) is None and "forward" not in model.model.layers[2].__dict__
        # there, a hybrid plan's dropped layer drops attention instead: cache slots stay put
        lm = LisaModel(copy.deepcopy(model), LisaConfig(plan=SharingPlan.for_model(model, [], dropped=[4])))
        model = lm.eval()
    else:
        reference = copy.deepcopy(model)
        with torch.no_grad():
            reference.model.layers[2].self_attn.o_proj.weight.zero_()
        apply_drop(model, plan)
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        assert (full - dense).abs().max() > 1e-3  # the dropped attention really is gone
        assert torch.allclose(_cached_logits(model, ids, prefill=12), full, atol=1e-5)
    if family in DROP_REFUSED:
        return
    restore(model)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-6)
