"""Evaluate a model on a task spec, and format a task's rows for TRL's SFT trainer.

    metrics = evaluate_task(model, tok, spec, rows, profile="quick")
    metrics["accuracy"], metrics["answer_nll"]      # gsm8k
    metrics["perplexity"]                            # wikitext2
    metrics.samples                                  # a few (prompt, output, target) for logging

    sft_examples(spec, rows) -> [{"prompt", "completion"}] | [{"text"}]   (chat: lists of messages)

Answer tokens are found the way TRL 1.16 finds them (SFTTrainer, prompt-completion case):
tokenize prompt and prompt + completion with the tokenizer's defaults and take what follows
their common prefix. So answer_nll measures exactly the tokens the SFT loss trains, minus
the EOS TRL appends to the completion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapters_hub.tasks import DataLoader, Metric, Profile, TaskSpec
from adapters_hub.tasks.scoring import macro_f1

if TYPE_CHECKING:
    import torch

N_SAMPLES = 3


@dataclass(frozen=True)
class Sample:
    prompt: str
    output: str
    target: str


class TaskMetrics(dict):
    """dict[str, float] of metrics (log it as is), with the sample generations on `.samples`."""

    def __init__(self, metrics: dict[str, float], samples: list[Sample]):
        super().__init__(metrics)
        self.samples = samples


def evaluate_task(model, tokenizer, spec: TaskSpec, rows: list[dict], *, profile: Profile | str,
                  progress: bool = True) -> TaskMetrics:
    """The spec's metrics on all of `rows` (see tasks.load_rows for picking them).

    gsm8k-like: accuracy (greedy generation, extracted answer == extracted reference),
    answer_found (share of generations with an extractable answer), answer_nll;
    corpus: perplexity over blocks of profile.max_seq_len tokens of the concatenated rows.
    """
    if isinstance(profile, str):
        profile = spec.profile(profile)
    if not rows:
        raise ValueError(f"task {spec.name!r}: no rows to evaluate")
    was_training = model.training
    model.eval()
    try:
        if spec.dataset.loader is DataLoader.corpus:
            return _evaluate_corpus(model, tokenizer, spec, rows, profile, progress)
        return _evaluate_rows(model, tokenizer, spec, rows, profile, progress)
    finally:
        model.train(was_training)


def sft_examples(spec: TaskSpec, rows: list[dict]) -> list[dict]:
    """Rows in TRL 1.16's dataset formats.

    rows      -> prompt-completion {"prompt", "completion"}: SFTTrainer then defaults to
    completion_only_loss (loss on answer tokens only) and appends EOS to the completion;
    chat rows -> the same in the conversational format (lists of {"role", "content"}), which
    TRL renders with the tokenizer's chat template, the loss on the assistant turn only.
    corpus    -> language modelling {"text"} (one chunk each; loss on every token).
    """
    if spec.dataset.loader is DataLoader.corpus:
        return [{"text": row["text"]} for row in rows]
    if spec.is_chat:  # conversational prompt-completion: TRL applies the chat template
        return [dict(zip(("prompt", "completion"), spec.messages(row))) for row in rows]
    return [{"prompt": spec.prompt(row), "completion": spec.completion(row)} for row in rows]


# ----------------------------------------------------------------------------- task rows


def _evaluate_rows(model, tok, spec, rows, profile, progress) -> TaskMetrics:
    prompts = [spec.prompt(row, tok) for row in rows]
    metrics: dict[str, float] = {"eval_examples": float(len(rows))}
    samples: list[Sample] = []
    if Metric.accuracy in spec.metrics or Metric.macro_f1 in spec.metrics:
        outputs = generate(model, tok, prompts, max_new_tokens=spec.max_new_tokens(profile),
                           batch_size=profile.eval_batch_size, max_prompt_len=profile.max_seq_len,
                           stop=spec.generation.stop, progress=progress)
        predicted = [spec.extract(out) for out in outputs]
        targets = [spec.target(row) for row in rows]
        if any(t is None for t in targets):
            bad = next(r for r, t in zip(rows, targets) if t is None)
            raise ValueError(f"task {spec.name!r}: a reference answer has no extractable answer "
                             f"({bad.get('_where', 'row')}: {spec.format.target_field}={bad[spec.format.target_field]!r})")
        metrics["accuracy"] = sum(p == t for p, t in zip(predicted, targets)) / len(rows)
        metrics["answer_found"] = sum(p is not None for p in predicted) / len(rows)
        if Metric.macro_f1 in spec.metrics:
            metrics["macro_f1"] = macro_f1(predicted, targets, labels=spec.extraction.labels)
        samples = [Sample(p, o, spec.completion(r)) for p, o, r in list(zip(prompts, outputs, rows))[:N_SAMPLES]]
    if Metric.mc_accuracy in spec.metrics:
        metrics["mc_accuracy"] = mc_accuracy(model, tok, prompts, [spec.choices(r) for r in rows],
                                             batch_size=profile.eval_batch_size, max_len=profile.max_seq_len,
                                             progress=progress)
    if Metric.answer_nll in spec.metrics:
        completions = [spec.completion(row) for row in rows]
        metrics["answer_nll"] = answer_nll(model, tok, prompts, completions, batch_size=profile.eval_batch_size,
                                           max_len=profile.max_seq_len, progress=progress)
    return TaskMetrics(metrics, samples)


def mc_accuracy(model, tok, prompts: list[str], choices: list[tuple[list[str], int]], *, batch_size: int,
                max_len: int | None = None, progress: bool = True) -> float:
    """Multiple choice as lm-evaluation-harness scores it: each choice is a completion of
    the prompt, the one with the highest summed log-likelihood is the model's answer."""
    pairs = [(p, c) for p, (options, _) in zip(prompts, choices) for c in options]
    scores = completion_logprobs(model, tok, [p for p, _ in pairs], [c for _, c in pairs], batch_size=batch_size,
                                 max_len=max_len, progress=progress)
    right, at = 0, 0
    for options, answer in choices:
        mine = scores[at : at + len(options)]
        at += len(options)
        right += int(max(range(len(options)), key=mine.__getitem__) == answer)
    return right / len(choices)


def generate(model, tok, prompts: list[str], *, max_new_tokens: int, batch_size: int,
             max_prompt_len: int | None = None, stop: list[str] | None = None, progress: bool = True) -> list[str]:
    """Greedy continuations of `prompts` (new text only), batched with left padding."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    config = GenerationConfig(  # a fresh config: the model's may carry sampling settings
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        stop_strings=list(stop or []) or None)
    extra = {"tokenizer": tok} if stop else {}  # generate needs it to match stop strings
    side, tok.padding_side = tok.padding_side, "left"  # left: every row's last prompt token is at -1
    outputs: list[str] = []
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
                batch = prompts[start : start + batch_size]
                # keep the end of an over-long prompt: the question and "Answer:" are there
                enc = tok(batch, return_tensors="pt", padding=True)
                enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
                if max_prompt_len and enc["input_ids"].shape[1] > max_prompt_len:
                    enc = {k: v[:, -max_prompt_len:] for k, v in enc.items()}
                enc = {k: v.to(device) for k, v in enc.items()}
                out = model.generate(**enc, generation_config=config, **extra)
                new = out[:, enc["input_ids"].shape[1]:]
                outputs += tok.batch_decode(new, skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return outputs


def answer_tokens(tok, prompt: str, completion: str) -> tuple[list[int], int]:
    """(ids of prompt + completion, index of the first answer token), as TRL 1.16 computes them."""
    prompt_ids = tok(prompt)["input_ids"]
    full_ids = tok(prompt + completion)["input_ids"]
    start = 0
    while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
        start += 1
    return full_ids, start


def answer_nll(model, tok, prompts: list[str], completions: list[str], *, batch_size: int,
               max_len: int | None = None, progress: bool = True) -> float:
    """Mean NLL (nats/token) of the answer tokens given the prompt, teacher forced, over all tokens.

    Sequences longer than max_len keep their start, as TRL truncates them in training.
    """
    totals = _answer_token_nll(model, tok, prompts, completions, batch_size=batch_size, max_len=max_len,
                               progress=progress, desc="answer nll")
    count = sum(n for _, n in totals)
    if count == 0:
        raise ValueError("no answer tokens to score (all completions empty or truncated away by max_len)")
    return sum(t for t, _ in totals) / count


def completion_logprobs(model, tok, prompts: list[str], completions: list[str], *, batch_size: int,
                        max_len: int | None = None, progress: bool = True) -> list[float]:
    """Summed log-likelihood of each completion given its prompt."""
    totals = _answer_token_nll(model, tok, prompts, completions, batch_size=batch_size, max_len=max_len,
                               progress=progress, desc="choices")
    return [-t for t, _ in totals]


def _answer_token_nll(model, tok, prompts, completions, *, batch_size, max_len, progress, desc):
    """Per (prompt, completion): (summed NLL of the answer tokens, their count)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    items = [answer_tokens(tok, p, c) for p, c in zip(prompts, completions)]
    out: list[tuple[float, int]] = []
    with torch.no_grad():
        for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress):
            batch = [(ids[:max_len] if max_len else ids, first) for ids, first in items[start : start + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width), dtype=torch.bool)  # which targets are answer tokens
            for i, (row, first) in enumerate(batch):  # right padding: positions stay 0..n-1
                ids[i, : len(row)] = torch.tensor(row)
                attention[i, : len(row)] = 1
                scored[i, first : len(row)] = True
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False).logits.float()
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(device), reduction="none")  # (B, T-1)
            mask = scored[:, 1:].to(device)  # token t is predicted from position t-1
            out += [(float((nll[i] * mask[i]).sum()), int(mask[i].sum())) for i in range(len(batch))]
    return out


# ----------------------------------------------------------------------------- corpus


def _evaluate_corpus(model, tok, spec, rows, profile, progress) -> TaskMetrics:
    import torch

    from adapters_hub.evaluation import perplexity

    ids = []  # per chunk: one call on the whole text trips the tokenizer's length warning
    for row in rows:
        ids += tok(row["text"], add_special_tokens=False)["input_ids"]
    n_blocks = len(ids) // profile.max_seq_len
    if n_blocks == 0:
        raise ValueError(f"task {spec.name!r}: {len(ids)} eval tokens, fewer than one block of "
                         f"max_seq_len={profile.max_seq_len}; raise eval_examples")
    blocks = torch.tensor(ids[: n_blocks * profile.max_seq_len], dtype=torch.long).view(n_blocks, -1)
    ppl = perplexity(model, blocks, batch_size=profile.eval_batch_size, progress=progress)
    metrics = {"perplexity": ppl, "eval_tokens": float(blocks.numel())}
    if not math.isfinite(ppl):
        raise ValueError(f"task {spec.name!r}: perplexity is not finite ({ppl})")
    # Samples: continue the start of a few chunks, next to the true continuation.
    samples = []
    cut = 200  # characters of context
    heads = [row["text"] for row in rows[:N_SAMPLES] if len(row["text"]) > cut]
    if heads:
        outs = generate(model, tok, [h[:cut] for h in heads], max_new_tokens=spec.max_new_tokens(profile),
                        batch_size=profile.eval_batch_size, progress=False)
        samples = [Sample(h[:cut], o, h[cut : cut + len(o) + 40]) for h, o in zip(heads, outs)]
    return TaskMetrics(metrics, samples)
