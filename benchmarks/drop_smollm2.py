"""Attention drop on SmolLM2-135M: WikiText-2 perplexity vs. number of dropped attention layers.

    LISA_HUB_DATA_DIR=../shared/data .venv/bin/python benchmarks/drop_smollm2.py [--json out.json]

Evaluation: the first 8 x 1024 tokens of the WikiText-2 test split (as `lisa-hub eval-ppl`).
Calibration: 8 x 256 tokens of the same split *after* those 8192 tokens, so calibration and
evaluation text do not overlap. For n in 0, 4, 8, 12, 15 dropped attention layers, one-shot
(rank once) and iterative (drop one, re-measure, repeat) plans are evaluated; the iterative
method is greedy, so one run of 15 rounds gives every n as a prefix of its pick order.
Also reported: the dropped layers and the K+V cache bytes per token measured on a real cache.
He et al. find that deep attention layers are dropped first; the last columns check that.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--n", default="0,4,8,12,15", help="numbers of attention layers to drop")
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--eval-len", type=int, default=1024)
    parser.add_argument("--calib-blocks", type=int, default=8)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    from adapters_hub.data import load_text, token_blocks
    from adapters_hub.drop import (DropPlan, apply_drop, calibration_blocks, iterative_plan,
                                   kv_cache_bytes_per_token, module_importance, restore)
    from adapters_hub.evaluation import perplexity
    from adapters_hub.models import load_base

    torch.manual_seed(0)
    start = time.perf_counter()
    model, tok = load_base(args.base)
    num_layers = model.config.num_hidden_layers
    ns = [int(x) for x in args.n.split(",")]
    text = load_text("wikitext2")
    eval_ids = token_blocks(tok, text, n_blocks=args.eval_blocks, block_len=args.eval_len)
    calib = calibration_blocks(tok, text, n_blocks=args.calib_blocks, block_len=args.calib_len,
                               skip_tokens=args.eval_blocks * args.eval_len)

    t0 = time.perf_counter()
    scores = module_importance(model, calib, progress=False)
    t_importance = time.perf_counter() - t0
    print(f"importance on {args.calib_blocks} x {args.calib_len} calibration tokens: {t_importance:.1f}s")
    print("layer   attn    mlp     block")
    for i in range(num_layers):
        print(f"{i:5d}  {scores['attn'][i]:.4f}  {scores['mlp'][i]:.4f}  {scores['block'][i]:.4f}")

    t0 = time.perf_counter()
    iterative = iterative_plan(model, calib, n=max(ns), target="attn", progress=False)
    t_iterative = time.perf_counter() - t0
    print(f"iterative pick order ({t_iterative:.1f}s): {[layer for _, layer in iterative.order]}")

    rows = []
    for method in ("one_shot", "iterative"):
        for n in ns:
            if method == "iterative" and n == 0:
                continue  # same as one-shot n=0
            if method == "one_shot":
                plan = DropPlan.top_n(scores, n=n, target="attn")
            else:
                picked = [layer for _, layer in iterative.order[:n]]
                plan = DropPlan(num_layers, "attn", attn=tuple(picked), method="iterative",
                                order=tuple(("attn", i) for i in picked))
            apply_drop(model, plan)
            try:
                t0 = time.perf_counter()
                ppl = perplexity(model, eval_ids, progress=False)
                t_eval = time.perf_counter() - t0
                kv = kv_cache_bytes_per_token(model)
            finally:
                restore(model)
            dropped = list(plan.attn)
            rows.append({
                "method": method, "n": n, "ppl": ppl, "kv_bytes_per_token": kv, "dropped": dropped,
                "mean_dropped_layer": sum(dropped) / len(dropped) if dropped else None,
                "deep_half": sum(i >= num_layers // 2 for i in dropped), "eval_s": t_eval,
            })
            print(f"  {method:9s} n={n:2d} ppl={ppl:9.3f} kv/token={kv:7.0f} B  ({t_eval:.1f}s) dropped={dropped}",
                  flush=True)

    print()
    print(f"SmolLM2-135M ({num_layers} layers), WikiText-2 perplexity on {args.eval_blocks} x {args.eval_len} tokens")
    print("| method    |  n | perplexity | KV bytes/token | dropped attention layers (sorted)            | in deep half |")
    print("|-----------|---:|-----------:|---------------:|----------------------------------------------|-------------:|")
    for r in rows:
        layers = ",".join(map(str, r["dropped"])) or "-"
        print(f"| {r['method']:9s} | {r['n']:2d} | {r['ppl']:10.3f} | {r['kv_bytes_per_token']:14.0f} | "
              f"{layers:44s} | {r['deep_half']:>5d}/{r['n']:<6d} |")
    print(f"(total {time.perf_counter() - start:.0f}s)")

    if args.json:
        result = {"base": args.base, "num_layers": num_layers, "scores": scores, "iterative_order": iterative.order,
                  "rows": rows, "calibration": f"{args.calib_blocks}x{args.calib_len} after {args.eval_blocks * args.eval_len}",
                  "eval": f"{args.eval_blocks}x{args.eval_len}"}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
