"""The batching engine of a serving replica: concurrent requests for any mix of adapters
gathered into one mixed-adapter decode batch (no Ray here; `sdk/serve.py` wraps it).

    .venv/bin/python -m pytest -q tests/test_engine_unit.py

One asyncio task per replica (`Engine.start`) owns the model:

1. A request is validated, its `model` resolved to a registry key (registry I/O in a
   thread, cached `alias_ttl_s`), its prompts tokenized and capped, and then queued, or
   refused with 503 when `max_queue` requests already wait. Nothing runs for it yet.
2. The loop waits for the first waiting request, lets the gather window run (a batch
   starts once no new request came for `batch_wait_s`, at most `batch_max_wait_s`), takes
   waiting requests in arrival order up to `max_batch_size` rows, makes their adapters
   resident (a request whose adapter fails to load gets its error, the others run) and
   runs one `decode_rows` call in a worker thread: prefill of every row together, then
   one token per step with one adapter per row. Rows leave the batch as they finish (stop
   string, eos, max_tokens, deadline, client gone); requests that arrive meanwhile wait
   for the next batch (static batches: no row joins a running batch).
3. Streamed text pieces and finishes are handed back to the event loop
   (`call_soon_threadsafe`), where the HTTP handler reads them from the request's queue.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdk.openai_api import ApiError, GenParams, Limits, check_prompt_tokens, not_found, overloaded, timed_out


@dataclass(frozen=True)
class Served:
    """What a request's `model` resolved to: a registry key ("gsm8k-lisa/3", or a folder when
    the operator allows folders), or None for the bare backbone."""

    model: str
    key: str | None
    folder: Path | None = None


@dataclass(eq=False)
class Job:
    """One request in the engine: its rows (prompts x n) and the events for its handler."""

    served: Served
    params: GenParams
    prompt_ids: list[list[int]]
    deadline: float
    events: asyncio.Queue
    rows: list = field(default_factory=list)       # sdk.decode.Row, built by the worker
    error: ApiError | None = None
    cancelled: bool = False
    started: float = 0.0

    @property
    def n_rows(self) -> int:
        return len(self.prompt_ids) * self.params.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompt_ids) * self.params.n

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.rows)


class Engine:
    """Batches requests over one `sdk.Backbone`.

    >>> engine = Engine(backbone=bb, limits=Limits(max_batch_size=8))   # doctest: +SKIP
    >>> job = await engine.submit(params=parse_completion(body, engine.limits))   # doctest: +SKIP
    >>> await engine.result(job)   # doctest: +SKIP
    """

    def __init__(self, *, backbone, limits: Limits | None = None, metrics: Any = None, alias_ttl_s: float = 5.0):
        self.bb, self.limits, self.metrics = backbone, limits or Limits(), metrics
        self.alias_ttl_s = alias_ttl_s
        self.base_model = backbone.base_model
        self._pending: deque[Job] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._resolved: dict[str, tuple[float, Served]] = {}
        cfg = getattr(backbone.lm, "config", None)
        self.context = getattr(cfg, "max_position_embeddings", None)
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "tokens": 0, "running_rows": 0, "steps": 0}

    # ------------------------------------------------------------------ public (event loop)

    def start(self) -> None:
        """Start the batching loop on the running event loop (idempotent)."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def resolve(self, model: str) -> Served:
        """The request's `model` -> Served; ApiError 404 for anything not servable here."""
        if not model or model == self.base_model:
            return Served(self.base_model, None)
        hit = self._resolved.get(model)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        from adapters_hub.errors import AdapterMismatchError

        try:
            folder, key = await asyncio.to_thread(self.bb.resolve, model)
        except AdapterMismatchError as err:
            raise ApiError(400, f"model: {err}", param="model", code="model_not_compatible") from None
        except (LookupError, ValueError, OSError):
            raise not_found(model) from None
        served = Served(model, key, folder)
        pinned_version = "@" not in model and model.rsplit("/", 1)[-1].isdigit()  # name/3 never changes
        ttl = float("inf") if pinned_version else self.alias_ttl_s
        self._resolved[model] = (time.monotonic() + ttl, served)
        return served

    def tokenize(self, text: str, max_tokens: int, param: str) -> list[int]:
        ids = self.bb.tokenizer(text).input_ids
        check_prompt_tokens(len(ids), max_tokens, self.limits, self.context, param)
        return ids

    async def submit(self, *, params: GenParams, prompts: list[str] | None = None) -> Job:
        """Resolve, tokenize, cap and queue a validated request (raises ApiError; no work done then).
        `prompts`: the rendered prompt texts (chat), else params.prompts."""
        self.start()
        texts = prompts if prompts is not None else params.prompts
        param = "messages" if params.messages is not None else "prompt"
        if len(texts) * params.n > self.limits.max_batch_size:
            raise ApiError(400, f"n: {len(texts) * params.n} rows exceed the batch size "
                           f"{self.limits.max_batch_size}", param="n", code="invalid_value")
        if len(self._pending) >= self.limits.max_queue:  # refuse before touching the registry
            raise overloaded(len(self._pending))
        served = await self.resolve(params.model)
        ids = [self.tokenize(t, params.max_tokens, param) for t in texts]
        if len(self._pending) >= self.limits.max_queue:
            raise overloaded(len(self._pending))
        job = Job(served=served, params=params, prompt_ids=ids,
                  deadline=time.monotonic() + self.limits.timeout_s, events=asyncio.Queue())
        self._pending.append(job)
        if self.metrics is not None:
            self.metrics.queued(len(self._pending))
        self._wake.set()
        return job

    async def result(self, job: Job) -> Job:
        """Wait for a job's end (non-streaming); raises its ApiError. Cancelling the caller
        (client gone) stops the job's generation."""
        async for _ in self.events(job):
            pass
        return job

    async def events(self, job: Job):
        """("delta", row_index, text) and ("finish", row_index, reason) events until the job ends;
        raises the job's ApiError at the end (before any event when it never ran)."""
        try:
            while True:
                event = await job.events.get()
                if event[0] == "end":
                    break
                yield event
        except BaseException:
            job.cancelled = True  # client disconnected or handler cancelled: the loop stops its rows
            raise
        if job.error is not None:
            raise job.error

    # ------------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        limits = self.limits
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            start = time.monotonic()
            while len(self._pending) < limits.max_batch_size:  # gather window
                seen = len(self._pending)
                await asyncio.sleep(limits.batch_wait_s)
                if len(self._pending) == seen or time.monotonic() - start >= limits.batch_max_wait_s:
                    break
            batch, rows, now = [], 0, time.monotonic()
            while self._pending:
                job = self._pending[0]
                if job.cancelled or now > job.deadline:
                    self._pending.popleft()
                    self._end(job, None if job.cancelled else timed_out(limits.timeout_s))
                    continue
                if batch and rows + job.n_rows > limits.max_batch_size:
                    break
                batch.append(self._pending.popleft())
                rows += job.n_rows
            if self.metrics is not None:
                self.metrics.queued(len(self._pending))
            if not batch:
                continue
            loop = asyncio.get_running_loop()
            try:
                await asyncio.to_thread(self._run_batch, batch, loop)
            except Exception as err:  # never leave a handler waiting
                for job in batch:
                    self._end(job, ApiError(500, f"generation failed: {type(err).__name__}: {err}",
                                            type="server_error", code="internal_error"))
                continue
            for job in batch:
                self._end(job, job.error)

    def _end(self, job: Job, error: ApiError | None) -> None:
        job.error = job.error or error
        if self.metrics is not None and job.error is None and job.rows:
            self.metrics.finished(job.served.key or self.base_model, job.prompt_tokens, job.completion_tokens)
        job.events.put_nowait(("end",))

    # ------------------------------------------------------------------ worker thread

    def _run_batch(self, batch: list[Job], loop) -> None:
        from adapters_hub.kinds import read_config  # noqa: F401  (kinds import before threads race on it)
        from sdk.decode import FINISH_TIMEOUT, Row, decode_rows

        keep: list[str] = []
        ready: list[Job] = []
        for job in batch:
            try:
                name = self._adapter_name(job.served, keep)
            except ApiError as err:
                job.error = err
                continue
            except Exception as err:  # a corrupt or refused adapter fails its own request only
                job.error = ApiError(400 if isinstance(err, ValueError) else 500,
                                     f"model {job.served.model!r} could not be loaded: {type(err).__name__}",
                                     param="model", code="model_load_failed",
                                     type="invalid_request_error" if isinstance(err, ValueError) else "server_error")
                continue
            keep.append(name)
            job.started = time.monotonic()
            p = job.params
            for i, ids in enumerate(job.prompt_ids):
                for k in range(p.n):
                    index = i * p.n + k
                    job.rows.append(Row(
                        prompt_ids=ids, adapter_name=name, max_new_tokens=p.max_tokens, temperature=p.temperature,
                        top_p=p.top_p, stop=p.stop, seed=None if p.seed is None else p.seed + index,
                        ignore_eos=p.ignore_eos,
                        deadline=job.deadline, cancelled=lambda job=job: job.cancelled,
                        on_delta=self._delta_sender(job, index, loop) if p.stream else None))
            ready.append(job)
        rows = [r for job in ready for r in job.rows]
        if not rows:
            return
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        self.stats["running_rows"] = len(rows)
        try:
            try:
                decode_rows(self.bb.lm, self.bb.tokenizer, rows, on_step=self._on_step)
            except Exception:
                if len(ready) == 1 or any(r.tokens for r in rows):
                    raise
                for job in ready:  # a failed prefill: each request alone, so one bad request fails alone
                    try:
                        decode_rows(self.bb.lm, self.bb.tokenizer, job.rows, on_step=self._on_step)
                    except Exception as err:
                        job.error = ApiError(500, f"generation failed: {type(err).__name__}",
                                             type="server_error", code="internal_error")
        finally:
            self.stats["running_rows"] = 0
        for job in ready:
            self.stats["tokens"] += job.completion_tokens
            if any(r.finish_reason == FINISH_TIMEOUT for r in job.rows):
                job.error = job.error or timed_out(self.limits.timeout_s)
            elif job.params.stream:
                for index, row in enumerate(job.rows):
                    loop.call_soon_threadsafe(job.events.put_nowait, ("finish", index, row.finish_reason))

    def _on_step(self, live_rows: int) -> None:
        self.stats["steps"] += 1
        self.stats["running_rows"] = live_rows

    @staticmethod
    def _delta_sender(job: Job, index: int, loop):
        def send(row, text: str) -> None:
            loop.call_soon_threadsafe(job.events.put_nowait, ("delta", index, text))
        return send

    def _adapter_name(self, served: Served, keep: list[str]) -> str:
        """The model's adapter name inside the backbone, loading it when needed (worker thread)."""
        bb = self.bb
        if served.key is None:
            return bb.base_adapter
        folder = served.folder
        if served.key not in bb._resident and (folder is None or folder == Path()):
            folder, _ = bb.resolve(served.key)  # evicted since it was resolved
        kind, name = bb.load_resolved(folder, served.key, keep=keep)
        if kind != "lisa":
            raise ApiError(400, f"model {served.model!r} is a {kind} adapter; mixed-adapter serving takes lisa "
                           f"adapters only (use sdk.Backbone for it)", param="model", code="unsupported_kind")
        return name
