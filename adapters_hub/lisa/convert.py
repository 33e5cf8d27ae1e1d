"""Pure pieces of a conversion (dense base -> LiSA backbone), shared by `jobs/convert.py`,
its tests and `benchmarks/convert_smollm2.py`.

Token layout (one tokenisation of WikiText-2 test, never its held-out last 10%):
    [0, eval)                    evaluation blocks (perplexity; never trained or calibrated on)
    [eval, eval + calib)         calibration: analysis, sensitivities, local initialisation
    [eval + calib, held-out)     conversion training text, interleaved with GSM8K train text

    split = token_split(tok)                         # TokenSplit(eval, calib, train)
    loss, parts = self_distillation_loss(lm, ids)    # KL to the dense teacher (+ optional terms)
    self_distill(lm, split.train, minutes=10)        # the training loop (jobs/convert.py runs it
                                                     # inside Ray Train with checkpoints)
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenSplit:
    eval: torch.Tensor    # (n_eval, eval_len)
    calib: torch.Tensor   # (n_calib, calib_len)
    train: torch.Tensor   # (n_train, train_len), WikiText-2 and GSM8K blocks alternating


def token_split(tok, *, eval_blocks: int = 8, eval_len: int = 1024, calib_blocks: int = 16,
                calib_len: int = 256, train_len: int = 256, gsm8k_rows: int = 2000) -> TokenSplit:
    from adapters_hub.data import held_out_start, load_task_rows, load_text

    text = load_text("wikitext2")
    usable = text[: held_out_start("wikitext2", text)]
    ids = tok(usable, add_special_tokens=False)["input_ids"]
    n_eval, n_calib = eval_blocks * eval_len, calib_blocks * calib_len
    if len(ids) < n_eval + n_calib + train_len:
        raise ValueError(f"wikitext2: {len(ids)} usable tokens, fewer than eval + calibration + one training block")
    ids = torch.tensor(ids, dtype=torch.long)
    wiki = ids[n_eval + n_calib :]
    wiki = wiki[: len(wiki) // train_len * train_len].view(-1, train_len)
    rows = load_task_rows("gsm8k", "train")[:gsm8k_rows]
    gsm_text = "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows)
    gsm = torch.tensor(tok(gsm_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    gsm = gsm[: len(gsm) // train_len * train_len].view(-1, train_len)
    n = min(len(wiki), len(gsm))
    train = torch.stack([wiki[:n], gsm[:n]], dim=1).reshape(2 * n, train_len)  # wiki, gsm, wiki, ...
    return TokenSplit(eval=ids[:n_eval].view(eval_blocks, eval_len),
                      calib=ids[n_eval : n_eval + n_calib].view(calib_blocks, calib_len), train=train)


def self_distillation_loss(lm, ids: torch.Tensor, *, kd_weight: float = 1.0, attn_weight: float = 0.0,
                           lm_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """kd_weight * KL(teacher || student) over next-token distributions (mean per token)
    + attn_weight * attention KL of the substituted layers + lm_weight * LM loss.

    The teacher is the same model with adapters disabled (the dense base: substituted layers
    run their own W_q/W_k), so no second model is held in memory; it needs W_q/W_k, i.e. a
    backbone that was not pruned."""
    from adapters_hub.lisa.distill import distillation

    if getattr(lm, "pruned", False):
        raise RuntimeError("self-distillation: W_q/W_k were pruned (prune_qk); the dense teacher is gone")
    was_training = lm.training
    lm.eval()  # inference mode: the teacher runs on the fast path (SDPA, no score tensors)
    try:
        with torch.no_grad(), lm.disable_adapter():
            teacher = torch.log_softmax(lm(input_ids=ids, use_cache=False).logits.float(), dim=-1)  # (B, T, V)
    finally:
        lm.train(was_training)
    ctx = distillation(lm) if attn_weight else contextlib.nullcontext()
    with ctx as d:
        out = lm(input_ids=ids, labels=ids if lm_weight else None, use_cache=False)
        attn = d.loss() if attn_weight else None
    student = torch.log_softmax(out.logits.float(), dim=-1)
    kd = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
    loss = kd_weight * kd
    parts = {"kd": float(kd.detach())}
    if attn is not None:
        loss = loss + attn_weight * attn
        parts["attn_kl"] = float(attn.detach())
    if lm_weight:
        loss = loss + lm_weight * out.loss
        parts["lm"] = float(out.loss.detach())
    return loss, parts


@dataclass
class DistillState:
    """Where a self-distillation run is: saved in checkpoints, so a resumed run continues."""

    step: int = 0
    elapsed: float = 0.0                        # seconds of training so far (all attempts)
    history: list[dict] = field(default_factory=list)


def self_distill(lm, train: torch.Tensor, *, minutes: float, max_steps: int = 100_000, batch_size: int = 4,
                 lr: float = 2e-3, kd_weight: float = 1.0, attn_weight: float = 0.0, lm_weight: float = 0.0,
                 optimizer: torch.optim.Optimizer | None = None, state: DistillState | None = None,
                 on_step: Callable[[DistillState, dict], None] | None = None) -> DistillState:
    """Train the active adapter of `lm` by `self_distillation_loss` on rows of `train`
    (a fixed seeded order) until `minutes` of training or `max_steps`. The learning rate
    warms up over 10 steps and decays (cosine, to 10%) over the time budget, so a run
    ends annealed whenever the budget ends it. `on_step(state, parts)` runs after every
    step (logging, checkpoints); pass the optimizer and state of a checkpoint to resume."""
    params = [p for p in lm.parameters() if p.requires_grad]
    if not params:
        raise ValueError("self_distill: the model has no trainable parameters (no active adapter?)")
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    state = state or DistillState()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    budget, start, offset = minutes * 60, time.perf_counter(), state.elapsed
    was_training = lm.training
    lm.train()
    while state.step < max_steps and state.elapsed < budget:
        rows = order[(torch.arange(batch_size) + state.step * batch_size) % len(train)]
        decay = 0.5 * (1 + math.cos(math.pi * min(1.0, state.elapsed / budget)))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (state.step + 1) / 10) * (0.1 + 0.9 * decay)
        loss, parts = self_distillation_loss(lm, train[rows], kd_weight=kd_weight, attn_weight=attn_weight,
                                             lm_weight=lm_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state.step += 1
        state.elapsed = offset + time.perf_counter() - start
        state.history.append({"step": state.step, "loss": float(loss.detach()), **parts})
        if on_step is not None:
            on_step(state, parts)
    lm.train(was_training)
    return state
