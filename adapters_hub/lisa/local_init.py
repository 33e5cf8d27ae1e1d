"""Local initialisation: fit each substituted layer's adapter to that layer's original
attention, one layer at a time, without any end-to-end backward pass.

    fits = local_init(lm, calib_blocks)           # lm: a LisaModel before prune_qk
    for f in fits: print(f.layer, f.kl_before, f.kl_after)

For every substituted layer l (in layer order) and calibration block:
    x_l        the input of layer l's attention in the *dense* model (captured once)
    teacher    A_l = softmax(Q_l K_l^T / sqrt(d) + mask), the layer's own frozen W_q/W_k
               (mask: causal, and the layer's sliding window if it has one)
    student    softmax(align(P Z_donor) + q_r k_r^T / sqrt(r) + mask) on the same x_l
where Z_donor is the donor's dense scores, or, when the donor is itself substituted, the
donor's already-fitted LiSA scores (so a chain is fitted in order, each layer against what
its donor will really give it). Only layer l's aligner and low-rank Q/K are trained, with
Adam on KL(teacher || student) averaged over heads and query positions.

Why KL on probabilities rather than least squares on scores: softmax ignores a per-row
shift and squashes keys far below the row's maximum, so score errors there cost nothing;
least squares would spend the few parameters (an H x H mix, rank-r Q/K) on exactly those
entries. The KL weighs each error by the attention it moves. Held-out calibration blocks
(not used by the optimiser) give the before/after KL that is reported.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from adapters_hub.lisa.layer import LisaAttention
from adapters_hub.lisa.scores import additive_mask


@dataclass(frozen=True)
class LayerFit:
    layer: int
    donor: int
    kl_before: float   # held-out blocks, fresh adapter (permuted donor attention)
    kl_after: float    # held-out blocks, fitted adapter
    steps: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def local_init(lm, blocks: torch.Tensor, *, adapter_name: str | None = None, steps: int = 150,
               lr: float = 1e-2, batch_size: int = 2, heldout: int | None = None,
               layers: list[int] | None = None, queries: int | None = None,
               log: Callable[[str], None] | None = print) -> list[LayerFit]:
    """Fit the substituted layers of `lm` (all, or `layers`) in place; returns one LayerFit
    per fitted layer. `blocks` (N, T) are calibration token ids; the last `heldout` of them
    (default: a quarter, at least one) only measure the KL before and after.

    `queries`: each step's KL on that many query positions drawn at random per step (all
    T when None). The KL is a mean over queries, so a sample is an unbiased estimate, and a
    step then costs Q x T instead of T x T: long blocks (1024 tokens, so that the rank-r Q/K
    see distances past 255) at the price of short ones (`queries_for`)."""
    if getattr(lm, "pruned", False):
        raise RuntimeError("local_init: W_q/W_k of the substituted layers were pruned (prune_qk); "
                           "the original attention is the target, fit before pruning")
    name = adapter_name or lm.active_adapter
    if name not in lm.peft_config:
        raise KeyError(f"adapter_name: {name!r} is not loaded")
    n = blocks.shape[0]
    heldout = max(1, n // 4) if heldout is None else heldout
    if not 0 < heldout < n:
        raise ValueError(f"heldout: need 0 < heldout < {n} calibration blocks, got {heldout}")
    if queries is not None and not 0 < queries <= blocks.shape[1]:
        raise ValueError(f"queries: need 0 < queries <= {blocks.shape[1]} (the block length), got {queries}")
    lisa = lm.lisa_layers
    todo = sorted(lisa) if layers is None else sorted(layers)
    unknown = set(todo) - set(lisa)
    if unknown:
        raise ValueError(f"layers: {sorted(unknown)} are not substituted in this plan")

    inputs, ropes = _dense_attention_inputs(lm, blocks)
    causal = additive_mask(None, blocks.shape[1], blocks.shape[1], blocks.device)  # (1, 1, T, T)
    fit_rows, test_rows = list(range(n - heldout)), list(range(n - heldout, n))
    scores: dict[int, torch.Tensor] = {}  # layer -> Z (N, H, T, T), no grad: what consumers will read
    consumers = {l: [s for s in lisa if lisa[s].donor == l] for l in range(lm.plan.num_layers)}
    fits: list[LayerFit] = []
    was_training = lm.training
    lm.eval()
    for l in sorted(lisa):
        module = lisa[l]
        donor_z = _scores_of(module.donor, lm, lisa, inputs, ropes[module.donor], scores, name)
        if l in todo:
            mask = _windowed(causal, _window(lm.model.config, l))
            fits.append(_fit_layer(module, name, inputs[l], ropes[l], donor_z, mask, fit_rows, test_rows,
                                   steps=steps, lr=lr, batch_size=batch_size, queries=queries))
            if log:
                f = fits[-1]
                log(f"[local-init] layer {l:3d} <- {module.donor:3d}: attention KL {f.kl_before:.4f} -> "
                    f"{f.kl_after:.4f} ({f.seconds:.1f}s)")
        if consumers[l]:
            with torch.no_grad():
                scores[l] = torch.cat([module.scores(name, inputs[l][i : i + 1], *ropes[l], donor_z[i : i + 1])[0]
                                       for i in range(n)])
        if all(c < l for c in consumers[module.donor]):
            scores.pop(module.donor, None)  # every consumer of the donor is done
    lm.train(was_training)
    return fits


def queries_for(block_len: int, *, like: int = 256) -> int | None:
    """The query sample that makes a local-init step on `block_len`-token blocks cost what
    one on `like`-token blocks costs (Q x T = like x like); None (all) when blocks are short."""
    return None if block_len <= like else max(1, like * like // block_len)


def _window(cfg, layer: int) -> int | None:
    """Layer `layer`'s sliding window (it attends to the last `window` positions), or None."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window or (types is not None and types[layer] != "sliding_attention"):
        return None
    return int(window)


def _windowed(causal: torch.Tensor, window: int | None) -> torch.Tensor:
    """The causal mask (1, 1, T, T) of a layer that also masks keys `window` or more
    positions back (HF's rule: key k is visible from query q when q - window < k <= q)."""
    if window is None or window >= causal.shape[-1]:
        return causal
    t = torch.arange(causal.shape[-1], device=causal.device)
    too_old = (t[:, None] - t[None, :]) >= window  # (Tq, Tk)
    return causal.masked_fill(too_old, torch.finfo(torch.float32).min)


def _dense_attention_inputs(lm, blocks):
    """({layer: attention input (N, T, hidden)} of the dense model (adapters disabled),
    {layer: the RoPE (cos, sin) of a block}) for every substituted layer and donor. RoPE is
    per layer: Gemma 3's sliding and full layers rotate with different bases."""
    wanted = set(lm.lisa_layers) | {s.donor for s in lm.plan.shared}
    layers = lm.model.get_decoder().layers
    inputs: dict[int, list[torch.Tensor]] = {l: [] for l in wanted}
    ropes: dict[int, tuple] = {}

    def hook(module, args, kwargs, layer):
        inputs[layer].append(kwargs["hidden_states"].detach())
        if layer not in ropes:
            ropes[layer] = tuple(t.detach() for t in kwargs["position_embeddings"])

    handles = [layers[l].self_attn.register_forward_pre_hook(
        lambda m, a, kw, layer=l: hook(m, a, kw, layer), with_kwargs=True) for l in wanted]
    try:
        with torch.no_grad(), lm.disable_adapter():
            for i in range(blocks.shape[0]):
                lm(input_ids=blocks[i : i + 1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {l: torch.cat(xs) for l, xs in inputs.items()}, ropes


def _scores_of(layer: int, lm, lisa, inputs, rope, scores, name) -> torch.Tensor:
    """Z (N, H, T, T) of a donor: the fitted LiSA scores of a substituted donor (computed
    when it was fitted), or the dense scores of a dense one."""
    if layer in scores:
        return scores[layer]
    if layer in lisa:
        raise RuntimeError(f"local_init: scores of substituted donor layer {layer} are missing")
    module = lm.model.get_decoder().layers[layer].self_attn
    with torch.no_grad():
        z = torch.cat([module.dense_scores(inputs[layer][i : i + 1], *rope, None)[0]
                       for i in range(inputs[layer].shape[0])])
    scores[layer] = z
    return z


def _kl(teacher_logp: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || softmax(z + mask)), mean over (B, H, Tq); teacher given as log-probs."""
    log_q = torch.log_softmax(z.float() + mask, dim=-1)
    p = teacher_logp.exp()
    return (p * (teacher_logp - log_q)).sum(-1).mean()


def _fit_layer(module: LisaAttention, name, x, rope, donor_z, mask, fit_rows, test_rows, *,
               steps, lr, batch_size, queries=None) -> LayerFit:
    t0 = time.perf_counter()
    with torch.no_grad():  # teacher log-probabilities of the layer's own dense attention
        teacher = torch.cat([torch.log_softmax(module.dense_scores(x[i : i + 1], *rope, None)[0].float() + mask, -1)
                             for i in range(x.shape[0])])  # (N, H, T, T)
        # masked entries: p = 0; keep log p finite so that 0 * (log p - log q) stays 0
        teacher = teacher.clamp_min(torch.finfo(torch.float32).min / 4)

    def heldout_kl() -> float:
        with torch.no_grad():
            return float(torch.stack([_kl(teacher[i : i + 1], module.scores(name, x[i : i + 1], *rope,
                                                                            donor_z[i : i + 1])[0], mask)
                                      for i in test_rows]).mean())

    before = heldout_kl()
    params = list(module.lisa_aligner[name].parameters()) + list(module.lisa_qk[name].parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(module.layer_idx)
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay to 10%
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        rows = torch.tensor(fit_rows)[torch.randperm(len(fit_rows), generator=g)[:batch_size]]
        if queries is None:
            z, _ = module.scores(name, x[rows], *rope, donor_z[rows])
            loss = _kl(teacher[rows], z, mask)
        else:  # the same KL on a random sample of query positions: (B, H, Q, T) instead of (B, H, T, T)
            q = torch.randperm(x.shape[1], generator=g)[:queries].sort().values.to(x.device)
            z, _ = module.scores(name, x[rows], *rope, torch.stack([donor_z[r, :, q] for r in rows.tolist()]),
                                 queries=q)
            loss = _kl(torch.stack([teacher[r, :, q] for r in rows.tolist()]), z, mask[:, :, q])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p, s in zip(params, saved):
        p.requires_grad_(s)
    after = heldout_kl()
    return LayerFit(module.layer_idx, module.donor, before, after, steps, time.perf_counter() - t0)
