"""The fast LiSA attention path (factored scores, SDPA) equals the reference path, which
materialises every score tensor. Tiny LLaMA: GQA with 4 query heads and 2 KV heads."""

from __future__ import annotations

import pytest
import torch

from adapters_hub.lisa import LisaConfig
from tests.test_lisa_model import SHARED, make, padded_batch, randomize


def both_paths(lm, fn):
    """fn() on the fast path and on the reference path."""
    lm.fast_path = True
    fast = fn()
    lm.fast_path = False
    ref = fn()
    lm.fast_path = True
    return fast, ref


def prefill_and_decode(lm, ids, mask, steps, adapter_names=None):
    """Logits of a left-padded prefill then cached single-token steps, (B, 1 + n, V)."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=lm.config)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                 adapter_names=adapter_names)
        logits = [out.logits]
        for s in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=torch.long)], dim=1)
            pos = pos[:, -1:] + 1
            out = lm(input_ids=steps[:, s : s + 1], attention_mask=mask, position_ids=pos,
                     past_key_values=cache, use_cache=True, adapter_names=adapter_names)
            logits.append(out.logits)
    return torch.cat(logits, dim=1), mask


@pytest.mark.parametrize("attn,kernel", [("sdpa", "blocks"), ("eager", "blocks"), ("sdpa", "fused")])
def test_fast_path_equals_reference_with_left_padding_and_cache(tiny, attn, kernel):
    lm = make(tiny)
    lm.model.set_attn_implementation(attn)
    lm.fast_kernel = kernel
    lm.eval()
    randomize(lm)
    _, ids, mask = padded_batch([11, 7, 4])
    steps = torch.randint(3, 259, (3, 4), generator=torch.Generator().manual_seed(1))
    (fast, m), (ref, _) = both_paths(lm, lambda: prefill_and_decode(lm, ids, mask, steps))
    keep = m.bool()  # pad positions are not compared: nothing reads them
    assert (fast - ref)[keep].abs().max() < 1e-4


def test_fast_path_is_taken_and_makes_no_score_tensor(tiny):
    lm = make(tiny)
    lm.eval()
    randomize(lm)
    seen = []
    for layer in lm.lisa_layers.values():
        layer.register_forward_hook(lambda mod, args, out: seen.append(out[1]))
    with torch.no_grad():
        lm(input_ids=torch.randint(3, 259, (2, 9)))
    assert len(seen) == len(SHARED) and all(p is None for p in seen)  # no probabilities made
    lm.fast_path = False
    seen.clear()
    with torch.no_grad():
        lm(input_ids=torch.randint(3, 259, (2, 9)))
    assert all(p is not None and p.shape == (2, 4, 9, 9) for p in seen)


def test_fast_path_mixed_adapter_batch_equals_reference(tiny):
    lm = make(tiny)
    lm.eval()
    lm.add_adapter("b", lm.peft_config["default"])
    randomize(lm, "default", seed=0)
    randomize(lm, "b", seed=1)
    _, ids, mask = padded_batch([9, 6, 8, 5])
    steps = torch.randint(3, 259, (4, 3), generator=torch.Generator().manual_seed(2))
    names = ["default", "b", "b", "default"]
    lm.fast_kernel = "fused"
    fused, _ = prefill_and_decode(lm, ids, mask, steps, names)
    lm.fast_kernel = "auto"
    (fast, m), (ref, _) = both_paths(lm, lambda: prefill_and_decode(lm, ids, mask, steps, names))
    assert (fast - ref)[m.bool()].abs().max() < 1e-4 and (fused - ref)[m.bool()].abs().max() < 1e-4
    single, _ = prefill_and_decode(lm, ids[1:2], mask[1:2], steps[1:2], ["b"])  # row 1 alone, adapter b
    assert (fast[1:2] - single)[m[1:2].bool()].abs().max() < 1e-4


def test_ffn_aligner_runs_on_the_reference_path_in_a_fast_model(tiny):
    """An FFN aligner cannot be factored: its layer materialises the donor's factors."""
    lm = make(tiny, aligner="ffn")
    lm.eval()
    randomize(lm)
    ids = torch.randint(3, 259, (2, 10))
    with torch.no_grad():
        fast, ref = both_paths(lm, lambda: lm(input_ids=ids).logits)
    assert (fast - ref).abs().max() < 1e-4


def test_linear_aligner_config_round_trip_and_old_configs_read_as_ffn(tiny):
    lm = make(tiny)
    assert LisaConfig.from_dict(lm.peft_config["default"].to_dict()).aligner == "linear"
    old = lm.peft_config["default"].to_dict()
    del old["aligner"]
    assert LisaConfig.from_dict(old).aligner == "ffn"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefill_in_chunks_through_the_cache_equals_one_prefill(tiny, attn):
    """Chunked prefill (queries 10..16 against a cached prefix: Tq < Tk, offset causal
    mask) gives the logits of the one-shot prefill, on both paths."""
    from transformers import DynamicCache

    lm = make(tiny)
    lm.model.set_attn_implementation(attn)
    lm.eval()
    randomize(lm)
    ids = torch.randint(3, 259, (2, 17), generator=torch.Generator().manual_seed(5))

    def chunked():
        with torch.no_grad():
            cache = DynamicCache(config=lm.config)
            first = lm(input_ids=ids[:, :10], past_key_values=cache, use_cache=True).logits
            second = lm(input_ids=ids[:, 10:], past_key_values=cache, use_cache=True).logits
        return torch.cat([first, second], dim=1)

    with torch.no_grad():
        whole = lm(input_ids=ids, use_cache=False).logits
    fast, ref = both_paths(lm, chunked)
    assert (fast - whole).abs().max() < 1e-4 and (ref - whole).abs().max() < 1e-4


@pytest.mark.parametrize("per_row", [False, True])
def test_blockwise_and_fused_attention_over_factors_agree_with_materialised_scores(per_row):
    """ScoreFactors.attend (CPU: query blocks, root mixed in score space) and attend_fused
    (GPU: one SDPA over per-kv-head queries) both equal softmax(materialize() + mask) V."""
    from adapters_hub.lisa.factors import ScoreFactors
    from adapters_hub.lisa.scores import additive_mask, gqa_apply

    g = torch.Generator().manual_seed(0)
    b, h, j, t, d, r = 2, 6, 3, 37, 8, 2
    f = ScoreFactors.own(torch.randn(b, h, t, d, generator=g), torch.randn(b, j, t, d, generator=g), d**-0.5)
    for _ in range(2):  # a chain of two substituted layers
        w = torch.randn(b, h, h, generator=g) if per_row else torch.randn(h, h, generator=g)
        f = f.mix(w / h**0.5).plus_lowrank(torch.randn(b, h, t, r, generator=g), torch.randn(b, j, t, r, generator=g),
                                           r**-0.5)
    v = torch.randn(b, j, t, d, generator=g)
    expect = gqa_apply(torch.softmax(f.materialize() + additive_mask(None, t, t, "cpu"), -1), v)
    blocks = f.attend(v, None, True, chunk_bytes=4 * b * h * t * 5)  # 5 query rows a block
    fused = f.attend_fused(v, None, True)
    torch.testing.assert_close(blocks, expect, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused, expect, atol=1e-5, rtol=1e-4)
    pad = torch.ones(b, t, dtype=torch.bool)
    pad[0, :4] = False  # left padding in row 0
    allowed = pad[:, None, None, :] & torch.ones(t, t, dtype=torch.bool).tril()
    add = torch.zeros(()).masked_fill(~allowed, torch.finfo(torch.float32).min)
    expect = gqa_apply(torch.softmax(f.materialize() + add, -1), v)
    torch.testing.assert_close(f.attend(v, add, False, chunk_bytes=4 * b * h * t * 7), expect, atol=1e-5, rtol=1e-4)


def test_disabled_adapters_on_the_fast_path_give_the_dense_model(tiny):
    """The distillation teacher (adapters disabled) runs on the fast path and is the base."""
    lm = make(tiny)
    lm.eval()
    randomize(lm)
    ids = torch.randint(3, 259, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), lm.disable_adapter():
        fast, ref = both_paths(lm, lambda: lm(input_ids=ids).logits)
        base = tiny[0](input_ids=ids).logits
    assert (fast - base).abs().max() < 1e-4 and (ref - base).abs().max() < 1e-4


def test_the_route_is_bound_by_train_eval_and_distillation_not_chosen_per_call(tiny):
    from adapters_hub.lisa.distill import distillation

    lm = make(tiny)
    routes = lambda: {a.route for a in lm._patch.wrapped()}  # noqa: E731
    lm.eval()
    assert routes() == {"blocks"}  # CPU: "auto" binds the query-block kernel
    with torch.enable_grad():  # a pass with grad on does not change the binding
        lm(input_ids=torch.randint(3, 259, (1, 5)))
    assert routes() == {"blocks"}
    lm.train()
    assert routes() == {"reference"}
    lm.eval()
    lm.fast_kernel = "fused"
    assert routes() == {"fused"}
    with distillation(lm):  # the collector reads Z: reference while it is on
        assert routes() == {"reference"}
    assert routes() == {"fused"}
    lm.fast_path = False
    assert routes() == {"reference"}
    lm.fast_path = True
    lm.bus.observer = lambda layer, probs, mask: None  # set behind the layers' back: refused, not silently wrong
    with pytest.raises(RuntimeError, match="fast route"):
        with torch.no_grad():
            lm(input_ids=torch.randint(3, 259, (1, 5)))
    lm.bind_routes()
    assert routes() == {"reference"}
