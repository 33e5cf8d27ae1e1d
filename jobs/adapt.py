"""Adaptation job: train one task adapter on a base model's shared-attention backbone,
evaluate it against the base and the fresh backbone, and register it in MLflow.

Run (from the repository root, with the local stack up: `lisa-hub up`):

    python -m jobs.adapt --task gsm8k --base smollm2-135m --kind lisa --profile quick
    python -m jobs.adapt --task gsm8k --kind lora --attention dense     # LoRA on the unmodified base
    lisa-hub adapt --task gsm8k --profile smoke --base tiny-llama      # same thing
    sdk.submit_adaptation(task="gsm8k")                                # as a Ray job

Steps: 1 task spec + profile   2 backbone plan (registry, or analyse + register)
3 TRL SFT inside Ray Train (adapter tensors only; adapter-only checkpoints; a re-run of
an interrupted job resumes from its last checkpoint)   4 evaluate base / fresh backbone /
general adapter it started from (if any) / adapter   5 MLflow run (params, per-step
metrics, curves, samples, adapter) + model version `<task>-<kind>` (`<task>-<kind>-dense`
on the dense backbone) with alias `candidate`
(and `champion` if it beats the current one; ties go to the spec's tie_breaker).
The last line printed is `LISA_HUB_RESULT {json}` for the SDK.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict

from pydantic import Field, model_validator
from pathlib import Path

from jobs import runtime


class AdaptSpec(runtime.JobSpec):
    task: str
    base: str | None = None            # None = the profile's default_base
    kind: str = "lisa"
    attention: str = "lisa"            # "lisa": the base's LiSA backbone; "dense": the unmodified base
    profile: str = "quick"
    overrides: dict = Field(default_factory=dict)   # profile fields, e.g. {"max_steps": 5}
    fresh_start: bool = False          # ignore checkpoints of an interrupted earlier run
    spec_file: str | None = None       # a task of one's own: its spec YAML (data paths relative to it)

    @model_validator(mode="after")
    def _check(self) -> "AdaptSpec":
        """One validation for the SDK, the CLI and the job (the task itself is checked by
        loading it; profile values by TaskSpec.profile_with)."""
        from adapters_hub.backbone import ATTENTIONS
        from adapters_hub.kinds import trainable_kinds

        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"task: must be a task name, got {self.task!r}")
        if self.kind not in trainable_kinds():
            raise ValueError(f"kind: unknown {self.kind!r}; trainable kinds: {', '.join(trainable_kinds())}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention: unknown {self.attention!r}; known: {', '.join(ATTENTIONS)}")
        if self.attention == "dense" and self.kind == "lisa":
            raise ValueError("kind: a lisa adapter needs the LiSA backbone (--attention lisa); the dense backbone "
                             "takes lora adapters")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"overrides: must be a mapping of profile fields, got {type(self.overrides).__name__}")
        return self


def main(spec: AdaptSpec) -> dict:
    import mlflow

    from adapters_hub import registry, settings
    from adapters_hub.backbone import backbone_plan, dense_plan
    from adapters_hub.kinds import read_config
    from adapters_hub.task_eval import sft_examples
    from adapters_hub.tasks import load_rows, load_task, spec_digest

    t0 = time.perf_counter()
    task = load_task(spec.task, spec.spec_file)       # clear error: unknown task / bad spec
    profile = _profile(task, spec)                     # (kind, backbone, overrides: AdaptSpec checked them)
    base = spec.base or profile.default_base
    if task.is_chat:
        _check_chat_template(base)
    uri = settings.mlflow_uri()
    registry.Registry(tracking_uri=uri).client()      # probe: fail before any work, leave nothing behind
    runtime.connect()  # settle the Ray connection (in seconds) before any expensive work
    runtime.use_all_cores()
    print(f"[adapt] task={task.name} kind={spec.kind} base={base} profile={profile.name} mlflow={uri}", flush=True)

    if spec.attention == "dense":
        plan, init_from = dense_plan(base), None
    else:
        plan = backbone_plan(base, tracking_uri=uri)
        init_from = _general_adapter(task.name, base, plan, uri)
    from adapters_hub.backbone import healing_of

    healing = healing_of(Path(init_from).parent) if init_from else None  # a converted backbone's, merged at load
    healing = str(healing) if healing else None
    train_rows, eval_rows = load_rows(task, "train", profile), load_rows(task, "eval", profile)  # checked rows
    print(f"[adapt] plan {plan.hash} ({len(plan.layers)} shared layers); {len(train_rows)} train / "
          f"{len(eval_rows)} eval rows; init={'general adapter' if init_from else 'fresh'}"
          f"{' (healed backbone)' if healing else ''}", flush=True)

    digest = spec_digest(task)
    run_key = _run_key(spec, base, plan.hash, digest if spec.spec_file else "")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(f"lisa-hub/{task.name}")
    with runtime.run_lock(run_key), mlflow.start_run(run_name=f"{task.name}-{spec.kind}-{base}") as run:
        mlflow.set_tags({"task": task.name, "kind": spec.kind, "attention": spec.attention, "base_model": base,
                         "plan_hash": plan.hash,
                         "profile": profile.name, "ray_job_id": os.environ.get("LISA_HUB_JOB_ID", "")})
        global_batch = profile.batch_size * profile.grad_accum * profile.num_workers
        mlflow.log_params({"task": task.name, "kind": spec.kind, "base": base, "global_batch": global_batch,
                           **_flat(profile.model_dump())})
        print(f"[adapt] {profile.num_workers} worker(s) x batch {profile.batch_size} x grad_accum "
              f"{profile.grad_accum} = global batch {global_batch}", flush=True)
        mlflow.set_tag("spec_sha256", digest)
        _log_datasets(task, train_rows, eval_rows)
        # The workers get SFT examples, not the spec: a user's spec and data stay with the driver.
        train_cfg = {"task": task.name, "kind": spec.kind, "base": base, "plan": plan.to_dict(),
                     "profile": profile.model_dump(), "examples": sft_examples(task, train_rows),
                     "init_from": init_from, "healing": healing,
                     "run_id": run.info.run_id, "tracking_uri": uri}
        adapter_dir, history, trainable = _train_on_ray(train_cfg, run_key=run_key, fresh_start=spec.fresh_start)
        mlflow.log_metric("train_seconds", time.perf_counter() - t0)

        metrics = _evaluate(task, profile, base, plan, spec.kind, adapter_dir, eval_rows, init_dir=init_from,
                            healing=healing)
        mlflow.log_metrics(metrics)
        _log_curve(history)
        (adapter_dir / "README.md").write_text(_model_card(task, spec.kind, base, plan, profile, metrics, trainable,
                                                             spec.attention))
        registered = registry.register_adapter(
            run_id=run.info.run_id, adapter_dir=adapter_dir, task=task.name, kind=spec.kind, base=base,
            attention=spec.attention,
            base_fingerprint=read_config(adapter_dir)["base_fingerprint"],
            plan_hash=plan.hash, metrics=metrics, main_metric=f"adapter.{task.main_metric.value}",
            higher_is_better=task.higher_is_better, trainable_params=trainable, tracking_uri=uri,
            tie_breaker=(f"adapter.{task.tie_breaker.value}", task.tie_breaker.higher_is_better)
            if task.tie_breaker else None, extra_tags={"spec_sha256": digest})
        runtime.delete_run(run_key, "[adapt]")  # done: the next run of this spec starts fresh
        shutil.rmtree(adapter_dir, ignore_errors=True)

    result = {"run_id": run.info.run_id, "model_name": registered.name, "version": str(registered.version),
              "aliases": list(registered.aliases), "metrics": metrics, "trainable_params": trainable,
              "seconds": round(time.perf_counter() - t0, 1), "plan_hash": plan.hash, "base": base}
    runtime.print_result(result)
    return result


# ----------------------------------------------------------------------------- pieces


def _profile(task, spec: AdaptSpec):
    return task.profile_with(spec.profile, spec.overrides)


def _check_chat_template(base: str) -> None:
    from adapters_hub.models import load_tokenizer

    if not getattr(load_tokenizer(base), "chat_template", None):
        raise ValueError(f"a chat task needs a base whose tokenizer has a chat template; {base!r} has none")


def _general_adapter(task: str, base: str, plan, uri: str) -> str | None:
    """The base's general adapter, which task adapters (lisa) and LiSA-backbone LoRA start
    from: the adapter/ of the registered converted backbone (backbone-<base>@champion), or
    else wikitext2-lisa@champion trained on this base and plan."""
    from adapters_hub import registry
    from adapters_hub.backbone import backbone_folder, general_adapter_of

    folder = general_adapter_of(backbone_folder(base, tracking_uri=uri))
    if folder is not None:
        return str(folder)
    if task == "wikitext2":
        return None
    try:
        found = registry.get_adapter("wikitext2-lisa@champion", tracking_uri=uri)
    except LookupError:
        return None
    if found.tags.get("base_model") != base or found.tags.get("plan_hash") not in (None, plan.hash):
        return None
    return str(registry.resolve("wikitext2-lisa@champion", tracking_uri=uri))


def _run_key(spec: AdaptSpec, base: str, plan_hash: str, digest: str = "") -> str:
    """Names an interrupted run so that the same job resumes it; a user's spec counts by its digest."""
    key = json.dumps([spec.task, spec.kind, spec.attention, base, spec.profile, spec.overrides, plan_hash]
                     + ([digest] if digest else []), sort_keys=True)
    return f"{spec.task}-{spec.kind}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _train_on_ray(cfg: dict, *, run_key: str, fresh_start: bool) -> tuple[Path, list[dict], int]:
    """Run `train_loop` on Ray Train (jobs.runtime.fit); returns (adapter dir, log history, trainable)."""
    profile = cfg["profile"]
    result = runtime.fit(train_loop, cfg, run_key=run_key, num_workers=profile["num_workers"],
                         use_gpu=profile["use_gpu"], placement_strategy=profile["placement_strategy"],
                         fresh_start=fresh_start, log_prefix="[adapt]")
    runtime.run_dir(run_key).parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f"{run_key}-adapter-", dir=runtime.run_dir(run_key).parent))  # this job's own
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / "adapter", out, dirs_exist_ok=True)
        meta = json.loads((Path(ckpt) / "meta.json").read_text())
    if meta.get("mlflow_lost"):
        shutil.rmtree(out, ignore_errors=True)
        from adapters_hub.registry import RegistryUnavailableError

        raise RegistryUnavailableError(f"MLflow became unreachable during training: {meta['mlflow_lost']}")
    return out, meta["history"], meta["trainable"]


def train_loop(cfg: dict) -> None:
    """Runs on each Ray Train worker: TRL SFT of the adapter tensors only."""
    import ray.train
    from datasets import Dataset

    from jobs.trainer import AdapterSFTTrainer, MlflowSteps, ReportCheckpoints, sft_config

    from adapters_hub.backbone import load_lisa_model
    from adapters_hub.kinds import get_kind
    from adapters_hub.lisa.plan import SharingPlan

    # MLflow's client retries a dead server for minutes by default; on a worker that only
    # logs step metrics, a lost server stops training at once (MlflowSteps) instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    p = cfg["profile"]
    lm, tok = load_lisa_model(cfg["base"], SharingPlan.from_dict(cfg["plan"]), general_adapter=cfg["init_from"],
                              healing=cfg.get("healing"))
    kind, name = get_kind(cfg["kind"]), cfg["task"]
    trainable = prepare_adapter(lm, kind, name, p, init_from=cfg["init_from"])
    import torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if rank == 0:
        print(f"[train] trainable parameters: {trainable:,} "
              f"({100 * trainable / sum(t.numel() for t in lm.parameters()):.2f}% of the backbone)", flush=True)
    print(f"[train] worker {rank}/{world} on node {ray.get_runtime_context().get_node_id()[:12]}, "
          f"torch threads {torch.get_num_threads()}", flush=True)

    dataset = Dataset.from_list(cfg["examples"])
    work = Path(tempfile.mkdtemp(prefix="lisa-train-"))
    args = sft_config(p, work)

    steps = MlflowSteps(cfg["tracking_uri"], cfg["run_id"], lambda: ray.train.get_context().get_world_rank())
    checkpoints = ReportCheckpoints(lisa_model=lm, adapter_kind=kind, adapter_name=name, trainable=trainable,
                                    mlflow_steps=steps)
    trainer = AdapterSFTTrainer(model=lm, args=args, train_dataset=dataset, processing_class=tok,
                                callbacks=[steps, checkpoints],
                                lisa_model=lm, adapter_kind=kind, adapter_name=name,
                                distill_beta=p["distill_beta"] if cfg["kind"] == "lisa" else 0.0)
    resume = None
    if (ckpt := ray.train.get_checkpoint()) is not None:
        resume_dir = Path(tempfile.mkdtemp(prefix="lisa-resume-"))
        with ckpt.as_directory() as d:
            shutil.copytree(Path(d) / "checkpoint", resume_dir / "checkpoint")
        resume = str(resume_dir / "checkpoint")
        print(f"[train] resuming from checkpoint at step {json.loads((resume_dir / 'checkpoint' / 'trainer_state.json').read_text())['global_step']}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    if rank == 0:  # the other workers hold the same adapter: only rank 0 writes it
        trainer.save_model(str(work / "final"))
        trainer.state.save_to_json(str(work / "final" / "trainer_state.json"))
    checkpoints.report(work / "final", trainer.state, final=True)


def prepare_adapter(lm, kind, name: str, profile: dict, *, init_from: str | None) -> int:
    """Add (or, for lisa with a general adapter, load from it) the adapter `name` that the
    profile describes, activate it, leave exactly its trainable tensors requiring grad;
    returns their count. A lisa adapter gets its LoRA parts here (fresh: B = 0)."""
    from adapters_hub.kinds import only_trainable

    options = kind.profile_options(profile)
    if init_from and kind.name == "lisa":
        kind.load(lm, init_from, name)     # start from the base's general adapter
        if options.get("lora_parts") is not None and lm.peft_config[name].lora_parts is None:
            lm.add_lora_parts(name, options["lora_parts"])  # (a general adapter with parts keeps its own)
    else:
        kind.add(lm, name, options)
    kind.activate(lm, name)
    only_trainable(lm, kind, name)
    from adapters_hub.kinds.lisa import default_lisa_tensors

    if kind.name == "lisa" and (profile.get("lisa_tensors") or default_lisa_tensors(bool(init_from))) == "aligner":
        for key, t in lm.named_parameters():
            if ".lisa_qk." in key:
                t.requires_grad_(False)  # the low-rank Q/K stay as the general adapter left them
    return sum(t.numel() for t in lm.parameters() if t.requires_grad)


def _evaluate(task, profile, base, plan, kind_name, adapter_dir, rows, *, init_dir=None,
              healing=None) -> dict[str, float]:
    """Main metrics of base / fresh backbone / [general adapter it started from] / adapter,
    on the same eval rows (so what the task training added is visible apart from the start).
    "base" is the untouched base; the others run on the backbone (healing merged)."""
    import mlflow

    from adapters_hub.backbone import load_lisa_model
    from adapters_hub.kinds import get_kind
    from adapters_hub.models import load_base
    from adapters_hub.task_eval import evaluate_task

    metrics: dict[str, float] = {}
    base_model, tok = load_base(base)
    for label, model in (("base", base_model),):
        metrics.update({f"{label}.{k}": v for k, v in evaluate_task(model, tok, task, rows, profile=profile).items()})
    del base_model
    lm, tok = load_lisa_model(base, plan, healing=healing)
    if plan.shared or plan.dropped:  # on the dense backbone "fresh" is the base itself
        results = evaluate_task(lm, tok, task, rows, profile=profile)
        metrics.update({f"fresh.{k}": v for k, v in results.items()})
    kind = get_kind(kind_name)
    if init_dir:  # the general adapter is a lisa adapter
        lisa = get_kind("lisa")
        lisa.load(lm, init_dir, "init")
        lisa.activate(lm, "init")
        lm.base_adapter = "init"  # what a lora adapter trained on this backbone runs its LiSA layers on
        metrics.update({f"init.{k}": v for k, v in evaluate_task(lm, tok, task, rows, profile=profile).items()})
    kind.load(lm, adapter_dir, "trained")
    kind.activate(lm, "trained")
    results = evaluate_task(lm, tok, task, rows, profile=profile)
    metrics.update({f"adapter.{k}": v for k, v in results.items()})
    samples = [asdict(s) if hasattr(s, "__dataclass_fields__") else s for s in getattr(results, "samples", [])]
    mlflow.log_dict({"samples": samples[:5]}, "samples.json")
    for k, v in sorted(metrics.items()):
        print(f"[eval] {k} = {v:.4f}", flush=True)
    return metrics


def _log_datasets(task, train_rows: list[dict], eval_rows: list[dict]) -> None:
    """Which data trained and evaluated this run: MLflow dataset inputs (name, digest, source)."""
    import mlflow
    import pandas as pd

    from adapters_hub.tasks import DataLoader

    ds = task.dataset
    if ds.loader is DataLoader.files:
        sources = {"training": ds.train, "evaluation": ds.eval or ds.train}
    else:  # a Hugging Face id (or local dataset folder) and its splits
        sources = {"training": f"{ds.hf_id}:{ds.train_split}", "evaluation": f"{ds.hf_id}:{ds.eval_split or ds.train_split}"}
    for context, rows in (("training", train_rows), ("evaluation", eval_rows)):
        frame = pd.DataFrame([{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()
                               if k != "_where"} for r in rows])
        dataset = mlflow.data.from_pandas(frame, source=sources[context], name=f"{task.name}-{context}")
        mlflow.log_input(dataset, context=context)


def _log_curve(history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    steps = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if steps:
        ax.plot(*zip(*steps), marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("SFT loss (answer tokens)")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    mlflow.log_figure(fig, "loss_curve.png")
    plt.close(fig)


def _model_card(task, kind, base, plan, profile, metrics, trainable, attention="lisa") -> str:
    from adapters_hub.registry import adapter_model_name

    name = adapter_model_name(task.name, kind, attention)
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))
    dense_arg = ', attention="dense"' if attention == "dense" else ""
    peft = ("\n3. PEFT (the folder is a PEFT LoRA adapter; its `artifacts/adapter` in the version):\n"
            "   `PeftModel.from_pretrained(base_model, folder)`; vLLM: `--lora-modules name=folder`\n"
            if kind == "lora" and attention == "dense" else
            "\n3. The OpenAI API: `lisa-hub serve --pin " + name + "@champion`, then `model=\"" + task.name + "\"`\n")
    return (f"# {name} adapter\n\n{task.description}\n\n"
            f"- base model: `{base}` (referenced by name: its weights are not in the registry)\n"
            f"- sharing plan: `{plan.hash}` ({len(plan.layers)} shared layers: {list(plan.layers)})\n"
            f"- kind: `{kind}`, attention: `{attention}`, trainable parameters: {trainable:,}\n- profile: `{profile.name}` "
            f"(steps {profile.max_steps}, batch {profile.batch_size}x{profile.grad_accum}, lr {profile.lr})\n\n"
            f"| metric | value |\n|---|---|\n{rows}\n\n## Load it\n\n"
            f"1. lisa-hub: `sdk.Backbone.load(base_model=\"{base}\"{dense_arg})"
            f".use(\"{name}@champion\")`\n"
            f"2. MLflow: `mlflow.pyfunc.load_model(\"models:/{name}@champion\").predict([\"Question: ...\"])`, or "
            f"`mlflow models serve -m models:/{name}@champion --env-manager local`\n{peft}")


def _flat(d: dict, prefix: str = "") -> dict:
    return {f"{prefix}{k}": v for k, v in d.items() if not isinstance(v, (dict, list))}


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> AdaptSpec:
    return runtime.parse_spec(argv, prog="python -m jobs.adapt", description=__doc__.split("\n")[0],
                              add_arguments=add_arguments, spec_type=AdaptSpec, from_args=spec_from_args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=None, help="task name (manifests/tasks/<task>.yaml); with --spec, optional")
    parser.add_argument("--spec", default=None, dest="spec_file",
                        help="a task spec YAML of your own (its data paths are relative to it)")
    parser.add_argument("--base", default=None, help="base model (default: the profile's)")
    from adapters_hub.kinds import trainable_kinds

    parser.add_argument("--kind", default="lisa", choices=trainable_kinds())
    parser.add_argument("--attention", default="lisa", choices=("lisa", "dense"),
                        help="train on the base's LiSA backbone or on the unmodified (dense) base")
    parser.add_argument("--profile", default="quick", help="smoke | quick | full")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override a profile field, e.g. --set max_steps=5")
    parser.add_argument("--fresh-start", action="store_true", help="ignore checkpoints of an interrupted run")


def spec_from_args(args) -> AdaptSpec:
    from adapters_hub.tasks import parse_overrides

    overrides = parse_overrides(args.set)
    task = args.task
    if task is None:
        if not args.spec_file:
            raise ValueError("task: give --task NAME or --spec FILE")
        from adapters_hub.tasks import load_task_file

        task = load_task_file(args.spec_file).name
    return AdaptSpec(task=task, base=args.base, kind=args.kind, attention=args.attention, profile=args.profile,
                     overrides=overrides, fresh_start=args.fresh_start, spec_file=args.spec_file)


if __name__ == "__main__":
    runtime.run_main(main, parse_args, "adapt")
