"""Does local initialisation on longer calibration blocks keep far context? One run, one table.

    LISA_HUB_DATA_DIR=../shared/data .venv/bin/python -m benchmarks.calib_length \
        [--fraction 0.6] [--rows 16x256,4x1024] [--heal-steps 0]

Calibration blocks (WikiText-2 test right after the eval slice) of each row: N x L blocks of
L tokens; a trailing "s" (4x1024s) samples each step's KL on queries_for(L) query positions,
so that a step costs what a 256-token one does. 16x256 and 4x1024 are the same 4,096 tokens;
16x1024 reads 16,384 (the job's `--calib-len 1024`). The same plan (the --fraction layers
the attention analysis picks); local initialisation on each; optionally --heal-steps fixed
steps of the default healing (4 x 256 training rows, so only the initialisation differs).
Each model is scored on the first 8,192 eval tokens as 32 x 256 and as 8 x 1024 blocks.
The held-out tail of WikiText-2 is never read. The held-out attention KL is a sum over each
query's keys, so it grows with the block length: compare it within a length, not across.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--fraction", type=float, default=0.6)
    ap.add_argument("--rows", default="16x256,4x1024", help="calibration blocks per row: NxL, NxLs = sampled queries")
    ap.add_argument("--init-steps", type=int, default=150)
    ap.add_argument("--heal-steps", type=int, default=0, help="fixed healing steps after local init (0: none)")
    args = ap.parse_args()

    import torch

    from adapters_hub.evaluation import perplexity
    from adapters_hub.lisa import LisaConfig, LisaModel, SharingPlan, analyze_attention, healing
    from adapters_hub.lisa.convert import self_distill, token_split
    from adapters_hub.lisa.local_init import local_init, queries_for
    from adapters_hub.models import fingerprint, load_base

    t0 = time.perf_counter()
    model, tok = load_base(args.base)
    fp = fingerprint(model)
    split = token_split(tok)
    short, long = split.eval.reshape(-1, 256), split.eval  # the same 8,192 tokens: (32, 256), (8, 1024)
    report = analyze_attention(model, [split.calib[i : i + 1] for i in range(4)], progress=False, base=args.base)
    plan = SharingPlan.from_layers(report, list(SharingPlan.from_report(report, fraction=args.fraction).layers))
    base_s, base_l = perplexity(model, short, progress=False), perplexity(model, long, progress=False)
    print(f"plan {list(plan.layers)}; base {base_s:.2f} @256, {base_l:.2f} @1024", flush=True)
    lm = LisaModel(model, LisaConfig(plan=plan), fingerprint=fp)
    fresh = {k: v.clone() for k, v in lm.adapter_state_dict().items()}
    rows = []
    for row in args.rows.split(","):
        n, length = (int(v) for v in row.rstrip("s").split("x"))
        queries = queries_for(length) if row.endswith("s") else None
        with torch.no_grad():
            for k, v in lm.adapter_state_dict().items():
                v.copy_(fresh[k])
        calib = token_split(tok, calib_blocks=n, calib_len=length).calib  # (n, length), right after the eval slice
        t = time.perf_counter()
        torch.manual_seed(0)
        batch = 2 if queries else max(1, 512 // length)  # a step of 2 x 256 x 256 (query, key) pairs
        fits = local_init(lm, calib, steps=args.init_steps, batch_size=batch, queries=queries, log=None)
        init_s = time.perf_counter() - t
        kl = sum(f.kl_after for f in fits) / len(fits)
        steps = 0
        if args.heal_steps:
            healing.attach(lm.model, healing.HealingConfig(), shared_layers=plan.layers)
            torch.manual_seed(0)
            steps = self_distill(lm, split.train, minutes=1e6, max_steps=args.heal_steps).step
        s, l = perplexity(lm, short, progress=False), perplexity(lm, long, progress=False)
        if args.heal_steps:
            healing.detach(lm.model)
        name = f"{n} x {length}" + (f", {queries} sampled queries" if queries else "")
        rows.append((name, init_s, kl, steps, s, l))
        print(f"calibration {name}: local init {init_s:.0f}s, mean held-out attention KL "
              f"{kl:.4f}, {steps} healing steps: {s:.2f} @256 ({s / base_s:.3f}x), {l:.2f} @1024 "
              f"({l / base_l:.3f}x)", flush=True)
    print(f"\n{args.base}, {len(plan.layers)}/{report.num_layers} layers shared ({args.fraction:.0%}); "
          f"{time.perf_counter() - t0:.0f}s total")
    print("| calibration blocks | local init (s) | held-out attention KL | healing steps | ppl / base, 32 x 256 "
          f"(base {base_s:.2f}) | ppl / base, 8 x 1024 (base {base_l:.2f}) |\n|---|---|---|---|---|---|")
    for name, init_s, kl, steps, s, l in rows:
        print(f"| {name} | {init_s:.0f} | {kl:.4f} | {steps} | {s / base_s:.3f} | {l / base_l:.3f} |")


if __name__ == "__main__":
    main()
