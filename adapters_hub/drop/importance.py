"""Module importance on calibration text, and plans made from it.

For a module F with input X (the residual stream before its norm), He et al. define

    similarity = mean over tokens of cos(X, X + F(norm(X)))      importance = 1 - similarity

Attention: X = the layer input x, F = self_attn. MLP: X = h = x + attn(...), F = mlp.
Block: X = x, Y = the layer output. Padding tokens (attention_mask 0) are left out.

Memory stays bounded by one layer: the calibration batches are embedded once (the model runs
up to its first decoder layer, whose inputs we capture: hidden states, causal mask, rotary
position embeddings), then the cached hidden states go through one decoder layer at a time.
The layer's current drop state is respected, so measuring a model with a plan applied gives
the importance *in the dropped model* (what the iterative method needs); a dropped branch
scores exactly 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from adapters_hub.drop import layer as drop_layer
from adapters_hub.drop.plan import DropConfig, DropPlan
from adapters_hub.drop.model import apply_drop, active_plan, decoder_layers, restore

if TYPE_CHECKING:
    import torch

class _Captured(Exception):
    """Raised by the pre-hook on layer 0 to stop the forward once its inputs are captured."""


def _normalise_batches(batches, batch_size: int) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
    """-> [(input_ids (B, T), attention_mask (B, T))]. A 2-D tensor is split into rows of batch_size;
    an iterable may hold id tensors, {"input_ids", "attention_mask"} dicts or (ids, mask) tuples."""
    import torch

    if isinstance(batches, torch.Tensor):
        if batches.dim() != 2:
            raise ValueError(f"batches: expected a (n, T) tensor of token ids, got shape {tuple(batches.shape)}")
        batches = list(batches.split(batch_size))
    out = []
    for b in batches:
        if isinstance(b, Mapping):
            ids = b["input_ids"]
            mask = b.get("attention_mask")
        elif isinstance(b, tuple):  # (input_ids, attention_mask), as this function returns
            ids, mask = b
        else:
            ids, mask = b, None
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        mask = torch.ones_like(ids) if mask is None else mask.reshape(ids.shape)
        out.append((ids, mask))
    if not out:
        raise ValueError("batches: no calibration data")
    return out


def _embed(model, ids: "torch.Tensor", mask: "torch.Tensor") -> tuple["torch.Tensor", dict]:
    """Run the model up to its first decoder layer: (hidden (B, T, D), layer kwargs)."""
    layers = decoder_layers(model)
    captured: dict = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        inner = getattr(model, "model", model)
        inner(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise RuntimeError("importance: the model never called its first decoder layer")
    return captured["hidden"], captured["kwargs"]


def module_importance(model, batches, *, batch_size: int = 4, progress: bool = True) -> dict[str, list[float]]:
    """Importance of every layer's attention, MLP and whole block: {"attn": [...], "mlp": [...],
    "block": [...]}, one float per layer (1 - mean cosine similarity, padding excluded)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    data = _normalise_batches(batches, batch_size)
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        drop_layer.check_llama_like(layer, i)

    was_training = model.training
    model.eval()
    sums = {k: [0.0] * len(layers) for k in ("attn", "mlp", "block")}
    with torch.no_grad():
        # Embed once; keep per batch the hidden states and the kwargs every layer receives.
        cached = []
        n_tokens = 0
        for ids, mask in data:
            hidden, kwargs = _embed(model, ids.to(device), mask.to(device))
            weight = mask.to(device=device, dtype=torch.float64)  # (B, T): 1 real token, 0 padding
            n_tokens += int(weight.sum().item())
            cached.append([hidden, kwargs, weight])
        if n_tokens == 0:
            raise ValueError("batches: every token is padding (attention_mask all 0)")

        def mean_cos(a, b, weight):  # sum over real tokens of cos(a, b); a, b (B, T, D)
            return (F.cosine_similarity(a.double(), b.double(), dim=-1) * weight).sum().item()

        for i, layer in enumerate(tqdm(layers, desc="importance", disable=not progress)):
            state = drop_layer.drop_state(layer)
            skip_attn, skip_mlp = (state.attn, state.mlp) if state else (False, False)
            for entry in cached:
                x, kwargs, weight = entry
                h = x if skip_attn else x + drop_layer.attention_branch(layer, x, **kwargs)
                out = h if skip_mlp else h + drop_layer.mlp_branch(layer, h)
                # A skipped branch is the identity: similarity 1 exactly, importance 0.
                sums["attn"][i] += weight.sum().item() if skip_attn else mean_cos(x, h, weight)
                sums["mlp"][i] += weight.sum().item() if skip_mlp else mean_cos(h, out, weight)
                sums["block"][i] += mean_cos(x, out, weight) if not (skip_attn and skip_mlp) else weight.sum().item()
                entry[0] = out  # the next layer's input
    model.train(was_training)
    return {k: [1.0 - s / n_tokens for s in v] for k, v in sums.items()}


def layer_importance(model, batches, target: str = "attn", *, batch_size: int = 4, progress: bool = True) -> list[float]:
    """Importance per layer of one module kind: target "attn", "mlp" or "block"."""
    if target not in ("attn", "mlp", "block"):
        raise ValueError(f"target: unknown {target!r}; use attn, mlp or block (joint plans use module_importance)")
    return module_importance(model, batches, batch_size=batch_size, progress=progress)[target]


def iterative_plan(model, batches, *, n: int, target: str = "attn", batch_size: int = 4,
                   progress: bool = True, history: list | None = None) -> DropPlan:
    """Drop one module, re-measure importance on the dropped model, repeat n times.

    The model must not have a plan applied; it is restored on return. When `history` is a
    list, the score table of each round is appended to it.
    """
    if active_plan(model) is not None:
        raise RuntimeError("iterative_plan: the model already has a drop plan applied; restore(model) first")
    data = _normalise_batches(batches, batch_size)

    def score(plan: DropPlan):
        apply_drop(model, plan)
        try:
            scores = module_importance(model, data, progress=progress)
        finally:
            restore(model)
        if history is not None:
            history.append(scores)
        return scores

    return DropPlan.iterative(score, n=n, target=target, num_layers=len(decoder_layers(model)))


def make_plan(model, batches, config: DropConfig, *, progress: bool = True) -> tuple[DropPlan, list[dict]]:
    """The plan `config` asks for, and the score tables it was made from (one for one-shot,
    one per round for iterative)."""
    if config.iterative:
        history: list = []
        plan = iterative_plan(model, batches, n=config.n, target=config.target, batch_size=config.batch_size,
                              progress=progress, history=history)
        return plan, history
    scores = module_importance(model, batches, batch_size=config.batch_size, progress=progress)
    return DropPlan.top_n(scores, n=config.n, target=config.target), [scores]


def calibration_blocks(tokenizer, text: str, *, n_blocks: int, block_len: int, skip_tokens: int = 0) -> "torch.Tensor":
    """(n_blocks, block_len) token ids of `text` after its first `skip_tokens` tokens."""
    from adapters_hub.data import token_blocks

    flat = token_blocks(tokenizer, text, n_blocks=1, block_len=skip_tokens + n_blocks * block_len)[0]
    return flat[skip_tokens:].view(n_blocks, block_len)
