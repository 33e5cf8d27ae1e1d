"""LiSA backbone and adapters on the tiny LLaMA (GQA: 4 query heads, 2 KV heads, head_dim 16)."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters_hub.lisa import AdapterMismatchError, LisaConfig, LisaModel, SharingPlan, distillation
from adapters_hub.lisa.layer import LisaAttention

SHARED = [2, 3, 5]  # 3 follows 2: a LiSA layer is the donor of a LiSA layer (chained sharing)
PERMS = {2: [1, 0, 3, 2], 3: [2, 3, 0, 1], 5: [0, 2, 1, 3]}


def make(tiny, layers=SHARED, perms=PERMS, **cfg):
    model = copy.deepcopy(tiny[0])
    plan = SharingPlan.for_model(model, layers, perms={l: p for l, p in perms.items() if l in layers})
    return LisaModel(model, LisaConfig(plan=plan, **cfg))


def randomize(lm, name=None, seed=0, scale=0.3):
    """Give an adapter non-trivial weights (a fresh one is exactly the permuted donor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lm.adapter_state_dict(name).values():
            t.copy_(torch.randn(t.shape, generator=g) * scale)


def padded_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 259, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return rows, ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_kv_cache_decoding_matches_full_forward_with_left_padding(tiny, attn):
    from transformers import DynamicCache

    lm = make(tiny)
    lm.model.set_attn_implementation(attn)
    randomize(lm)
    rows, ids, mask = padded_batch([11, 7, 4])
    steps = torch.randint(3, 259, (len(rows), 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = DynamicCache(config=lm.config)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        step_logits = [out.logits[:, -1]]
        for s in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            pos = pos[:, -1:] + 1
            out = lm(input_ids=steps[:, s : s + 1], attention_mask=mask, position_ids=pos,
                     past_key_values=cache, use_cache=True)
            step_logits.append(out.logits[:, -1])
        incremental = torch.stack(step_logits, dim=1)  # (B, 1 + steps, V)
        for b, r in enumerate(rows):  # each padded row equals its own unpadded full forward pass
            full = lm(input_ids=torch.cat([r, steps[b]])[None], use_cache=False).logits[0]
            expect = full[len(r) - 1 :]
            torch.testing.assert_close(incremental[b], expect, atol=2e-4, rtol=1e-4)
    # The substituted layers cached rank-r keys, the dense ones full keys.
    layer = lm.lisa_layers[3]
    assert cache.layers[3].keys.shape == (3, 2, 11 + 5, layer.rank)
    assert cache.layers[1].keys.shape == (3, 2, 11 + 5, 16)


def test_generate_with_padding_and_cache_matches_single_rows(tiny):
    lm = make(tiny)
    randomize(lm, scale=0.2)
    rows, ids, mask = padded_batch([9, 5], seed=3)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = lm.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
        for b, r in enumerate(rows):
            single = lm.generate(input_ids=r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), **kw)
            assert torch.equal(batched[b], single[0, len(r):])
            # and generation with the cache equals greedy decoding by full forward passes
            seq = r[None]
            for _ in range(6):
                nxt = lm(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
            assert torch.equal(seq[0, len(r):], single[0, len(r):])


def _attention_probs(lm, ids):
    """Attention probabilities per layer, from the reference path (the fast one makes none)."""
    lm.fast_path = False
    probs = {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, kw_out, i=i: probs.__setitem__(i, kw_out[1]))
             for i, layer in enumerate(lm.model.model.layers)]
    try:
        with torch.no_grad():
            lm(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        lm.fast_path = True
    return probs


def test_fresh_adapter_gives_the_permuted_donor_attention_exactly(tiny):
    lm = make(tiny)
    ids = torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(0))
    probs = _attention_probs(lm, ids)  # layers 1, 2(LiSA), 3(LiSA), 4, 5(LiSA) expose probabilities
    p2 = probs[1][:, PERMS[2]]
    torch.testing.assert_close(probs[2], p2, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs[3], p2[:, PERMS[3]], atol=1e-6, rtol=0)  # chained through layer 2
    torch.testing.assert_close(probs[5], probs[4][:, PERMS[5]], atol=1e-6, rtol=0)
    # ... and a trained adapter does not
    randomize(lm)
    assert (_attention_probs(lm, ids)[2] - p2).abs().max() > 1e-2


def test_save_load_round_trip_switch_and_refusals(tiny, tmp_path):
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    lm = make(tiny)
    randomize(lm, seed=1)
    lm.add_adapter("b", LisaConfig(plan=lm.plan))
    randomize(lm, "b", seed=2)
    with torch.no_grad():
        logits_a = lm(input_ids=ids).logits
        lm.save_adapter(tmp_path / "a", "default")
        lm.set_adapter("b")
        logits_b = lm(input_ids=ids).logits
        lm.set_adapter("default")
        assert torch.equal(lm(input_ids=ids).logits, logits_a)  # switching back restores exactly
    assert (logits_a - logits_b).abs().max() > 1e-3
    saved = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert saved == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert keys and all("lisa_" in k and ".default." not in k for k in keys)  # adapter tensors only

    other = make(tiny)  # a new backbone with the same base and plan
    other.load_adapter(tmp_path / "a", "task", activate=True)
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, logits_a)

    with pytest.raises(AdapterMismatchError) as err:  # another plan
        make(tiny, layers=[2, 3]).load_adapter(tmp_path / "a", "x")
    assert err.value.args[0].startswith("plan:") and lm.plan.hash in str(err.value)
    assert SharingPlan.for_model(tiny[0], [2, 3], perms=PERMS).hash in str(err.value)

    from transformers import LlamaForCausalLM

    from adapters_hub.models import fingerprint, tiny_llama_config

    torch.manual_seed(123)
    other_base = LlamaForCausalLM(tiny_llama_config())
    wrong = LisaModel(other_base, LisaConfig(plan=lm.plan))
    with pytest.raises(AdapterMismatchError) as err:  # another base
        wrong.load_adapter(tmp_path / "a", "x")
    msg = str(err.value)
    assert msg.startswith("base_fingerprint:") and lm.base_fingerprint in msg and wrong.base_fingerprint in msg
    assert lm.base_fingerprint == fingerprint(tiny[0])  # taken on the unmodified base
    assert "x" not in wrong.peft_config  # a refused adapter leaves nothing behind


def test_only_lisa_tensors_get_gradients(tiny):
    lm = make(tiny)
    lm.add_adapter("other", LisaConfig(plan=lm.plan))
    randomize(lm)
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    lm.train()
    lm(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in lm.named_parameters() if p.grad is not None}
    requires = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert with_grad == requires
    assert requires and all("lisa_" in n and ".default." in n for n in requires)
    for n, p in lm.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, n  # every active adapter tensor really learns
    report = lm.trainable_report()
    assert report["trainable"] == sum(p.numel() for p in lm.parameters() if p.requires_grad)
    assert 0 < report["fraction"] < 0.05


def smollm2_config(layers=30):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                       max_position_embeddings=2048, rope_theta=100000.0)


def test_trainable_fraction_on_smollm2_shape_with_60_percent_plan():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # shapes only: parameter counting needs no weights
        model = LlamaForCausalLM(smollm2_config())
    layers = list(range(12, 30))  # 18 of 30 layers = 60%
    lm = LisaModel(model, LisaConfig(plan=SharingPlan.for_model(model, layers)), fingerprint="meta")
    report = lm.trainable_report()
    print(f"SmolLM2 shape, 60% plan: {report['trainable']:,} / {report['total']:,} = {100 * report['fraction']:.3f}%")
    assert report["shared_layers"] == 18
    assert 0.001 < report["fraction"] < 0.02
    # Q/K parameters of a substituted layer vs the dense layer: head_dim / rank = 64 / 10
    layer = lm.lisa_layers[12]
    dense_qk = layer.q_proj.weight.numel() + layer.k_proj.weight.numel()
    lisa_qk = sum(p.numel() for p in layer.lisa_qk["default"].parameters())
    assert dense_qk / lisa_qk >= 6.0
    freed = lm.prune_qk()
    assert freed == 18 * dense_qk and layer.q_proj is None


@pytest.mark.parametrize("shape", ["tiny", "smollm2-3-layers"])
def test_qk_params_and_k_cache_bytes_shrink_at_least_6x(tiny, shape):
    from transformers import DynamicCache, LlamaForCausalLM

    if shape == "tiny":
        lm = make(tiny)
        layer_id, dense_id = 3, 1
    else:
        torch.manual_seed(0)
        base = LlamaForCausalLM(smollm2_config(layers=3))
        lm = LisaModel(base, LisaConfig(plan=SharingPlan.for_model(base, [2])), fingerprint="random")
        layer_id, dense_id = 2, 1
    layer = lm.lisa_layers[layer_id]
    dense_qk = layer.q_proj.weight.numel() + layer.k_proj.weight.numel()
    lisa_qk = sum(p.numel() for p in layer.lisa_qk["default"].parameters())
    assert dense_qk / lisa_qk >= 6.0
    ids = torch.randint(3, 200, (2, 24))
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        lm(input_ids=ids, past_key_values=cache, use_cache=True)
    k_lisa, k_dense = cache.layers[layer_id].keys, cache.layers[dense_id].keys
    assert k_lisa.shape[:3] == k_dense.shape[:3]
    ratio = k_dense.nbytes / k_lisa.nbytes
    assert ratio >= 6.0, ratio
    assert cache.layers[layer_id].values.nbytes == cache.layers[dense_id].values.nbytes


def test_mixed_batch_equals_per_adapter_runs(tiny):
    lm = make(tiny)
    randomize(lm, seed=1)
    lm.add_adapter("b", LisaConfig(plan=lm.plan))
    randomize(lm, "b", seed=2)
    rows, ids, mask = padded_batch([8, 6, 8, 3], seed=5)
    names = ["default", "b", "b", "default"]
    with torch.no_grad():
        mixed = lm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        per = {}
        for name in ("default", "b"):
            lm.set_adapter(name)
            per[name] = lm(input_ids=ids, attention_mask=mask).logits
        lm.set_adapter("default")
        for i, n in enumerate(names):
            torch.testing.assert_close(mixed[i], per[n][i], atol=1e-5, rtol=1e-5)
        assert (per["default"] - per["b"]).abs().max() > 1e-3
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        gen_mixed = lm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
        gen = {}
        for name in ("default", "b"):
            lm.set_adapter(name)
            gen[name] = lm.generate(input_ids=ids, attention_mask=mask, **kw)
        for i, n in enumerate(names):
            assert torch.equal(gen_mixed[i], gen[n][i])
    with pytest.raises(KeyError, match="adapter_names"):
        lm(input_ids=ids, adapter_names=["default", "nope", "b", "b"])


def test_distillation_loss_and_prune(tiny):
    lm = make(tiny)
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    lm.train()
    with distillation(lm) as d:
        out = lm(input_ids=ids, labels=ids)
        fresh = d.loss()
        assert len(d.per_layer()) == 3 and fresh > 0  # aligned sharing != the original attention
        (out.loss + 1.0 * fresh).backward()
    grads = {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}
    assert grads and all("lisa_" in n for n in grads)
    assert lm._patch.bus.distill is None
    # a few steps of pure distillation reduce the KL
    opt = torch.optim.Adam([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    with distillation(lm) as d:
        for _ in range(15):
            opt.zero_grad()
            lm(input_ids=ids)
            loss = d.loss()
            loss.backward()
            opt.step()
    assert loss.item() < 0.7 * fresh.item()
    lm.eval()
    with torch.no_grad():
        before = lm(input_ids=ids).logits
        lm.prune_qk()
        assert all(l.q_proj is None and l.k_proj is None for l in lm.lisa_layers.values())
        assert torch.equal(lm(input_ids=ids).logits, before)  # the adapter path never used W_q/W_k
    with pytest.raises(RuntimeError, match="pruned"):
        with distillation(lm):
            pass


def test_disable_adapter_and_unload_restore_the_base(tiny):
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    base = copy.deepcopy(tiny[0])
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        lm = LisaModel(base, LisaConfig(plan=SharingPlan.for_model(base, SHARED)))
        with lm.disable_adapter():
            torch.testing.assert_close(lm(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
        restored = lm.unload()
        assert not any(isinstance(l.self_attn, LisaAttention) for l in restored.model.layers)
        torch.testing.assert_close(restored(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_trl_sft_trainer_runs_two_steps(tiny, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    lm = make(tiny)
    tok = tiny[1]
    before = {k: v.clone() for k, v in lm.adapter_state_dict().items()}
    base_before = lm.model.model.layers[3].self_attn.v_proj.weight.clone()
    data = Dataset.from_dict({"text": ["hello lisa world " * 4, "shared attention layers " * 4] * 4})
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], save_strategy="no", logging_steps=1, max_length=64, use_cpu=True,
                     dataloader_num_workers=0)
    trainer = SFTTrainer(model=lm, args=args, train_dataset=data, processing_class=tok)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    after = lm.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # adapter moved
    assert torch.equal(lm.model.model.layers[3].self_attn.v_proj.weight, base_before)  # base did not
