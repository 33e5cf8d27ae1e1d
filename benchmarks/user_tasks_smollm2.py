"""Two user-style tasks built from GSM8K, adapted on SmolLM2-135M with the quick profile:
base vs adapter on each task's main metric.

    LISA_HUB_DATA_DIR=../shared/data .venv/bin/python benchmarks/user_tasks_smollm2.py --out runs/user_tasks

What it builds (in --out, never in the repository), as a user would with their own files:
  gsm8k-op   classification, JSONL: which operation the first calculator step of the
             solution uses (add / subtract / multiply / divide), from the question alone;
             label check, accuracy (main) and macro-F1.
  gsm8k-mc   multiple choice, CSV: the final answer among four numbers (the true one and
             three seeded distractors near it), scored by the log-likelihood of each
             choice (mc_accuracy), as lm-evaluation-harness does.
Training rows come from GSM8K train, evaluation rows from GSM8K test. Each task is
submitted with `sdk.submit_adaptation(spec=..., profile="quick")` to the running stack
(`lisa-hub up` first; the spec and its data travel with the job), then the table of
base / fresh backbone / general adapter / task adapter metrics.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
from pathlib import Path

from adapters_hub.tasks.cli import PROFILES  # the starter profiles `lisa-hub task init` writes

OPS = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide"}


OP_SPEC = """name: gsm8k-op
description: Which operation the first calculator step of a GSM8K solution uses.
dataset: {loader: files, train: op_train.jsonl, eval: op_eval.jsonl}
format:
  prompt: "Question: {question}\\nFirst operation (add, subtract, multiply or divide):"
  answer: " {op}"
  target_field: op
extraction: {kind: label, labels: [add, subtract, multiply, divide]}
metrics: [accuracy, macro_f1, answer_nll]
main_metric: accuracy
direction: higher
tie_breaker: answer_nll
generation: {max_new_tokens: 4, stop: ["\\n"]}
""" + PROFILES

MC_SPEC = """name: gsm8k-mc
description: The final answer of a GSM8K question among four numbers.
dataset: {loader: files, train: mc_train.csv, eval: mc_eval.csv}
format:
  prompt: "Question: {question}\\nThe answer is"
  choices_field: choices
  target_field: label
extraction: {kind: none}
metrics: [mc_accuracy, answer_nll]
main_metric: mc_accuracy
direction: higher
tie_breaker: answer_nll
generation: {max_new_tokens: 8}
""" + PROFILES


def first_op(solution: str) -> str | None:
    match = re.search(r"<<[^<>]*?\d\s*([-+*/])\s*[\d(]", solution)
    return OPS[match.group(1)] if match else None


def final_number(solution: str) -> int | None:
    raw = solution.split("####")[-1].strip().replace(",", "")
    return int(raw) if re.fullmatch(r"-?\d+", raw) else None


def build(out: Path, data_dir: Path, seed: int = 0) -> dict[str, Path]:
    rng = random.Random(seed)
    rows = {split: [json.loads(line) for line in (data_dir / "gsm8k" / f"{split}.jsonl").open()]
            for split in ("train", "test")}
    out.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train"), ("test", "eval")):
        ops = [{"question": r["question"], "op": op} for r in rows[split] if (op := first_op(r["answer"]))]
        (out / f"op_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ops))
        with (out / f"mc_{name}.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["question", "choices", "label"])
            writer.writeheader()
            for r in rows[split]:
                answer = final_number(r["answer"])
                if answer is None:
                    continue
                wrong = set()
                while len(wrong) < 3:
                    candidate = answer + rng.choice([-1, 1]) * rng.randint(1, max(3, abs(answer) // 4))
                    if candidate != answer and (candidate >= 0 or answer < 0):
                        wrong.add(candidate)
                choices = [answer, *sorted(wrong)]
                rng.shuffle(choices)
                writer.writerow({"question": r["question"], "choices": json.dumps([str(c) for c in choices]),
                                 "label": choices.index(answer)})
    (out / "gsm8k-op.yaml").write_text(OP_SPEC)
    (out / "gsm8k-mc.yaml").write_text(MC_SPEC)
    return {"gsm8k-op": out / "gsm8k-op.yaml", "gsm8k-mc": out / "gsm8k-mc.yaml"}


def main() -> None:
    import os

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/user_tasks")
    parser.add_argument("--tasks", default="gsm8k-op,gsm8k-mc")
    args = parser.parse_args()
    data_dir = Path(os.environ.get("LISA_HUB_DATA_DIR", "../shared/data"))
    specs = build(Path(args.out), data_dir)
    import sdk

    results = {}
    for name in args.tasks.split(","):
        job = sdk.submit_adaptation(spec=specs[name], profile="quick")  # spec and data travel with the job
        print(f"{name}: job {job.id}", flush=True)
        result = job.wait(timeout=3600)
        results[name] = {**result.raw, "seconds": result.raw.get("seconds")}
    print("\n| task | metric | base | fresh backbone | general adapter | task adapter | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        m = r["metrics"]
        for metric in [k.removeprefix("adapter.") for k in m if k.startswith("adapter.")]:
            if metric in ("eval_examples", "answer_found"):
                continue
            cells = [m.get(f"{who}.{metric}") for who in ("base", "fresh", "init", "adapter")]
            print(f"| {name} | {metric} | " + " | ".join("" if c is None else f"{c:.4f}" for c in cells)
                  + f" | {r['seconds']} |")


if __name__ == "__main__":
    main()
