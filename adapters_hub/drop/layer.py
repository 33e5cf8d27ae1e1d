"""The drop-aware forward of one LLaMA-family decoder layer.

A LLaMA decoder layer (LlamaDecoderLayer, and Mistral/Qwen2/... which share its shape) is

    h   = x + self_attn(input_layernorm(x))          # attention branch
    out = h + mlp(post_attention_layernorm(h))       # MLP branch

with x, h, out of shape (B, T, D). Dropping a branch means skipping it entirely: the residual
passes through and neither the norm nor the module runs, so a dropped attention also never
touches the KV cache.

How it is switched on: rather than putting wrapper modules into `model.model.layers`, we swap
the *forward* of the existing layer instance (an instance attribute, the pattern accelerate's
hooks use) and keep the module itself. Keeping the module keeps state_dict keys (and so the
base fingerprint), forward hooks that transformers installed for `output_hidden_states`
(matched by isinstance on LlamaDecoderLayer, installed once per model), and any other tool's
hooks. `uninstall` puts the previous forward back, so restoring is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

# The children a decoder layer must have, and nothing else: a layer with extra norms
# (Gemma2's pre/post feed-forward norms, OLMo2's post norms) computes something else.
LLAMA_LAYER_CHILDREN = frozenset({"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"})

_STATE_ATTR = "_lisa_hub_drop"  # per-layer DropState, present only while a plan is applied


@dataclass
class DropState:
    """What is skipped in one layer, and what to put back on restore."""

    attn: bool
    mlp: bool
    had_own_forward: bool        # the instance had its own `forward` attribute before us
    previous_forward: Any        # ... and this was it (e.g. an accelerate hook)


def check_llama_like(layer: "nn.Module", index: int) -> None:
    """Refuse layers whose structure is not x + attn(norm(x)); h + mlp(norm(h))."""
    children = {name for name, _ in layer.named_children()}
    if children != LLAMA_LAYER_CHILDREN:
        raise NotImplementedError(
            f"decoder layer {index} ({type(layer).__name__}) has children {sorted(children)}; attention/MLP drop "
            f"supports LLaMA-family layers with exactly {sorted(LLAMA_LAYER_CHILDREN)}"
        )


def attention_branch(layer: "nn.Module", x: "torch.Tensor", **kwargs) -> "torch.Tensor":
    """F_attn(norm(x)), shape (B, T, D). kwargs: what the model passes its layers
    (attention_mask, position_embeddings, position_ids, past_key_values, use_cache, ...)."""
    out, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
    return out


def mlp_branch(layer: "nn.Module", h: "torch.Tensor") -> "torch.Tensor":
    """F_mlp(norm(h)), shape (B, T, D)."""
    return layer.mlp(layer.post_attention_layernorm(h))


def drop_forward(self: "nn.Module", hidden_states: "torch.Tensor", **kwargs) -> "torch.Tensor":
    """LlamaDecoderLayer.forward with the dropped branches skipped; bound to a layer by `install`."""
    state: DropState = getattr(self, _STATE_ATTR)
    if not state.attn:
        hidden_states = hidden_states + attention_branch(self, hidden_states, **kwargs)
    if not state.mlp:
        hidden_states = hidden_states + mlp_branch(self, hidden_states)
    return hidden_states


def install(layer: "nn.Module", *, attn: bool, mlp: bool) -> None:
    """Make `layer` skip its attention and/or MLP branch (at least one)."""
    if not (attn or mlp):
        raise ValueError("install: nothing to drop (attn and mlp both False)")
    if hasattr(layer, _STATE_ATTR):
        raise RuntimeError("install: this layer already has a drop installed; uninstall it first")
    own = "forward" in layer.__dict__
    setattr(layer, _STATE_ATTR, DropState(attn, mlp, own, layer.__dict__.get("forward")))
    layer.forward = MethodType(drop_forward, layer)


def uninstall(layer: "nn.Module") -> None:
    """Put back the forward the layer had before `install` (no-op when none is installed)."""
    state: DropState | None = getattr(layer, _STATE_ATTR, None)
    if state is None:
        return
    if state.had_own_forward:
        layer.forward = state.previous_forward
    else:
        del layer.forward  # falls back to the class's forward
    delattr(layer, _STATE_ATTR)


def drop_state(layer: "nn.Module") -> DropState | None:
    return getattr(layer, _STATE_ATTR, None)
