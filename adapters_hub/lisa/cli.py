"""`lisa-hub analyze`: attention analysis of a base model and the sharing plan it implies.

  lisa-hub analyze --base smollm2-135m --data wikitext2 --out runs/analysis \
                   [--fraction 0.6] [--protect-first 2] [--blocks 4 --block-len 256] [--sensitivity] \
                   [--register [--replace]]

Writes DIR/report.json, DIR/heatmap.png and DIR/plan.json. With --register, the folder
becomes the base's backbone in the MLflow registry (`backbone-<base>@champion`), which every
adaptation job of that base then trains on. Calibration text starts after the first
--skip-tokens tokens (default 8192: the 8 x 1024 tokens the perplexity numbers are scored on).
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
    p.add_argument("--skip-tokens", type=int, default=8192, help="calibrate after this many tokens")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--register", action="store_true", help="register the plan as the base's backbone (MLflow)")
    p.add_argument("--replace", action="store_true", help="with --register: replace an existing backbone plan")
    p.set_defaults(func=_analyze)


def _analyze(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from adapters_hub import registry
    from adapters_hub.data import token_blocks, trainable_text
    from adapters_hub.lisa.analysis import analyze_attention
    from adapters_hub.lisa.plan import SharingPlan
    from adapters_hub.models import load_base

    start = time.perf_counter()
    model, tok = load_base(args.base, dtype=args.dtype)
    n_skip = -(-args.skip_tokens // args.block_len)  # whole blocks, rounded up
    blocks = token_blocks(tok, trainable_text(args.data), n_blocks=n_skip + args.blocks, block_len=args.block_len)[n_skip:]
    report = analyze_attention(model, blocks, sensitivity=args.sensitivity, progress=True, base=args.base)
    plan = SharingPlan.from_report(report, fraction=args.fraction, protect_first=args.protect_first, rank=args.rank)
    out = Path(args.out)
    report.save(out)
    plan.save(out / "plan.json")
    print("\n".join(report.lines()))
    print(plan.summary())
    print(f"wrote {out / 'report.json'}, {out / 'heatmap.png'}, {out / 'plan.json'} "
          f"({time.perf_counter() - start:.1f}s)")
    if args.register:
        found = registry.register_backbone(args.base, out, plan_hash=plan.hash, replace=args.replace)
        print(f"registered backbone {found.name} version {found.version} (aliases {list(found.aliases)})")
    return 0
