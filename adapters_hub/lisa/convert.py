"""The pieces of a conversion (dense base -> LiSA backbone): the token layout, the objective
and the self-distillation loop; `jobs/convert.py` runs them in Ray Train, the benchmarks
in-process.

Token layout (one tokenisation of WikiText-2 test, never its held-out last 10%):
    [0, eval)                    the evaluation slice (perplexity; never trained or calibrated on;
                                 not to be confused with the *held-out tail*, data.held_out_text)
    [eval, eval + calib)         calibration: analysis, sensitivities, local initialisation
    [eval + calib, held-out)     conversion training text, interleaved with GSM8K train text

    split = token_split(tok)                         # TokenSplit(eval, calib, train)
    loss, parts = self_distillation_loss(lm, ids, Objective(kd_temperature=2.0))  # vs the dense teacher
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


@dataclass(frozen=True)
class Objective:
    """What self-distillation minimises, each term weighted by a field (0 = off):

        kd_weight     * T^2 KL(softmax(teacher / T) || softmax(student / T))   next tokens
        hidden_weight * |h_student - h_teacher|^2 / mean |h_teacher|^2          last hidden states
        attn_weight   * attention KL of the substituted layers                  per layer
        lm_weight     * next-token cross-entropy on the text itself

    T^2 keeps the gradient scale of the KL term independent of T (Hinton et al.; SwiftKV
    uses T = 2). The hidden term is relative, so its weight does not depend on the model's
    hidden-state scale."""

    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    hidden_weight: float = 0.0
    attn_weight: float = 0.0
    lm_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("kd_weight", "hidden_weight", "attn_weight", "lm_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature: must be > 0, got {self.kd_temperature}")
        if not any(getattr(self, n) for n in ("kd_weight", "hidden_weight", "attn_weight", "lm_weight")):
            raise ValueError("objective: every weight is 0; nothing to train on")


def self_distillation_loss(lm, ids: torch.Tensor, objective: Objective = Objective()
                           ) -> tuple[torch.Tensor, dict[str, float]]:
    """The `Objective` on one batch of token rows `ids` (B, T); (loss, parts as floats).

    The teacher is the same model with adapters and healing disabled (the dense base:
    substituted layers run their own W_q/W_k, healed linears their plain weights), so no
    second model is held in memory; it needs W_q/W_k, i.e. a backbone that was not pruned."""
    from adapters_hub.lisa import healing
    from adapters_hub.lisa.distill import distillation

    if getattr(lm, "pruned", False):
        raise RuntimeError("self-distillation: W_q/W_k were pruned (prune_qk); the dense teacher is gone")
    o = objective
    hidden = bool(o.hidden_weight)
    was_training = lm.training
    lm.eval()  # inference mode: the teacher runs on the fast path (SDPA, no score tensors)
    try:
        with torch.no_grad(), lm.disable_adapter(), healing.disabled(lm.model):
            t_out = lm(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    finally:
        lm.train(was_training)
    ctx = distillation(lm) if o.attn_weight else contextlib.nullcontext()
    with ctx as d:
        out = lm(input_ids=ids, labels=ids if o.lm_weight else None, use_cache=False, output_hidden_states=hidden)
        attn = d.loss() if o.attn_weight else None
    loss = torch.zeros((), device=ids.device)
    parts: dict[str, float] = {}
    if o.kd_weight:
        temp = o.kd_temperature
        t_logits, s_logits = t_out.logits.float(), out.logits.float()  # (B, T, V)
        if temp != 1:  # at T = 1 the division would be two more passes over B x T x V
            t_logits, s_logits = t_logits / temp, s_logits / temp
        teacher = torch.log_softmax(t_logits, dim=-1).flatten(0, 1)  # (B*T, V)
        student = torch.log_softmax(s_logits, dim=-1).flatten(0, 1)
        kd = F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temp**2
        loss = loss + o.kd_weight * kd
        parts["kd"] = float(kd.detach())
    if hidden:
        h_t, h_s = t_out.hidden_states[-1].float(), out.hidden_states[-1].float()  # (B, T, hidden)
        mse = (h_s - h_t).pow(2).sum(-1).mean() / h_t.pow(2).sum(-1).mean()
        loss = loss + o.hidden_weight * mse
        parts["hidden"] = float(mse.detach())
    if attn is not None:
        loss = loss + o.attn_weight * attn
        parts["attn_kl"] = float(attn.detach())
    if o.lm_weight:
        loss = loss + o.lm_weight * out.loss
        parts["lm"] = float(out.loss.detach())
    return loss, parts


def distill_optimizer(lm, *, lr: float, heal_lr: float) -> torch.optim.Optimizer:
    """AdamW over what requires grad: the LiSA tensors at `lr`, healing updates at `heal_lr`
    (a group of their own: the right rate for B A updates of frozen weights differs from the
    aligner's; see the objectives benchmark)."""
    from adapters_hub.lisa import healing

    heal = {id(p) for p in healing.parameters(lm.model)}
    lisa = [p for p in lm.parameters() if p.requires_grad and id(p) not in heal]
    groups = [{"params": lisa, "lr": lr, "name": "lisa"}]
    if heal:
        groups.append({"params": [p for p in lm.parameters() if id(p) in heal], "lr": heal_lr, "name": "healing"})
    return torch.optim.AdamW(groups, weight_decay=0.0)


@dataclass
class DistillState:
    """Where a self-distillation run is: saved in checkpoints, so a resumed run continues."""

    step: int = 0
    elapsed: float = 0.0                        # seconds of training so far (all attempts)
    history: list[dict] = field(default_factory=list)


def self_distill(lm, train: torch.Tensor, *, minutes: float, max_steps: int = 100_000, batch_size: int = 4,
                 lr: float = 2e-3, heal_lr: float = 4e-3, objective: Objective = Objective(),
                 amp_dtype: torch.dtype | None = None, optimizer: torch.optim.Optimizer | None = None, state: DistillState | None = None,
                 on_step: Callable[[DistillState, dict], None] | None = None) -> DistillState:
    """Train what requires grad in `lm` (the active adapter, and healing when attached) by
    `self_distillation_loss` on rows of `train`
    (a fixed seeded order) until `minutes` of training or `max_steps`. Each group's learning
    rate (`lr` for LiSA tensors, `heal_lr` for healing) warms up over 10 steps and decays (cosine, to 10%) over the time budget, so a run
    ends annealed whenever the budget ends it. `on_step(state, parts)` runs after every
    step (logging, checkpoints); pass the optimizer and state of a checkpoint to resume."""
    params = [p for p in lm.parameters() if p.requires_grad]
    if not params:
        raise ValueError("self_distill: the model has no trainable parameters (no active adapter?)")
    opt = optimizer or distill_optimizer(lm, lr=lr, heal_lr=heal_lr)
    state = state or DistillState()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    device = params[0].device
    budget, start, offset = minutes * 60, time.perf_counter(), state.elapsed
    was_training = lm.training
    lm.train()
    while state.step < max_steps and state.elapsed < budget:
        rows = order[(torch.arange(batch_size) + state.step * batch_size) % len(train)]
        decay = 0.5 * (1 + math.cos(math.pi * min(1.0, state.elapsed / budget)))
        for group in opt.param_groups:
            group["lr"] = group.setdefault("peak_lr", group["lr"]) * min(1.0, (state.step + 1) / 10) * (0.1 + 0.9 * decay)
        ids = train[rows].to(device)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
            loss, parts = self_distillation_loss(lm, ids, objective)
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
