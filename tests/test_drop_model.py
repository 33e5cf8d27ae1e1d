"""Importance, applying/restoring plans, the KV cache, generate, the adapter folder, the CLI.
On the tiny LLaMA (6 layers, GQA); one slow test on SmolLM2-135M."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from adapters_hub.drop import (AdapterMismatchError, DropAdapter, DropPlan, active_plan, apply_drop, cache_bytes,
                               iterative_plan, kv_cache_bytes_per_token, layer_importance, module_importance,
                               restore)
from tests.conftest import needs_data

PLANS = {
    "attn": DropPlan(6, "attn", attn=(0, 3)),             # layer 0 too: cache slots must be renumbered
    "joint": DropPlan(6, "joint", attn=(1, 5), mlp=(2, 5)),
    "block": DropPlan(6, "block", block=(0, 4)),
}


@pytest.fixture
def model(tiny):
    return copy.deepcopy(tiny[0])


def _ids(shape, seed=0):
    return torch.randint(3, 259, shape, generator=torch.Generator().manual_seed(seed))


# -- importance ---------------------------------------------------------------------------------

def _reference_importance(model, ids, mask):
    """Straightforward: one full forward, forward hooks record each module's input X (the
    residual before its norm) and output F, then 1 - cos(X, X + F) averaged over real tokens."""
    rec: dict = {}

    def save(name, what):
        def hook(module, args, kwargs, output):
            rec[(name, "in")] = args[0] if args else kwargs["hidden_states"]
            rec[(name, what)] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles += [
            layer.input_layernorm.register_forward_hook(save(("attn_x", i), "out"), with_kwargs=True),
            layer.self_attn.register_forward_hook(save(("attn", i), "out"), with_kwargs=True),
            layer.post_attention_layernorm.register_forward_hook(save(("mlp_x", i), "out"), with_kwargs=True),
            layer.mlp.register_forward_hook(save(("mlp", i), "out"), with_kwargs=True),
            layer.register_forward_hook(save(("block", i), "out"), with_kwargs=True),
        ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()

    w = mask.double()
    def imp(x, y):
        cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
        return 1 - ((cos * w).sum() / w.sum()).item()

    n = len(model.model.layers)
    return {
        "attn": [imp(rec[(("attn_x", i), "in")], rec[(("attn_x", i), "in")] + rec[(("attn", i), "out")]) for i in range(n)],
        "mlp": [imp(rec[(("mlp_x", i), "in")], rec[(("mlp_x", i), "in")] + rec[(("mlp", i), "out")]) for i in range(n)],
        "block": [imp(rec[(("block", i), "in")], rec[(("block", i), "out")]) for i in range(n)],
    }


def test_importance_matches_straightforward_computation(model):
    ids = _ids((3, 24))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding: excluded from the mean
    mask[2, 7:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    ref = _reference_importance(model, ids, mask)
    got = module_importance(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    for kind in ("attn", "mlp", "block"):
        assert got[kind] == pytest.approx(ref[kind], abs=1e-6), kind
    assert layer_importance(model, [{"input_ids": ids, "attention_mask": mask}], "mlp", progress=False) == got["mlp"]
    # The scores vary by layer (a constant would pass a loose check), all in (0, 2].
    assert len(set(round(v, 4) for v in got["attn"])) == 6 and all(0 < v <= 2 for v in got["attn"])


def test_importance_ignores_padding(model):
    # Right padding cannot change the real tokens (causal attention), so padded batches must give
    # the same importance as the unpadded pieces; counting pad tokens would change the means.
    a, b = _ids((1, 20), seed=1), _ids((1, 9), seed=2)
    padded = torch.zeros(2, 20, dtype=torch.long)
    padded[0], padded[1, :9] = a[0], b[0]
    mask = (torch.arange(20) < torch.tensor([[20], [9]])).long()
    got = module_importance(model, [{"input_ids": padded, "attention_mask": mask}], progress=False)
    want = module_importance(model, [a, b], progress=False)
    for kind in got:
        assert got[kind] == pytest.approx(want[kind], abs=1e-6)
    with pytest.raises(ValueError, match="padding"):
        module_importance(model, [{"input_ids": padded, "attention_mask": torch.zeros_like(mask)}], progress=False)


def test_importance_on_dropped_model_and_iterative_plan(model):
    ids = _ids((4, 32))
    base = module_importance(model, ids, progress=False)
    history: list = []
    plan = iterative_plan(model, ids, n=2, target="attn", progress=False, history=history)
    assert active_plan(model) is None  # restored after measuring
    first = min(range(6), key=lambda i: base["attn"][i])
    assert plan.order[0] == ("attn", first) and history[0] == base
    # Round 2 was measured on the model with `first` dropped: that module scores 0, and the
    # pick is the least important of the others *in the dropped model*.
    apply_drop(model, DropPlan(6, attn=(first,)))
    again = module_importance(model, ids, progress=False)
    restore(model)
    assert again == history[1] and again["attn"][first] == 0.0
    assert plan.order[1] == ("attn", min((i for i in range(6) if i != first), key=lambda i: again["attn"][i]))


# -- applying a plan ------------------------------------------------------------------------------

def _zeroed_reference(model, plan):
    """Dropping a branch == zeroing the projection that writes it into the residual stream."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            if plan.skips_attention(i):
                layer.self_attn.o_proj.weight.zero_()
            if plan.skips_mlp(i):
                layer.mlp.down_proj.weight.zero_()
    return ref


@pytest.mark.parametrize("name", list(PLANS))
def test_apply_matches_zeroed_branches_and_cached_decoding(model, name):
    plan = PLANS[name]
    ids = _ids((2, 24))
    ref_logits = _zeroed_reference(model, plan)(ids).logits
    apply_drop(model, plan)
    full = model(ids).logits
    assert torch.allclose(full, ref_logits, atol=1e-5)

    assert torch.allclose(_cached_logits(model, ids), full, atol=1e-5)


def _cached_logits(model, ids, prefill=16):
    """Prefill `prefill` tokens, then decode the rest one at a time with the KV cache."""
    out = model(ids[:, :prefill], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


def test_dropped_attention_computes_nothing_and_caches_nothing(model):
    plan = PLANS["attn"]
    calls = []
    for i, layer in enumerate(model.model.layers):
        for name in ("input_layernorm", "self_attn"):
            getattr(layer, name).register_forward_hook(lambda *a, i=i, name=name: calls.append((i, name)))
    apply_drop(model, plan)
    cache = model(_ids((2, 10)), use_cache=True).past_key_values
    assert {i for i, _ in calls} == {1, 2, 4, 5}  # neither the norm nor the attention of 0 and 3 ran
    held = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]
    assert len(held) == 4  # one K/V pair per kept attention layer, nothing for dropped ones
    cfg = model.config
    per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # K and V, float32, per token
    assert cache_bytes(cache) == 4 * per_layer * 2 * 10
    assert kv_cache_bytes_per_token(model) == 4 * per_layer
    restore(model)
    assert kv_cache_bytes_per_token(model) == 6 * per_layer


def test_mlp_drop_keeps_the_cache(model):
    apply_drop(model, DropPlan(6, "mlp", mlp=(0, 1, 2)))
    cfg = model.config
    assert kv_cache_bytes_per_token(model) == 6 * 2 * cfg.num_key_value_heads * cfg.head_dim * 4


@pytest.mark.parametrize("name", ["attn", "block"])
def test_generate_with_cache(model, name):
    plan = PLANS[name]
    prompt = _ids((1, 12))
    ref = _zeroed_reference(model, plan)
    apply_drop(model, plan)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, **kwargs)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kwargs))
    assert torch.equal(cached, ref.generate(prompt, **kwargs))


def test_restore_is_exact(model):
    ids = _ids((2, 20))
    before = model(ids, output_hidden_states=True)  # installs transformers' output hooks first
    for plan in PLANS.values():
        apply_drop(model, plan)
        dropped = model(ids, output_hidden_states=True)
        assert len(dropped.hidden_states) == 7  # hooks still fire on every layer
        assert not torch.allclose(dropped.logits, before.logits)
        assert restore(model) == plan
        after = model(ids, output_hidden_states=True)
        assert torch.equal(after.logits, before.logits)
        assert all(torch.equal(a, b) for a, b in zip(after.hidden_states, before.hidden_states))
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(6))
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert restore(model) is None


def test_apply_refuses_bad_use(model):
    with pytest.raises(ValueError, match="DropPlan.num_layers"):
        apply_drop(model, DropPlan(30, attn=(1,)))
    apply_drop(model, PLANS["attn"])
    with pytest.raises(RuntimeError, match="already applied"):
        apply_drop(model, PLANS["block"])


def test_non_llama_layer_refused(model):
    model.model.layers[2].post_feedforward_layernorm = torch.nn.Identity()  # a Gemma2-like extra norm
    with pytest.raises(NotImplementedError, match="decoder layer 2"):
        apply_drop(model, PLANS["attn"])
    assert active_plan(model) is None


# -- adapter folder ---------------------------------------------------------------------------------

def test_adapter_save_load_activate(model, tmp_path):
    from adapters_hub.models import fingerprint

    plan = PLANS["joint"]
    adapter = DropAdapter.for_model(model, plan)
    adapter.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json"]  # no tensors
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert data["kind"] == "attn_drop" and data["base_model"] == "tiny-llama"
    assert data["base_fingerprint"] == fingerprint(model) and data["plan_hash"] == plan.hash()
    assert DropPlan.from_dict(data["plan"]) == plan

    loaded = DropAdapter.load(tmp_path / "a", model=model)
    assert loaded.plan == plan
    ids = _ids((1, 16))
    base = model(ids).logits
    loaded.activate(model)
    assert active_plan(model) == plan and fingerprint(model) == data["base_fingerprint"]
    assert not torch.allclose(model(ids).logits, base)
    loaded.deactivate(model)
    assert torch.equal(model(ids).logits, base)


def test_adapter_refuses_another_base(model, tmp_path):
    DropAdapter.for_model(model, PLANS["attn"]).save(tmp_path)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        DropAdapter.load(tmp_path, model=other)
    adapter = DropAdapter.load(tmp_path)
    with pytest.raises(AdapterMismatchError):
        adapter.activate(other)
    assert active_plan(other) is None

    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["plan"]["attn"] = [0, 4]  # edited by hand: the stored hash no longer matches
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="plan_hash"):
        DropAdapter.load(tmp_path)


# -- CLI ------------------------------------------------------------------------------------------

@needs_data("tinyshakespeare/input.txt")
def test_cli_writes_scores_chart_and_adapter(tmp_path, capsys):
    from sdk.cli import main

    out = tmp_path / "plan"
    rc = main(["drop", "--base", "tiny-llama", "--target", "attn", "--n", "2", "--iterative",
               "--data", "tinyshakespeare", "--blocks", "2", "--block-len", "32", "--out", str(out)])
    assert rc == 0
    adapter = DropAdapter.load(out)
    assert len(adapter.plan.attn) == 2 and adapter.plan.method == "iterative"
    scores = json.loads((out / "importance.json").read_text())
    assert len(scores["rounds"]) == 2 and len(scores["rounds"][0]["attn"]) == 6
    assert (out / "importance.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["drop", "--base", "tiny-llama", "--n", "7", "--data", "tinyshakespeare", "--blocks", "1",
                 "--block-len", "16", "--out", str(tmp_path / "x")]) == 2
    assert "n: 7 is larger" in capsys.readouterr().err


# -- SmolLM2 ------------------------------------------------------------------------------------------

@pytest.mark.slow
@needs_data("wikitext2/test.raw.txt")
def test_smollm2_attention_drop():
    from adapters_hub.data import load_text
    from adapters_hub.drop import calibration_blocks
    from adapters_hub.models import load_base

    model, tok = load_base("smollm2-135m")
    calib = calibration_blocks(tok, load_text("wikitext2"), n_blocks=2, block_len=64, skip_tokens=8192)
    scores = layer_importance(model, calib, "attn", progress=False)
    plan = DropPlan.top_n(scores, n=8, target="attn")
    # The score means something: dropping the 8 least important attention layers hurts
    # held-out text (first 2 x 256 tokens, not the calibration text) far less than dropping
    # the 8 most important. (Which layers go first is a measurement: benchmarks/drop_smollm2.py.)
    from adapters_hub.evaluation import perplexity

    held_out = calibration_blocks(tok, load_text("wikitext2"), n_blocks=2, block_len=256)
    most = DropPlan.top_n([-s for s in scores], n=8, target="attn")
    ppl = {}
    for name, p in (("least", plan), ("most", most)):
        apply_drop(model, p)
        ppl[name] = perplexity(model, held_out, progress=False)
        restore(model)
    assert ppl["least"] * 2 < ppl["most"], ppl
    ids = calib[:1, :24]
    base = model(ids).logits
    apply_drop(model, plan)
    full = model(ids).logits
    assert torch.allclose(_cached_logits(model, ids), full, atol=1e-4)
    cfg = model.config
    assert kv_cache_bytes_per_token(model) == 22 * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    restore(model)
    assert torch.equal(model(ids).logits, base)


def test_attention_drop_on_a_pruned_lisa_backbone_keeps_scores_and_cache_apart(tmp_path):
    """An attn_drop adapter on a LiSA backbone: dropping layer 0's attention renumbers the KV
    cache slots of the kept layers, while the score bus stays keyed by layer (a consumer's
    donor is a layer, not a slot); activation trusts the load-time check, since a pruned
    backbone's own weights fingerprint differently. Same logits as zeroing layer 0's o_proj
    (no attention output), and cached decoding equals the full forward."""
    from adapters_hub.kinds import get_kind
    from adapters_hub.models import load_base
    from tests.test_lisa_model import make, randomize

    tiny = load_base("tiny-llama")
    plan = DropPlan(num_layers=6, target="attn", attn=(0,))
    DropAdapter.for_model(tiny[0], plan).save(tmp_path / "drop0")
    lm = make(tiny)  # layers 2, 3, 5 shared; donors 1, 2, 4
    randomize(lm, scale=0.1)
    reference = copy.deepcopy(lm)
    with torch.no_grad():
        reference.model.model.layers[0].self_attn.o_proj.weight.zero_()
    lm.prune_qk()
    kind = get_kind("attn_drop")
    kind.load(lm, tmp_path / "drop0", "drop0")
    kind.activate(lm, "drop0")
    lm.eval()
    reference.eval()
    ids = _ids((2, 24))
    with torch.no_grad():
        full = lm(input_ids=ids).logits
        assert torch.allclose(full, reference(input_ids=ids).logits, atol=1e-5)
        assert torch.allclose(_cached_logits(lm, ids), full, atol=1e-5)
    kind.deactivate(lm, "drop0")
    assert active_plan(lm.get_base_model()) is None
