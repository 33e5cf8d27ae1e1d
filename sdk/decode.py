"""One batched decode loop for serving: many rows, one adapter per row, each row finishing
on its own (its stop strings, token budget, deadline or cancellation).

    .venv/bin/python -m pytest -q tests/test_decode_unit.py      # greedy == Backbone.generate

`Decoder` is the running batch (continuous batching): `add(rows)` prefills newcomers'
left-padded prompts in one forward (the LiSA fast path) and merges them into the batch
between decode steps; `step()` decodes one token per live row with the KV cache. Rows
that finish leave the batch at once (the cache, mask and positions are compacted, and
padding no row needs is cut), so the others cost only their own compute.
`decode_rows(lm, tokenizer, rows)` runs one static batch to its end. Greedy rows
(temperature 0) give exactly what `Backbone.generate` (HF `generate`, the plain reference
path) gives for the same prompts and adapters, whenever they join; sampled rows use their
own seeded `torch.Generator`.

A row with `logprobs` (k) records each generated token's log-probability and the k most
likely tokens at its position (log-softmax of the model's logits, before temperature); with
`echo`, the prompt's tokens too, from the prefill's logits at every position (the first
prompt token has none). `max_new_tokens` 0 (with echo) scores the prompt and generates
nothing, what evaluation clients ask for.

Text is re-decoded from the row's tokens at every step; a streamed delta never includes
text that could still change (a possible start of a stop string, an incomplete UTF-8
character, trailing white space that a later token may merge with), so the deltas of a
row join to exactly its final text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

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
    logprobs: int | None = None           # record log-probabilities and the top-k per token
    echo: bool = False                    # ... of the prompt's tokens as well (needs logprobs)
    # filled by the loop
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)           # per generated token
    top_logprobs: list[dict[int, float]] = field(default_factory=list)  # token id -> log p, k per position
    prompt_logprobs: list[float | None] = field(default_factory=list)   # echo: per prompt token (first None)
    prompt_top: list[dict[int, float] | None] = field(default_factory=list)
    text: str = ""
    emitted: int = 0                      # characters of text already passed to on_delta
    finish_reason: str | None = None
    job: Any = None                       # the owner's bookkeeping (the engine's request)
    index: int = 0                        # choice index within that request

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


class Decoder:
    """A running batch: rows join (`add`: prefill, then merged into the batch) and leave (when
    finished) between decode steps (`step`). Continuous batching on one KV cache:

        dec = Decoder(lm, tok)
        dec.add(rows)              # prefill the new rows together, first token each
        while dec.live:
            dec.step()             # one token for every live row; finished rows leave
            dec.add(more_rows)     # newcomers join between steps

    The batch is left-padded: the cache (per layer (B, KVH, T, d or r)) and the mask (B, T)
    of the newcomers are padded on the left to the longer of the two and concatenated
    along the batch; padding columns no row needs any more are cut off again.
    """

    def __init__(self, lm, tokenizer, *, pad_token_id: int | None = None,
                 on_step: Callable[[int], None] | None = None):
        self.lm, self.tokenizer, self.on_step = lm, tokenizer, on_step
        pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        self.pad = 0 if pad is None else pad
        self.eos = _eos_ids(lm, tokenizer)
        self.rows: list[Row] = []       # live rows, in batch order
        self._gens: list = []           # their generators
        self._cache = None              # DynamicCache, layers (B, KVH, T, e)
        self._mask = None               # (B, T) 1 = a real token
        self._pos = None                # (B, 1) position of each row's last token

    @property
    def live(self) -> int:
        return len(self.rows)

    def add(self, rows: list[Row]) -> list[Row]:
        """Prefill `rows` (one forward) and give each its first token; those still running join
        the batch. Returns the rows that finished at once."""
        import torch
        from transformers import DynamicCache

        if not rows:
            return []
        gens = []
        for row in rows:
            g = torch.Generator()
            g.manual_seed(row.seed if row.seed is not None else int(torch.randint(0, 2**62, ()).item()))
            gens.append(g)
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)   # (B, T) left padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)          # (B, T)
        for b, r in enumerate(rows):
            ids[b, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[b, width - len(r.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)       # (B, T), as HF generate
        cache = DynamicCache()
        echo = any(r.echo for r in rows)
        logits = self._forward(ids, mask, positions, cache, rows, every_position=echo)  # (B, V) | (B, T, V)
        if echo:
            for b, r in enumerate(rows):
                if r.echo:
                    _record_prompt(r, logits[b, width - len(r.prompt_ids):])
            logits = logits[:, -1]
        finished = self._advance(rows, gens, logits)
        keep = [k for k, r in enumerate(rows) if not r.done]
        if keep:
            index = torch.tensor(keep, dtype=torch.long)
            if len(keep) < len(rows):
                cache.batch_select_indices(index)
            self._join([rows[k] for k in keep], [gens[k] for k in keep], cache, mask[index], positions[index, -1:])
        if self.on_step is not None:
            self.on_step(self.live)
        return finished

    def step(self) -> list[Row]:
        """One token for every live row; returns the rows that finished (they left the batch)."""
        import torch

        if not self.rows:
            return []
        ids = torch.tensor([[r.tokens[-1]] for r in self.rows], dtype=torch.long)          # (B, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=-1)  # (B, T + 1)
        self._pos = self._pos + 1                                                          # (B, 1)
        logits = self._forward(ids, self._mask, self._pos, self._cache, self.rows)
        finished = self._advance(self.rows, self._gens, logits)
        if finished:
            keep = [k for k, r in enumerate(self.rows) if not r.done]
            if keep:
                index = torch.tensor(keep, dtype=torch.long)
                self._cache.batch_select_indices(index)
                self._mask, self._pos = self._mask[index], self._pos[index]
                self.rows, self._gens = [self.rows[k] for k in keep], [self._gens[k] for k in keep]
                self._trim()
            else:
                self.reset()
        if self.on_step is not None:
            self.on_step(self.live)
        return finished

    def reset(self) -> None:
        """Drop every row (after an error) and the cache."""
        self.rows, self._gens, self._cache, self._mask, self._pos = [], [], None, None, None

    # ------------------------------------------------------------------ internals

    def _forward(self, ids, mask, positions, cache, rows, every_position: bool = False):
        """Logits (B, V) float32 of the last position, or (B, T, V) of every position; the
        cache grows by ids' length."""
        import torch

        with torch.no_grad():
            out = self.lm(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                          use_cache=True, logits_to_keep=0 if every_position else 1,
                          adapter_names=[r.adapter_name for r in rows])
        return out.logits.float() if every_position else out.logits[:, -1, :].float()

    def _advance(self, rows: list[Row], gens: list, logits) -> list[Row]:
        import torch

        picked = _pick(logits, rows, gens)
        logp = torch.log_softmax(logits, dim=-1) if any(r.logprobs is not None for r in rows) else None  # (B, V)
        now, finished = time.monotonic(), []
        for b, (row, token) in enumerate(zip(rows, picked)):
            if row.cancelled():
                row.finish_reason = FINISH_CANCELLED
            elif row.max_new_tokens <= 0:  # echo only: the prompt is scored, nothing generated
                row.finish_reason = FINISH_LENGTH
            else:
                if token in self.eos and not row.ignore_eos:
                    row.finish_reason = FINISH_STOP
                else:
                    row.tokens.append(token)
                    if row.logprobs is not None:
                        row.token_logprobs.append(float(logp[b, token]))
                        row.top_logprobs.append(_top(logp[b], row.logprobs))
                    if len(row.tokens) >= row.max_new_tokens:
                        row.finish_reason = FINISH_LENGTH
                if now > row.deadline and not row.done:
                    row.finish_reason = FINISH_TIMEOUT
                _update_text(row, self.tokenizer)
            if row.done:
                finished.append(row)
        return finished

    def _join(self, rows, gens, cache, mask, pos) -> None:
        import torch
        import torch.nn.functional as F

        if not self.rows:
            self.rows, self._gens, self._cache, self._mask, self._pos = list(rows), list(gens), cache, mask, pos
            return
        width = max(self._mask.shape[1], mask.shape[1])
        pad_a, pad_b = width - self._mask.shape[1], width - mask.shape[1]
        for mine, theirs in zip(self._cache.layers, cache.layers):  # (B, KVH, T, e): pad T on the left
            if mine.keys is None:  # the slot of a dropped attention layer: never written
                continue
            mine.keys = torch.cat([F.pad(mine.keys, (0, 0, pad_a, 0)), F.pad(theirs.keys, (0, 0, pad_b, 0))], 0)
            mine.values = torch.cat([F.pad(mine.values, (0, 0, pad_a, 0)), F.pad(theirs.values, (0, 0, pad_b, 0))], 0)
        self._mask = torch.cat([F.pad(self._mask, (pad_a, 0)), F.pad(mask, (pad_b, 0))], 0)  # (B, T)
        self._pos = torch.cat([self._pos, pos], 0)
        self.rows += rows
        self._gens += gens

    def _trim(self) -> None:
        """Cut the leading columns that are padding for every row (after long rows left)."""
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 0:
            self._mask = self._mask[:, start:]
            for layer in self._cache.layers:
                if layer.keys is not None:  # None: a dropped attention layer's slot
                    layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def _top(logp, k: int) -> dict[int, float]:
    """The k most likely tokens of one position: {token id: log p}. logp (V,)."""
    if k <= 0:
        return {}
    values, ids = logp.topk(k)
    return dict(zip(ids.tolist(), values.tolist()))


def _record_prompt(row: Row, logits) -> None:
    """An echo row's prompt log-probabilities from the prefill. logits (L, V) of its L prompt
    positions (its padding cut off): position t - 1 predicts prompt token t."""
    import torch

    logp = torch.log_softmax(logits[:-1], dim=-1)  # (L - 1, V)
    targets = torch.tensor(row.prompt_ids[1:], dtype=torch.long)
    row.prompt_logprobs = [None] + logp.gather(1, targets[:, None])[:, 0].tolist()
    row.prompt_top = [None] + [_top(logp[t], row.logprobs or 0) for t in range(logp.shape[0])]


def decode_rows(lm, tokenizer, rows: list[Row], *, pad_token_id: int | None = None,
                on_step: Callable[[int], None] | None = None) -> list[Row]:
    """Generate every row to its end (in place; returns `rows`), all joining at once. Blocking.
    `on_step(live_rows)` is called after every forward.

    >>> rows = [Row(prompt_ids=tok("Hi").input_ids, adapter_name="fresh", max_new_tokens=8)]  # doctest: +SKIP
    >>> decode_rows(lm, tok, rows)[0].text  # doctest: +SKIP
    """
    decoder = Decoder(lm, tokenizer, pad_token_id=pad_token_id, on_step=on_step)
    decoder.add(rows)
    while decoder.live:
        decoder.step()
    return rows
