"""`lisa-hub drop`: measure module importance on calibration text and write a drop plan.

  lisa-hub drop --base smollm2-135m --target attn --n 8 [--iterative] [--joint] \
                [--data wikitext2] [--blocks 8 --block-len 256] [--skip-tokens 8192] --out DIR

DIR becomes an attn_drop adapter folder (adapter_config.json, no tensors) that also holds
importance.json (scores per layer; one table per round when iterative) and importance.png.
"""

from __future__ import annotations

import argparse


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("drop", help="make an attention/MLP/block drop plan (adapter kind attn_drop)")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--target", default="attn", choices=["attn", "mlp", "block"])
    p.add_argument("--n", type=int, default=8, help="how many modules to drop")
    p.add_argument("--iterative", action="store_true", help="drop one at a time, re-measuring in between")
    p.add_argument("--joint", action="store_true", help="rank attention and MLP modules together")
    p.add_argument("--data", default="wikitext2", help="calibration corpus")
    p.add_argument("--blocks", type=int, default=8, help="calibration blocks")
    p.add_argument("--block-len", type=int, default=256, help="tokens per calibration block")
    p.add_argument("--skip-tokens", type=int, default=8192,
                   help="start calibration after this many tokens (default: past the evaluation slice eval-ppl scores)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.set_defaults(func=_drop)


def _drop(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from adapters_hub.data import trainable_text
    from adapters_hub.drop.plan import DropConfig
    from adapters_hub.drop.importance import calibration_blocks, make_plan
    from adapters_hub.drop.model import DropAdapter
    from adapters_hub.models import load_base

    if args.joint and args.target != "attn":
        raise ValueError("--joint ranks attention and MLP together; do not combine it with --target")
    config = DropConfig(
        target="joint" if args.joint else args.target, n=args.n, iterative=args.iterative, data=args.data,
        n_blocks=args.blocks, block_len=args.block_len, skip_tokens=args.skip_tokens, batch_size=args.batch_size,
    )
    start = time.perf_counter()
    model, tok = load_base(args.base, dtype=args.dtype)
    calib = calibration_blocks(tok, trainable_text(config.data), n_blocks=config.n_blocks, block_len=config.block_len,
                               skip_tokens=config.skip_tokens)
    plan, tables = make_plan(model, calib, config)

    out = Path(args.out)
    adapter = DropAdapter.for_model(model, plan, drop_config=config)
    adapter.save(out)
    (out / "importance.json").write_text(json.dumps(
        {"base": adapter.base, "config": config.to_dict(), "rounds": tables,
         "picked": [list(p) for p in plan.order]}, indent=2) + "\n", encoding="utf-8")
    plot_importance(tables[0], plan, out / "importance.png", title=f"{adapter.base}: module importance (1 - cos)")
    print(plan.describe())
    print(f"wrote {out}/adapter_config.json, importance.json, importance.png ({time.perf_counter() - start:.1f}s)")
    return 0


def plot_importance(scores: dict, plan, path, *, title: str = "") -> None:
    """Grouped bars of attn / mlp / block importance per layer; dropped modules hatched."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    kinds = [k for k in ("attn", "mlp", "block") if k in scores]
    n_layers = len(scores[kinds[0]])
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * n_layers), 3.5))
    for j, kind in enumerate(kinds):
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(n_layers)]
        bars = ax.bar(xs, scores[kind], width, label=kind)
        for i, bar in enumerate(bars):
            if (kind, i) in plan.dropped():
                bar.set_hatch("//")
                bar.set_edgecolor("black")
    ax.set_xlabel("layer")
    ax.set_ylabel("importance = 1 - cos(X, X + F(norm X))")
    ax.set_yscale("log")
    ax.set_title(title + (f"\nhatched: dropped ({plan.method}, {len(plan)})" if len(plan) else ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
