"""The batching engine of a serving replica: concurrent requests for any mix of adapters
decoded together in one mixed-adapter batch, with continuous batching (no Ray here;
`sdk/serve.py` wraps it).

    .venv/bin/python -m pytest -q tests/test_engine_unit.py

1. On the event loop, a request is validated, its `model` resolved to a registry key
   (registry I/O in a thread, cached `alias_ttl_s`), its prompts tokenized and capped,
   then queued, or refused with 503 when `max_queue` requests already wait. Nothing has
   run for it yet.
2. One worker thread owns the model and a `sdk.decode.Decoder` (the running batch).
   Between two decode steps it admits waiting requests in arrival order while the batch
   has room (`max_batch_size` rows): makes their adapters resident (a request whose
   adapter fails to load gets its error, the others go on), prefills the newcomers in one
   forward and merges them into the batch. Then one decode step gives every live row its
   next token, one adapter per row. Rows leave as they finish (stop string, eos,
   max_tokens, deadline, client gone); a request ends when its last row does. Requests
   that time out while waiting are answered without running.
3. Streamed text pieces, finishes and ends go back to the event loop of the request
   (`call_soon_threadsafe`), where its HTTP handler reads them from the request's queue.
"""

from __future__ import annotations

import asyncio
import threading
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
    loop: Any = None                               # the event loop of the request's handler
    rows: list = field(default_factory=list)       # sdk.decode.Row, built by the worker
    open_rows: int = 0                             # rows not finished yet
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
        self._pending: deque[Job] = deque()     # appended on the event loop, taken by the worker
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        self._resolved: dict[str, tuple[float, Served]] = {}
        cfg = getattr(backbone.lm, "config", None)
        self.context = getattr(cfg, "max_position_embeddings", None)
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "tokens": 0, "running_rows": 0, "steps": 0}

    # ------------------------------------------------------------------ public (event loop)

    @property
    def waiting(self) -> int:
        """Requests queued and not yet admitted into the batch."""
        return len(self._pending)

    @property
    def healthy(self) -> bool:
        """False once the started worker thread has died (the replica's health check reads it)."""
        return self._worker is None or self._worker.is_alive()

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="lisa-hub-engine", daemon=True)
            self._worker.start()

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
        except (LookupError, ValueError):  # unknown, or no valid reference at all
            raise not_found(model) from None
        except Exception as err:  # the registry itself failed: not the client's fault
            raise ApiError(503, f"the adapter registry does not answer ({type(err).__name__}); retry later",
                           type="server_error", code="registry_unavailable") from None
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
        rows = max(len(texts), len(params.prompt_ids or ())) * params.n
        if rows > self.limits.max_batch_size:
            raise ApiError(400, f"n: {rows} rows exceed the batch size "
                           f"{self.limits.max_batch_size}", param="n", code="invalid_value")
        if len(self._pending) >= self.limits.max_queue:  # refuse before touching the registry
            raise overloaded(len(self._pending))
        served = await self.resolve(params.model)
        if params.prompt_ids is not None:  # token ids: each must be a token of this tokenizer
            vocab = len(self.bb.tokenizer)
            for p in params.prompt_ids:
                bad = next((t for t in p if not 0 <= t < vocab), None)
                if bad is not None:
                    raise ApiError(400, f"prompt: token id {bad} is not in this model's vocabulary (0..{vocab - 1})",
                                   param="prompt", code="invalid_value")
                check_prompt_tokens(len(p), params.max_tokens, self.limits, self.context, param)
            ids = [list(p) for p in params.prompt_ids]
        else:
            ids = [self.tokenize(t, params.max_tokens, param) for t in texts]
        if len(self._pending) >= self.limits.max_queue:
            raise overloaded(len(self._pending))
        job = Job(served=served, params=params, prompt_ids=ids, deadline=time.monotonic() + self.limits.timeout_s,
                  events=asyncio.Queue(), loop=asyncio.get_running_loop())
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

    # ------------------------------------------------------------------ worker thread

    def _work(self) -> None:
        from sdk.decode import Decoder

        decoder = Decoder(self.bb.lm, self.bb.tokenizer, on_step=self._on_step)
        while True:
            if not decoder.live:
                self.stats["running_rows"] = 0
                self._wake.wait()
                self._wake.clear()
                time.sleep(self.limits.batch_wait_s)  # let requests sent together start together
            try:
                self._admit(decoder)
                if decoder.live:
                    self._finished(decoder.step())
            except Exception as err:  # never leave a handler waiting; the next batch starts clean
                error = ApiError(500, f"generation failed: {type(err).__name__}", type="server_error",
                                 code="internal_error")
                for row in decoder.rows:
                    row.finish_reason = row.finish_reason or "error"
                jobs = {id(r.job): r.job for r in decoder.rows}
                decoder.reset()
                for job in jobs.values():
                    job.error = job.error or error
                    job.open_rows = 0
                    self._send_end(job)

    def _admit(self, decoder) -> None:
        """Move waiting requests into the batch while it has room (expired ones are answered)."""
        limits, now, new_jobs, rows = self.limits, time.monotonic(), [], []
        keep = list({r.adapter_name for r in decoder.rows})  # adapters of live rows are never evicted
        for job in [j for j in list(self._pending) if j.cancelled or now > j.deadline]:
            self._pending.remove(job)
            job.error = None if job.cancelled else timed_out(limits.timeout_s)
            self._send_end(job)
        while self._pending and decoder.live + len(rows) + self._pending[0].n_rows <= limits.max_batch_size:
            job = self._pending.popleft()
            try:
                name = self._adapter_name(job.served, keep)
            except ApiError as err:
                job.error = err
                self._send_end(job)
                continue
            except Exception as err:  # a corrupt or refused adapter fails its own request only
                refused = isinstance(err, ValueError)
                job.error = ApiError(400 if refused else 500, f"model {job.served.model!r} could not be loaded: "
                                     f"{type(err).__name__}", param="model", code="model_load_failed",
                                     type="invalid_request_error" if refused else "server_error")
                self._send_end(job)
                continue
            keep.append(name)
            job.rows = self._rows(job, name)
            job.open_rows = len(job.rows)
            rows += job.rows
            new_jobs.append(job)
        if self.metrics is not None:
            self.metrics.queued(len(self._pending))
        if not rows:
            return
        self.stats["batches"] += 1  # admissions (a prefill each)
        self.stats["rows"] += len(rows)
        try:
            finished = decoder.add(rows)
        except Exception as err:  # a failed prefill fails the newcomers only; the running rows go on
            for job in new_jobs:
                job.error = ApiError(500, f"generation failed: {type(err).__name__}", type="server_error",
                                     code="internal_error")
                job.open_rows = 0
                self._send_end(job)
            return
        self.stats["largest_batch"] = max(self.stats["largest_batch"], decoder.live + len(finished))
        self._finished(finished)

    def _rows(self, job: Job, name: str) -> list:
        from sdk.decode import Row

        p, rows = job.params, []
        for i, ids in enumerate(job.prompt_ids):
            for k in range(p.n):
                index = i * p.n + k
                row = Row(prompt_ids=ids, adapter_name=name, max_new_tokens=p.max_tokens, temperature=p.temperature,
                          top_p=p.top_p, stop=p.stop, seed=None if p.seed is None else p.seed + index,
                          ignore_eos=p.ignore_eos, deadline=job.deadline, cancelled=lambda job=job: job.cancelled,
                          on_delta=self._delta_sender(job, index) if p.stream else None,
                          logprobs=p.logprobs, echo=p.echo and p.logprobs is not None)
                row.job, row.index = job, index
                rows.append(row)
        return rows

    def _finished(self, rows: list) -> None:
        """Rows that left the batch: finish events; the end of a request whose last row it was."""
        from sdk.decode import FINISH_TIMEOUT

        for row in rows:
            job = row.job
            self.stats["tokens"] += len(row.tokens)
            if job.params.stream and row.finish_reason != FINISH_TIMEOUT:
                _post(job, job.events.put_nowait, ("finish", row.index, row.finish_reason))
            job.open_rows -= 1
            if job.open_rows == 0:
                if any(r.finish_reason == FINISH_TIMEOUT for r in job.rows):
                    job.error = job.error or timed_out(self.limits.timeout_s)
                self._send_end(job)

    def _send_end(self, job: Job) -> None:
        _post(job, self._end, job)

    def _end(self, job: Job) -> None:  # on the job's event loop
        if self.metrics is not None and job.error is None and job.rows:
            self.metrics.finished(job.served.key or self.base_model, job.prompt_tokens, job.completion_tokens)
        job.events.put_nowait(("end",))

    def _on_step(self, live_rows: int) -> None:
        self.stats["steps"] += 1
        self.stats["running_rows"] = live_rows

    @staticmethod
    def _delta_sender(job: Job, index: int):
        def send(row, text: str) -> None:
            _post(job, job.events.put_nowait, ("delta", index, text))
        return send

    def _adapter_name(self, served: Served, keep: list[str]) -> str:
        """The model's adapter name inside the backbone, loading it when needed (worker thread)."""
        bb = self.bb
        if served.key is None:
            return bb.base_adapter
        folder = served.folder
        if not bb.is_resident(served.key) and (folder is None or folder == Path()):
            folder, _ = bb.resolve(served.key)  # evicted since it was resolved
        from adapters_hub.kinds import batching_kinds, get_kind

        kind = bb.kind_of(folder, served.key)  # before loading: a refused adapter changes nothing resident
        if not get_kind(kind).batches_per_row:
            raise ApiError(400, f"model {served.model!r} is a {kind} adapter; mixed-adapter serving takes "
                           f"{', '.join(batching_kinds())} adapters (use sdk.Backbone for it)", param="model",
                           code="unsupported_kind")
        return bb.load_resolved(folder, served.key, keep=keep)[1]


def _post(job: Job, fn, *args) -> None:
    """Run fn(*args) on the job's event loop (from the worker thread); a closed loop means the
    request is gone, which must not disturb the batch."""
    try:
        job.loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        job.cancelled = True
