"""`lisa-hub analyze`: attention analysis of a base model and the sharing plan it implies.

  lisa-hub analyze --base smollm2-135m --data wikitext2 --out runs/analysis \
                   [--fraction 0.6] [--protect-first 2] [--blocks 4 --block-len 256] [--sensitivity]

Writes DIR/report.json, DIR/heatmap.png and DIR/plan.json.
"""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    p = sub.add_parser("analyze", help="LiSA attention analysis: JS divergence report, heatmap and sharing plan")
    p.add_argument("--base", default="smollm2-135m", help="base model name, HF id or folder")
    p.add_argument("--data", default="wikitext2", help="calibration corpus (adapters_hub.data.CORPORA)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fraction", type=float, default=0.6, help="fraction of layers to substitute")
    p.add_argument("--protect-first", type=int, default=2, help="never substitute the first K layers")
    p.add_argument("--rank", type=int, default=None, help="Q/K rank (default head_dim // 6)")
    p.add_argument("--blocks", type=int, default=4, help="calibration texts")
    p.add_argument("--block-len", type=int, default=256, help="tokens per calibration text")
    p.add_argument("--sensitivity", action="store_true", help="also measure per-layer perplexity change")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=_analyze)


def _analyze(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from adapters_hub.data import load_text, token_blocks
    from adapters_hub.lisa.analysis import analyze_attention
    from adapters_hub.lisa.plan import SharingPlan
    from adapters_hub.models import load_base

    start = time.perf_counter()
    model, tok = load_base(args.base, dtype=args.dtype)
    blocks = token_blocks(tok, load_text(args.data), n_blocks=args.blocks, block_len=args.block_len)
    report = analyze_attention(model, blocks, sensitivity=args.sensitivity, progress=True, base=args.base)
    plan = SharingPlan.from_report(report, fraction=args.fraction, protect_first=args.protect_first, rank=args.rank)
    out = Path(args.out)
    report.save(out)
    plan.save(out / "plan.json")
    print("\n".join(report.lines()))
    print(plan.summary())
    print(f"wrote {out / 'report.json'}, {out / 'heatmap.png'}, {out / 'plan.json'} "
          f"({time.perf_counter() - start:.1f}s)")
    return 0
