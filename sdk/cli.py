"""The `lisa-hub` command line (entry point `main`). Feature modules add their own
sub-commands through `add_commands(subparsers)` (COMMAND_MODULES); handlers import heavy
libraries only when they run. This module's own:

  lisa-hub convert --base B [--fraction F | --max-ppl-increase X | --kv-budget K [--drop-attention]]
                   [--register] [--submit]
                                              dense base -> LiSA backbone (jobs/convert.py)
  lisa-hub pretrain --config bytes-6l --plan-fraction 0.5 [--register] [--submit]
                                              a LiSA model from scratch beside a dense twin (jobs/pretrain.py)
  lisa-hub adapt --task gsm8k [--profile quick] [--base B] [--kind lisa] [--attention dense]   run the job here
  lisa-hub submit gsm8k [--follow]            submit it to the Ray cluster as a job
  lisa-hub submit --spec my_task.yaml         a task of your own (`lisa-hub task init NAME --data FILE`)
  lisa-hub jobs | lisa-hub logs ID            follow jobs (also in the Ray dashboard)
  lisa-hub adapters [--task T]                registered adapters (also in the MLflow UI)
  lisa-hub generate --adapter A "prompt"      one completion on the backbone with adapter A
  lisa-hub serve [--adapters a,b] [--pin a]   Ray Serve app: OpenAI-compatible API, adapters batched
  lisa-hub eval-ppl [--backbone DIR | --adapter REF] [--text FILE]   perplexity, loaded as serving loads it
  lisa-hub eval --tasks T[,T2] [--adapter REF] [--attention dense]    lm-evaluation-harness (sdk/evaluate.py)
  lisa-hub batch --input in.jsonl --output out.jsonl [--adapter A | --adapter-column C]   Ray Data (sdk/batch.py)
  lisa-hub demo                               the whole tour on SmolLM2 (README's main command)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# Modules that contribute sub-commands besides this one; each defines add_commands(subparsers).
COMMAND_MODULES = [
    "adapters_hub.stack",       # lisa-hub up | down | status
    "adapters_hub.lisa.cli",    # lisa-hub analyze
    "adapters_hub.drop.cli",    # lisa-hub drop
    "adapters_hub.tasks.cli",   # lisa-hub task init | check
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lisa-hub", description="lisa-hub: task adaptation for compressed LLMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("models", help="list base model names")
    p.set_defaults(func=_models)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (LookupError, ValueError, RuntimeError, OSError) as err:
        # Known failure kinds get one clear line instead of a traceback.
        print(f"lisa-hub {args.command}: error: {err}", file=sys.stderr)
        return 2


def _models(args) -> int:
    from adapters_hub.models import list_models

    for info in list_models():
        print(f"{info.name:14s} {info.description}  [{info.source}]")
    print("(or any Hugging Face model id / local model folder)")
    return 0


def add_commands(sub) -> None:
    from jobs import convert
    from jobs.adapt import add_arguments

    p = sub.add_parser("convert", help="turn a dense base into a LiSA backbone that keeps its quality")
    convert.add_arguments(p)
    p.add_argument("--submit", action="store_true", help="run it as a Ray job on the cluster instead of here")
    p.add_argument("--follow", action="store_true", help="with --submit: stream the log and wait")
    p.set_defaults(func=_convert)

    from jobs import pretrain

    p = sub.add_parser("pretrain", help="train a LiSA model from scratch beside a dense twin, as a base of its own")
    pretrain.add_arguments(p)
    p.add_argument("--submit", action="store_true", help="run it as a Ray job on the cluster instead of here")
    p.add_argument("--follow", action="store_true", help="with --submit: stream the log and wait")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("eval-ppl", help="perplexity of a base, a backbone or an adapter on a corpus or a text file")
    p.add_argument("--base", default="smollm2-135m", help="base model")
    p.add_argument("--backbone", default=None, metavar="DIR",
                   help="a backbone folder (plan.json [, adapter/, healing/]); 'registered' = backbone-<base>@champion")
    p.add_argument("--adapter", default=None, metavar="REF",
                   help="a registered adapter (gsm8k-lisa@champion) or adapter folder, on the backbone")
    p.add_argument("--data", default="wikitext2", help="wikitext2 (its first blocks), wikitext2-heldout, tinyshakespeare")
    p.add_argument("--text", default=None, metavar="FILE", help="any UTF-8 text file instead of --data")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--block-len", type=int, default=1024)
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=_eval_ppl)

    p = sub.add_parser("eval", help="lm-evaluation-harness tasks on a base, a backbone or an adapter")
    p.add_argument("--tasks", required=True, help="comma-separated: lm-eval task names, lisa_gsm8k, lisa_gsm8k_mc "
                                                  "(local GSM8K files), or tasks under --include-path")
    p.add_argument("--adapter", default=None, metavar="REF", help="task, registry ref or folder; none = the backbone")
    p.add_argument("--base", default="smollm2-135m", help="base model")
    p.add_argument("--attention", default="lisa", choices=("lisa", "dense"),
                   help="the base's registered LiSA backbone, or the unmodified base (dense)")
    p.add_argument("--plan-path", default=None, metavar="DIR", help="a backbone folder instead of the registered one")
    p.add_argument("--include-path", default=None, metavar="DIR", help="a folder of lm-eval task YAML files")
    p.add_argument("--limit", type=int, default=None, help="the first N documents of each task")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-log", action="store_true", help="do not log the results to the adapter's MLflow run")
    p.set_defaults(func=_eval)

    p = sub.add_parser("batch", help="batch inference of a JSONL file of prompts on Ray Data, adapters mixed per row")
    p.add_argument("--input", required=True, help="JSONL, one {\"prompt\": ...} per line")
    p.add_argument("--output", required=True, help="JSONL written in input order, an `error` field per line")
    p.add_argument("--adapter", default=None, help="the adapter of every line (default: the bare backbone)")
    p.add_argument("--adapter-column", default=None, help="a field naming each line's adapter (else --adapter)")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--attention", default="lisa", choices=("lisa", "dense"))
    p.add_argument("--plan-path", default=None, metavar="DIR", help="a backbone folder instead of the registered one")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together per actor call")
    p.add_argument("--actors", type=int, default=1, help="actors, one backbone each")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor")
    p.set_defaults(func=_batch)

    p = sub.add_parser("adapt", help="run an adaptation job in this process (Ray Train inside)")
    add_arguments(p)
    p.set_defaults(func=_adapt)

    p = sub.add_parser("submit", help="submit an adaptation job to the Ray cluster")
    p.add_argument("task", nargs="?", default=None, help="a built-in task (optional with --spec)")
    p.add_argument("--spec", default=None, help="a task spec YAML of your own; it and its data travel with the job")
    p.add_argument("--base", default=None)
    from adapters_hub.kinds import trainable_kinds

    p.add_argument("--kind", default="lisa", choices=trainable_kinds())
    p.add_argument("--attention", default="lisa", choices=("lisa", "dense"))
    p.add_argument("--profile", default="quick")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON")
    p.add_argument("--follow", action="store_true", help="stream the log and wait for the result")
    p.add_argument("--fresh-start", action="store_true", help="ignore checkpoints of an interrupted earlier run")
    p.set_defaults(func=_submit)

    p = sub.add_parser("jobs", help="lisa-hub jobs on the cluster")
    p.set_defaults(func=_jobs)

    p = sub.add_parser("logs", help="log of one job")
    p.add_argument("job_id")
    p.add_argument("--follow", action="store_true")
    p.set_defaults(func=_logs)

    p = sub.add_parser("adapters", help="registered adapters")
    p.add_argument("--task", default=None)
    p.set_defaults(func=_adapters)

    p = sub.add_parser("generate", help="generate with an adapter on the backbone")
    p.add_argument("prompt")
    p.add_argument("--adapter", default=None, help="task, registry ref or folder; none = fresh backbone")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=_generate)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP serving, adapters batched per request (Ray Serve)")
    p.add_argument("--base", "--base-model", dest="base_model", default="smollm2-135m")
    p.add_argument("--adapters", default="", help="comma-separated adapters to preload (task names or registry refs)")
    p.add_argument("--pin", default="", help="comma-separated adapters preloaded and never evicted")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--plan-path", default=None, help="backbone folder or plan.json instead of the registered one")
    p.add_argument("--attention", default="lisa", choices=("lisa", "dense"),
                   help="the base's LiSA backbone, or the unmodified base with its lora adapters (<task>-lora-dense)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--max-resident", type=int, default=4, help="adapters kept loaded (LRU; pinned ones on top)")
    p.add_argument("--max-tokens", type=int, default=512, help="cap on a request's max_tokens")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="cap on prompt tokens per prompt")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows in one decode batch")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per request; its generation stops then")
    p.add_argument("--allow-local-folders", action="store_true",
                   help="also serve adapters from folders on this machine (registry references only otherwise)")
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs reserved for each replica")
    p.add_argument("--replicas", type=int, default=1, help="Generator replicas, each with its own backbone")
    p.add_argument("--min-replicas", type=int, default=None,
                   help="autoscale on ongoing requests between --min-replicas and --max-replicas")
    p.add_argument("--max-replicas", type=int, default=None)
    p.add_argument("--target-ongoing-requests", type=float, default=8.0,
                   help="autoscaling: ongoing requests per replica it aims at")
    p.add_argument("--routing", default="affinity", choices=("affinity", "random"),
                   help="affinity: a request goes to a replica with its adapter resident (Serve multiplexing)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every route but /health (default: LISA_HUB_API_KEY); "
                        "needed to serve on a non-loopback --host")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="the full tour on SmolLM2: stack, convert, adapt gsm8k, serve, compare")
    p.add_argument("--profile", default="quick")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--fraction", type=float, default=0.5, help="layers shared by the demo's backbone")
    p.add_argument("--convert-minutes", type=float, default=4.0,
                   help="healing budget of the demo's conversion (only when no converted backbone is registered)")
    p.add_argument("--convert-max-steps", type=int, default=100_000)
    p.add_argument("--reconvert", action="store_true", help="convert again even if a converted backbone is registered")
    p.add_argument("--port", type=int, default=8000, help="port of the OpenAI-compatible server the demo starts")
    p.set_defaults(func=_demo)


def _pretrain(args) -> int:
    from jobs import pretrain, runtime

    spec = runtime.spec_from_args(pretrain.PretrainSpec, args)
    if not args.submit:
        pretrain.main(spec)
        return 0
    import sdk

    options = {k: v for k, v in spec.model_dump().items()
               if k not in ("config", "plan_fraction", "steps", "name", "register")}
    job = sdk.submit_pretraining(config=spec.config, plan_fraction=spec.plan_fraction, steps=spec.steps,
                                 name=spec.name, register=spec.register, options=options)
    print(f"submitted pre-training {job.id}  (dashboard: {job.address}/#/jobs/{job.id})")
    if args.follow:
        job.tail()
        result = job.wait()
        ratio = result.metrics.get("ppl_ratio")
        print(f"pre-trained {result.base}: {len(result.layers)} layers shared"
              + (f", perplexity {ratio:.3f}x its dense twin" if ratio else "")
              + (f"; registered {result.model_name} version {result.version}" if result.version else ""))
    return 0


def _convert(args) -> int:
    from jobs import convert, runtime

    spec = runtime.spec_from_args(convert.ConvertSpec, args)
    if not args.submit:
        convert.main(spec)
        return 0
    import sdk

    if spec.out:
        raise ValueError("out: a submitted conversion runs on the cluster; use --register, not --out")
    options = {k: v for k, v in spec.model_dump().items()
               if k not in ("base", "fraction", "max_ppl_increase", "kv_budget", "drop_attention", "minutes",
                            "init_only", "register", "fresh_start", "out")}
    job = sdk.submit_conversion(base_model=spec.base, fraction=spec.fraction,
                                max_ppl_increase=spec.max_ppl_increase, kv_budget=spec.kv_budget,
                                drop_attention=spec.drop_attention, minutes=spec.minutes,
                                init_only=spec.init_only, register=spec.register, options=options,
                                fresh_start=spec.fresh_start)
    print(f"submitted conversion {job.id}  (dashboard: {job.address}/#/jobs/{job.id})")
    if args.follow:
        job.tail()
        result = job.wait()
        print(f"converted {result.base}: {len(result.layers)} layers shared, {len(result.dropped)} dropped, "
              f"perplexity ratio "
              f"{result.metrics['converted.ppl_ratio']:.3f}" + (f"; registered {result.model_name} version "
                                                               f"{result.version}" if result.version else ""))
    return 0


def _eval_ppl(args) -> int:
    """One JSON line: what was scored, on what, and the perplexity last."""
    import json
    import time

    import sdk
    from adapters_hub.data import eval_text, token_blocks
    from adapters_hub.evaluation import perplexity

    start = time.perf_counter()
    if args.text:
        path = Path(args.text)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"--text: {path} does not exist") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"--text: {path} is not UTF-8 text (byte {err.start})") from None
        data = str(path)
    else:
        text, data = eval_text(args.data), args.data
    if args.backbone is None and args.adapter is None:  # the dense base itself
        from adapters_hub.models import load_base

        model, tok = load_base(args.base, dtype=args.dtype)
        what = {"base": args.base}
    else:  # exactly as serving loads it: healing merged, W_q/W_k pruned, general adapter active
        plan_path = None if args.backbone in (None, "registered") else args.backbone
        bb = sdk.Backbone.load(base_model=args.base, plan_path=plan_path, dtype=None if args.dtype == "float32" else args.dtype)
        if args.adapter:
            bb.use(args.adapter)
        model, tok = bb.lm, bb.tokenizer
        what = {"base": args.base, "backbone": args.backbone or "registered", "adapter": args.adapter,
                "healed": bool(getattr(bb.lm, "healing", None)), "shared_layers": len(bb.lm.plan.shared)}
    blocks = token_blocks(tok, text, n_blocks=args.blocks, block_len=args.block_len)
    ppl = perplexity(model, blocks, progress=sys.stderr.isatty())
    print(json.dumps({**what, "data": data, "blocks": args.blocks, "block_len": args.block_len,
                      "seconds": round(time.perf_counter() - start, 1), "perplexity": round(ppl, 4)}))
    return 0


def _eval(args) -> int:
    """One JSON line: the model, each task's metrics, the run they were logged to."""
    import json

    from sdk.evaluate import evaluate_harness

    r = evaluate_harness(tasks=args.tasks.split(","), base_model=args.base, adapter=args.adapter,
                         attention=args.attention, plan_path=args.plan_path, include_path=args.include_path,
                         limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                         log_to_run=not args.no_log)
    print(json.dumps({**r.model, "results": r.results, "run_id": r.run_id, "seconds": r.seconds}))
    return 0


def _batch(args) -> int:
    from sdk.batch import batch_generate

    r = batch_generate(input=args.input, output=args.output, base_model=args.base, attention=args.attention,
                       plan_path=args.plan_path, adapter=args.adapter, adapter_column=args.adapter_column,
                       prompt_column=args.prompt_column, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, actors=args.actors, num_cpus=args.num_cpus)
    print(f"wrote {r.rows} lines to {r.output} ({r.failed} failed) in {r.seconds:.1f} s, "
          f"{r.tokens_per_s:.1f} generated tokens/s")
    return 1 if r.failed == r.rows else 0


def _adapt(args) -> int:
    from jobs.adapt import main, spec_from_args

    main(spec_from_args(args))
    return 0


def _submit(args) -> int:
    import sdk
    from adapters_hub.tasks import parse_overrides

    job = sdk.submit_adaptation(args.task, spec=args.spec, base_model=args.base, kind=args.kind,
                                attention=args.attention, profile=args.profile,
                                overrides=parse_overrides(args.set), fresh_start=args.fresh_start)
    print(f"submitted job {job.id}  (dashboard: {job.address}/#/jobs/{job.id})")
    if args.follow:
        job.tail()
        result = job.wait()
        print(f"registered {result.model_name} version {result.version} aliases {result.aliases}")
    return 0


def _jobs(args) -> int:
    import sdk

    for j in sdk.list_jobs():
        print(f"{j.id:28s} {j.status.value:9s} {j.task:10s} {j.kind:6s} {j.base:14s} {j.profile:6s} {j.message[:60]}")
    return 0


def _logs(args) -> int:
    import sdk

    job = sdk.get_job(args.job_id)
    if args.follow:
        job.tail()
    else:
        print(job.logs(), end="")
    return 0


def _adapters(args) -> int:
    import sdk

    for a in sdk.list_adapters(task=args.task):
        metrics = " ".join(f"{k}={v:.3f}" for k, v in sorted(a.metrics.items()) if k.startswith("adapter."))
        print(f"{a.name}/{a.version:<4} {','.join(a.aliases):18s} base={a.tags.get('base_model', '?'):14s} {metrics}")
    return 0


def _generate(args) -> int:
    from sdk import Backbone

    bb = Backbone.load(base_model=args.base)
    if args.adapter:
        bb.use(args.adapter)
    print(bb.generate(args.prompt, max_new_tokens=args.max_new_tokens))
    return 0


def _serve(args) -> int:
    from sdk.serve import run

    split = lambda text: [a.strip() for a in text.split(",") if a.strip()]  # noqa: E731
    pin = split(args.pin)
    run(base_model=args.base_model, port=args.port, host=args.host, plan_path=args.plan_path,
        tracking_uri=args.tracking_uri, max_resident=args.max_resident,
        adapters=[a for a in split(args.adapters) if a not in pin], pin=pin, allow_local_folders=args.allow_local_folders,
        max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, timeout_s=args.timeout_s, num_cpus=args.num_cpus, api_key=args.api_key,
        attention=args.attention, replicas=args.replicas, min_replicas=args.min_replicas,
        max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests, routing=args.routing)
    return 0


def _demo(args) -> int:
    """The product in one command: a converted (healed) backbone, a GSM8K adapter trained
    on it, one answer through the OpenAI-compatible server, and what was gained and lost."""
    import json
    import time

    import sdk
    from adapters_hub import stack
    from adapters_hub.backbone import backbone_folder, general_adapter_of

    start = time.perf_counter()
    print("== 1. local stack (Ray head + dashboard, MLflow server)")
    for s in stack.up():
        print("  ", s.line())
    print(f"   follow the jobs in the Ray dashboard {stack.dashboard_url()}/#/jobs")
    folder = backbone_folder(args.base)
    if args.reconvert or general_adapter_of(folder) is None:
        print(f"== 2. convert {args.base} into a LiSA backbone: {args.fraction:.0%} of the layers share attention "
              f"(chosen by the attention analysis), local initialisation, {args.convert_minutes:g} min of healing")
        job = sdk.submit_conversion(base_model=args.base, fraction=args.fraction, minutes=args.convert_minutes,
                                    options={"choose_by": "analysis", "eval_blocks": 4,
                                             "max_steps": args.convert_max_steps})
        job.tail()
        converted = job.wait().metrics
        folder = backbone_folder(args.base)
    else:
        print(f"== 2. using the registered converted backbone of {args.base} ({folder.name}); --reconvert makes a new one")
        converted = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    print(f"== 3. adapt gsm8k on it (profile {args.profile})")
    job = sdk.submit_adaptation(task="gsm8k", base_model=args.base, profile=args.profile)
    job.tail()
    result = job.wait()
    print(f"   registered {result.model_name} version {result.version} aliases {result.aliases}")
    print("== 4. one request through the OpenAI-compatible server (lisa-hub serve), with the openai client")
    question = "Question: Tom has 3 boxes with 4 apples each. He eats 2 apples. How many apples are left?\nAnswer:"
    answer = _ask_server(args.base, args.port, result.ref, question)
    print(f"   {result.ref}: {answer.strip()[:300]}")
    m = result.metrics
    rows = [("base (dense)", converted.get("base.perplexity"), m.get("base.answer_nll")),
            ("LiSA backbone (converted, healed)", converted.get("converted.perplexity"), m.get("init.answer_nll")),
            (f"+ gsm8k adapter ({result.ref})", None, m.get("adapter.answer_nll"))]
    fmt = lambda v: f"{v:10.3f}" if v is not None else f"{'':10s}"  # noqa: E731
    print(f"== 5. what was gained and lost\n   {'':36s} {'WikiText-2 ppl':>14s} {'GSM8K answer NLL':>17s}")
    for name, ppl, nll in rows:
        print(f"   {name:36s} {fmt(ppl):>14s} {fmt(nll):>17s}")
    if converted.get("base.perplexity") and converted.get("converted.perplexity"):
        print(f"   backbone perplexity {converted['converted.perplexity'] / converted['base.perplexity']:.3f}x the base; "
              f"KV cache {converted.get('kv_ratio', float('nan')):.2f}x smaller")
    print(f"== done in {time.perf_counter() - start:.0f} s.  Ray dashboard: {stack.dashboard_url()}   "
          f"MLflow UI: {stack.mlflow_url()}/#/models/{result.model_name}")
    return 0


def _ask_server(base: str, port: int, model: str, prompt: str, *, timeout: float = 300.0) -> str:
    """Start `lisa-hub serve` (the project's own command) on `port`, ask it one completion
    with the openai client, stop it (SIGTERM deletes the app); the answer's text."""
    import os
    import signal
    import subprocess
    import time

    import requests
    from openai import OpenAI

    proc = subprocess.Popen([sys.executable, "-m", "sdk.cli", "serve", "--base", base, "--pin", model,
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read() if proc.poll() is not None else ""
                raise RuntimeError(f"lisa-hub serve did not answer on port {port} within {timeout:.0f} s\n{out[-2000:]}")
            time.sleep(2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=80, temperature=0, stop=["\n\n"])
        return reply.choices[0].text
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except ProcessLookupError:  # it ended by itself (the error above says why)
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
