"""Hot-swap latency and mixed-batch throughput on SmolLM2-135M, measured in one run.

    LISA_HUB_DATA_DIR=../shared/data .venv/bin/python benchmarks/hotswap_smollm2.py [--base smollm2-135m] [--repeats 5]

Starts its own MLflow server (temporary LISA_HUB_HOME, free port), registers two LiSA
adapters with non-trivial weights, then times:
  swap, resident      `use()` of an adapter already in the pool, by version and by alias
                      (an alias may have moved, so it costs one registry lookup)
  swap, local cache   `use()` of a registered adapter already downloaded (load + verify)
  swap, first use     `use()` that downloads from MLflow, verifies and loads
  full reload         load the base model and rebuild the backbone (what a swap avoids)
and generation throughput of a mixed batch (alternating adapters per row) against the
same batch with one adapter. Ratios are taken within this run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def timed(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    import torch

    from adapters_hub import registry, stack
    from adapters_hub.backbone import analyse_base, load_lisa_model
    from adapters_hub.models import load_base
    from sdk.hotswap import Backbone

    home = Path(tempfile.mkdtemp(prefix="lisa-hub-bench-"))
    os.environ["LISA_HUB_HOME"] = str(home)
    stack.up(home=home, ray=False, ports=stack.Ports(mlflow=stack.free_port()))
    uri = stack.mlflow_url(home)
    try:
        plan, _ = analyse_base(args.base)
        lm, tok = load_lisa_model(args.base, plan)
        refs = []
        for i, task in enumerate(("bench_a", "bench_b")):
            lm.add_adapter(task, next(iter(lm.peft_config.values())))
            with torch.no_grad():  # non-trivial weights, so adapters really differ
                for name, p in lm.named_parameters():
                    if f".{task}." in name:
                        p.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
            folder = lm.save_adapter(home / task, task)
            import mlflow

            mlflow.set_tracking_uri(uri)
            with mlflow.start_run() as run:
                reg = registry.register_adapter(
                    run_id=run.info.run_id, adapter_dir=folder, task=task, kind="lisa", base=args.base,
                    base_fingerprint=lm.base_fingerprint, plan_hash=plan.hash, metrics={"adapter.score": float(i)},
                    main_metric="adapter.score", higher_is_better=True, trainable_params=0, tracking_uri=uri)
            refs.append(f"{reg.name}/{reg.version}")
        del lm

        def reload():
            load_lisa_model(args.base, plan)

        t_reload = timed(reload, max(1, args.repeats // 2))
        bb = Backbone(*load_lisa_model(args.base, plan), base_model=args.base, tracking_uri=uri, max_resident=8)
        tok = bb.tokenizer
        tok.padding_side = "left"

        start = time.perf_counter()
        bb.use(refs[0])
        t_first = time.perf_counter() - start  # download + verify + load

        def from_cache():  # drop from the pool, keep the verified download
            key = refs[1]
            if key in bb._resident:
                kind, name = bb._resident.pop(key)
                from adapters_hub.kinds import get_kind

                if bb.active and bb.active.name == name:
                    bb.use(refs[0])
                get_kind(kind).delete(bb.lm, name)
            bb.use(refs[1])

        bb.use(refs[1])
        t_cache = timed(from_cache, args.repeats)
        t_resident = timed(lambda: (bb.use(refs[0]), bb.use(refs[1])), args.repeats) / 2
        aliases = [r.split("/")[0] + "@candidate" for r in refs]  # an alias may move: one registry lookup
        t_alias = timed(lambda: (bb.use(aliases[0]), bb.use(aliases[1])), args.repeats) / 2

        prompts = [f"Question: what is {i} plus {i + 3}?\nAnswer:" for i in range(args.batch)]
        mixed = [refs[i % 2] for i in range(args.batch)]
        bb.generate(prompts[:2], adapter=refs[0], max_new_tokens=4)  # warm-up
        t_single = timed(lambda: bb.generate(prompts, adapter=refs[0], max_new_tokens=args.new_tokens), args.repeats)
        t_mixed = timed(lambda: bb.generate(prompts, adapter=mixed, max_new_tokens=args.new_tokens), args.repeats)
        tokens = args.batch * args.new_tokens

        print(f"\nhot swap on {args.base} (plan {plan.hash}, {len(plan.layers)} shared layers), median of {args.repeats}")
        print(f"{'what':28s} {'seconds':>9s} {'vs full reload':>15s}")
        for label, t in (("swap, resident (version ref)", t_resident), ("swap, resident (alias ref)", t_alias),
                         ("swap, from local cache", t_cache), ("swap, first use (download)", t_first),
                         ("full reload of the model", t_reload)):
            print(f"{label:28s} {t:9.4f} {t / t_reload:14.3f}x")
        print(f"\ngeneration, batch {args.batch} x {args.new_tokens} new tokens")
        print(f"{'single adapter':28s} {t_single:9.3f} s  {tokens / t_single:8.1f} tok/s")
        print(f"{'mixed (2 adapters, per row)':28s} {t_mixed:9.3f} s  {tokens / t_mixed:8.1f} tok/s"
              f"  ratio mixed/single throughput {t_single / t_mixed:.2f}")
    finally:
        stack.down(home=home)


if __name__ == "__main__":
    main()
