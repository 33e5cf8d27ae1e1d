"""Ray Serve application: one shared-attention backbone per replica, many adapters per batch,
an OpenAI-compatible HTTP API.

    lisa-hub serve --base smollm2-135m --adapters gsm8k,wikitext2 --pin gsm8k    # http://127.0.0.1:8000/v1
    lisa-hub serve --replicas 2 --pin gsm8k             # two replicas, requests routed by adapter
    lisa-hub serve --min-replicas 1 --max-replicas 4    # autoscaled on ongoing requests per replica
    curl -s 127.0.0.1:8000/v1/models
    curl -s 127.0.0.1:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"model": "gsm8k", "prompt": "Question: 2+3?\\nAnswer:", "max_tokens": 32, "temperature": 0}'
    # any OpenAI client: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")

Routes: POST /v1/completions, POST /v1/chat/completions (the base tokenizer's chat
template), GET /v1/models (registered adapters + the bare backbone), GET /stats (queue,
batches, resident and pinned adapters: summed, and per replica), and the older POST /generate {"prompt", "adapter",
"max_new_tokens"} (greedy; the adapter may also come in the `serve_multiplexed_model_id`
header), which goes through the same batching.

The request's `model` picks the adapter: a task name ("gsm8k" = gsm8k-lisa@champion), a
registry reference ("gsm8k-lisa@champion", "gsm8k-lisa/3") or the base model's name (the
bare backbone). Aliases are re-resolved every few seconds, so a new `champion` is served
without restarting. Local adapter folders are served only when the operator starts the
app with allow_local_folders.

Two deployments: the `Router` (HTTP ingress) and the `Generator` replicas, each with one
backbone; the Router routes a request by its adapter (Ray Serve's model multiplexing) to a
replica that has it resident, and answers 503 with a body when a replica dies under it.

Concurrent requests are decoded together, any mix of adapters, with continuous batching
(sdk/engine.py: requests join and leave the running batch between decode steps); limits,
validation and error bodies are sdk/openai_api.py. Per-adapter metrics (Ray Serve
metrics, exported with the replica's): lisa_hub_requests, lisa_hub_prompt_tokens,
lisa_hub_completion_tokens (tag model), lisa_hub_adapter_loads, lisa_hub_adapter_evictions,
lisa_hub_adapter_resident (tag adapter), lisa_hub_queue_depth. `run` (the CLI) deletes the
app on Ctrl-C and on SIGTERM.
"""

import time

# No `from __future__ import annotations` here: the routes' `request: Request` must be the
# class itself when Ray Serve pickles the ingress by value (a string annotation would
# lose `Request` from the pickled methods' globals and FastAPI would read it as a query
# parameter).
from starlette.requests import Request

APP_NAME = "lisa-hub"
ROUTE = "/"


class _Metrics:
    """Per-adapter counters and gauges through Ray Serve's metrics (exported with the replica's)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge

        self.requests = Counter("lisa_hub_requests", description="finished requests per adapter", tag_keys=("model",))
        self.prompt_tokens = Counter("lisa_hub_prompt_tokens", description="prompt tokens per adapter",
                                     tag_keys=("model",))
        self.completion_tokens = Counter("lisa_hub_completion_tokens", description="generated tokens per adapter",
                                         tag_keys=("model",))
        self.loads = Counter("lisa_hub_adapter_loads", description="adapter loads into the backbone",
                             tag_keys=("adapter",))
        self.evictions = Counter("lisa_hub_adapter_evictions", description="adapters evicted from the pool",
                                 tag_keys=("adapter",))
        self.resident = Gauge("lisa_hub_adapter_resident", description="1 while the adapter is resident",
                              tag_keys=("adapter",))
        self.waiting = Gauge("lisa_hub_queue_depth", description="requests waiting for a batch")

    def finished(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        tags = {"model": model}
        self.requests.inc(1, tags=tags)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens, tags=tags)
        if completion_tokens:
            self.completion_tokens.inc(completion_tokens, tags=tags)

    def queued(self, depth: int) -> None:
        self.waiting.set(depth)

    def adapter_event(self, event: str, key: str) -> None:
        tags = {"adapter": key}
        (self.loads if event == "load" else self.evictions).inc(1, tags=tags)
        self.resident.set(1 if event == "load" else 0, tags=tags)


def build_app(*, base_model: str, plan_path: str | None = None, tracking_uri: str | None = None,
              max_resident: int = 4, num_cpus: float = 0.5, adapters: list[str] | tuple[str, ...] = (),
              pin: list[str] | tuple[str, ...] = (), allow_local_folders: bool = False, max_tokens: int = 512,
              max_prompt_tokens: int = 2048, max_batch_size: int = 16, max_queue: int = 64,
              timeout_s: float = 60.0, api_key: str | None = None, attention: str = "lisa",
              replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None,
              target_ongoing_requests: float = 8.0, routing: str = "affinity"):
    """The Serve application (bound deployments), ready for `serve.run(app, route_prefix="/")`.

    Two deployments: `Router`, the HTTP ingress (FastAPI, one replica, no CPU of its own), and
    `Generator`, the replicas that each hold one backbone, their own resident adapters, pins and
    continuous batching. `replicas` fixes their number; `min_replicas`/`max_replicas` instead
    autoscale it on ongoing requests per replica (Serve's `autoscaling_config`,
    `target_ongoing_requests`). `routing="affinity"` (default) sends a request with Ray Serve's
    model multiplexing: to a replica that has its adapter resident, else to one with the fewest
    adapters, which loads it; `routing="random"` is Serve's plain power-of-two choice (the
    benchmark's baseline).

    With `api_key`, every route but GET /health needs `Authorization: Bearer <api_key>`
    (what the openai client sends as its api_key), else 401 with an OpenAI error body.

    `attention="dense"` serves the unmodified base and its `lora` adapters (the multi-LoRA
    baseline server). `adapters` are preloaded and `pin` ones preloaded and never evicted, on
    every replica (a replacement replica loads them before it takes traffic); the caps
    (max_tokens, max_prompt_tokens, max_batch_size, max_queue, timeout_s) are checked
    before any work for a request.

    >>> app = build_app(base_model="smollm2-135m", adapters=["gsm8k", "wikitext2"], pin=["gsm8k"])  # doctest: +SKIP
    >>> serve.run(app, name=APP_NAME, route_prefix="/")  # doctest: +SKIP
    """
    from ray import serve

    from sdk.openai_api import Limits

    limits = Limits(max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, max_batch_size=max_batch_size,
                    max_queue=max_queue, timeout_s=timeout_s, default_max_tokens=min(64, max_tokens))
    adapters, pin = list(adapters), list(pin)
    scaling = replica_options(replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                              target_ongoing_requests=target_ongoing_requests)
    if routing not in ROUTINGS:
        raise ValueError(f"routing: {routing!r} is not one of {', '.join(ROUTINGS)}")
    ongoing = limits.max_queue + limits.max_batch_size + 8  # the engine answers 503 past its queue first

    @serve.deployment(name="Generator", ray_actor_options={"num_cpus": num_cpus}, max_ongoing_requests=ongoing,
                      health_check_period_s=5, **scaling)
    class Generator:
        """One backbone and its engine; called by the Router through a deployment handle."""

        async def __init__(self):
            from sdk.engine import Engine
            from sdk.hotswap import Backbone

            bb = Backbone.load(base_model=base_model, plan_path=plan_path, max_resident=max_resident,
                               tracking_uri=tracking_uri, attention=attention)
            bb.allow_local_folders = allow_local_folders
            self.metrics = _Metrics()
            self.adapter_events = {"loads": 0, "evictions": 0}

            def on_event(event: str, key: str) -> None:  # engine thread
                self.metrics.adapter_event(event, key)
                self.adapter_events["loads" if event == "load" else "evictions"] += 1

            bb.on_event = on_event
            for ref in pin:
                bb.pin(ref)
            for ref in adapters:
                bb.preload(ref)
            self.engine = Engine(backbone=bb, limits=limits, metrics=self.metrics)
            self.engine.start()
            self.name = serve.get_replica_context().replica_id.to_full_id_str()
            self.served: dict[str, int] = {}  # requests answered here, per model
            for ref in pin + adapters:  # Serve's routing table learns what is resident here
                await self.resident(ref)

        @serve.multiplexed(max_num_models_per_replica=max_resident + len(pin))
        async def resident(self, model: str) -> str:
            """Records `model` in Serve's multiplexing table of this replica (what routing reads);
            the engine's pool loads and evicts the adapter itself."""
            return model

        def check_health(self):  # Serve calls it every few seconds; a raise restarts the replica
            if not self.engine.healthy:
                raise RuntimeError("the engine's model thread died")

        def stats(self) -> dict:
            import psutil

            bb = self.engine.bb
            return {"replica": self.name, **self.engine.stats, **self.adapter_events, "waiting": self.engine.waiting,
                    "resident": bb.resident, "pinned": sorted(bb.pinned), "requests": dict(self.served),
                    "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}

        async def complete(self, body, chat: bool) -> dict:
            """One non-streamed request -> {"status", "body", "replica"} (an ApiError is a status too)."""
            from sdk import openai_api as api

            try:
                params, job = await self._submit(body, chat)
                await self.engine.result(job)
                out = _completion_body(self.engine.bb.tokenizer, params, job, chat)
                return {"status": 200, "body": out, "replica": self._done(params.model)}
            except api.ApiError as err:
                return {"status": err.status, "body": err.body(), "replica": self.stats()}

        async def stream(self, body, chat: bool):
            """A streamed request: first {"status", "body"?}, then the SSE strings, last {"replica"}."""
            from sdk import openai_api as api

            try:
                params, job = await self._submit(body, chat)
            except api.ApiError as err:
                yield {"status": err.status, "body": err.body()}
                return
            yield {"status": 200}
            async for piece in _sse(self.engine, job, api.new_id("chatcmpl" if chat else "cmpl"), int(time.time()),
                                    chat):
                yield piece
            yield {"replica": self._done(params.model)}

        async def legacy(self, body, header_model: str | None) -> dict:
            from sdk import openai_api as api

            try:
                params = api.parse_legacy(body, self.engine.limits, header_model)
                start = time.perf_counter()
                job = await self.engine.submit(params=params)
                await self._record()
                await self.engine.result(job)
            except api.ApiError as err:
                return {"status": err.status, "body": err.body(), "replica": self.stats()}
            out = {"text": job.rows[0].text, "adapter": params.model or None, "resolved": job.served.key,
                   "seconds": round(time.perf_counter() - start, 3)}
            return {"status": 200, "body": out, "replica": self._done(params.model)}

        async def _submit(self, body, chat: bool):
            from sdk import openai_api as api

            params = (api.parse_chat if chat else api.parse_completion)(body, self.engine.limits)
            prompts = [api.render_chat(self.engine.bb.tokenizer, params.messages)] if chat else None
            job = await self.engine.submit(params=params, prompts=prompts)
            await self._record()
            return params, job

        async def _record(self) -> None:
            """After a request's adapter resolved: its id in this replica's routing table."""
            if serve.get_multiplexed_model_id():
                await self.resident(serve.get_multiplexed_model_id())

        def _done(self, model: str) -> dict:
            self.served[model or base_model] = self.served.get(model or base_model, 0) + 1
            return self.stats()

    app = _ingress(api_key)

    @serve.deployment(name="Router", num_replicas=1, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=max(1000, ongoing * (scaling.get("num_replicas") or max_replicas or 1)))
    @serve.ingress(app)
    class Router:
        """The HTTP ingress: validates nothing but JSON, picks the route to a Generator replica
        (the request's `model` as Serve's multiplexed model id), keeps every replica's latest
        stats, and answers 503 with a body when a replica dies under a request."""

        def __init__(self, generator):
            self.generator = generator
            self.replicas: dict[str, tuple[float, dict]] = {}  # replica name -> (when, its stats)
            self.started = int(time.time())

        @app.get("/health")
        async def health(self):
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models(self):
            return await _models(base_model, attention, tracking_uri, self.started)

        @app.get("/stats")
        async def stats(self):
            self._note(await self._call("", "stats"))
            return {**merge_stats(self._live()), "limits": limits.__dict__, "routing": routing}

        @app.post("/v1/completions")
        async def completions(self, request: Request):
            return await self._generate(await _body(request), chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            return await self._generate(await _body(request), chat=True)

        @app.post("/generate")
        async def generate(self, request: Request):
            header = request.headers.get("serve_multiplexed_model_id") or None
            body = await _body(request)
            key = header or (body.get("adapter") if isinstance(body, dict) else None)
            return self._answer(await self._call(self._key(key), "legacy", body, header))

        # ---------------------------------------------------------------- routing

        def _key(self, model) -> str:
            """Serve's multiplexed model id of a request: its adapter (affinity), or "" (any replica)."""
            if routing != "affinity" or not isinstance(model, str) or model in ("", base_model):
                return ""
            return model

        def _handle(self, key: str, **options):
            if key:
                options["multiplexed_model_id"] = key
            return self.generator.options(**options) if options else self.generator

        async def _call(self, key: str, method: str, *args):
            import asyncio

            response = getattr(self._handle(key), method).remote(*args)
            try:
                return await asyncio.wait_for(_wait(response), timeout=limits.timeout_s + 30)
            except asyncio.TimeoutError:
                response.cancel()
                raise replica_unavailable("did not answer in time") from None
            except Exception as err:
                raise _unavailable_if_gone(err) from None

        async def _generate(self, body, *, chat: bool):
            from starlette.responses import StreamingResponse

            key = self._key(body.get("model") if isinstance(body, dict) else None)
            if not (isinstance(body, dict) and body.get("stream") is True):
                return self._answer(await self._call(key, "complete", body, chat))
            gen = self._handle(key, stream=True).stream.remote(body, chat)
            try:
                head = await gen.__anext__()
            except Exception as err:
                raise _unavailable_if_gone(err) from None
            if head["status"] != 200:
                return self._answer(head)
            return StreamingResponse(self._relay(gen), media_type="text/event-stream")

        async def _relay(self, gen):
            from sdk import openai_api as api

            try:
                async for piece in gen:
                    if isinstance(piece, dict):
                        self._note(piece["replica"])
                    else:
                        yield piece
            except Exception as err:  # the status line is sent already: the error is an event
                if not _replica_gone(err):
                    raise
                yield api.sse(replica_unavailable(type(err).__name__).body())
                yield api.sse("[DONE]")
            except BaseException:  # client gone: stop the replica's generation too
                gen.cancel()
                raise

        def _answer(self, out: dict):
            from starlette.responses import JSONResponse

            if "replica" in out:
                self._note(out["replica"])
            return JSONResponse(out["body"], status_code=out["status"])

        def _note(self, snapshot: dict) -> None:
            self.replicas[snapshot["replica"]] = (time.monotonic(), snapshot)

        def _live(self) -> list[dict]:
            """The latest stats of each replica still alive (Serve names its replica actors)."""
            import ray

            alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
            for name in [n for n in self.replicas if n not in alive]:
                del self.replicas[name]
            now = time.monotonic()
            return [{**s, "age_s": round(now - t, 1)} for t, s in self.replicas.values()]

    return Router.bind(Generator.bind())


ROUTINGS = ("affinity", "random")


def replica_options(*, replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None,
                    target_ongoing_requests: float = 8.0) -> dict:
    """The Generator deployment's replica options: a fixed `num_replicas`, or Serve's
    `autoscaling_config` when min/max replicas are given (ValueError naming the field).

    >>> replica_options(replicas=2)
    {'num_replicas': 2}
    >>> replica_options(min_replicas=1, max_replicas=3)["autoscaling_config"]["max_replicas"]
    3
    """
    if min_replicas is None and max_replicas is None:
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas: must be an integer >= 1, got {replicas!r}")
        return {"num_replicas": replicas}
    lo = 1 if min_replicas is None else min_replicas
    hi = max(lo, 1) if max_replicas is None else max_replicas
    if not (isinstance(lo, int) and lo >= 0):
        raise ValueError(f"min_replicas: must be an integer >= 0, got {min_replicas!r}")
    if not (isinstance(hi, int) and hi >= max(lo, 1)):
        raise ValueError(f"max_replicas: must be an integer >= max(min_replicas, 1), got {max_replicas!r}")
    if not target_ongoing_requests > 0:
        raise ValueError(f"target_ongoing_requests: must be > 0, got {target_ongoing_requests!r}")
    return {"autoscaling_config": {"min_replicas": lo, "initial_replicas": max(lo, 1), "max_replicas": hi,
                                   "target_ongoing_requests": target_ongoing_requests,
                                   "upscale_delay_s": 5, "downscale_delay_s": 60}}


def merge_stats(replicas: list[dict]) -> dict:
    """/stats: counters summed over the replicas, adapter sets joined, and each replica's own.

    >>> merge_stats([{"replica": "a", "steps": 2, "largest_batch": 3, "resident": ["x"], "pinned": [],
    ...               "requests": {"x": 1}}, {"replica": "b", "steps": 1, "largest_batch": 5,
    ...               "resident": ["y"], "pinned": [], "requests": {"x": 2}}])["requests"]
    {'x': 3}
    """
    out: dict = {"replicas": sorted(replicas, key=lambda s: s["replica"])}
    for s in replicas:
        for k, v in s.items():
            if k in ("replica", "age_s", "rss_mb"):
                continue
            if k == "largest_batch":
                out[k] = max(out.get(k, 0), v)
            elif isinstance(v, (int, float)):
                out[k] = out.get(k, 0) + v
            elif isinstance(v, list):
                out[k] = sorted(set(out.get(k, [])) | set(v))
            elif isinstance(v, dict):
                merged = out.setdefault(k, {})
                for name, n in v.items():
                    merged[name] = merged.get(name, 0) + n
    return out


def replica_unavailable(why: str):
    from sdk.openai_api import ApiError

    return ApiError(503, f"the replica serving this request is gone ({why}); retry: another replica answers",
                    type="server_error", code="replica_unavailable")


def _unavailable_if_gone(err: Exception) -> Exception:
    """The 503 to raise for a replica gone under a request, else the error itself."""
    return replica_unavailable(type(err).__name__) if _replica_gone(err) else err


def _replica_gone(err: BaseException) -> bool:
    """A Serve replica died or became unreachable under a request (not an error of the request)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(err, (ActorDiedError, ActorUnavailableError, RayActorError))


async def _wait(response):
    return await response


async def _body(request):
    from sdk.openai_api import ApiError

    try:
        return await request.json()
    except Exception:
        raise ApiError(400, "The request body must be valid JSON.", code="invalid_json") from None


def _completion_body(tok, params, job, chat: bool) -> dict:
    """The OpenAI body of a finished non-streamed job."""
    from sdk import openai_api as api

    rid, created = api.new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    choices = [(r.text, api.FINISH_REASONS.get(r.finish_reason, "stop")) for r in job.rows]
    if chat:
        return api.chat_response(id=rid, model=params.model, choices=choices, created=created,
                                 prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens)
    blocks = None
    if params.echo:  # the prompt's text first (decoded from its tokens)
        choices = [(tok.decode(r.prompt_ids, skip_special_tokens=True) + text, reason)
                   for r, (text, reason) in zip(job.rows, choices)]
    if params.logprobs is not None:
        blocks = [api.logprobs_block(tok, ids=(r.prompt_ids if params.echo else []) + r.tokens,
                                     logprobs=(r.prompt_logprobs if params.echo else []) + r.token_logprobs,
                                     top=(r.prompt_top if params.echo else []) + r.top_logprobs)
                  for r in job.rows]
    return api.completion_response(id=rid, model=params.model, choices=choices, created=created,
                                   prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens,
                                   logprobs=blocks)


async def _sse(engine, job, rid: str, created: int, chat: bool):
    """The server-sent events of a streamed job, [DONE] last; an error after the first event is
    an event too (the status line is sent already)."""
    from sdk import openai_api as api

    model = job.params.model
    try:
        if chat:
            for i in range(job.n_rows):
                yield api.sse(api.chat_chunk(id=rid, model=model, created=created, index=i,
                                             delta={"role": "assistant", "content": ""}))
        async for kind, index, value in engine.events(job):
            if kind == "delta":
                chunk = (api.chat_chunk(id=rid, model=model, created=created, index=index, delta={"content": value})
                         if chat else api.completion_chunk(id=rid, model=model, created=created, index=index,
                                                           text=value))
            else:
                reason = api.FINISH_REASONS.get(value, "stop")
                chunk = (api.chat_chunk(id=rid, model=model, created=created, index=index, delta={},
                                        finish_reason=reason) if chat else
                         api.completion_chunk(id=rid, model=model, created=created, index=index, text="",
                                              finish_reason=reason))
            yield api.sse(chunk)
        if job.params.include_usage:
            yield api.sse(api.usage_chunk(id=rid, model=model, created=created, chat=chat,
                                          prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens))
    except api.ApiError as err:
        yield api.sse(err.body())
    yield api.sse("[DONE]")


async def _models(base_model: str, attention: str, tracking_uri: str | None, started: int) -> dict:
    """GET /v1/models: the bare backbone, then every registered adapter of this base by each
    name that serves it (the bare task name for `<task>-lisa@champion`)."""
    import asyncio

    from adapters_hub import registry
    from adapters_hub.registry.refs import adapter_model_name

    from sdk.openai_api import ApiError

    try:
        records = await asyncio.to_thread(registry.list_adapters, tracking_uri=tracking_uri)
    except Exception as err:
        raise ApiError(503, f"the adapter registry does not answer ({type(err).__name__}); retry later",
                       type="server_error", code="registry_unavailable") from None

    def bare_name(task):
        return adapter_model_name(task, "lisa" if attention == "lisa" else "lora", attention)

    entries, seen = [(base_model, "lisa-hub", started)], {base_model}
    for r in records:
        if r.tags.get("base_model") not in (None, base_model):
            continue
        created = int(r.created.timestamp()) if r.created else started
        task = r.tags.get("task")
        names = [r.ref, *(f"{r.name}@{a}" for a in r.aliases)]
        if task and "champion" in r.aliases and r.name == bare_name(task):
            names.insert(0, task)  # the bare task name serves <task>-lisa@champion (-lora-dense)
        for name in names:
            if name not in seen:
                seen.add(name)
                entries.append((name, "lisa-hub", created))
    return api_models(entries)


ROUTES = "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /stats, POST /generate, GET /health"


def _ingress(api_key: str | None):
    """The FastAPI app of the Serve ingress (Ray Serve's `@serve.ingress`): OpenAI error
    bodies for our errors and for unknown routes; with `api_key`, every route but
    GET /health needs `Authorization: Bearer <api_key>`."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    from sdk.openai_api import ApiError, check_api_key

    app = FastAPI(title="lisa-hub", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):  # unknown route or method
        code = "unknown_route" if err.status_code in (404, 405) else "http_error"
        message = (f"no route {request.method} {request.url.path}; routes: {ROUTES}" if code == "unknown_route"
                   else str(err.detail))
        return JSONResponse(ApiError(err.status_code, message, code=code).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err):
        return JSONResponse(ApiError(400, str(err), code="invalid_request").body(), status_code=400)

    if api_key is not None:
        @app.middleware("http")
        async def require_key(request, call_next):
            if not (request.method == "GET" and request.url.path.rstrip("/").endswith("/health")):
                try:
                    check_api_key(request.headers.get("authorization"), api_key)
                except ApiError as err:
                    return JSONResponse(err.body(), status_code=err.status)
            return await call_next(request)
    return app


def api_models(entries):
    from sdk.openai_api import models_response

    return models_response(entries)


def run(*, base_model: str, port: int = 8000, host: str = "127.0.0.1", api_key: str | None = None,
        **options) -> None:
    """Deploy on the Ray cluster (local stack by default) and serve until Ctrl-C or SIGTERM,
    which delete the app. `options` go to `build_app` (adapters, pin, caps, ...). `api_key`
    (default LISA_HUB_API_KEY) guards every route but /health; a non-loopback `host` is
    refused without one.

    >>> run(base_model="smollm2-135m", adapters=["gsm8k"], pin=["gsm8k"], max_tokens=256)  # doctest: +SKIP
    """
    import os
    import signal

    import ray
    from ray import serve

    from sdk.client import resolve_address

    from jobs.runtime import connect
    from sdk.openai_api import check_bind

    api_key = api_key or os.environ.get("LISA_HUB_API_KEY") or None
    check_bind(host, api_key)  # before anything starts
    from adapters_hub import settings

    # The replica runs in the cluster's environment: name the registry this process means.
    options["tracking_uri"] = options.get("tracking_uri") or settings.mlflow_uri()
    explicit = os.environ.get("RAY_ADDRESS", "")
    if explicit.startswith("http"):  # a remote cluster named by its dashboard
        resolve_address()
        ray.init(address="auto", ignore_reinit_error=True)
    else:
        if not explicit:
            resolve_address()  # starts the local stack when nothing runs
        connect()  # RAY_ADDRESS (host:port), else this stack's head by its 127.0.0.1 GCS address
    serve.start(http_options={"host": host, "port": port})

    def _stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        serve.run(build_app(base_model=base_model, api_key=api_key, **options), name=APP_NAME, route_prefix=ROUTE)
        print(f"serving {base_model} at http://{host}:{port}/v1  (OpenAI API{', API key required' if api_key else ''}; "
              "Ctrl-C or SIGTERM stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.delete(APP_NAME)
        if not serve.status().applications:  # nothing else is served: free the HTTP port too (a later
            serve.shutdown()                   # `serve --port Q` would otherwise find the proxy on the old one)
        print("stopped: app deleted", flush=True)
