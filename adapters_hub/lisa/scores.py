"""Attention scores of a LiSA backbone: the math both routes share and the bus that carries
scores from donor to consumer. The fast route's score factors and its two kernels are
`adapters_hub.lisa.factors`; the modules that use both are `adapters_hub.lisa.layer`.

The `ScoreBus` is the side channel: a donor `put`s its Z, the consumer `take`s it. In eval
mode a taken Z is freed once its last consumer read it; in training mode it is kept until
the next forward (autograd holds it anyway, and gradient-checkpoint recomputation reads it).

Two routes compute the same attention, bound per layer at train()/eval() (`layer.route`):
  reference  Z is materialised (B, H, Tq, Tk) in float32 at every donor and substituted
             layer; any aligner; training, distillation, analysis and decode steps use it
             (a decode step's Z is (B, H, 1, Tk): materialising it is the cheap way).
  fast       (eval mode, Tq > 1, linear aligners) Z is never materialised. A linear head
             mix commutes with the query-key product,
                 W Z_donor = sum_j (W q_donor)[:, :, :, j] k_donor[j]^T,
             so the bus carries `factors.ScoreFactors` (the root donor's queries and keys,
             the product of the head mixes, the chain's rank-r terms) and a substituted layer
             attends over them in query blocks (`attend`, CPU) or as one SDPA call
             (`attend_fused`, GPU).

The 4-D mask the decoder hands to attention depends on `config._attn_implementation`:
None (sdpa: pure causal), bool (sdpa: True = attend) or additive float (eager);
`additive_mask` turns all three into an additive float32 mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # the bus carries them; factors.py imports this module's math
    from adapters_hub.lisa.factors import ScoreFactors


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def additive_mask(mask: torch.Tensor | None, q_len: int, k_len: int, device) -> torch.Tensor:
    """An additive float32 mask broadcastable to (B, H, Tq, Tk) from whatever HF passed."""
    if mask is None:  # sdpa skipped the mask: plain causal, queries are the last q_len positions
        q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        allowed = torch.arange(k_len, device=device)[None, :] <= q_pos  # (Tq, Tk)
        allowed = allowed[None, None]
    elif mask.dtype == torch.bool:
        allowed = mask[..., -q_len:, :k_len]  # (B, 1, Tq, Tk)
    else:
        return mask[..., -q_len:, :k_len].float()
    return torch.zeros((), device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)


def sdpa_mask(mask: torch.Tensor | None, q_len: int, k_len: int, dtype, device) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for F.scaled_dot_product_attention from what HF passed.
    Masks become additive in `dtype` with finfo.min (not -inf), so the query rows of left
    padding, which attend to nothing, stay finite exactly as on the reference path."""
    if mask is None and (q_len == k_len or q_len == 1):
        return None, q_len > 1
    add = additive_mask(mask, q_len, k_len, device)
    return add.clamp_min(torch.finfo(dtype).min).to(dtype), False


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KVH, T, e) -> (B, KVH * n_rep, T, e), as HF does for GQA."""
    if n_rep == 1:
        return x
    b, kvh, t, e = x.shape
    return x[:, :, None].expand(b, kvh, n_rep, t, e).reshape(b, kvh * n_rep, t, e)


def gqa_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q k^T per head without copying the cache: q (B, H, Tq, e), k (B, KVH, Tk, e) -> (B, H, Tq, Tk).
    The n_rep query heads of a kv head are stacked along the query axis instead of
    repeating k n_rep times (repeat_kv copies the whole cache at every decode step)."""
    b, h, tq, e = q.shape
    kvh = k.shape[1]
    z = torch.matmul(q.reshape(b, kvh, (h // kvh) * tq, e), k.transpose(2, 3))  # (B, KVH, n_rep * Tq, Tk)
    return z.view(b, h, tq, k.shape[2])


def gqa_apply(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs V per head: probs (B, H, Tq, Tk), v (B, KVH, Tk, d) -> (B, H, Tq, d), no copy of v."""
    b, h, tq, tk = probs.shape
    kvh = v.shape[1]
    out = torch.matmul(probs.reshape(b, kvh, (h // kvh) * tq, tk).to(v.dtype), v)  # (B, KVH, n_rep * Tq, d)
    return out.view(b, h, tq, v.shape[-1])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Full-width RoPE as in HF LLaMA: x (B, h, T, d), cos/sin (B, T, d)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def rope_frequencies(head_dim: int, rank: int) -> torch.Tensor:
    """Which of the head's head_dim/2 RoPE frequencies the rank-r projections use:
    rank // 2 of them spread evenly from the fastest to the slowest."""
    pairs = max(rank // 2, 0)
    if pairs == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.linspace(0, head_dim // 2 - 1, pairs).round().long().unique()


def lowrank_rope_tables(cos: torch.Tensor, sin: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, s), each (B, 1, T, p): the rows of HF's cos/sin (B, T, d) at `freqs`. HF cos is
    cat(f, f), so an index < d/2 picks frequency f."""
    return cos[..., freqs].unsqueeze(1), sin[..., freqs].unsqueeze(1)


def apply_rope_lowrank(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, freqs: torch.Tensor,
                       tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """RoPE on rank-r vectors x (B, h, T, r): dims (k, k + p) form a rotating pair at
    frequency freqs[k] (p = len(freqs)); an odd last dim is left as is (no position).
    `tables`: `lowrank_rope_tables(cos, sin, freqs)`, when the caller has them already."""
    p = len(freqs)
    if p == 0:
        return x
    c, s = tables or lowrank_rope_tables(cos, sin, freqs)                     # (B, 1, T, p) each
    x1, x2, rest = x[..., :p], x[..., p : 2 * p], x[..., 2 * p :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, rest), dim=-1)


def softmax_fp32(scores: torch.Tensor, mask_add: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.float() + mask_add, dim=-1)


# ---------------------------------------------------------------------------------------
# the side channel
# ---------------------------------------------------------------------------------------
class ScoreBus:
    """Per-backbone state of the current forward step: donor scores, the adapter of each
    row (mixed batches), an optional distillation collector and an analysis observer."""

    def __init__(self, consumers: dict[int, int] | None = None) -> None:
        self.consumers: dict[int, int] = dict(consumers or {})  # donor layer -> #consumers
        self.scores: dict[int, torch.Tensor] = {}
        self.pending: dict[int, int] = {}
        self.keep = False  # True while training: do not free taken scores
        # What the layers bind as their forward route at train()/eval() (layer._AttentionBase.bind_route);
        # never read per call. fast=False puts inference on the reference path too (tests compare them).
        self.fast = True
        self.kernel = "auto"  # the fast path's kernel: "blocks", "fused" or "auto" (blocks on CPU)
        self.row_adapters: list[str] | None = None
        self.distill: "DistillCollector | None" = None
        self.observer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
        self.step: dict = {}  # what every layer of this forward step would recompute alike (masks, RoPE tables)

    def reset(self) -> None:
        self.scores.clear()
        self.step.clear()
        self.pending = dict(self.consumers)
        if self.distill is not None:
            self.distill.reset()

    def mask(self, attention_mask: torch.Tensor | None, q_len: int, k_len: int, device) -> torch.Tensor:
        """`additive_mask`, made once per forward step for all layers (HF hands every layer
        of one attention kind the same mask object, alive for the whole step)."""
        key = ("mask", id(attention_mask), q_len, k_len, str(device))
        if key not in self.step:
            self.step[key] = additive_mask(attention_mask, q_len, k_len, device)
        return self.step[key]

    def rope_tables(self, cos: torch.Tensor, sin: torch.Tensor, freqs: torch.Tensor, rank: int):
        """`lowrank_rope_tables`, once per forward step, RoPE table (Gemma 3 has two) and rank
        (freqs is a function of the rank: `rope_frequencies`)."""
        key = ("rope", id(cos), rank)
        if key not in self.step:
            self.step[key] = lowrank_rope_tables(cos, sin, freqs)
        return self.step[key]

    def wants(self, layer: int) -> bool:
        return layer in self.consumers

    def put(self, layer: int, z: "torch.Tensor | ScoreFactors") -> None:
        if layer in self.consumers:
            self.scores[layer] = z
            self.pending[layer] = self.consumers[layer]

    def take(self, layer: int) -> "torch.Tensor | ScoreFactors":
        if layer not in self.scores:
            raise RuntimeError(
                f"LiSA: scores of donor layer {layer} are missing; a substituted layer must run in the "
                "same forward pass as its donor (call the whole model, not a single layer)"
            )
        z = self.scores[layer]
        if not self.keep:
            self.pending[layer] -= 1
            if self.pending[layer] <= 0:
                del self.scores[layer]
        return z


class DistillCollector:
    """Collects one attention-distillation KL term per substituted layer and forward."""

    def __init__(self) -> None:
        self.terms: list[torch.Tensor] = []

    def reset(self) -> None:
        self.terms = []

    def add(self, kl: torch.Tensor) -> None:
        self.terms.append(kl)
