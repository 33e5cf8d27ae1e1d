"""The fast route's scores, kept as factors and never materialised for all queries at once,
and its two kernels: `attend` (query blocks; the root's head mix in score space: fewer
passes in float32, the CPU's) and `attend_fused` (the mix folded into the queries, one
SDPA call: more FLOPs, fewer passes over memory, the GPU's). Both equal the reference
route's softmax(Z + mask) V (tests/test_lisa_fast.py); `adapters_hub.lisa.scores` holds
the math they share with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters_hub.lisa.scores import additive_mask, gqa_apply, gqa_scores, repeat_kv


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
