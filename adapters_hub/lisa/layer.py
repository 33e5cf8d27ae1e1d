"""Attention modules of a LiSA backbone (HF LLaMA-family: LLaMA, Mistral, Qwen2).

Sharing scheme, for a plan substituting layers 3 and 4 (donors 2 and 3):

    layer 2 (dense donor, ScoredAttention)      layer 3 (LisaAttention)               layer 4 (LisaAttention)
    x2 -> W_q, W_k (full), RoPE                 x3 -> q_r, k_r (rank r), RoPE         x4 -> q_r, k_r, RoPE
    Z2 = Q K^T / sqrt(d)  --------bus------->   Z3 = align3(Z2) + q_r k_r^T/sqrt(r) --bus--> Z4 = align4(Z3) + ...
    A2 = softmax(Z2 + mask)                     A3 = softmax(Z3 + mask)               A4 = softmax(Z4 + mask)
    out = A2 V2 W_o2                            out = A3 V3 W_o3                      out = A4 V4 W_o4
    KV cache: K2 (d), V2                        KV cache: k_r (r), V3                 KV cache: k_r (r), V4

    align(z) = P z + W2 act(W1 P z)   over the head axis at every (i, j); P = plan.perm, W2 = 0 at init
    Z (B, H, Tq, Tk) is pre-softmax and pre-mask; it only lives for the current forward step.

The `ScoreBus` is the side channel: a donor `put`s its Z, the consumer `take`s it. In eval
mode a taken Z is freed once its last consumer read it; in training mode it is kept until
the next forward (autograd holds it anyway, and gradient-checkpoint recomputation reads it).

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


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KVH, T, e) -> (B, KVH * n_rep, T, e), as HF does for GQA."""
    if n_rep == 1:
        return x
    b, kvh, t, e = x.shape
    return x[:, :, None].expand(b, kvh, n_rep, t, e).reshape(b, kvh * n_rep, t, e)


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


def apply_rope_lowrank(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE on rank-r vectors x (B, h, T, r): dims (k, k + p) form a rotating pair at
    frequency freqs[k] (p = len(freqs)); an odd last dim is left as is (no position)."""
    p = len(freqs)
    if p == 0:
        return x
    c = cos[..., freqs].unsqueeze(1)  # (B, 1, T, p); HF cos is cat(f, f), so index < d/2 picks f
    s = sin[..., freqs].unsqueeze(1)
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
        self.row_adapters: list[str] | None = None
        self.distill: "DistillCollector | None" = None
        self.observer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    def reset(self) -> None:
        self.scores.clear()
        self.pending = dict(self.consumers)
        if self.distill is not None:
            self.distill.reset()

    def wants(self, layer: int) -> bool:
        return layer in self.consumers

    def put(self, layer: int, z: torch.Tensor) -> None:
        if layer in self.consumers:
            self.scores[layer] = z
            self.pending[layer] = self.consumers[layer]

    def take(self, layer: int) -> torch.Tensor:
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
        if hasattr(base_attn, "q_norm") or hasattr(base_attn, "k_norm"):
            raise TypeError(f"{type(base_attn).__name__} uses q/k norms; LiSA supports LLaMA/Mistral/Qwen2 attention")
        cfg = base_attn.config
        self.config = cfg
        self.layer_idx = base_attn.layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.head_dim = getattr(base_attn, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.scaling = getattr(base_attn, "scaling", self.head_dim**-0.5)
        self.is_causal = True
        self.q_proj, self.k_proj = base_attn.q_proj, base_attn.k_proj
        self.v_proj, self.o_proj = base_attn.v_proj, base_attn.o_proj
        self._bus = bus

    def _heads(self, proj: nn.Module, x: torch.Tensor, width: int) -> torch.Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, -1, width).transpose(1, 2)  # (B, h, T, width)

    def _dense_scores(self, x, cos, sin, past_key_values):
        """Full-rank eager scores Z (B, H, Tq, Tk), the values (B, KVH, Tk, d); caches K, V."""
        if self.q_proj is None or self.k_proj is None:
            raise RuntimeError(f"layer {self.layer_idx}: W_q/W_k were pruned (prune_qk); the dense attention "
                               "of this layer is not available any more")
        q = apply_rope(self._heads(self.q_proj, x, self.head_dim), cos, sin)  # (B, H, Tq, d)
        k = apply_rope(self._heads(self.k_proj, x, self.head_dim), cos, sin)  # (B, KVH, Tq, d)
        v = self._heads(self.v_proj, x, self.head_dim)                        # (B, KVH, Tq, d)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)               # (B, KVH, Tk, d)
        z = torch.matmul(q, repeat_kv(k, self.num_key_value_groups).transpose(2, 3)) * self.scaling
        return z, v

    def _output(self, probs: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(probs.to(v.dtype), repeat_kv(v, self.num_key_value_groups))  # (B, H, Tq, d)
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))


class ScoredAttention(_AttentionBase):
    """Dense attention computed eagerly, so that its scores Z reach the bus (donors of
    substituted layers) or an observer (analysis). Same result as the HF module."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        cos, sin = position_embeddings
        z, v = self._dense_scores(hidden_states, cos, sin, past_key_values)  # (B, H, Tq, Tk)
        mask = additive_mask(attention_mask, z.shape[-2], z.shape[-1], z.device)
        self._bus.put(self.layer_idx, z)
        probs = softmax_fp32(z, mask)  # (B, H, Tq, Tk)
        if self._bus.observer is not None:
            self._bus.observer(self.layer_idx, probs, mask)
        return self._output(probs, v, hidden_states), probs


class Aligner(nn.Module):
    """align(z) = z + W2 act(W1 z + b1) over the head axis, applied to already permuted
    scores (P z); W2 starts at zero, so a fresh aligner is exactly the permutation."""

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
        self.register_buffer("rope_freqs", rope_frequencies(self.head_dim, self.rank), persistent=False)
        self.lisa_aligner = nn.ModuleDict()
        self.lisa_qk = nn.ModuleDict()
        self.active_adapter: str | None = None

    # ---- adapters ----------------------------------------------------------------
    def add_adapter(self, name: str, *, aligner_hidden: int, act: str, aligner_init_std: float,
                    lowrank_init_std: float | None) -> None:
        hidden = self.config.hidden_size
        ref = self.v_proj.weight
        k_std = lowrank_init_std or hidden**-0.5
        self.lisa_aligner[name] = Aligner(self.num_heads, aligner_hidden, act, aligner_init_std).to(ref.device, ref.dtype)
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
        if names is None:  # adapters disabled: the layer's original attention
            z, v = self._dense_scores(x, cos, sin, past_key_values)
            bus.take(self.donor)  # keep the bus bookkeeping identical
        else:
            self._check(names)
            if not isinstance(names, str) and len(names) != x.shape[0]:
                raise ValueError(f"adapter_names: {len(names)} names for a batch of {x.shape[0]} rows")
            q_r, k_r = self._per_row(names, self._lowrank, x)                    # (B, H, Tq, r), (B, KVH, Tq, r)
            q_r = apply_rope_lowrank(q_r, cos, sin, self.rope_freqs)
            k_r = apply_rope_lowrank(k_r, cos, sin, self.rope_freqs)
            v = self._heads(self.v_proj, x, self.head_dim)                        # (B, KVH, Tq, d)
            if past_key_values is not None:
                k_r, v = past_key_values.update(k_r, v, self.layer_idx)           # (B, KVH, Tk, r), (B, KVH, Tk, d)
            z_donor = bus.take(self.donor)                                        # (B, H, Tq, Tk)
            z_perm = z_donor.index_select(1, self.perm)                           # P z
            diff = torch.matmul(q_r, repeat_kv(k_r, self.num_key_value_groups).transpose(2, 3))
            z = self._per_row(names, self._align, z_perm) + diff / math.sqrt(self.rank)  # (B, H, Tq, Tk)
        mask = additive_mask(attention_mask, z.shape[-2], z.shape[-1], z.device)  # (B|1, 1, Tq, Tk)
        bus.put(self.layer_idx, z)
        probs = softmax_fp32(z, mask)                                              # (B, H, Tq, Tk)
        if bus.distill is not None and names is not None:
            bus.distill.add(self._distill_kl(x, cos, sin, z, mask, past_key_values))
        if bus.observer is not None:
            bus.observer(self.layer_idx, probs, mask)
        return self._output(probs, v, x), probs

    def _distill_kl(self, x, cos, sin, z, mask, past_key_values) -> torch.Tensor:
        """KL(A_original || A_lisa), mean over (B, H, Tq); the teacher uses the layer's frozen W_q/W_k."""
        if z.shape[-1] != z.shape[-2]:
            raise RuntimeError("attention distillation needs full sequences (no KV cache from earlier steps)")
        with torch.no_grad():
            teacher, _ = self._dense_scores(x, cos, sin, None)
            p = softmax_fp32(teacher, mask)                                        # (B, H, Tq, Tk)
        log_a = torch.log_softmax(z.float() + mask, dim=-1)
        kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_a), torch.zeros_like(p))
        return kl.sum(-1).mean()
