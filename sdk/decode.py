"""One batched decode loop for serving: many rows, one adapter per row, each row finishing
on its own (its stop strings, token budget, deadline or cancellation).

    .venv/bin/python -m pytest -q tests/test_decode_unit.py      # greedy == Backbone.generate

`decode_rows(lm, tokenizer, rows)` prefills the left-padded prompts in one forward (the
LiSA fast path), then decodes one token per step with the KV cache. Rows that finish
leave the batch between steps (the cache, mask and positions are compacted), so the
remaining rows cost only their own compute. Greedy rows (temperature 0) give exactly
what `Backbone.generate` (HF `generate`, the plain reference path) gives for the same
prompts and adapters; sampled rows use their own seeded `torch.Generator`.

Text is re-decoded from the row's tokens at every step; a streamed delta never includes
text that could still change (a possible start of a stop string, an incomplete UTF-8
character, trailing white space that a later token may merge with), so the deltas of a
row join to exactly its final text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

FINISH_STOP, FINISH_LENGTH, FINISH_TIMEOUT, FINISH_CANCELLED = "stop", "length", "timeout", "cancelled"


@dataclass(eq=False)
class Row:
    """One completion being generated (a request with n=3 is three rows)."""

    prompt_ids: list[int]
    adapter_name: str                     # adapter name inside the LisaModel (per-row routing)
    max_new_tokens: int
    temperature: float = 0.0              # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False              # vLLM's extension: always generate max_new_tokens (benchmarks)
    deadline: float = float("inf")        # time.monotonic() after which the row stops (finish "timeout")
    cancelled: Callable[[], bool] = lambda: False
    on_delta: Callable[["Row", str], None] | None = None   # streamed text pieces (join to .text)
    # filled by the loop
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0                      # characters of text already passed to on_delta
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _eos_ids(lm, tokenizer) -> set[int]:
    eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _safe_length(text: str, stop: tuple[str, ...]) -> int:
    """How much of a still-growing text can be streamed without a later token changing it."""
    n = len(text)
    for s in stop:  # the longest suffix of text that is a proper prefix of a stop string
        for k in range(min(len(s) - 1, n), 0, -1):
            if s.startswith(text[n - k:]):
                n = min(n, len(text) - k)
                break
    while n > 0 and (text[n - 1] == "\ufffd" or text[n - 1].isspace()):
        n -= 1
    return n


def _update_text(row: Row, tokenizer) -> None:
    """Decode the row's tokens; finish it at the first stop string; stream the safe part."""
    text = tokenizer.decode(row.tokens, skip_special_tokens=True)
    if row.stop:
        cut = min((i for i in (text.find(s) for s in row.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, row.finish_reason = text[:cut], FINISH_STOP
    row.text = text
    upto = len(text) if row.done else _safe_length(text, row.stop)
    if upto > row.emitted and row.on_delta is not None:
        row.on_delta(row, text[row.emitted:upto])
    row.emitted = max(row.emitted, upto)


def _pick(logits, rows: list[Row], generators: list):
    """Next token per row: greedy argmax, or temperature / top-p sampling with the row's generator.
    logits (B, V) float32 -> list of B ints."""
    import torch

    greedy = logits.argmax(dim=-1).tolist()  # (B,)
    out = []
    for b, row in enumerate(rows):
        if row.temperature <= 0:
            out.append(greedy[b])
            continue
        probs = torch.softmax(logits[b] / row.temperature, dim=-1)  # (V,)
        if row.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > row.top_p   # keep the smallest head with mass >= top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        out.append(int(torch.multinomial(probs, 1, generator=generators[b]).item()))
    return out


def decode_rows(lm, tokenizer, rows: list[Row], *, pad_token_id: int | None = None,
                on_step: Callable[[int], None] | None = None) -> list[Row]:
    """Generate every row to its end (in place; returns `rows`). Blocking; run it in a worker thread.
    `on_step(live_rows)` is called after every forward.

    >>> rows = [Row(prompt_ids=tok("Hi").input_ids, adapter_name="fresh", max_new_tokens=8)]  # doctest: +SKIP
    >>> decode_rows(lm, tok, rows)[0].text  # doctest: +SKIP
    """
    import torch
    from transformers import DynamicCache

    if not rows:
        return rows
    pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    pad = 0 if pad is None else pad
    eos = _eos_ids(lm, tokenizer)
    generators = []
    for row in rows:
        g = torch.Generator()
        g.manual_seed(row.seed if row.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        generators.append(g)

    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)          # (B, T) left padded
    mask = torch.zeros((len(rows), width), dtype=torch.long)             # (B, T)
    for b, r in enumerate(rows):
        ids[b, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[b, width - len(r.prompt_ids):] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)          # (B, T), as HF generate
    live = list(range(len(rows)))  # indices into rows of the rows still in the batch
    cache = DynamicCache()
    step_ids = ids
    with torch.no_grad():
        while live:
            names = [rows[i].adapter_name for i in live]
            out = lm(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                     use_cache=True, logits_to_keep=1, adapter_names=names)
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()                         # (B, V)
            batch_rows = [rows[i] for i in live]
            picked = _pick(logits, batch_rows, [generators[i] for i in live])
            now = time.monotonic()
            for row, token in zip(batch_rows, picked):
                if row.cancelled():
                    row.finish_reason = FINISH_CANCELLED
                    continue
                if token in eos and not row.ignore_eos:
                    row.finish_reason = FINISH_STOP
                else:
                    row.tokens.append(token)
                    if len(row.tokens) >= row.max_new_tokens:
                        row.finish_reason = FINISH_LENGTH
                if now > row.deadline and not row.done:
                    row.finish_reason = FINISH_TIMEOUT
                _update_text(row, tokenizer)
            keep = [k for k, i in enumerate(live) if not rows[i].done]
            if on_step is not None:
                on_step(len(keep))
            if not keep:
                break
            if len(keep) < len(live):  # finished rows leave the batch
                index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                live = [live[k] for k in keep]
            step_ids = torch.tensor([[rows[i].tokens[-1]] for i in live], dtype=torch.long)  # (B, 1)
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)                   # (B, T + t)
            positions = positions[:, -1:] + 1                                                   # (B, 1)
    return rows
