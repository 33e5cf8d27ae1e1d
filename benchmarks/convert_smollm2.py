"""Converting SmolLM2-135M into LiSA backbones: perplexity by shared fraction and method, one run.

    LISA_HUB_DATA_DIR=../shared/data .venv/bin/python benchmarks/convert_smollm2.py \
        [--convert 0.4:20,0.5:20,0.6:20] [--plain 0.6:20] [--save runs/convert-bench] \
        [--sensitivity-cache runs/sensitivity-smollm2.json]

Token layout: `adapters_hub.lisa.convert.token_split` (evaluation = the first 8 x 1024
WikiText-2 test tokens; calibration = the next 16 x 256; training = the rest of the
usable text, never its held-out last 10%, interleaved with GSM8K train text).

1. attention analysis (head permutations) and every layer's sensitivity after local
   initialisation (fit on calibration blocks 0-7, measured on 8-15; cached with
   --sensitivity-cache, the scan is deterministic and ~8 CPU-minutes)
2. for each fraction: the least sensitive layers; KV bytes per token; perplexity of
   aligned direct sharing (fresh adapter) and after local initialisation; the planner's
   probe (calibration perplexity after a short local init, as `--max-ppl-increase` measures
   it); for the fractions in --plain, self-distillation of the LiSA tensors alone, and for
   those in --convert, with healing (the job's defaults), each with its CPU-minute budget.
   Every healed backbone is saved and re-scored by `lisa-hub eval-ppl --backbone DIR`
   (loaded as serving loads it: healing merged, W_q/W_k pruned) on WikiText-2's held-out
   tail and on Tiny Shakespeare, which no step reads.
3. the planner's exponent fitted on the healed rows (log converted = a log probe), and the
   plan `--max-ppl-increase` picks with it.
Printed as one table at the end (and a PNG plot beside --save); everything in it is
measured in this run.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sensitivities(model, split, base: str, *, cache: str | None = None, steps: int = 50, aligner: str = "linear"):
    """(attention report, calibration perplexity, {layer: sensitivity after local init});
    fit on calibration blocks 0-7, measured on 8-15. With `cache`, read from / written to
    that JSON file (the scan is ~8 CPU-minutes on SmolLM2 and deterministic)."""
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


def eval_ppl(base: str, folder: Path, data: str, env=None) -> float:
    """`lisa-hub eval-ppl --backbone folder --data data`: its last JSON line's perplexity."""
    out = subprocess.run([sys.executable, "-m", "sdk.cli", "eval-ppl", "--base", base, "--backbone",
                          str(folder), "--data", data], cwd=REPO, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["perplexity"]


def pairs(text: str) -> dict[float, float]:
    return {float(f): float(m) for f, m in (p.split(":") for p in text.split(",") if p)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--fractions", default="0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--convert", default="0.4:20,0.5:20,0.6:20", help="fraction:minutes of healed conversion, ...")
    ap.add_argument("--plain", default="", help="fraction:minutes of conversion without healing (LiSA tensors only)")
    ap.add_argument("--save", default="runs/convert-bench", help="folder for the healed backbones and the plot")
    ap.add_argument("--sensitivity-cache", default=None)
    ap.add_argument("--max-ppl-increase", type=float, default=0.05)
    ap.add_argument("--device", default="cpu", help="cuda: a GPU conversion (scripts/gpu_check.sh)")
    ap.add_argument("--dtype", default="auto", help="the job's --dtype: auto (bf16 autocast where native), float32, bfloat16")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the job's (4 x 256 tokens)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="token budget of each conversion instead of its minutes (the minutes then only label it)")
    ap.add_argument("--no-served", action="store_true", help="skip the eval-ppl re-scoring (no subprocesses)")
    args = ap.parse_args()

    import os

    import torch

    from adapters_hub.evaluation import perplexity
    from adapters_hub.lisa import LisaConfig, LisaModel, SharingPlan, healing
    from adapters_hub.lisa.convert import self_distill, token_split
    from adapters_hub.lisa.local_init import local_init
    from adapters_hub.lisa.plan import choose_layers, predicted_converted_ppl
    from adapters_hub.models import fingerprint, load_base
    from jobs import runtime
    from jobs.convert import ConvertSpec

    spec = ConvertSpec()  # the job's defaults: objective, healing, learning rates
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_base(args.base)
    fp = fingerprint(model)
    model.to(args.device)
    batch_size = args.batch_size or spec.batch_size
    amp = runtime.amp_dtype(args.dtype, args.device)
    kvh = model.config.num_key_value_heads
    split = token_split(tok)
    fit, measure = split.calib[:8], split.calib[8:]
    report, calib_ppl, sens = sensitivities(model, split, args.base, cache=args.sensitivity_cache)
    base_ppl = perplexity(model, split.eval, progress=False)
    save = Path(args.save)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base_heldout = base_shakespeare = float("nan")
    if not args.no_served:
        base_heldout = eval_ppl_base(args.base, "wikitext2-heldout", env)
        base_shakespeare = eval_ppl_base(args.base, "tinyshakespeare", env)
    print(f"base perplexity {base_ppl:.2f} (held-out tail {base_heldout:.2f}, Tiny Shakespeare {base_shakespeare:.2f})",
          flush=True)

    def probe(layers) -> float:  # what --max-ppl-increase measures for a prefix
        lm = LisaModel(model, LisaConfig(plan=SharingPlan.from_layers(report, layers)), fingerprint=fp)
        local_init(lm, fit, steps=spec.sensitivity_steps, log=None)
        ppl = perplexity(lm, measure, progress=False)
        lm.unload()
        return ppl

    healed, plain = pairs(args.convert), pairs(args.plain)
    rows = []
    for fraction in [float(f) for f in args.fractions.split(",")]:
        layers = choose_layers(sens, num_layers=report.num_layers, fraction=fraction)
        plan = SharingPlan.from_layers(report, layers)
        row = {"fraction": fraction, "layers": len(layers), "kv": plan.kv_bytes_per_token(kvh), "probe": probe(layers)}
        lm = LisaModel(model, LisaConfig(plan=plan), fingerprint=fp)
        row["aligned"] = perplexity(lm, split.eval, progress=False)
        local_init(lm, split.calib, steps=spec.init_steps, log=None)
        row["init"] = perplexity(lm, split.eval, progress=False)
        init_state = {k: v.clone() for k, v in lm.adapter_state_dict().items()}
        for method, budget in (("plain", plain.get(fraction)), ("healed", healed.get(fraction))):
            if not budget:
                continue
            with torch.no_grad():
                for k, v in lm.adapter_state_dict().items():
                    v.copy_(init_state[k])
            torch.manual_seed(0)
            if method == "healed":
                healing.attach(lm.model, spec.healing(), shared_layers=plan.layers)
            minutes, steps = (1e9, args.tokens // (batch_size * split.train.shape[1])) if args.tokens else (budget, 100_000)
            state = self_distill(lm, split.train, minutes=minutes, max_steps=steps, lr=spec.lr, heal_lr=spec.heal_lr,
                                 objective=spec.objective(), batch_size=batch_size, amp_dtype=amp)
            row[method] = perplexity(lm, split.eval, progress=False)
            row[f"{method}_steps"], row[f"{method}_minutes"] = state.step, round(state.elapsed / 60, 1)
            if method == "healed":
                folder = save / f"fraction-{fraction}"
                plan.save(folder / "plan.json")
                lm.save_adapter(folder / "adapter")
                healing.save(lm.model, folder / "healing")
                healing.stamp_adapter(folder / "adapter", folder / "healing")
                healing.detach(lm.model)
                if args.no_served:
                    continue
                row["served"] = eval_ppl(args.base, folder, "wikitext2", env)
                row["heldout"] = eval_ppl(args.base, folder, "wikitext2-heldout", env)
                row["shakespeare"] = eval_ppl(args.base, folder, "tinyshakespeare", env)
        lm.unload()
        rows.append(row)
        print(json.dumps(row), flush=True)

    fitted = [math.log(r["healed"] / base_ppl) / math.log(r["probe"] / calib_ppl) for r in rows
              if r.get("healed") and r["probe"] > calib_ppl * 1.001]
    exponent = sum(fitted) / len(fitted) if fitted else None
    picked = None
    if exponent:
        picked = choose_layers(sens, num_layers=report.num_layers, max_ppl_increase=args.max_ppl_increase,
                               base_ppl=calib_ppl,
                               combined_ppl=lambda l: predicted_converted_ppl(probe(l), calib_ppl, exponent))

    dense_kv = report.num_layers * kvh * 2 * report.head_dim * 4
    print(f"\n{'=' * 110}\n{args.base}, WikiText-2 {tuple(split.eval.shape)} eval tokens; base perplexity {base_ppl:.2f} "
          f"(held-out tail {base_heldout:.2f}, Tiny Shakespeare {base_shakespeare:.2f}); dense KV {dense_kv:,} B/token; "
          f"healing {spec.healing()}, objective {spec.objective()}; {time.perf_counter() - t0:.0f}s total")
    print("| shared | layers | KV B/token | aligned sharing | local init | probe / base | no healing (min, steps) "
          "| healed (min, steps) | healed / base | served / base | held-out tail / base | Shakespeare / base |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cell = lambda m: (f"{r[m]:.2f} ({r[m + '_minutes']:g}, {r[m + '_steps']})" if r.get(m) else "")  # noqa: E731
        ratio = lambda k, b: f"{r[k] / b:.3f}" if r.get(k) else ""  # noqa: E731
        print(f"| {r['fraction']:.0%} | {r['layers']} | {r['kv']:,} ({dense_kv / r['kv']:.2f}x less) | "
              f"{r['aligned']:.2f} | {r['init']:.2f} | {r['probe'] / calib_ppl:.3f} | {cell('plain')} | {cell('healed')} | "
              f"{ratio('healed', base_ppl)} | {ratio('served', base_ppl)} | {ratio('heldout', base_heldout)} | "
              f"{ratio('shakespeare', base_shakespeare)} |")
    if exponent:
        print(f"planner exponent (log converted / log probe, mean of {len(fitted)} healed rows): {exponent:.3f} "
              f"(each: {', '.join(f'{a:.3f}' for a in fitted)})")
        print(f"--max-ppl-increase {args.max_ppl_increase} with it: {len(picked)}/{report.num_layers} layers "
              f"({len(picked) / report.num_layers:.0%}) {picked}")
    plot(rows, base_ppl, save / "convert_smollm2.png")
    print(f"plot: {save / 'convert_smollm2.png'}")


def eval_ppl_base(base: str, data: str, env) -> float:
    out = subprocess.run([sys.executable, "-m", "sdk.cli", "eval-ppl", "--base", base, "--data", data],
                         cwd=REPO, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["perplexity"]


def plot(rows, base_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label in (("aligned", "aligned direct sharing"), ("init", "local initialisation"),
                       ("plain", "converted, no healing"), ("healed", "converted, healed")):
        pts = [(r["fraction"], r[key] / base_ppl) for r in rows if r.get(key)]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("fraction of layers sharing attention")
    ax.set_ylabel("WikiText-2 perplexity / base")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
