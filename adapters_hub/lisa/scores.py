"""Attention scores of a LiSA backbone: the math both paths share, the fast path's score
factors and kernels, and the bus that carries scores from donor to consumer (the
modules that use them are `adapters_hub.lisa.layer`).

The `ScoreBus` is the side channel: a donor `put`s its Z, the consumer `take`s it. In eval
mode a taken Z is freed once its last consumer read it; in training mode it is kept until
the next forward (autograd holds it anyway, and gradient-checkpoint recomputation reads it).

Two paths compute the same attention:
  reference  Z is materialised (B, H, Tq, Tk) in float32 at every donor and substituted
             layer; any aligner; training, distillation, analysis and decode steps use it.
  fast       (inference, `bus.route` != reference, Tq > 1, linear aligners) Z is never materialised. A
             linear head mix commutes with the query-key product,
                 W Z_donor = sum_j (W q_donor)[:, :, :, j] k_donor[j]^T,
             so the bus carries `ScoreFactors` (the root donor's queries and keys, the
             product of the head mixes, the chain's rank-r terms) and a substituted layer
             attends over them in query blocks (CPU) or as one SDPA call (GPU).

The 4-D mask the decoder hands to attention depends on `config._attn_implementation`:
None (sdpa: pure causal), bool (sdpa: True = attend) or additive float (eager);
`additive_mask` turns all three into an additive float32 mask.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


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


class ScoreFactors:
    """Attention scores kept as factors, never materialised for all queries at once:

        Z = M (q0 k0^T per GQA head) + sum over terms t, kv heads j of q_t[:, :, :, j] @ k_t[:, j]^T

    q0 (B, H, Tq, d), k0 (B, J, Tk, d): the root donor's roped queries (scale folded in)
                 and its K cache; head h sees kv head h // (H / J), as in the donor itself
    M            the product of the head mixes W P along the chain: None (identity),
                 (H, H), or (B, H, H) for one adapter per row
    q_t (B, H, Tq, J, r), k_t (B, J, Tk, r): the rank-r terms of the chain's layers. A mix
                 after them crosses GQA groups, so each keeps a query per kv head.
    Mixing the root in score space costs H multiply-adds per score; folding it into the
    queries instead would cost J * d per score (the `attend_fused` route, used on GPUs).
    """

    def __init__(self, q0: torch.Tensor, k0: torch.Tensor, mix: torch.Tensor | None = None,
                 terms: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()) -> None:
        self.q0, self.k0, self.m, self.terms = q0, k0, mix, terms

    @staticmethod
    def own(q: torch.Tensor, k: torch.Tensor, scale: float) -> "ScoreFactors":
        """A dense layer's scores: q (B, H, Tq, d), k (B, J, Tk, d)."""
        return ScoreFactors(q * scale, k)

    def mix(self, w: torch.Tensor) -> "ScoreFactors":
        """Scores W Z: w (H, H) for the whole batch or (B, H, H) per row."""
        w = w.to(self.q0.dtype)
        m = w if self.m is None else torch.matmul(w, self.m)
        spec = "hg,bgqje->bhqje" if w.dim() == 2 else "bhg,bgqje->bhqje"
        return ScoreFactors(self.q0, self.k0, m, tuple((torch.einsum(spec, w, q), k) for q, k in self.terms))

    def plus_lowrank(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> "ScoreFactors":
        """Add a GQA rank-r term q (B, H, Tq, r), k (B, J, Tk, r), in per-kv-head form."""
        b, h, tq, r = q.shape
        j = k.shape[1]
        eye = torch.eye(j, dtype=q.dtype, device=q.device)
        qb = torch.einsum("bjnqr,jk->bjnqkr", (q * scale).view(b, j, h // j, tq, r), eye).reshape(b, h, tq, j, r)
        return ScoreFactors(self.q0, self.k0, self.m, self.terms + ((qb, k),))

    def _lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All rank-r terms as one product: q (B, H, Tq, Elr) and k (B, Tk, Elr), float32."""
        if not self.terms:
            return None
        q = torch.cat([q.flatten(-2) for q, _ in self.terms], -1).float()                   # (B, H, Tq, Elr)
        k = torch.cat([k.transpose(1, 2).flatten(-2) for _, k in self.terms], -1).float()   # (B, Tk, Elr)
        return q, k

    def scores(self, start: int = 0, stop: int | None = None, keys: int | None = None,
               lowrank: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Z[:, :, start:stop, :keys] (B, H, tq, tk) in float32."""
        z = gqa_scores(self.q0[:, :, start:stop].float(), self.k0[:, :, :keys].float())  # (B, H, tq, tk)
        b, h, tq, tk = z.shape
        if self.m is not None:  # the head mix as one GEMM over the flattened scores
            z = torch.matmul(self.m.float(), z.reshape(b, h, tq * tk)).view(b, h, tq, tk)
        lowrank = lowrank or self._lowrank_factors()
        if lowrank is not None:  # + q_lr k_lr^T: one batched GEMM, all heads share the keys
            q, k = lowrank
            q = q[:, :, start:stop].reshape(b, h * tq, -1)                                  # (B, H tq, Elr)
            # k[:, :tk] keeps its rows contiguous; its transpose goes to BLAS as is (no copy)
            z = z.view(b, h * tq, tk).baddbmm_(q, k[:, :tk].transpose(1, 2)).view(b, h, tq, tk)
        return z

    def materialize(self) -> torch.Tensor:
        """Z (B, H, Tq, Tk) in float32, for the reference path."""
        return self.scores()

    def attend(self, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
               chunk_bytes: int = 16 * 2**20) -> torch.Tensor:
        """softmax(Z + mask) V for v (B, KVH, Tk, d) -> (B, H, Tq, d), one block of queries
        at a time: each block's float32 scores stay under `chunk_bytes`, and under a pure
        causal mask a block only reads the keys up to its last query."""
        b, h, tq, _ = self.q0.shape
        tk = self.k0.shape[2]
        rows = max(1, chunk_bytes // (4 * b * h * tk))
        lowrank = self._lowrank_factors()
        if is_causal:  # queries are the last tq of tk positions
            mask = additive_mask(None, tq, tk, self.q0.device)                        # (1, 1, Tq, Tk)
        out = v.new_empty(b, h, tq, v.shape[-1])
        for start in range(0, tq, rows):
            stop = min(tq, start + rows)
            keys = tk - tq + stop if is_causal else tk
            z = self.scores(start, stop, keys, lowrank)                              # (B, H, rows, keys)
            if mask is not None:
                z += mask[..., start:stop, :keys]
            out[:, :, start:stop] = gqa_apply(torch.softmax(z, dim=-1), v[:, :, :keys])
        return out

    def attend_fused(self, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """The same as one SDPA call: the mix folded into per-kv-head queries, queries and
        keys concatenated over terms and kv heads (width E = J (d + r x terms)), V padded to
        E (fused kernels want equal widths). More FLOPs, fewer passes over memory."""
        b, h, tq, d = self.q0.shape
        j = self.k0.shape[1]
        eye = torch.eye(j, dtype=self.q0.dtype, device=self.q0.device)
        root = torch.einsum("bjnqd,jk->bjnqkd", self.q0.view(b, j, h // j, tq, d), eye).reshape(b, h, tq, j, d)
        if self.m is not None:
            root = torch.einsum("hg,bgqje->bhqje" if self.m.dim() == 2 else "bhg,bgqje->bhqje", self.m, root)
        terms = ((root, self.k0),) + self.terms
        q = torch.cat([q.flatten(-2) for q, _ in terms], dim=-1)                          # (B, H, Tq, E)
        k = torch.cat([k.transpose(1, 2).flatten(-2) for _, k in terms], dim=-1)          # (B, Tk, E)
        e = q.shape[-1]
        k = k.unsqueeze(1).expand(b, h, k.shape[1], e)                                    # (B, H, Tk, E), a view
        v_pad = F.pad(repeat_kv(v, h // v.shape[1]), (0, e - d)) if e > d else repeat_kv(v, h // v.shape[1])
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v_pad.to(q.dtype), attn_mask=mask,
                                             is_causal=is_causal, scale=1.0)
        return out[..., : v.shape[-1]]


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
        # The route of this forward pass, chosen once by the model before its first layer runs
        # (LisaModel's decoder pre-hook): "reference", or the fast path's kernel, "blocks" or "fused".
        self.route = "reference"
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
