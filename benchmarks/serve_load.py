"""Serving under concurrent load: batching across requests and adapters, measured in one run.

    LISA_HUB_DATA_DIR=../shared/data .venv/bin/python benchmarks/serve_load.py [--base smollm2-135m] [--plan plan.json]
        [--adapters lisa|parts|mixed|dense-lora]
    .venv/bin/python benchmarks/serve_load.py --replicas [--soak-minutes 10]   # 1 vs 2 replicas, affinity, soak
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:8000 --models gsm8k,wikitext2,a-lisa/1,b-lisa/1

Without --url it is self-contained: a temporary LISA_HUB_HOME with its own MLflow server
(free port), the base's backbone registered from `--plan` (default: the attention analysis
of the base, as benchmarks/hotswap_smollm2.py), four adapters with non-trivial random
weights registered as bench_a..bench_d (`--adapters`: lisa = LiSA-only; parts = lisa with
LoRA parts r=5 on o/v/MLP; mixed = LiSA-only, parts, a `lora` adapter (r=8 q/v), parts;
dense-lora = four `lora` adapters on the dense backbone, the multi-LoRA baseline server),
plus a LiSA-only reference adapter when the four are not, a local Ray instance and the Serve app
(`sdk.serve.build_app`, all four adapters pinned) on a free port; all of it is stopped at
the end. With --url it measures an app already running (`lisa-hub serve ...`) with the
four adapters named by --models.

Every request is a completion of one of 16 fixed prompts with exactly --new-tokens tokens
(temperature 0, `ignore_eos`). Loads, each from closed-loop clients (a client sends its
next request when its answer is back), `--per-client` requests per client at 16 clients
(more per client at fewer clients, same request count per phase where possible):
  1 / 4 / 16 clients      requests spread over the 4 adapters (round robin)
  16 clients, 1 adapter   the same requests, all on the first adapter
  16 clients, 1 lisa-only the same requests on the LiSA-only reference (when the four are not)
  one at a time           the 16-client requests (4 adapters) sent sequentially
It prints total generated tok/s, p50/p95 request latency, and the ratios the issue sets
as targets: 16 clients over 4 adapters vs one at a time (>= 4x) and vs 16 clients on one
adapter (>= 0.85x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = [f"Question: {name} has {i + 2} apples and buys {3 * i + 1} more. How many apples now?\nAnswer:"
           if i % 2 == 0 else f"The history of {name} begins in the year {1700 + 13 * i}, when"
           for i, name in enumerate(["Ann", "Bob", "Cleo", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim",
                                     "Lea", "Max", "Ned", "Ola", "Pia"])]


def run_load(url: str, requests_: list[tuple[str, str]], clients: int, new_tokens: int) -> dict:
    """Send `requests_` ((model, prompt) pairs) from `clients` closed-loop clients; timings."""
    import requests

    latencies: list[float] = []
    lock = threading.Lock()
    queues = [requests_[c::clients] for c in range(clients)]
    errors: list[str] = []

    def client(mine):
        with requests.Session() as session:
            for model, prompt in mine:
                start = time.perf_counter()
                r = session.post(f"{url}/v1/completions", timeout=600,
                                 json={"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                                       "ignore_eos": True})
                took = time.perf_counter() - start
                with lock:
                    if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != new_tokens:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                    latencies.append(took)

    threads = [threading.Thread(target=client, args=(q,)) for q in queues]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, first: {errors[0]}")
    latencies.sort()
    tokens = len(requests_) * new_tokens
    return {"requests": len(requests_), "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
            "p50": statistics.median(latencies), "p95": latencies[min(len(latencies) - 1,
                                                                      int(round(0.95 * (len(latencies) - 1))))]}


def self_contained(args, home: Path):
    """(url, models, stop) of a freshly started app with four registered adapters."""
    import ray
    from ray import serve

    from adapters_hub import stack

    stack.up(home=home, ray=False, ports=stack.Ports(mlflow=stack.free_port()))
    uri = stack.mlflow_url(home)

    def stop():
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        stack.down(home=home)
    try:
        return _start(args, home, uri, stop)
    except BaseException:
        stop()
        raise


MIXES = {"lisa": ["lisa"] * 4, "parts": ["parts"] * 4, "mixed": ["lisa", "parts", "lora", "parts"],
         "dense-lora": ["lora"] * 4}


def _make_adapter(lm, task: str, make: str, seed: int, home: Path) -> tuple[str, Path]:
    """(kind, folder) of a saved adapter with random non-trivial weights."""
    import torch

    from adapters_hub.kinds import get_kind
    from adapters_hub.multi_lora import LoraParts

    if make == "lora":
        get_kind("lora").add(lm, task, {})
    else:
        parts = LoraParts(r=5, targets=("o_proj", "v_proj", "mlp")) if make == "parts" else None
        get_kind("lisa").add(lm, task, {"lora_parts": parts})
    with torch.no_grad():  # non-trivial weights, so adapters really differ
        for name, p in lm.named_parameters():
            if task in name.split("."):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
    kind = "lora" if make == "lora" else "lisa"
    return kind, get_kind(kind).save(lm, task, home / task)


def _register(args, home: Path, uri: str, mix: list[str]) -> list[str]:
    """Register the base's backbone and one adapter per entry of `mix` (plus a LiSA-only
    reference when `mix` has none); their registry references."""
    import mlflow

    from adapters_hub import registry
    from adapters_hub.backbone import analyse_base, dense_plan, load_lisa_model
    from adapters_hub.lisa.plan import SharingPlan

    if args.adapters == "dense-lora":
        plan = dense_plan(args.base)
    else:
        plan = SharingPlan.load(args.plan) if args.plan else analyse_base(args.base)[0]
    (home / "backbone").mkdir()
    plan.save(home / "backbone" / "plan.json")
    lm, _ = load_lisa_model(args.base, plan)
    registry.register_backbone(args.base, home / "backbone", tracking_uri=uri, plan_hash=plan.hash,
                               base_fingerprint=lm.base_fingerprint)
    mlflow.set_tracking_uri(uri)
    models = []
    tasks = [f"bench_{chr(ord('a') + i)}" for i in range(len(mix))]
    if "lisa" not in mix and plan.shared:  # the LiSA-only reference
        mix, tasks = mix + ["lisa"], tasks + ["bench_ref"]
    for i, (task, make) in enumerate(zip(tasks, mix)):
        kind, folder = _make_adapter(lm, task, make, i, home)
        with mlflow.start_run() as run:
            reg = registry.register_adapter(
                run_id=run.info.run_id, adapter_dir=folder, task=task, kind=kind, base=args.base,
                base_fingerprint=lm.base_fingerprint, plan_hash=plan.hash, metrics={"adapter.score": float(i)},
                main_metric="adapter.score", higher_is_better=True, trainable_params=0, tracking_uri=uri)
        models.append(f"{reg.name}/{reg.version}")
    return models


def _start(args, home: Path, uri: str, stop):
    import ray
    from ray import serve

    from adapters_hub import stack
    from sdk.serve import build_app

    models = _register(args, home, uri, MIXES[args.adapters])
    port = stack.free_port()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)  # never someone else's cluster
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(base_model=args.base, tracking_uri=uri, num_cpus=args.cpus, pin=models,
                        max_batch_size=16, max_tokens=max(64, args.new_tokens)), name="lisa-hub-bench", route_prefix="/")
    return f"http://127.0.0.1:{port}", models, stop


# ----------------------------------------------------------------------------- replicas


def replicas(args, home: Path) -> None:
    """1 replica against 2 (random routing, then adapter affinity), each replica 1 CPU and at
    most 4 adapters resident, 32 clients over 8 adapters; then, with --soak-minutes, mixed
    traffic on 2 affinity replicas with one replica killed a third of the way in."""
    import ray
    from ray import serve

    from adapters_hub import stack
    from sdk.serve import build_app

    stack.up(home=home, ray=False, ports=stack.Ports(mlflow=stack.free_port()))
    uri = stack.mlflow_url(home)
    try:
        models = _register(args, home, uri, ["parts"] * 8)[:8]
        port = stack.free_port()
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"

        def deploy(n: int, routing: str, name: str) -> None:
            serve.run(build_app(base_model=args.base, tracking_uri=uri, num_cpus=1, replicas=n, routing=routing,
                                max_resident=4, max_batch_size=16, max_tokens=max(64, args.new_tokens),
                                timeout_s=120), name=name, route_prefix="/")

        total = 32 * args.per_client
        load = [(models[k % 8], PROMPTS[k % 16]) for k in range(total)]
        rows = []
        for label, n, routing in () if args.soak_only else (
                ("1 replica", 1, "affinity"), ("2 replicas, random routing", 2, "random"),
                ("2 replicas, adapter affinity", 2, "affinity")):
            deploy(n, routing, "bench")
            run_load(url, [(m, PROMPTS[0]) for m in models], 8, 2)  # warm-up: every adapter once
            before = _stats(url)["loads"]
            result = run_load(url, load, 32, args.new_tokens)
            result["loads"] = _stats(url)["loads"] - before
            rows.append((label, result))
            serve.delete("bench")
        if rows:
            _print_replicas(args, total, rows)
        if args.soak_minutes:
            deploy(2, "affinity", "soak")
            soak(url, models, args.soak_minutes * 60, args.new_tokens)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        stack.down(home=home)


def _print_replicas(args, total: int, rows: list) -> None:
    print(f"\n{args.base}: 32 clients over 8 adapters, {total} requests of {args.new_tokens} tokens, "
          "1 CPU and at most 4 resident adapters per replica")
    print(f"{'serving':30s} {'tok/s':>7s} {'p50 s':>7s} {'p95 s':>7s} {'adapter loads':>14s}")
    for label, r in rows:
        print(f"{label:30s} {r['tok_s']:7.1f} {r['p50']:7.2f} {r['p95']:7.2f} {r['loads']:14d}")
    one, rand, aff = (r for _, r in rows)
    print(f"\naffinity: {aff['loads']} adapter loads vs {rand['loads']} with random routing "
          f"({aff['loads'] / max(rand['loads'], 1):.2f}x, target <= 0.25x); 2 replicas {aff['tok_s'] / one['tok_s']:.2f}x "
          "the tokens/s of 1 (target >= 1.6x)")


def _stats(url: str) -> dict:
    import requests

    return requests.get(f"{url}/stats", timeout=60).json()


def soak(url: str, models: list[str], seconds: float, new_tokens: int, clients: int = 8) -> None:
    """Mixed traffic for `seconds`; one replica killed at a third. Every request ends answered
    (200), failed with an OpenAI error body, or lost (no body: a hang past its timeout or a
    dropped connection); lost must be 0."""
    import ray
    import requests

    counts = {"sent": 0, "answered": 0, "failed with a body": 0, "lost": 0}
    lock, stop_at = threading.Lock(), time.monotonic() + seconds

    def client(c: int) -> None:
        k = c
        with requests.Session() as session:
            while time.monotonic() < stop_at:
                model, k = models[k % len(models)], k + clients
                with lock:
                    counts["sent"] += 1
                try:
                    r = session.post(f"{url}/v1/completions", timeout=180, json={
                        "model": model, "prompt": PROMPTS[k % 16], "max_tokens": new_tokens, "ignore_eos": True})
                    outcome = ("answered" if r.status_code == 200 else
                               "failed with a body" if "error" in r.json() else "lost")
                except (requests.RequestException, ValueError):
                    outcome = "lost"
                with lock:
                    counts[outcome] += 1

    warm = {s["replica"]: s["rss_mb"] for s in _settled_stats(url, models, new_tokens)}
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds / 3)
    victim = sorted(warm)[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    killed, back = time.monotonic(), None
    while back is None and time.monotonic() < stop_at:  # full capacity: two live replicas answer, the victim not
        names = {s["replica"] for s in _stats(url).get("replicas", [])}  # a 503 while Serve drops the dead one
        if len(names - {victim}) == 2:
            back = time.monotonic() - killed
        time.sleep(0.5)
    for t in threads:
        t.join()
    end = {s["replica"]: s["rss_mb"] for s in _settled_stats(url, models, 2)}
    print(f"\nsoak: {seconds / 60:.0f} min, {clients} clients over {len(models)} adapters, replica {victim[-8:]} "
          f"killed at {seconds / 3:.0f} s; two replicas answering again "
          f"{'never' if back is None else f'{back:.1f} s'} later (target < 60 s)")
    print("  " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " (target: lost 0)")
    for name in sorted(set(warm) | set(end)):
        a, b = warm.get(name), end.get(name)
        growth = f"{(b - a) / a:+.1%}" if a and b else "-"
        print(f"  replica {name[-8:]}: resident memory {a or '-'} MB after warm-up, {b or '-'} MB at the end "
              f"({growth}; target < +5%)")


def _settled_stats(url: str, models: list[str], new_tokens: int) -> list[dict]:
    """Both replicas' stats after a round of the soak's traffic (32 clients, every adapter:
    full batches, every replica's pool full): the warm-up, and the last look."""
    run_load(url, [(models[k % len(models)], PROMPTS[k % 16]) for k in range(64)], 32, new_tokens)
    seen: dict[str, dict] = {}
    for _ in range(20):
        for s in _stats(url).get("replicas", []):
            seen[s["replica"]] = s
        if len(seen) >= 2:
            break
    return list(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--plan", default=None, help="plan.json of the backbone (default: analysis of the base)")
    parser.add_argument("--url", default=None, help="a running app; needs --models")
    parser.add_argument("--models", default=None, help="four comma-separated adapters served by --url")
    parser.add_argument("--adapters", default="lisa", choices=sorted(MIXES), help="the four adapters' kinds")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=2, help="requests per client at 16 clients")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance and the replica")
    parser.add_argument("--replicas", action="store_true",
                        help="the replicas scenario instead: 1 vs 2 replicas, affinity vs random routing")
    parser.add_argument("--soak-minutes", type=float, default=0, help="with --replicas: then a soak this long")
    parser.add_argument("--soak-only", action="store_true", help="with --replicas: the soak alone")
    args = parser.parse_args()
    if args.replicas:
        home = Path(tempfile.mkdtemp(prefix="lisa-hub-serve-bench-"))
        os.environ["LISA_HUB_HOME"] = str(home)
        return replicas(args, home)

    stop = None
    if args.url:
        if not args.models or len(args.models.split(",")) != 4:
            parser.error("--url needs --models with four adapters")
        url, models = args.url.rstrip("/"), args.models.split(",")
    else:
        home = Path(tempfile.mkdtemp(prefix="lisa-hub-serve-bench-"))
        os.environ["LISA_HUB_HOME"] = str(home)
        url, models, stop = self_contained(args, home)
    reference, models = (models[4] if len(models) > 4 else None), models[:4]
    try:
        total = 16 * args.per_client
        spread = [(models[k % 4], PROMPTS[k % 16]) for k in range(total)]
        single = [(models[0], p) for _, p in spread]
        run_load(url, [(m, PROMPTS[0]) for m in models], 4, 4)  # warm-up: every adapter once
        rows = []
        for clients in (1, 4, 16):
            n = total if clients == 16 else max(clients, total // 4)
            rows.append((f"{clients} clients, 4 adapters", clients, run_load(url, spread[:n], clients, args.new_tokens)))
        rows.append(("16 clients, 1 adapter", 16, run_load(url, single, 16, args.new_tokens)))
        if reference:
            rows.append(("16 clients, 1 lisa-only adapter", 16,
                         run_load(url, [(reference, p) for _, p in spread], 16, args.new_tokens)))
        rows.append(("one at a time (same requests)", 1, run_load(url, spread, 1, args.new_tokens)))
        by = {label: r for label, _, r in rows}
        base = by["one at a time (same requests)"]["tok_s"]
        print(f"\nserving {args.base} at {url}: {args.new_tokens} new tokens per request, adapters {', '.join(models)}")
        print(f"{'load':32s} {'requests':>8s} {'seconds':>8s} {'tok/s':>8s} {'p50 s':>7s} {'p95 s':>7s} "
              f"{'vs one at a time':>17s}")
        for label, _, r in rows:
            print(f"{label:32s} {r['requests']:8d} {r['seconds']:8.2f} {r['tok_s']:8.1f} {r['p50']:7.2f} "
                  f"{r['p95']:7.2f} {r['tok_s'] / base:16.2f}x")
        mixed, one = by["16 clients, 4 adapters"]["tok_s"], by["16 clients, 1 adapter"]["tok_s"]
        print(f"\n16 clients over 4 adapters ({args.adapters}): {mixed / base:.2f}x one at a time (target >= 4x), "
              f"{mixed / one:.2f}x of 16 clients on one adapter (target >= 0.85x)")
        if reference:
            ref = by["16 clients, 1 lisa-only adapter"]["tok_s"]
            print(f"16 clients over 4 adapters ({args.adapters}): {mixed / ref:.2f}x of 16 clients on one "
                  f"lisa-only adapter (target >= 0.85x)")
    finally:
        if stop is not None:
            stop()


if __name__ == "__main__":
    main()
