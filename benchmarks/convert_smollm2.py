"""Converting SmolLM2-135M into LiSA backbones: perplexity by shared fraction, one run.

    LISA_HUB_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/convert_smollm2.py \
        [--convert 0.4:6,0.6:20] [--save runs/convert-bench]

Token layout: `adapters_hub.lisa.convert.token_split` (evaluation = the first 8 x 1024
WikiText-2 test tokens; calibration = the next 16 x 256; training = the rest of the
usable text, never its held-out last 10%, interleaved with GSM8K train text).

1. attention analysis (head permutations) and every layer's sensitivity after local
   initialisation (fit on calibration blocks 0-7, measured on 8-15)
2. for each fraction: the least sensitive layers; perplexity of aligned direct sharing
   (fresh adapter), after local initialisation, and, for the fractions in --convert,
   after self-distillation with the stated CPU-minute budget (`--save`: each converted
   backbone folder, plan.json + adapter/, as `lisa-hub convert --out` writes it)
3. the plan --max-ppl-increase picks (combined calibration perplexity after local init)
Printed as one table at the end; everything in it is measured in this run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def sensitivities(model, split, base: str, *, cache: str | None = None, steps: int = 50, aligner: str = "linear"):
    """(attention report, calibration perplexity, {layer: sensitivity after local init});
    fit on calibration blocks 0-7, measured on 8-15. With `cache`, read from / written to
    that JSON file (the scan is ~9 CPU-minutes on SmolLM2 and deterministic)."""
    import json

    from adapters_hub.lisa import analyze_attention
    from adapters_hub.lisa.analysis import layer_sensitivity
    from adapters_hub.models import fingerprint

    report = analyze_attention(model, [split.calib[i : i + 1] for i in range(4)], progress=False, base=base)
    key = {"base": base, "fingerprint": fingerprint(model), "steps": steps, "aligner": aligner,
           "calib": list(split.calib.shape)}
    if cache and Path(cache).is_file():
        data = json.loads(Path(cache).read_text())
        if data["key"] == key:
            return report, data["calib_ppl"], {int(k): v for k, v in data["sensitivity"].items()}
    t = time.perf_counter()
    calib_ppl, sens = layer_sensitivity(model, report, split.calib[8:], fit_blocks=split.calib[:8], fit_steps=steps,
                                        aligner=aligner, fingerprint=key["fingerprint"], progress=False)
    print(f"sensitivity scan: {time.perf_counter() - t:.0f}s", flush=True)
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        Path(cache).write_text(json.dumps({"key": key, "calib_ppl": calib_ppl, "sensitivity": sens}, indent=1))
    return report, calib_ppl, sens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--fractions", default="0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--convert", default="0.4:6,0.6:20", help="fraction:minutes of self-distillation, ...")
    ap.add_argument("--save", default=None, help="folder for the converted backbones (one per fraction)")
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
    converts = {float(f): float(m) for f, m in (pair.split(":") for pair in args.convert.split(",") if pair)}
    for fraction in [float(f) for f in args.fractions.split(",")]:
        layers = choose_layers(sens, num_layers=report.num_layers, fraction=fraction)
        plan = SharingPlan.from_layers(report, layers)
        lm = LisaModel(model, LisaConfig(plan=plan, aligner=args.aligner), fingerprint=fp)
        aligned = perplexity(lm, split.eval, progress=False)
        t = time.perf_counter()
        local_init(lm, split.calib, steps=args.init_steps, log=None)
        t_init = time.perf_counter() - t
        init = perplexity(lm, split.eval, progress=False)
        converted, steps, minutes = None, 0, converts.get(fraction, 0.0)
        if minutes:
            state = self_distill(lm, split.train, minutes=minutes, lr=args.lr)
            converted, steps = perplexity(lm, split.eval, progress=False), state.step
            if args.save:
                folder = Path(args.save) / f"fraction-{fraction}"
                plan.save(folder / "plan.json")
                lm.save_adapter(folder / "adapter")
        lm.unload()
        rows.append((fraction, len(layers), aligned, init, t_init, converted, steps, minutes))
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
          f"base perplexity {base_ppl:.2f}; self-distillation batch 4 x 256, lr {args.lr}; "
          f"{time.perf_counter() - t0:.0f}s total")
    print(f"{'fraction':>8} {'layers':>6} {'aligned sharing':>16} {'local init':>11} {'init s':>7} "
          f"{'converted':>10} {'CPU-min':>8} {'steps':>6} {'ppl / base':>11}")
    for fraction, n, aligned, init, t_init, converted, steps, minutes in rows:
        conv = f"{converted:10.2f}" if converted else f"{'-':>10}"
        ratio = f"{converted / base_ppl:11.3f}" if converted else f"{init / base_ppl:10.3f}*"
        print(f"{fraction:8.1f} {n:6d} {aligned:16.2f} {init:11.2f} {t_init:7.0f} {conv} {minutes:8.0f} {steps:6d} "
              f"{ratio}")
    print("* ratio after local initialisation only")
    print(f"--max-ppl-increase {args.max_ppl_increase}: {len(picked)}/{report.num_layers} layers "
          f"({len(picked) / report.num_layers:.0%}) {picked}; eval perplexity after local init {picked_ppl:.2f} "
          f"({picked_ppl / base_ppl:.3f}x base)")


if __name__ == "__main__":
    main()
