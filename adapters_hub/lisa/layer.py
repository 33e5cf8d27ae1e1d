"""Attention modules of a LiSA backbone (the families of `adapters_hub.architectures`).

Sharing scheme, for a plan substituting layers 3 and 4 (donors 2 and 3):

    layer 2 (dense donor, ScoredAttention)      layer 3 (LisaAttention)               layer 4 (LisaAttention)
    x2 -> W_q, W_k (full), RoPE                 x3 -> q_r, k_r (rank r), RoPE         x4 -> q_r, k_r, RoPE
    Z2 = Q K^T / sqrt(d)  --------bus------->   Z3 = align3(Z2) + q_r k_r^T/sqrt(r) --bus--> Z4 = align4(Z3) + ...
    A2 = softmax(Z2 + mask)                     A3 = softmax(Z3 + mask)               A4 = softmax(Z4 + mask)
    out = A2 V2 W_o2                            out = A3 V3 W_o3                      out = A4 V4 W_o4
    KV cache: K2 (d), V2                        KV cache: k_r (r), V3                 KV cache: k_r (r), V4

    align(z) = W P z                  (linear, the default) or P z + W2 act(W1 P z) (ffn, the paper's), over
                                      the head axis at every (i, j); P = plan.perm; identity at init
    Z (B, H, Tq, Tk) is pre-softmax and pre-mask; it only lives for the current forward step.

A plan may also drop a layer's attention (`DroppedAttention`: adds nothing, caches nothing);
a shared layer above it takes the nearest kept-or-shared layer below as its donor.

The `ScoreBus` is the side channel: a donor `put`s its Z, the consumer `take`s it. In eval
mode a taken Z is freed once its last consumer read it; in training mode it is kept until
the next forward (autograd holds it anyway, and gradient-checkpoint recomputation reads it).

Two paths compute the same attention:
  reference  Z is materialised (B, H, Tq, Tk) in float32 at every donor and substituted
             layer; any aligner; training, distillation, analysis and decode steps use it.
  fast       (inference, `bus.fast`, Tq > 1, linear aligners) Z is never materialised. A
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

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adapters_hub.lisa.plan import SharedLayer

_ACT = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh}


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
        self.fast = False  # set per forward by the Backbone: the fast path may run
        self.kernel = "auto"  # fast path over factors: "blocks", "fused" or "auto" (blocks on CPU)
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


# ---------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------
class _AttentionBase(nn.Module):
    """Shares the base attention's projections (same attribute names, so the state-dict keys
    of base weights do not change) and its shape attributes."""

    def __init__(self, base_attn: nn.Module, bus: ScoreBus) -> None:
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "config", "layer_idx"):
            if not hasattr(base_attn, name):
                raise TypeError(f"{type(base_attn).__name__} has no {name}: not a LLaMA-family attention module")
        cfg = base_attn.config
        self.config = cfg
        # `layer` is the decoder layer's index, the key of its scores on the bus (what consumers
        # name as their donor); `layer_idx` is its KV-cache slot, which an attention drop
        # renumbers (adapters_hub/drop/model.py) while the bus keys stay.
        self.layer = self.layer_idx = base_attn.layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.head_dim = getattr(base_attn, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.scaling = getattr(base_attn, "scaling", self.head_dim**-0.5)
        self.is_causal = True
        self.q_proj, self.k_proj = base_attn.q_proj, base_attn.k_proj
        self.v_proj, self.o_proj = base_attn.v_proj, base_attn.o_proj
        # Qwen3 RMS-normalises each query and key head before RoPE (same names: same state-dict
        # keys). Only the dense attention uses them; a substituted layer's low-rank Q/K are new
        # projections, learned without a norm.
        self.q_norm, self.k_norm = getattr(base_attn, "q_norm", None), getattr(base_attn, "k_norm", None)
        self._bus = bus

    def _heads(self, proj: nn.Module, x: torch.Tensor, width: int) -> torch.Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, -1, width).transpose(1, 2)  # (B, h, T, width)

    def _normed_heads(self, proj: nn.Module, norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        """(B, h, T, d) heads of a dense projection, each RMS-normalised first where the family does."""
        if norm is None:
            return self._heads(proj, x, self.head_dim)
        b, t, _ = x.shape
        return norm(proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)

    def dense_scores(self, x, cos, sin, past_key_values):
        """Full-rank eager scores Z (B, H, Tq, Tk), the values (B, KVH, Tk, d); caches K, V."""
        q, k, v = self._dense_qkv(x, cos, sin, past_key_values)  # (B, H, Tq, d), (B, KVH, Tk, d) x 2
        z = gqa_scores(q, k) * self.scaling
        return z, v

    def _dense_qkv(self, x, cos, sin, past_key_values):
        """q (B, H, Tq, d), k and v (B, KVH, Tk, d) with RoPE; caches K, V."""
        if self.q_proj is None or self.k_proj is None:
            raise RuntimeError(f"layer {self.layer_idx}: W_q/W_k were pruned (prune_qk); the dense attention "
                               "of this layer is not available any more")
        q = apply_rope(self._normed_heads(self.q_proj, self.q_norm, x), cos, sin)
        k = apply_rope(self._normed_heads(self.k_proj, self.k_norm, x), cos, sin)
        v = self._heads(self.v_proj, x, self.head_dim)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        return q, k, v

    def _output(self, probs: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._project(gqa_apply(probs, v), x)  # (B, H, Tq, d) -> (B, Tq, hidden)

    def _project(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1).to(x.dtype))

    def _dense_fast(self, x, cos, sin, attention_mask, past_key_values) -> torch.Tensor:
        """The layer's own dense attention as one SDPA call; consumers get its factors."""
        q, k, v = self._dense_qkv(x, cos, sin, past_key_values)
        if self._bus.wants(self.layer):
            self._bus.put(self.layer, ScoreFactors.own(q, k, self.scaling))
        mask, causal = sdpa_mask(attention_mask, q.shape[2], k.shape[2], q.dtype, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scaling,
                                             enable_gqa=self.num_key_value_groups > 1)
        return self._project(out, x)

    def _fast(self, x: torch.Tensor) -> bool:
        """The fast path runs for prefill-like steps (Tq > 1); a decode step's scores are
        (B, H, 1, Tk), small enough that materialising them is the cheaper way."""
        return self._bus.fast and x.shape[1] > 1


class ScoredAttention(_AttentionBase):
    """Dense attention computed eagerly, so that its scores Z reach the bus (donors of
    substituted layers) or an observer (analysis). Same result as the HF module."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        cos, sin = position_embeddings
        if self._fast(hidden_states):  # SDPA for itself; its consumers get factors, not scores
            return self._dense_fast(hidden_states, cos, sin, attention_mask, past_key_values), None
        z, v = self.dense_scores(hidden_states, cos, sin, past_key_values)  # (B, H, Tq, Tk)
        mask = self._bus.mask(attention_mask, z.shape[-2], z.shape[-1], z.device)
        self._bus.put(self.layer, z)
        probs = softmax_fp32(z, mask)  # (B, H, Tq, Tk)
        if self._bus.observer is not None:
            self._bus.observer(self.layer, probs, mask)
        return self._output(probs, v, hidden_states), probs


class DroppedAttention(ScoredAttention):
    """A dropped layer's self-attention: while any adapter of the backbone is active it adds
    nothing to the residual stream and never touches the KV cache (its slot stays empty);
    with adapters disabled (the distillation teacher, analysis) it is the layer's original
    dense attention again. The plan never makes it a donor. The decoder layer's forward stays
    transformers' own; its input norm is skipped with it (`lisa.model._gate_norm`)."""

    dropped = True

    def __init__(self, base_attn: nn.Module, bus: ScoreBus) -> None:
        super().__init__(base_attn, bus)
        self.active_adapter: str | None = None

    @property
    def dropping(self) -> bool:
        """True while an adapter is active (for all rows, or one per row)."""
        return self.active_adapter is not None or self._bus.row_adapters is not None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        if not self.dropping:
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        return torch.zeros_like(hidden_states), None


class MixAligner(nn.Module):
    """align(z) = W P z over the head axis; W starts as the identity, so a fresh aligner is
    exactly the permutation. Both paths use it as one (H, H) matrix W P (`matrix`): on
    materialised scores (reference) and on a score's query factors (fast); `forward`
    serves batches that mix it with FFN adapters."""

    linear = True

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(num_heads))  # (H, H)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # z: (B, H, Tq, Tk), already permuted
        """W (P z): the per-row route of a batch mixing linear and FFN adapters."""
        return torch.einsum("hg,bgqk->bhqk", self.weight.to(z.dtype), z)

    def matrix(self, inv_perm: torch.Tensor) -> torch.Tensor:
        """W P as one (H, H) matrix on unpermuted scores: (W P z)_h = sum_g W[h, g] z[perm[g]],
        i.e. W's columns taken at argsort(perm) (`inv_perm`, a buffer of the layer: one op)."""
        return self.weight[:, inv_perm]


class Aligner(nn.Module):
    """align(z) = z + W2 act(W1 z + b1) over the head axis, applied to already permuted
    scores (P z); W2 starts at zero, so a fresh aligner is exactly the permutation."""

    linear = False

    def __init__(self, num_heads: int, hidden: int, act: str, init_std: float) -> None:
        super().__init__()
        self.act = act
        self.w1 = nn.Linear(num_heads, hidden)
        self.w2 = nn.Linear(hidden, num_heads, bias=False)
        nn.init.normal_(self.w1.weight, std=init_std)
        nn.init.zeros_(self.w1.bias)
        nn.init.zeros_(self.w2.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # z: (B, H, Tq, Tk), permuted
        w1 = self.w1.weight.to(z.dtype)
        h = torch.einsum("fh,bhqk->bfqk", w1, z) + self.w1.bias.to(z.dtype)[:, None, None]  # (B, h_ff, Tq, Tk)
        return z + torch.einsum("hf,bfqk->bhqk", self.w2.weight.to(z.dtype), _ACT[self.act](h))


class LowRankQK(nn.Module):
    """Rank-r query and key projections of one substituted layer (q starts at zero)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, rank: int, k_std: float) -> None:
        super().__init__()
        self.q = nn.Linear(hidden_size, num_heads * rank, bias=False)
        self.k = nn.Linear(hidden_size, num_kv_heads * rank, bias=False)
        nn.init.zeros_(self.q.weight)
        nn.init.normal_(self.k.weight, std=k_std)


class LisaAttention(_AttentionBase):
    """A substituted layer's self-attention: Z = align(Z_donor) + q_r k_r^T / sqrt(r);
    V and W_o stay the layer's own. Adapter tensors live in `lisa_*` ModuleDicts keyed by
    adapter name (PEFT tuner layout). With no active adapter it runs the original dense
    attention (needs W_q/W_k, i.e. not pruned)."""

    def __init__(self, base_attn: nn.Module, shared: SharedLayer, bus: ScoreBus) -> None:
        super().__init__(base_attn, bus)
        self.donor = shared.donor
        self.rank = shared.rank
        self.register_buffer("perm", torch.tensor(shared.perm, dtype=torch.long), persistent=False)
        self.register_buffer("inv_perm", torch.argsort(self.perm), persistent=False)  # for W P (MixAligner.matrix)
        self.register_buffer("rope_freqs", rope_frequencies(self.head_dim, self.rank), persistent=False)
        self.lisa_aligner = nn.ModuleDict()
        self.lisa_qk = nn.ModuleDict()
        self.active_adapter: str | None = None

    # ---- adapters ----------------------------------------------------------------
    def add_adapter(self, name: str, *, aligner: str = "linear", aligner_hidden: int, act: str,
                    aligner_init_std: float, lowrank_init_std: float | None) -> None:
        hidden = self.config.hidden_size
        ref = self.v_proj.weight
        k_std = lowrank_init_std or hidden**-0.5
        module = (MixAligner(self.num_heads) if aligner == "linear"
                  else Aligner(self.num_heads, aligner_hidden, act, aligner_init_std))
        self.lisa_aligner[name] = module.to(ref.device, ref.dtype)
        self.lisa_qk[name] = LowRankQK(hidden, self.num_heads, self.num_kv_heads, self.rank, k_std).to(
            ref.device, ref.dtype)

    def delete_adapter(self, name: str) -> None:
        del self.lisa_aligner[name]
        del self.lisa_qk[name]
        if self.active_adapter == name:
            self.active_adapter = None

    # ---- pieces, per adapter or per row ------------------------------------------
    def _rows(self, names: list[str] | str):
        """[(adapter, row index or None for all rows)] for a name or one name per row."""
        if isinstance(names, str):
            return [(names, None)]
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n, []).append(i)
        if len(groups) == 1:
            return [(names[0], None)]
        return [(n, torch.tensor(rows, device=self.perm.device)) for n, rows in groups.items()]

    def _per_row(self, names, fn, *tensors: torch.Tensor):
        """Apply fn(adapter, *tensors[rows]) per adapter group; reassemble along the batch."""
        groups = self._rows(names)
        if groups[0][1] is None:
            return fn(groups[0][0], *tensors)
        outs = None
        for name, rows in groups:
            res = fn(name, *(t.index_select(0, rows) for t in tensors))
            res = res if isinstance(res, tuple) else (res,)
            if outs is None:
                outs = [r.new_empty((tensors[0].shape[0], *r.shape[1:])) for r in res]
            for o, r in zip(outs, res):
                o.index_copy_(0, rows, r)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _lowrank(self, name: str, x: torch.Tensor):
        qk = self.lisa_qk[name]
        return self._heads(qk.q, x, self.rank), self._heads(qk.k, x, self.rank)  # (B,H,T,r), (B,KVH,T,r)

    def _align(self, name: str, z: torch.Tensor) -> torch.Tensor:
        return self.lisa_aligner[name](z)

    def _check(self, names) -> None:
        for n in {names} if isinstance(names, str) else set(names):
            if n not in self.lisa_qk:
                raise KeyError(f"LiSA adapter {n!r} is not loaded (loaded: {', '.join(self.lisa_qk) or 'none'})")

    # ---- forward ------------------------------------------------------------------
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        bus, x = self._bus, hidden_states
        cos, sin = position_embeddings
        names = bus.row_adapters if bus.row_adapters is not None else self.active_adapter
        if names is not None:
            self._check(names)
            if not isinstance(names, str) and len(names) != x.shape[0]:
                raise ValueError(f"adapter_names: {len(names)} names for a batch of {x.shape[0]} rows")
        donor = bus.take(self.donor)
        if names is None and self._fast(x):  # adapters disabled (e.g. the distillation teacher)
            return self._dense_fast(x, cos, sin, attention_mask, past_key_values), None
        if names is not None and isinstance(donor, ScoreFactors) and self._all_linear(names):
            return self._forward_fast(names, x, cos, sin, donor, attention_mask, past_key_values)
        if isinstance(donor, ScoreFactors):  # an FFN aligner needs Z itself
            donor = donor.materialize()
        if names is None:  # adapters disabled: the layer's original attention
            z, v = self.dense_scores(x, cos, sin, past_key_values)
        else:
            z, v = self.scores(names, x, cos, sin, donor, past_key_values)
        mask = bus.mask(attention_mask, z.shape[-2], z.shape[-1], z.device)  # (B|1, 1, Tq, Tk)
        bus.put(self.layer, z)
        probs = softmax_fp32(z, mask)                                              # (B, H, Tq, Tk)
        if bus.distill is not None and names is not None:
            bus.distill.add(self._distill_kl(x, cos, sin, z, mask, past_key_values))
        if bus.observer is not None:
            bus.observer(self.layer, probs, mask)
        return self._output(probs, v, x), probs

    def scores(self, names, x, cos, sin, z_donor, past_key_values=None):
        """Reference path: Z (B, H, Tq, Tk) = align(P Z_donor) + q_r k_r^T / sqrt(r), and the
        values (B, KVH, Tk, d); caches k_r and V."""
        q_r, k_r, v = self._lowrank_qkv(names, x, cos, sin, past_key_values)
        diff = gqa_scores(q_r, k_r)                                               # (B, H, Tq, Tk)
        if self._all_linear(names):  # W P z as one matmul over the flattened scores, (B,) H x H per row if mixed
            b, h, tq, tk = z_donor.shape
            aligned = torch.matmul(self._mix_matrix(names).to(z_donor.dtype),
                                   z_donor.reshape(b, h, tq * tk)).view(b, h, tq, tk)
        else:
            aligned = self._per_row(names, self._align, z_donor.index_select(1, self.perm))  # align(P z)
        return torch.add(aligned, diff, alpha=1 / math.sqrt(self.rank)), v

    def _lowrank_qkv(self, names, x, cos, sin, past_key_values):
        """q_r (B, H, Tq, r), k_r (B, KVH, Tk, r) with RoPE on their frequency pairs, v (B, KVH, Tk, d)."""
        q_r, k_r = self._per_row(names, self._lowrank, x)
        tables = self._bus.rope_tables(cos, sin, self.rope_freqs, self.rank)
        q_r = apply_rope_lowrank(q_r, cos, sin, self.rope_freqs, tables)
        k_r = apply_rope_lowrank(k_r, cos, sin, self.rope_freqs, tables)
        v = self._heads(self.v_proj, x, self.head_dim)
        if past_key_values is not None:
            k_r, v = past_key_values.update(k_r, v, self.layer_idx)
        return q_r, k_r, v

    def _all_linear(self, names) -> bool:
        return all(self.lisa_aligner[n].linear for n in ({names} if isinstance(names, str) else set(names)))

    def _mix_matrix(self, names) -> torch.Tensor:
        """W P: (H, H) for one adapter, (B, H, H) for one adapter name per row."""
        if isinstance(names, str):
            return self.lisa_aligner[names].matrix(self.inv_perm)
        per_adapter = {n: self.lisa_aligner[n].matrix(self.inv_perm) for n in set(names)}
        return torch.stack([per_adapter[n] for n in names])

    def _forward_fast(self, names, x, cos, sin, donor: ScoreFactors, attention_mask, past_key_values):
        """Fast path: the donor's factors mixed by W P, plus this layer's rank-r term, as one
        SDPA call; no (B, H, Tq, Tk) tensor is made here."""
        q_r, k_r, v = self._lowrank_qkv(names, x, cos, sin, past_key_values)    # (B,H,Tq,r), (B,KVH,Tk,r), (B,KVH,Tk,d)
        factors = donor.mix(self._mix_matrix(names)).plus_lowrank(q_r, k_r, 1 / math.sqrt(self.rank))
        self._bus.put(self.layer, factors)
        mask, causal = sdpa_mask(attention_mask, q_r.shape[2], k_r.shape[2], x.dtype, x.device)
        kernel = self._bus.kernel if self._bus.kernel != "auto" else ("blocks" if x.device.type == "cpu" else "fused")
        if kernel == "blocks":
            out = factors.attend(v, mask, causal)                                 # (B, H, Tq, d)
        else:
            out = factors.attend_fused(v, mask, causal)
        return self._project(out, x), None

    def _distill_kl(self, x, cos, sin, z, mask, past_key_values) -> torch.Tensor:
        """KL(A_original || A_lisa), mean over (B, H, Tq); the teacher uses the layer's frozen W_q/W_k."""
        if z.shape[-1] != z.shape[-2]:
            raise RuntimeError("attention distillation needs full sequences (no KV cache from earlier steps)")
        with torch.no_grad():
            teacher, _ = self.dense_scores(x, cos, sin, None)
            p = softmax_fp32(teacher, mask)                                        # (B, H, Tq, Tk)
        log_a = torch.log_softmax(z.float() + mask, dim=-1)
        kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_a), torch.zeros_like(p))
        return kl.sum(-1).mean()
