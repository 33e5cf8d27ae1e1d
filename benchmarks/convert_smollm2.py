"""Converting SmolLM2-135M into LiSA backbones: perplexity by shared fraction, one run.

    LISA_HUB_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/convert_smollm2.py [--minutes 10]

Token layout: `adapters_hub.lisa.convert.token_split` (evaluation = the first 8 x 1024
WikiText-2 test tokens; calibration = the next 16 x 256; training = the rest of the
usable text, never its held-out last 10%, interleaved with GSM8K train text).

1. attention analysis (head permutations) and every layer's sensitivity after local
   initialisation (fit on calibration blocks 0-7, measured on 8-15)
2. for each fraction: the least sensitive layers; perplexity of aligned direct sharing
   (fresh adapter), after local initialisation, and, for --convert-fractions, after
   self-distillation with a budget of --minutes
3. the plan --max-ppl-increase picks (combined calibration perplexity after local init)
Printed as one table at the end; everything in it is measured in this run.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--fractions", default="0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--convert-fractions", default="0.4,0.6")
    ap.add_argument("--minutes", type=float, default=10.0, help="self-distillation budget per converted fraction")
    ap.add_argument("--max-ppl-increase", type=float, default=0.05)
    ap.add_argument("--init-steps", type=int, default=150)
    ap.add_argument("--sensitivity-steps", type=int, default=50)
    ap.add_argument("--aligner", default="linear", choices=("linear", "ffn"))
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()

    import torch

    from adapters_hub.evaluation import perplexity
    from adapters_hub.lisa import LisaConfig, LisaModel, SharingPlan, analyze_attention
    from adapters_hub.lisa.analysis import layer_sensitivity
    from adapters_hub.lisa.convert import self_distill, token_split
    from adapters_hub.lisa.local_init import local_init
    from adapters_hub.lisa.plan import choose_layers
    from adapters_hub.models import fingerprint, load_base

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_base(args.base)
    fp = fingerprint(model)
    split = token_split(tok)
    fit, measure = split.calib[:8], split.calib[8:]
    report = analyze_attention(model, [split.calib[i : i + 1] for i in range(4)], progress=False, base=args.base)
    base_ppl = perplexity(model, split.eval, progress=False)
    print(f"base perplexity {base_ppl:.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    t = time.perf_counter()
    calib_ppl, sens = layer_sensitivity(model, report, measure, fit_blocks=fit, fit_steps=args.sensitivity_steps,
                                        aligner=args.aligner, fingerprint=fp, progress=False)
    order = sorted(sens, key=lambda l: (sens[l], l))
    print(f"sensitivity after local init ({time.perf_counter() - t:.0f}s), calibration ppl {calib_ppl:.2f}; "
          "least to most sensitive:\n  " + ", ".join(f"{l}:{sens[l]:+.2f}" for l in order), flush=True)

    rows = []
    converts = {float(f) for f in args.convert_fractions.split(",") if f}
    for fraction in [float(f) for f in args.fractions.split(",")]:
        layers = choose_layers(sens, num_layers=report.num_layers, fraction=fraction)
        plan = SharingPlan.from_layers(report, layers)
        lm = LisaModel(model, LisaConfig(plan=plan, aligner=args.aligner), fingerprint=fp)
        aligned = perplexity(lm, split.eval, progress=False)
        t = time.perf_counter()
        local_init(lm, split.calib, steps=args.init_steps, log=None)
        t_init = time.perf_counter() - t
        init = perplexity(lm, split.eval, progress=False)
        converted, steps = None, 0
        if fraction in converts:
            state = self_distill(lm, split.train, minutes=args.minutes, lr=args.lr)
            converted, steps = perplexity(lm, split.eval, progress=False), state.step
        lm.unload()
        rows.append((fraction, len(layers), aligned, init, t_init, converted, steps))
        print(f"fraction {fraction}: {len(layers)} layers {layers}; aligned {aligned:.2f}, local init {init:.2f} "
              f"({t_init:.0f}s)" + (f", converted {converted:.2f} ({steps} steps)" if converted else ""), flush=True)

    def combined(layers):
        lm = LisaModel(model, LisaConfig(plan=SharingPlan.from_layers(report, layers), aligner=args.aligner),
                       fingerprint=fp)
        local_init(lm, fit, steps=args.sensitivity_steps, log=None)
        ppl = perplexity(lm, measure, progress=False)
        lm.unload()
        print(f"  budget search: {len(layers)} layers -> calibration ppl {ppl:.2f} ({ppl / calib_ppl - 1:+.1%})",
              flush=True)
        return ppl

    picked = choose_layers(sens, num_layers=report.num_layers, max_ppl_increase=args.max_ppl_increase,
                           base_ppl=calib_ppl, combined_ppl=combined)
    lm = LisaModel(model, LisaConfig(plan=SharingPlan.from_layers(report, picked), aligner=args.aligner),
                   fingerprint=fp)
    local_init(lm, split.calib, steps=args.init_steps, log=None)
    picked_ppl = perplexity(lm, split.eval, progress=False)
    lm.unload()

    print(f"\n{'=' * 100}\n{args.base}, aligner {args.aligner}, WikiText-2 {tuple(split.eval.shape)} tokens; "
          f"base perplexity {base_ppl:.2f}; self-distillation budget {args.minutes:g} CPU-min "
          f"(batch 4 x 256, lr {args.lr}); {time.perf_counter() - t0:.0f}s total")
    print(f"{'fraction':>8} {'layers':>6} {'aligned sharing':>16} {'local init':>11} {'init s':>7} "
          f"{'converted':>10} {'steps':>6} {'converted/base':>15}")
    for fraction, n, aligned, init, t_init, converted, steps in rows:
        conv = f"{converted:10.2f}" if converted else f"{'-':>10}"
        ratio = f"{converted / base_ppl:15.3f}" if converted else f"{init / base_ppl:14.3f}*"
        print(f"{fraction:8.1f} {n:6d} {aligned:16.2f} {init:11.2f} {t_init:7.0f} {conv} {steps:6d} {ratio}")
    print("* ratio after local initialisation only")
    print(f"--max-ppl-increase {args.max_ppl_increase}: {len(picked)}/{report.num_layers} layers "
          f"({len(picked) / report.num_layers:.0%}) {picked}; eval perplexity after local init {picked_ppl:.2f} "
          f"({picked_ppl / base_ppl:.3f}x base)")


if __name__ == "__main__":
    main()
