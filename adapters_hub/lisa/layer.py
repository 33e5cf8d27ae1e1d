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

The scores' side channel (`ScoreBus`) and the attention math both routes share are
`adapters_hub.lisa.scores`; the fast route's score factors and kernels `adapters_hub.lisa.factors`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from adapters_hub.lisa.plan import SharedLayer
from adapters_hub.lisa.factors import ScoreFactors
from adapters_hub.lisa.scores import (ScoreBus, apply_rope, apply_rope_lowrank, gqa_apply, gqa_scores,
                                      rope_frequencies, sdpa_mask, softmax_fp32)

_ACT = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh}


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

    # ---- the forward route: bound when the model is prepared, never chosen per call ----
    # "reference" (Z materialised: training, distillation, analysis), or the fast path's
    # kernel, "blocks" (query blocks, CPU) or "fused" (one SDPA call over mixed queries, GPU).
    route = "reference"

    def train(self, mode: bool = True):
        """`model.train()` / `model.eval()` reach every layer (nn.Module recurses): that is
        where the route is bound, as dropout binds its behaviour."""
        super().train(mode)
        self.bind_route()
        return self

    def bind_route(self) -> None:
        """Training, or something that reads Z (a distillation collector, an analysis
        observer), or the fast path switched off -> reference; else the bus's kernel,
        "auto" meaning blocks on CPU and fused elsewhere (resolved here, on this layer's device)."""
        bus = self._bus
        if self.training or not bus.fast or bus.distill is not None or bus.observer is not None:
            self.route = "reference"
        elif bus.kernel == "auto":
            self.route = "blocks" if self.v_proj.weight.device.type == "cpu" else "fused"
        else:
            self.route = bus.kernel

    def _fast(self, x: torch.Tensor) -> bool:
        """The fast route runs for prefill-like steps (Tq > 1); a decode step's scores are
        (B, H, 1, Tk), small enough that materialising them is the cheaper way."""
        return self.route != "reference" and x.shape[1] > 1


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

    def scores(self, names, x, cos, sin, z_donor, past_key_values=None, queries=None):
        """Reference path: Z (B, H, Tq, Tk) = align(P Z_donor) + q_r k_r^T / sqrt(r), and the
        values (B, KVH, Tk, d); caches k_r and V. With `queries` (Q,) query positions, only
        those rows of Z: z_donor is then (B, H, Q, Tk), already taken at them, and Z is
        (B, H, Q, Tk) (local initialisation's sampled KL on long blocks)."""
        q_r, k_r, v = self._lowrank_qkv(names, x, cos, sin, past_key_values)
        if queries is not None:
            q_r = q_r.index_select(2, queries)                                    # (B, H, Q, r)
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
        if self.route == "blocks":
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
