"""The model families LiSA runs on, as data: one entry per Hugging Face `model_type`.

    arch = architectures.check(model.config)     # UnsupportedArchitectureError, in microseconds
    arch.name, arch.qk_norm, arch.sliding_window

What a LiSA layer relies on, and where each family stands:

  llama    q/k/v/o projections on `self_attn`, RoPE from the decoder (position_embeddings),
           one causal mask for every layer                                    supported
  mistral  the same, with an optional sliding window: HF builds that layer's mask, and a
           LiSA consumer applies its own layer's mask to its donor's pre-mask scores   supported
  qwen2    biases on q/k/v (a substituted layer's low-rank Q/K have none: they are new
           projections, the donor's biased scores come in through the bus); per-layer
           sliding windows (`layer_types`) masked as mistral's                 supported
  qwen3    RMS-normalises queries and keys per head (q_norm, k_norm) before RoPE: the
           dense attention of donors applies them; a substituted layer's low-rank Q/K are
           new projections learned without a norm (a fresh one is zero)        supported
  gemma3   q/k norms (as qwen3), sliding and global layers with two RoPE bases (the decoder
           hands each layer its own cos/sin), its own query scale (the module's `scaling`),
           one KV head in small sizes                                          supported (text)

Everything else is refused before any work, with the supported list. Tested families:
tests/test_architectures.py runs the fast path against the reference path, the dense
donors against the base, a save/load round trip and a mixed batch of every trainable kind
on a tiny random model of each. (Multimodal wrappers are checked by their `text_config`.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str                  # HF model_type
    qk_bias: bool = False      # q/k/v projections carry biases
    sliding_window: bool = False  # some layers may attend within a window (HF builds their mask)
    qk_norm: bool = False      # queries/keys RMS-normalised per head before RoPE (dense attention only)


SUPPORTED: dict[str, Architecture] = {
    "llama": Architecture("llama"),
    "mistral": Architecture("mistral", sliding_window=True),
    "qwen2": Architecture("qwen2", qk_bias=True, sliding_window=True),
    "qwen3": Architecture("qwen3", sliding_window=True, qk_norm=True),
    "gemma3_text": Architecture("gemma3_text", sliding_window=True, qk_norm=True),
}

NOT_YET: dict[str, str] = {  # families seen asked for, and what stands in the way
    "phi3": "fuses q/k/v into one qkv_proj",
    "gpt2": "fuses q/k/v into one c_attn and has no RoPE",
}


class UnsupportedArchitectureError(TypeError):
    """A base model whose family LiSA does not run on (yet); the message lists the supported ones."""


def check(config) -> Architecture:
    """The family entry of a HF config, or UnsupportedArchitectureError naming the model type
    and the supported list."""
    model_type = getattr(config, "model_type", None)
    text = getattr(config, "text_config", None)  # multimodal wrappers: their text model decides
    if model_type not in SUPPORTED and text is not None and getattr(text, "model_type", None) in SUPPORTED:
        model_type = text.model_type
    if model_type in SUPPORTED:
        return SUPPORTED[model_type]
    why = f" ({NOT_YET[model_type]})" if model_type in NOT_YET else ""
    raise UnsupportedArchitectureError(
        f"model type {model_type!r}{why} is not supported by LiSA; supported: {', '.join(SUPPORTED)}")
