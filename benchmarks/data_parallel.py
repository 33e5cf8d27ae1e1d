"""One adapter trained by 1 and by 2 data-parallel Ray Train workers with the same global
batch, side by side: wall time per step, final loss, the registered adapter's metrics.

    lisa-hub up --nodes 2        # (or a 1-node stack: the 2 workers then share one node)
    LISA_HUB_STORAGE=~/.lisa-hub/train .venv/bin/python benchmarks/data_parallel.py --profile smoke
    LISA_HUB_STORAGE=~/.lisa-hub/train .venv/bin/python benchmarks/data_parallel.py --profile quick \\
        --set max_steps=20 --set eval_examples=16

Each configuration is submitted with the SDK to the running stack (its own seed, so the
two runs never share a run key) and read back from MLflow: `train/train_runtime` over the
steps, the last `train/loss`, the version's metrics, and where each worker ran.
"""

from __future__ import annotations

import argparse
import re


def main() -> None:
    import mlflow

    import sdk
    from adapters_hub import settings
    from adapters_hub.tasks import load_task, parse_overrides

    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON")
    args = parser.parse_args()
    base_overrides = parse_overrides(args.set)
    profile = load_task(args.task).profile_with(args.profile, base_overrides)
    global_batch = profile.batch_size * profile.grad_accum * profile.num_workers
    if global_batch % 2:
        raise SystemExit(f"global batch {global_batch} is odd: two workers cannot share it evenly")
    configs = {"1 worker": {"num_workers": 1, "batch_size": global_batch // profile.grad_accum},
               "2 workers": {"num_workers": 2, "batch_size": global_batch // profile.grad_accum // 2,
                             "placement_strategy": "SPREAD"}}
    client = mlflow.MlflowClient(settings.mlflow_uri())
    rows = []
    for i, (label, extra) in enumerate(configs.items()):
        job = sdk.submit_adaptation(task=args.task, profile=args.profile,
                                    overrides={**base_overrides, **extra, "seed": 1000 + i})
        print(f"{label}: job {job.id}", flush=True)
        result = job.wait(timeout=3600)
        logs = job.logs()
        nodes = sorted(set(re.findall(r"\[train\] worker \d/\d on node (\w+)", logs)))
        runtime = client.get_metric_history(result.run_id, "train/train_runtime")
        losses = sorted(client.get_metric_history(result.run_id, "train/loss"), key=lambda m: m.step)
        seconds = runtime[-1].value if runtime else float("nan")
        main_metric = next(k for k in result.metrics if k.startswith("adapter.") and "nll" not in k
                           and k != "adapter.eval_examples" and k != "adapter.answer_found")
        rows.append((label, global_batch, profile.max_steps, seconds / profile.max_steps, losses[-1].value,
                     result.metrics["adapter.answer_nll"], main_metric, result.metrics[main_metric],
                     f"{result.model_name}/{result.version}", len(nodes)))
    print(f"\n{args.task}, profile {args.profile} {base_overrides or ''}")
    print("| workers | global batch | steps | s / step | final loss | adapter answer NLL | main metric | version | nodes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, gb, steps, per_step, loss, nll, metric, value, ref, n_nodes in rows:
        print(f"| {label} | {gb} | {steps} | {per_step:.2f} | {loss:.4f} | {nll:.4f} | {metric} = {value:.4f} | "
              f"{ref} | {n_nodes} |")


if __name__ == "__main__":
    main()
