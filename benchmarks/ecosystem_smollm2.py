"""lm-evaluation-harness and Ray Data batch inference on SmolLM2-135M (2-core CPU numbers).

    .venv/bin/python -m benchmarks.ecosystem_smollm2 --backbone runs/convert-bench/fraction-0.6
    .venv/bin/python -m benchmarks.ecosystem_smollm2 --skip-eval --prompts 128   # batch part only

1. `sdk.evaluate_harness` on the local GSM8K task files: the dense base and a converted
   backbone folder, `lisa_gsm8k_mc` (the first --mc questions) and `lisa_gsm8k` (--gen).
2. `sdk.batch_generate` (Ray Data, one actor) against `sdk.Backbone.generate` in a loop, on
   the same prompts over 4 LoRA adapters (random updates, the dense base): generated tokens/s.
Prints one JSON object; the table in the closing note comes from it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="runs/convert-bench/fraction-0.6")
    parser.add_argument("--mc", type=int, default=64)
    parser.add_argument("--gen", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--out", default="/tmp/ecosystem-bench")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    if not args.skip_eval:
        import sdk

        for name, options in (("base (dense)", {"attention": "dense"}), ("backbone", {"plan_path": args.backbone})):
            row = {}
            for task, limit in (("lisa_gsm8k_mc", args.mc), ("lisa_gsm8k", args.gen)):
                start = time.perf_counter()
                r = sdk.evaluate_harness(base_model="smollm2-135m", tasks=[task], limit=limit, **options)
                row[task] = {**r.results[task], "n": limit, "seconds": round(time.perf_counter() - start, 1)}
            report[name] = row
            print(json.dumps({name: row}), flush=True)
    report["batch"] = _batch(args, out)
    print(json.dumps(report, indent=2))


def _batch(args, out: Path) -> dict:
    import torch

    import sdk
    from adapters_hub.backbone import dense_plan, load_lisa_model
    from adapters_hub.kinds import get_kind

    lm, _ = load_lisa_model("smollm2-135m", dense_plan("smollm2-135m"))
    kind, folders = get_kind("lora"), []
    for i in range(4):
        kind.add(lm, f"a{i}", {"r": 8, "lora_alpha": 16})
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if f"lora_B.a{i}." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        folders.append(str(kind.save(lm, f"a{i}", out / f"a{i}")))
    del lm
    questions = [json.loads(line)["question"] for line in
                 (Path(__import__("adapters_hub.settings", fromlist=["x"]).data_dir()) / "gsm8k" / "test.jsonl")
                 .read_text().splitlines()[: args.prompts]]
    rows = [{"prompt": f"Question: {q}\nAnswer:", "adapter": folders[i % 4]} for i, q in enumerate(questions)]
    (out / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    start = time.perf_counter()
    r = sdk.batch_generate(input=out / "in.jsonl", output=out / "out.jsonl", base_model="smollm2-135m",
                           attention="dense", adapter_column="adapter", max_new_tokens=args.max_new_tokens,
                           batch_size=16, num_cpus=2)
    batch_s = time.perf_counter() - start
    import ray

    ray.shutdown()  # the loop below gets the machine's cores alone
    bb = sdk.Backbone.load(base_model="smollm2-135m", attention="dense", max_resident=4)
    start, tokens = time.perf_counter(), 0
    for row in rows:
        text = bb.generate(row["prompt"], adapter=row["adapter"], max_new_tokens=args.max_new_tokens)
        tokens += len(bb.tokenizer(text, add_special_tokens=False).input_ids)
    loop_s = time.perf_counter() - start
    return {"prompts": len(rows), "adapters": 4, "max_new_tokens": args.max_new_tokens,
            "batch_seconds_incl_startup": round(batch_s, 1), "batch_tokens": r.tokens,
            "batch_tokens_per_s": round(r.tokens / batch_s, 1), "loop_seconds": round(loop_s, 1),
            "loop_tokens_approx": tokens, "loop_tokens_per_s": round(tokens / loop_s, 1),
            "speedup": round((r.tokens / batch_s) / (tokens / loop_s), 2), "failed": r.failed}


if __name__ == "__main__":
    main()
