"""Does local initialisation on longer calibration blocks keep far context? One run, one table.

    LISA_HUB_DATA_DIR=../shared/data .venv/bin/python -m benchmarks.calib_length \
        [--fraction 0.6] [--lengths 256,1024] [--heal-steps 0]

The same calibration tokens (WikiText-2 test right after the eval slice, 4,096 tokens) cut
into blocks of each length (16 x 256, 4 x 1024, ...); the same plan (the --fraction layers
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
    ap.add_argument("--lengths", default="256,1024", help="calibration block lengths (each divides 4096)")
    ap.add_argument("--init-steps", type=int, default=150)
    ap.add_argument("--heal-steps", type=int, default=0, help="fixed healing steps after local init (0: none)")
    args = ap.parse_args()

    import torch

    from adapters_hub.evaluation import perplexity
    from adapters_hub.lisa import LisaConfig, LisaModel, SharingPlan, analyze_attention, healing
    from adapters_hub.lisa.convert import self_distill, token_split
    from adapters_hub.lisa.local_init import local_init
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
    for length in [int(x) for x in args.lengths.split(",")]:
        with torch.no_grad():
            for k, v in lm.adapter_state_dict().items():
                v.copy_(fresh[k])
        calib = split.calib.reshape(-1, length)  # the same calibration tokens, other block length
        t = time.perf_counter()
        torch.manual_seed(0)
        fits = local_init(lm, calib, steps=args.init_steps, batch_size=max(1, 512 // length), log=None)
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
        rows.append((f"{calib.shape[0]} x {length}", init_s, kl, steps, s, l))
        print(f"calibration {calib.shape[0]} x {length}: local init {init_s:.0f}s, mean held-out attention KL "
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
