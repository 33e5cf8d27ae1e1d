"""Speed and memory of a LiSA backbone against its dense base, measured side by side.

    LISA_HUB_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/speed_smollm2.py
    .venv/bin/python benchmarks/speed_smollm2.py --device cuda --dtype bfloat16     # on a GPU

Dense = the base model on SDPA. LiSA = the same weights with a sharing plan (default: the
analysis plan at --fraction, calibration text past the first 8 x 1024 WikiText-2 tokens),
W_q/W_k of the substituted layers pruned, on the fast path. Every measurement alternates
dense and LiSA (A/B/A/B, --reps rounds) and reports medians and the LiSA / dense ratio:

  prefill        one forward over B x T tokens, wall time and peak memory above the start
                 (CUDA: max_memory_allocated; CPU: peak RSS sampled every 2 ms)
  decode         tok/s of single-token steps after a prefill (prefill not timed)
  KV bytes       cache bytes per token, all layers
  equal budget   the largest batch whose KV cache at --budget-context tokens fits --budget-gib,
                 for each model, and its decode tok/s there (caches filled by repeating a
                 real one-row prefill along the batch)
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--fraction", type=float, default=0.6)
    ap.add_argument("--plan", default=None, help="a plan.json instead of the analysis plan")
    ap.add_argument("--adapter", default=None, help="a saved LiSA adapter folder (default: fresh adapter)")
    ap.add_argument("--kernel", default="auto", choices=("auto", "blocks", "fused"),
                    help="how the LiSA fast path attends over factored scores")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--budget-gib", type=float, default=2.0)
    ap.add_argument("--budget-context", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    args = ap.parse_args()

    import copy

    import torch

    from adapters_hub.lisa import LisaConfig, LisaModel, SharingPlan
    from adapters_hub.models import fingerprint, load_base

    torch.manual_seed(0)
    dense, tok = load_base(args.base, dtype=args.dtype, device=args.device)
    dense.set_attn_implementation("sdpa")
    plan = SharingPlan.load(args.plan) if args.plan else _analysis_plan(args.base, args.fraction)
    model = copy.deepcopy(dense)
    fp = fingerprint(dense)
    healing_dir = Path(args.adapter).parent / "healing" if args.adapter else None
    if healing_dir is not None and healing_dir.is_dir():  # a converted backbone's adapter: merge its healing first
        from adapters_hub.lisa import healing

        fp = healing.healed_fingerprint(fp, healing.merge(model, healing_dir))
    lm = LisaModel(model, LisaConfig(plan=plan), fingerprint=fp)
    if args.adapter:
        lm.load_adapter(args.adapter, "trained", activate=True)
    freed = lm.prune_qk()
    lm.fast_kernel = args.kernel
    lm.eval()
    models = {"dense": dense, "lisa": lm}
    print(f"{args.base} {args.dtype} on {args.device}; {plan.summary()}; W_q/W_k pruned: {freed:,} params; "
          f"fast kernel {args.kernel}")
    vocab = dense.config.vocab_size
    dev = args.device

    def ids(b, t):
        return torch.randint(100, vocab - 100, (b, t), generator=torch.Generator().manual_seed(b * 7 + t)).to(dev)

    rows: list[tuple[str, str, str, str]] = []

    def report(name, d, l, unit, higher_is_better):
        ratio = (l / d) if higher_is_better else (d / l)
        rows.append((name, f"{d:.3f} {unit}", f"{l:.3f} {unit}", f"{ratio:.2f}x"))
        print(f"  {name}: dense {d:.3f} {unit}, lisa {l:.3f} {unit}, lisa speed/size {ratio:.2f}x", flush=True)

    shapes = [(1, 512), (4, 1024)] if not args.quick else [(1, 128), (2, 256)]
    other = "fused" if args.kernel in ("auto", "blocks") and dev == "cpu" else "blocks"
    for b, t in shapes:
        x = ids(b, t)
        times, peaks = {k: [] for k in (*models, other)}, {k: [] for k in (*models, other)}
        for _ in range(args.reps):  # dense, LiSA, LiSA with the other fast kernel: interleaved
            for name, m in (*models.items(), (other, lm)):
                lm.fast_kernel = other if name == other else args.kernel
                secs, peak = _timed(lambda: m(input_ids=x, use_cache=False), dev)
                times[name].append(secs)
                peaks[name].append(peak)
        lm.fast_kernel = args.kernel
        report(f"prefill {b} x {t}, seconds", *(statistics.median(times[k]) for k in models), "s", False)
        report(f"prefill {b} x {t}, peak memory MiB", *(statistics.median(peaks[k]) / 2**20 for k in models),
               "MiB", False)
        report(f"prefill {b} x {t}, seconds, LiSA with the {other} kernel", statistics.median(times["dense"]),
               statistics.median(times[other]), "s", False)

    prompt = 128 if not args.quick else 32
    for b in ([1, 8, 32] if not args.quick else [1, 4]):
        rates = {k: [] for k in models}
        for _ in range(args.reps):
            for name, m in models.items():
                rates[name].append(_decode_rate(m, ids(b, prompt), args.decode_steps, dev))
        report(f"decode batch {b} (prompt {prompt}), tok/s", *(statistics.median(rates[k]) for k in models),
               "tok/s", True)

    kv = {name: _kv_bytes_per_token(m, ids(1, 64)) for name, m in models.items()}
    report("KV cache bytes per token", kv["dense"], kv["lisa"], "B", False)

    ctx = args.budget_context if not args.quick else 128
    budget = args.budget_gib * 2**30
    batch = {name: max(1, int(budget // (kv[name] * ctx))) for name in models}
    rates = {k: [] for k in models}
    for _ in range(args.reps):
        for name, m in models.items():
            rates[name].append(_decode_rate(m, ids(1, ctx), args.decode_steps, dev, expand_to=batch[name]))
    report(f"max decode at {args.budget_gib:g} GiB KV, context {ctx} (batch {batch['dense']} vs {batch['lisa']}), "
           "tok/s", *(statistics.median(rates[k]) for k in models), "tok/s", True)

    params = {name: sum(p.numel() * p.element_size() for p in m.parameters()) for name, m in models.items()}
    report("parameter bytes, MiB", params["dense"] / 2**20, params["lisa"] / 2**20, "MiB", False)

    print(f"\n{'=' * 100}\n{args.base} {args.dtype} {args.device}, {plan.summary()}")
    print(f"{'measurement':<72} {'dense':>14} {'LiSA':>14} {'LiSA/dense':>10}")
    for name, d, l, r in rows:
        print(f"{name:<72} {d:>14} {l:>14} {r:>10}")
    print("ratios: speed (or 1 / size) of LiSA relative to dense, > 1 is better for LiSA")


def _analysis_plan(base: str, fraction: float):
    from adapters_hub.backbone import analyse_base

    plan, _ = analyse_base(base, fraction=fraction)
    return plan


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[float, float]:
    """(seconds, peak bytes above the start) of fn() under no_grad."""
    import torch

    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    else:
        sampler = _RssSampler()
    t = time.perf_counter()
    with torch.no_grad():
        fn()
    _sync(device)
    secs = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - start_mem) if device.startswith("cuda") else sampler.stop()
    return secs, float(peak)


class _RssSampler:
    """Peak resident memory above the value at start, sampled in a thread every 2 ms."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self._start = self._proc.memory_info().rss
        self._peak = self._start
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def stop(self) -> int:
        self._running = False
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        return self._peak - self._start


def _decode_rate(model, prompt, steps: int, device: str, expand_to: int | None = None) -> float:
    """Tokens per second of `steps` greedy single-token steps after a (not timed) prefill;
    expand_to repeats the one-row prefilled cache along the batch first."""
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        if expand_to:
            for layer in cache.layers:
                if layer.keys is None:  # a dropped layer's slot: nothing cached
                    continue
                layer.keys = layer.keys.repeat(expand_to, 1, 1, 1)
                layer.values = layer.values.repeat(expand_to, 1, 1, 1)
        b = expand_to or prompt.shape[0]
        nxt = out.logits[:, -1:].argmax(-1).expand(b, 1).contiguous()
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        return b * steps / (time.perf_counter() - t)


def _kv_bytes_per_token(model, prompt) -> float:
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
    return sum(l.keys.nbytes + l.values.nbytes for l in cache.layers if l.keys is not None) / prompt.shape[1]


if __name__ == "__main__":
    main()
