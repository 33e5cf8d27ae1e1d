"""LiSA on SmolLM2-135M: analysis, perplexity of sharing variants, a short training run, KV cache.

    LISA_HUB_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/lisa_smollm2.py [--train-seconds 600]

Token layout of WikiText-2 (test split, one tokenisation, no overlap):
    [0, 8192)                     evaluation: 8 x 1024 blocks (perplexity)
    [8192, 8192 + 1024)           calibration for the analysis: 4 x 256
    [8192 + 1024, ...)            training text for the short distillation + LM run
Everything in the printed table is measured in this one run.
"""

from __future__ import annotations

import argparse
import math
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--fraction", type=float, default=0.6)
    ap.add_argument("--protect-first", type=int, default=2)
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--eval-len", type=int, default=1024)
    ap.add_argument("--train-seconds", type=float, default=600.0, help="wall-clock budget of the training run")
    ap.add_argument("--max-steps", type=int, default=10_000)
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--beta", type=float, default=1.0, help="weight of the attention-distillation KL")
    args = ap.parse_args()

    import torch

    from adapters_hub.data import load_text, token_blocks
    from adapters_hub.evaluation import perplexity
    from adapters_hub.lisa import LisaConfig, LisaModel, SharingPlan, analyze_attention, distillation
    from adapters_hub.models import fingerprint, load_base

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_base(args.base)
    fp = fingerprint(model)
    n_eval = args.eval_blocks * args.eval_len
    n_train_tokens = 200_000
    all_ids = token_blocks(tok, load_text("wikitext2"), n_blocks=1, block_len=n_eval + 1024 + n_train_tokens)[0]
    eval_blocks = all_ids[:n_eval].view(args.eval_blocks, args.eval_len)
    calib = all_ids[n_eval : n_eval + 1024].view(4, 256)
    train_ids = all_ids[n_eval + 1024 :]
    print(f"loaded {args.base} in {time.perf_counter() - t0:.1f}s; fingerprint {fp}")

    rows: list[tuple[str, str, str]] = []

    def row(name, value, note=""):
        rows.append((name, value, note))
        print(f"  {name}: {value} {note}", flush=True)

    # 1. analysis ---------------------------------------------------------------------------
    t = time.perf_counter()
    report = analyze_attention(model, calib, batch_size=4, progress=False, base=args.base)
    t_an = time.perf_counter() - t
    print(f"\nattention analysis on 4 x 256 tokens ({t_an:.1f}s); JS divergence to layer l-1, nats (max 0.693)")
    lines = report.lines()
    print(lines[0])
    for l in (1, 2, 3, 5, 10, 15, 20, 25, 29):
        print(lines[l])
    raw = report.raw[1:]
    aligned = report.aligned[1:]
    print(f"per head, all layers: raw {raw.min():.3f}-{raw.max():.3f}, aligned {aligned.min():.3f}-{aligned.max():.3f}; "
          f"layer means raw {min(report.raw_mean[1:]):.3f}-{max(report.raw_mean[1:]):.3f}, "
          f"aligned {min(report.aligned_mean[1:]):.3f}-{max(report.aligned_mean[1:]):.3f}")
    plan = SharingPlan.from_report(report, fraction=args.fraction, protect_first=args.protect_first)
    unaligned = SharingPlan.from_report(report, fraction=args.fraction, protect_first=args.protect_first,
                                        aligned=False)
    print(plan.summary())

    # 2. perplexities -------------------------------------------------------------------------
    print(f"\nperplexity, WikiText-2, {args.eval_blocks} x {args.eval_len} tokens")
    t = time.perf_counter()
    ppl_base = perplexity(model, eval_blocks, progress=False)
    t_base = time.perf_counter() - t
    row("base (dense)", f"{ppl_base:.2f}", f"({t_base:.0f}s)")

    lm = LisaModel(model, LisaConfig(plan=unaligned), "unaligned", fingerprint=fp)
    ppl_unaligned = perplexity(lm, eval_blocks, progress=False)
    row(f"{len(plan.shared)}/{plan.num_layers} layers, direct sharing, unaligned (identity P)", f"{ppl_unaligned:.2f}")
    lm.unload()

    lm = LisaModel(model, LisaConfig(plan=plan), "default", fingerprint=fp)
    t = time.perf_counter()
    ppl_aligned = perplexity(lm, eval_blocks, progress=False)
    t_lisa = time.perf_counter() - t
    row(f"{len(plan.shared)}/{plan.num_layers} layers, fresh LiSA adapter (aligned sharing)", f"{ppl_aligned:.2f}",
        f"({t_lisa:.0f}s)")

    # 3. short training: LM loss + attention distillation, on text after the eval blocks ------
    rep = lm.trainable_report()
    print(f"\ntraining: {rep['trainable']:,} trainable of {rep['total']:,} params ({100 * rep['fraction']:.2f}%), "
          f"batch {args.train_batch} x {args.train_len}, lr {args.lr}, beta {args.beta}, "
          f"budget {args.train_seconds:.0f}s")
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    per_step = args.train_batch * args.train_len
    n_chunks = len(train_ids) // per_step
    lm.train()
    t = time.perf_counter()
    step = 0
    with distillation(lm) as d:
        while step < args.max_steps and time.perf_counter() - t < args.train_seconds:
            chunk = train_ids[(step % n_chunks) * per_step : (step % n_chunks + 1) * per_step]
            ids = chunk.view(args.train_batch, args.train_len)
            warm = min(1.0, (step + 1) / 10)
            for g in opt.param_groups:
                g["lr"] = args.lr * warm
            opt.zero_grad(set_to_none=True)
            out = lm(input_ids=ids, labels=ids)
            kl = d.loss()
            (out.loss + args.beta * kl).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step == 1 or step % 10 == 0:
                print(f"  step {step:4d}  lm {out.loss.item():.3f}  kl {kl.item():.4f}  "
                      f"{time.perf_counter() - t:.0f}s", flush=True)
    t_train = time.perf_counter() - t
    lm.eval()
    ppl_trained = perplexity(lm, eval_blocks, progress=False)
    row(f"{len(plan.shared)}/{plan.num_layers} layers, LiSA after {step} steps "
        f"({step * per_step:,} tokens, {t_train:.0f}s CPU)", f"{ppl_trained:.2f}")

    # 4. KV cache and Q/K parameters ----------------------------------------------------------
    from transformers import DynamicCache

    def cache_bytes(m, n=64):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            m(input_ids=eval_blocks[:1, :n], past_key_values=cache, use_cache=True)
        k = sum(layer.keys.nbytes for layer in cache.layers) / n
        v = sum(layer.values.nbytes for layer in cache.layers) / n
        return k, v

    k_lisa, v_lisa = cache_bytes(lm)
    with lm.disable_adapter():  # substituted layers back to dense attention: full K cache
        k_dense, v_dense = cache_bytes(lm)
    layer = next(iter(lm.lisa_layers.values()))
    qk_dense = layer.q_proj.weight.numel() + layer.k_proj.weight.numel()
    qk_lisa = sum(p.numel() for p in layer.lisa_qk["default"].parameters())
    freed = lm.prune_qk()
    with torch.no_grad():
        check = lm(input_ids=eval_blocks[:1, :128]).logits
    assert torch.isfinite(check).all()
    total_after = sum(p.numel() for p in lm.parameters())

    print(f"\n{'=' * 96}\nLiSA on {args.base} (fp32, CPU), {time.perf_counter() - t0:.0f}s total")
    print(f"{'measurement':<78} {'value':>10}")
    for name, value, note in rows:
        print(f"{name + (' ' + note if note else ''):<78} {value:>10}")
    print(f"{'ppl ratio aligned / unaligned':<78} {ppl_aligned / ppl_unaligned:>10.3f}")
    print(f"{'ppl ratio trained / base':<78} {ppl_trained / ppl_base:>10.3f}")
    print(f"{'K cache bytes per token, dense (fp32, all layers)':<78} {k_dense:>10.0f}")
    print(f"{'K cache bytes per token, 60% plan':<78} {k_lisa:>10.0f}")
    print(f"{'K cache ratio dense / plan (whole model)':<78} {k_dense / k_lisa:>10.2f}")
    print(f"{'V cache bytes per token (unchanged)':<78} {v_lisa:>10.0f}")
    print(f"{'KV cache ratio dense / plan (whole model)':<78} {(k_dense + v_dense) / (k_lisa + v_lisa):>10.2f}")
    print(f"{'Q/K params of a substituted layer, dense / LiSA':<78} {qk_dense / qk_lisa:>10.2f}")
    print(f"{'trainable params (% of model)':<78} {100 * rep['fraction']:>9.3f}%")
    print(f"{'params freed by prune_qk / model params after':<78} {freed:>10,} / {total_after:,}")
    print(f"{'perplexity eval time, base / LiSA (s)':<78} {t_base:>5.0f} / {t_lisa:.0f}")
    print(f"analysis {t_an:.0f}s on 4 x 256 tokens; plan hash {plan.hash}; layers {list(plan.layers)}")
    assert math.isfinite(ppl_trained)


if __name__ == "__main__":
    main()
