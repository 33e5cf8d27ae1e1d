"""lm-evaluation-harness on a base, a LiSA backbone or an adapter, loaded as serving loads it;
an adapter's results go to its MLflow run.

    lisa-hub eval --adapter gsm8k --tasks lisa_gsm8k_mc,lisa_gsm8k --limit 64
    lisa-hub eval --attention dense --tasks lisa_gsm8k_mc           # the unmodified base
    lisa-hub eval --tasks hellaswag                                 # an lm-eval task (needs the hub)

    import sdk
    r = sdk.evaluate_harness(adapter="gsm8k", tasks=["lisa_gsm8k_mc"], limit=64)
    r.results["lisa_gsm8k_mc"]["acc,none"]

`lisa_gsm8k` and `lisa_gsm8k_mc` are local task files over the data mirror's GSM8K test
split (adapters_hub/harness.py), written on first use; any other name is lm-eval's own task
or one of the YAML files under `include_path`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

LOCAL_TASKS = ("lisa_gsm8k", "lisa_gsm8k_mc")


@dataclass(frozen=True)
class HarnessResult:
    results: dict[str, dict[str, float]]   # task -> {lm-eval metric key ("acc,none"): value}
    model: dict[str, str | None]           # base, backbone, adapter (its resolved key)
    run_id: str | None = None              # the adapter's MLflow run the metrics were logged to
    seconds: float = 0.0
    logged: dict[str, float] = field(default_factory=dict)  # MLflow metric name -> value


def evaluate_harness(*, tasks: list[str], base_model: str = "smollm2-135m", adapter: str | None = None,
                     attention: str = "lisa", plan_path: str | Path | None = None,
                     include_path: str | Path | None = None, limit: int | None = None,
                     num_fewshot: int | None = None, batch_size: int = 8, log_to_run: bool = True,
                     tracking_uri: str | None = None) -> HarnessResult:
    """Score `tasks` with lm-evaluation-harness on `adapter` (or the bare backbone; with
    `attention="dense"` and no adapter, the base model itself). The harness refuses an
    adapter that changes no output of the backbone (harness.AdapterHadNoEffectError).

    >>> r = evaluate_harness(adapter="gsm8k", tasks=["lisa_gsm8k_mc"], limit=64)  # doctest: +SKIP
    >>> r.results["lisa_gsm8k_mc"]["acc,none"], r.run_id  # doctest: +SKIP
    """
    from adapters_hub import harness, settings
    from sdk.hotswap import Backbone

    start = time.perf_counter()
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ValueError("tasks: name at least one task")
    if include_path is None and any(t in LOCAL_TASKS for t in tasks):
        include_path = _local_tasks(settings)
    bb = Backbone.load(base_model=base_model, plan_path=plan_path, attention=attention, tracking_uri=tracking_uri)
    active = bb.use(adapter) if adapter else None
    lm = harness.HarnessLM(bb.lm, bb.tokenizer, batch_size=batch_size, reference=bb.bare if adapter else None,
                           name=adapter or base_model)
    results = harness.evaluate(lm, tasks=tasks, include_path=include_path, limit=limit, num_fewshot=num_fewshot)
    run_id, logged = None, {}
    if active is not None and log_to_run and not Path(active.key).is_absolute():  # a registry version: its run
        run_id, logged = _log(active.key, results, tracking_uri)
    return HarnessResult(results, {"base": base_model, "attention": attention, "adapter": active.key if active else None},
                         run_id, round(time.perf_counter() - start, 1), logged)


def _local_tasks(settings) -> Path:
    from adapters_hub import harness

    data = settings.data_dir()
    path = data / "gsm8k" / "test.jsonl" if data else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"tasks {', '.join(LOCAL_TASKS)} read gsm8k/test.jsonl of the data mirror: set "
                                "LISA_HUB_DATA_DIR (or give include_path, a folder of lm-eval task YAML files)")
    return harness.write_gsm8k_tasks(settings.cache_dir("lm_eval_tasks"), path)


def _log(key: str, results: dict, tracking_uri: str | None) -> tuple[str | None, dict[str, float]]:
    """Log `lm_eval.<task>.<metric>` to the run of the registered version `key`."""
    from adapters_hub import registry

    record = registry.get_adapter(key, tracking_uri=tracking_uri)
    if not record.run_id:
        return None, {}
    logged = {f"lm_eval.{task}.{metric.replace(',', '.').removesuffix('.none')}": float(value)
              for task, metrics in results.items() for metric, value in metrics.items()}
    client = registry.for_uri(tracking_uri).client()
    for name, value in logged.items():
        client.log_metric(record.run_id, name, value)
    return record.run_id, logged
