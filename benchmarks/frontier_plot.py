"""The frontier a user picks from: max decode throughput at an equal KV budget against
perplexity, one point per backbone, from numbers other benchmarks printed.

    .venv/bin/python benchmarks/frontier_plot.py --out docs/frontier_smollm2.png \
        --point "dense:1.0:1.0" --point "60% shared:1.264:1.25" --point "50% hybrid:1.817:1.97"

Each --point is label:perplexity / base:throughput / dense. Perplexity ratios come from
benchmarks/convert_smollm2.py or hybrid_smollm2.py ("healed / base"), throughput ratios from
benchmarks/speed_smollm2.py ("max decode at 2 GiB KV"): each pair of a point measured in its
own run, as the README's tables say. Nothing is measured here.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--point", action="append", required=True, help="label:ppl_ratio:throughput_ratio")
    ap.add_argument("--out", default="docs/frontier_smollm2.png")
    args = ap.parse_args()
    points = []
    for text in args.point:
        label, ppl, speed = text.rsplit(":", 2)
        points.append((label, float(ppl), float(speed)))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rightmost = max(p for _, p, _ in points)
    for label, ppl, speed in points:
        ax.plot(ppl, speed, "o", ms=8)
        left = ppl == rightmost and len(points) > 1  # the last label reads leftwards, inside the axes
        ax.annotate(label, (ppl, speed), textcoords="offset points", xytext=(-6 if left else 6, 6), fontsize=9,
                    ha="right" if left else "left")
    ax.margins(x=0.35, y=0.15)  # room for the labels
    ax.set_xlabel("WikiText-2 perplexity / base (converted, healed)")
    ax.set_ylabel("max decode tok/s at equal KV memory / dense")
    ax.grid(alpha=0.3)
    ax.set_title("SmolLM2-135M, 2-core CPU, 2 GiB of KV at context 1024", fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
