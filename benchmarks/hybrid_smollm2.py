"""Hybrid plans on SmolLM2-135M: keep, share or drop each layer; perplexity against KV bytes.

    LISA_HUB_DATA_DIR=../shared/data .venv/bin/python benchmarks/hybrid_smollm2.py \
        [--budgets 0.6,0.5] [--convert hybrid:0.5:10,drop:0.5:10] \
        [--sensitivity-cache runs/sensitivity-smollm2.json] [--save runs/hybrid-bench]

Tokens: `adapters_hub.lisa.convert.token_split` as the conversion job (evaluation = the first
8 x 1024 WikiText-2 test tokens; calibration = the next 16 x 256; training = the rest of the
usable text, never the held-out last 10%).

1. every layer's sensitivity to sharing (after a short local initialisation; cached with
   --sensitivity-cache, shared with benchmarks/convert_smollm2.py) and to dropping its
   attention (no training), both on calibration blocks 8-15
2. for each KV budget and each family of plans (share only, drop only, hybrid: the greedy
   path of `adapters_hub.lisa.plan.hybrid_steps`), the first plan within the budget; its
   WikiText-2 perplexity after local initialisation (the job's 150 steps per layer)
3. for each entry of --convert (family:budget:CPU-minutes), the job's healed conversion
   (self-distillation with healing, the job's defaults) and the served perplexity
   (`lisa-hub eval-ppl --backbone`: healing merged, W_q/W_k pruned) on WikiText-2, its
   held-out tail and Tiny Shakespeare, which no step reads
Printed as one table, and a plot of perplexity / base against KV bytes per token
(hybrid_smollm2.png beside --save). Speed: benchmarks/speed_smollm2.py --plan <saved plan.json>.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FAMILIES = ("share", "drop", "hybrid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--budgets", default="0.6,0.5", help="KV budgets, fractions of the dense cache")
    ap.add_argument("--convert", default="hybrid:0.5:10", help="family:budget:minutes of healed conversion, ...")
    ap.add_argument("--sensitivity-cache", default="runs/sensitivity-smollm2.json")
    ap.add_argument("--save", default="runs/hybrid-bench")
    ap.add_argument("--no-served", action="store_true", help="skip the eval-ppl re-scoring (no subprocesses)")
    args = ap.parse_args()

    import os

    import torch

    from adapters_hub.evaluation import perplexity
    from adapters_hub.lisa import LisaConfig, LisaModel, SharingPlan, healing
    from adapters_hub.lisa.analysis import drop_sensitivity
    from adapters_hub.lisa.convert import self_distill, token_split
    from adapters_hub.lisa.local_init import local_init
    from adapters_hub.lisa.plan import PlanError, choose_hybrid, default_rank
    from adapters_hub.models import fingerprint, load_base
    from benchmarks.convert_smollm2 import REPO, eval_ppl, eval_ppl_base, sensitivities
    from jobs.convert import ConvertSpec

    spec = ConvertSpec()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_base(args.base)
    fp = fingerprint(model)
    kvh = model.config.num_key_value_heads
    split = token_split(tok)
    report, calib_ppl, share = sensitivities(model, split, args.base, cache=args.sensitivity_cache)
    t = time.perf_counter()
    _, drop = drop_sensitivity(model, split.calib[8:], fingerprint=fp, progress=False)
    print(f"drop scan: {time.perf_counter() - t:.0f}s", flush=True)
    report.sensitivity, report.drop_sensitivity = share, drop
    base_ppl = perplexity(model, split.eval, progress=False)
    ranks = {l: default_rank(report.head_dim) for l in share}
    dense_kv = report.num_layers * kvh * 2 * report.head_dim * 4
    save = Path(args.save)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base_heldout = base_shakespeare = float("nan")
    if not args.no_served:
        base_heldout = eval_ppl_base(args.base, "wikitext2-heldout", env)
        base_shakespeare = eval_ppl_base(args.base, "tinyshakespeare", env)
    print(f"base perplexity {base_ppl:.2f} (held-out tail {base_heldout:.2f}, Tiny Shakespeare {base_shakespeare:.2f})",
          flush=True)

    def plan_for(family: str, budget: float):
        s = share if family in ("share", "hybrid") else {}
        d = drop if family in ("drop", "hybrid") else {}
        shared, dropped = choose_hybrid(s, d, num_layers=report.num_layers, head_dim=report.head_dim, ranks=ranks,
                                        kv_budget=budget)
        return SharingPlan.from_layers(report, shared, rank=shared, dropped=dropped,
                                       meta={"source": "benchmarks/hybrid_smollm2.py", "family": family,
                                             "kv_budget": budget})

    converts = {(f, float(b)): float(m) for f, b, m in (c.split(":") for c in args.convert.split(",") if c)}
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        for family in FAMILIES:
            try:
                plan = plan_for(family, budget)
            except PlanError as err:
                print(f"{family} at {budget}: {err}", flush=True)
                rows.append({"family": family, "budget": budget, "error": str(err).split(";")[-1].strip()})
                continue
            row = {"family": family, "budget": budget, "shared": len(plan.shared), "dropped": len(plan.dropped),
                   "kv": plan.kv_bytes_per_token(kvh), "plan": plan.hash}
            lm = LisaModel(model, LisaConfig(plan=plan), fingerprint=fp)
            t = time.perf_counter()
            if plan.shared:
                local_init(lm, split.calib, steps=spec.init_steps, log=None)
            row["init"] = perplexity(lm, split.eval, progress=False)
            row["init_seconds"] = round(time.perf_counter() - t)
            minutes = converts.get((family, budget))
            if minutes:
                torch.manual_seed(0)
                healing.attach(lm.model, spec.healing(), shared_layers=plan.layers + plan.dropped)
                state = self_distill(lm, split.train, minutes=minutes, lr=spec.lr, heal_lr=spec.heal_lr,
                                     objective=spec.objective(), batch_size=spec.batch_size)
                row["healed"] = perplexity(lm, split.eval, progress=False)
                row["steps"], row["minutes"] = state.step, round(state.elapsed / 60, 1)
                folder = save / f"{family}-{budget}"
                plan.save(folder / "plan.json")
                report.save(folder)
                from adapters_hub.lisa.analysis import plan_figure

                plan_figure(plan, report, folder / "plan.png")
                lm.save_adapter(folder / "adapter")
                healing.save(lm.model, folder / "healing")
                healing.stamp_adapter(folder / "adapter", folder / "healing")
                healing.detach(lm.model)
                if not args.no_served:
                    row["served"] = eval_ppl(args.base, folder, "wikitext2", env)
                    row["heldout"] = eval_ppl(args.base, folder, "wikitext2-heldout", env)
                    row["shakespeare"] = eval_ppl(args.base, folder, "tinyshakespeare", env)
            lm.unload()
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{'=' * 100}\n{args.base}, WikiText-2 {tuple(split.eval.shape)} eval tokens; base perplexity {base_ppl:.2f} "
          f"(held-out tail {base_heldout:.2f}, Tiny Shakespeare {base_shakespeare:.2f}); dense KV {dense_kv:,} B/token "
          f"fp32; {time.perf_counter() - t0:.0f}s total")
    print("| KV budget | plan | shared | dropped | KV B/token | local init / base | healed (CPU-min, steps) "
          "| healed / base | served / base | held-out tail / base | Shakespeare / base |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['budget']:.0%} | {r['family']} | | | out of reach: {r['error']} | | | | | | |")
            continue
        ratio = lambda k, b: f"{r[k] / b:.3f}" if r.get(k) else ""  # noqa: E731
        healed = f"{r['healed']:.2f} ({r['minutes']:g}, {r['steps']})" if r.get("healed") else ""
        print(f"| {r['budget']:.0%} | {r['family']} | {r['shared']} | {r['dropped']} | {r['kv']:,} "
              f"({dense_kv / r['kv']:.2f}x less) | {r['init'] / base_ppl:.3f} | {healed} | {ratio('healed', base_ppl)} | "
              f"{ratio('served', base_ppl)} | {ratio('heldout', base_heldout)} | {ratio('shakespeare', base_shakespeare)} |")
    print("per-layer sensitivities (calibration perplexity change, one layer changed alone):")
    print("  share: " + ", ".join(f"{l}:{v:.2f}" for l, v in sorted(share.items())))
    print("  drop:  " + ", ".join(f"{l}:{v:.2f}" for l, v in sorted(drop.items())))
    plot(rows, base_ppl, dense_kv, save / "hybrid_smollm2.png")
    print(f"plot: {save / 'hybrid_smollm2.png'}")


def plot(rows, base_ppl: float, dense_kv: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([dense_kv], [1.0], "k*", ms=12, label="dense")
    for family, color in zip(FAMILIES, ("#1f77b4", "#d62728", "#2ca02c")):
        for key, marker, what in (("init", "o", "local init"), ("healed", "s", "healed")):
            pts = sorted((r["kv"], r[key] / base_ppl) for r in rows if r["family"] == family and r.get(key))
            if pts:
                ax.plot(*zip(*pts), marker=marker, color=color, ls="-" if key == "init" else "none",
                        label=f"{family} only, {what}" if family != "hybrid" else f"hybrid, {what}")
    ax.set_xlabel("KV cache bytes per token (fp32)")
    ax.set_ylabel("WikiText-2 perplexity / base")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
