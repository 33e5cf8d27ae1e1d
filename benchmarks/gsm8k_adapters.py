"""GSM8K task adapters side by side: same data, steps and questions, one table.

    LISA_HUB_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/gsm8k_adapters.py \
        --backbone runs/convert-bench/fraction-0.6 [--only lisa-only,lisa-parts-r5] [--eval-examples 64]

Rows: the untouched base; dense LoRA (r=8 on q/v, the usual baseline; r=20 on q/v and r=5 on
o/v/MLP, both at the LiSA adapter's size); on the LiSA backbone (`--backbone`: a converted
backbone folder with plan.json, adapter/ and healing/) its general adapter, the LiSA-only task
adapter, and task adapters with LoRA parts. Each adapter trains in this process with the
adaptation job's own pieces (`jobs.adapt.prepare_adapter`, `jobs.trainer`: TRL SFT, the
task's `quick` profile) and is scored by the job's evaluator (answer NLL and accuracy on the
first `--eval-examples` test questions). Results go to `--out` (JSON) as they come, so an
interrupted run keeps what it measured; `--only` reruns some rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

# name -> (backbone, kind, profile overrides)
CONFIGS = {
    "lora-dense-r8-qv": ("dense", "lora", {}),
    "lora-dense-r20-qv": ("dense", "lora", {"lora_rank": 20}),
    "lora-dense-r5-ovmlp": ("dense", "lora", {"lora_rank": 5, "lora_targets": ["o_proj", "v_proj", "mlp"]}),
    "lisa-only": ("lisa", "lisa", {"lora_rank": 0}),
    "lisa-parts-r5": ("lisa", "lisa", {"lora_rank": 5, "lisa_tensors": "aligner"}),
    "lisa-all-parts-r4": ("lisa", "lisa", {"lora_rank": 4}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--backbone", required=True, help="converted backbone folder (plan.json, adapter/, healing/)")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--eval-examples", type=int, default=64)
    ap.add_argument("--only", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--out", default="runs/gsm8k-adapters.json")
    args = ap.parse_args()

    import torch

    from adapters_hub.backbone import dense_plan, load_lisa_model
    from adapters_hub.lisa.plan import SharingPlan
    from adapters_hub.models import load_base
    from adapters_hub.tasks import load_rows, load_task
    from adapters_hub.task_eval import evaluate_task

    torch.set_num_threads(max(1, torch.get_num_threads()))
    task = load_task("gsm8k")
    profile = task.profile_with(args.profile, {"eval_examples": args.eval_examples})
    train_rows, eval_rows = load_rows(task, "train", profile), load_rows(task, "eval", profile)
    folder = Path(args.backbone)
    plan = SharingPlan.load(folder / "plan.json")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    wanted = [n for n in args.only.split(",") if n] or list(CONFIGS)

    def save(name: str, row: dict) -> None:
        results[name] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"[gsm8k] {name}: {row}", flush=True)

    def score(model, tok) -> dict:
        m = evaluate_task(model, tok, task, eval_rows, profile=profile)
        return {"answer_nll": round(float(m["answer_nll"]), 4), "accuracy": round(float(m["accuracy"]), 4)}

    def backbone(kind: str):
        if kind == "dense":
            return load_lisa_model(args.base, dense_plan(args.base))
        healing = folder / "healing" if (folder / "healing").is_dir() else None
        return load_lisa_model(args.base, plan, general_adapter=folder / "adapter", healing=healing)

    if "base" not in results:
        model, tok = load_base(args.base)
        save("base", score(model, tok))
    if "lisa-backbone" not in results:
        lm, tok = backbone("lisa")
        save("lisa-backbone", score(lm, tok))
    for name in wanted:
        kind_of_backbone, kind_name, overrides = CONFIGS[name]
        save(name, train_and_score(name, backbone(kind_of_backbone), kind_name, task, profile, overrides,
                                   train_rows, str(folder / "adapter") if kind_of_backbone == "lisa" else None,
                                   score))
    print_table(results, args.eval_examples)


def train_and_score(name, loaded, kind_name, task, profile, overrides, train_rows, init_from, score) -> dict:
    from datasets import Dataset

    from adapters_hub.kinds import get_kind
    from adapters_hub.task_eval import sft_examples
    from jobs.adapt import prepare_adapter
    from jobs.trainer import AdapterSFTTrainer, sft_config

    lm, tok = loaded
    p = {**profile.model_dump(), **overrides}
    p["save_steps"] = p["max_steps"]  # one checkpoint, at the end
    kind = get_kind(kind_name)
    trainable = prepare_adapter(lm, kind, name, p, init_from=init_from)
    print(f"[gsm8k] {name}: {trainable:,} trainable parameters", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gsm8k-bench-") as work:
        trainer = AdapterSFTTrainer(model=lm, args=sft_config(p, Path(work)),
                                    train_dataset=Dataset.from_list(sft_examples(task, train_rows)),
                                    processing_class=tok, lisa_model=lm, adapter_kind=kind, adapter_name=name)
        result = trainer.train()
    minutes = (time.perf_counter() - t0) / 60
    lm.eval()
    return {"trainable": trainable, "train_minutes": round(minutes, 2), "final_loss": round(result.training_loss, 4),
            **score(lm, tok)}


def print_table(results: dict, questions: int) -> None:
    print("\n| | trainable | answer NLL | accuracy | train minutes |\n|---|---|---|---|---|")
    for name, r in results.items():
        trainable = f"{r['trainable']:,}" if "trainable" in r else ""
        acc = f"{round(r['accuracy'] * questions)}/{questions}"
        print(f"| {name} | {trainable} | {r['answer_nll']:.3f} | {acc} | {r.get('train_minutes', '')} |")


if __name__ == "__main__":
    main()
