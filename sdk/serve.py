"""Ray Serve application: one shared-attention backbone per replica, adapter per request.

    lisa-hub serve --base smollm2-135m            # http://127.0.0.1:8000/generate
    curl -s 127.0.0.1:8000/generate -d '{"prompt": "Question: 2+3?\\nAnswer:", "adapter": "gsm8k"}'
    # or pick the adapter with Serve's multiplexing header: -H 'serve_multiplexed_model_id: gsm8k'

Requests are routed by adapter name (Ray Serve model multiplexing), so a replica that
already holds an adapter gets its traffic. Every request re-resolves registry aliases, so
a new `champion` is served without restarting. Without an adapter the fresh backbone
(aligned direct sharing) answers.
"""

from __future__ import annotations

import time

APP_NAME = "lisa-hub"
ROUTE = "/generate"


def build_app(*, base_model: str, plan_path: str | None = None, tracking_uri: str | None = None,
              max_resident: int = 4, num_cpus: float = 0.5):
    """The Serve application (bound deployment), ready for `serve.run`."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(name="Generator", num_replicas=1, ray_actor_options={"num_cpus": num_cpus})
    class Generator:
        def __init__(self):
            import threading

            from sdk.hotswap import Backbone

            self.backbone = Backbone.load(base_model=base_model, plan_path=plan_path,
                                          max_resident=max_resident, tracking_uri=tracking_uri)
            self.lock = threading.Lock()  # one generate at a time on the shared model

        @serve.multiplexed(max_num_models_per_replica=max_resident)
        async def warm(self, adapter: str) -> str:
            with self.lock:  # pre-load into the backbone's pool; the pool owns the tensors
                self.backbone.preload(adapter)
            return adapter

        async def __call__(self, request: Request):
            try:
                body = await request.json()
                prompt = body["prompt"]
            except Exception:
                return JSONResponse({"error": "body must be JSON with a 'prompt' field"}, status_code=400)
            adapter = serve.get_multiplexed_model_id() or body.get("adapter") or None
            start = time.perf_counter()
            try:
                if adapter:
                    await self.warm(adapter)
                with self.lock:
                    text = self.backbone.generate(prompt, adapter=adapter,
                                                  max_new_tokens=int(body.get("max_new_tokens", 64)))
                    active = self.backbone.active.key if adapter else None
            except (LookupError, ValueError) as err:  # unknown adapter, other backbone, ...
                return JSONResponse({"error": str(err), "adapter": adapter}, status_code=404)
            return {"text": text, "adapter": adapter, "resolved": active,
                    "seconds": round(time.perf_counter() - start, 3)}

    return Generator.bind()


def run(*, base_model: str, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Deploy on the Ray cluster (local stack by default) and keep serving until Ctrl-C."""
    import ray
    from ray import serve

    from sdk.client import resolve_address

    resolve_address()  # starts the local stack when nothing runs
    ray.init(address="auto", ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(base_model=base_model), name=APP_NAME, route_prefix=ROUTE)
    print(f"serving {base_model} at http://{host}:{port}{ROUTE}  (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
