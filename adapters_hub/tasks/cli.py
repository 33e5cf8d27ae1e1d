"""`lisa-hub task init | check`: start a task of one's own from a data file, and check it.

  lisa-hub task init tickets --data tickets.csv            # writes tickets.yaml beside the data
  lisa-hub task check tickets.yaml                         # spec + every row; 3 rendered examples
  lisa-hub submit --spec tickets.yaml --profile quick      # then train it on the cluster
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

MAX_LABELS = 20  # a column with at most this many distinct values (and repeats) is a label

PROFILES = """\
profiles:
  smoke:
    description: seconds on CPU, for trying the spec end to end
    default_base: tiny-llama
    max_steps: 2
    train_examples: 8
    eval_examples: 4
    batch_size: 2
    eval_batch_size: 4
    grad_accum: 1
    lr: 1.0e-3
    max_seq_len: 256
    num_workers: 1
    use_gpu: false
    distill_beta: 0.0
    save_steps: 0
  quick:
    description: about 10 minutes on a CPU with SmolLM2-135M
    default_base: smollm2-135m
    max_steps: 50
    train_examples: 200
    eval_examples: 64
    batch_size: 4
    eval_batch_size: 16
    grad_accum: 1
    lr: 1.0e-3
    max_seq_len: 256
    num_workers: 1
    use_gpu: false
    distill_beta: 0.0
    save_steps: 0
"""


def add_commands(sub) -> None:
    p = sub.add_parser("task", help="a task of your own: init a spec from data, check it")
    task_sub = p.add_subparsers(dest="task_command", required=True, metavar="ACTION")
    q = task_sub.add_parser("init", help="write a starter spec from a data file's columns")
    q.add_argument("name", help="task name (lower-case letters, digits, '-', '_')")
    q.add_argument("--data", required=True, help="training data: .jsonl, .csv or .parquet")
    q.add_argument("--eval-data", default=None, help="evaluation data (default: 10%% of --data, seeded)")
    q.add_argument("--out", default=None, help="spec file to write (default: NAME.yaml beside the data)")
    q.set_defaults(func=_init)
    q = task_sub.add_parser("check", help="validate a spec and its data; print three rendered examples")
    q.add_argument("spec", help="the task spec YAML")
    q.add_argument("--profile", default=None, help="whose default_base tokenizes the examples (default: the first)")
    q.set_defaults(func=_check)


def starter_spec(name: str, rows: list[dict], *, data: str, eval_data: str | None) -> str:
    """A spec for rows with these columns: classification (text + a label column),
    multiple choice (a list column + its answer), else prompt -> answer (exact match)."""
    from adapters_hub.tasks import TASK_NAME

    if not TASK_NAME.match(name):
        raise ValueError(f"task name {name!r}: lower-case letters, digits, '_' and '-'")
    columns = [c for c in rows[0] if c != "_where"]
    lists = [c for c in columns if all(isinstance(r.get(c), list) for r in rows)]
    # at most one label column: the one with the fewest distinct values
    labelish = sorted((c for c in columns if c not in lists and _is_label(rows, c)),
                      key=lambda c: len({str(r.get(c)) for r in rows}))[:1]
    texts = [c for c in columns if c not in lists and c not in labelish]
    if not texts:
        raise ValueError(f"{data}: no text column to build a prompt from (columns: {columns})")
    prompt_col = next((c for c in ("question", "prompt", "text", "input", "instruction") if c in texts), texts[0])
    split = f"  eval: {eval_data}\n" if eval_data else "  eval_fraction: 0.1          # seeded, stable split\n"
    head = f"name: {name}\ndescription: {name} (from {Path(data).name})\n\n" \
           f"dataset:\n  loader: files\n  train: {data}\n{split}\n"
    if lists:  # multiple choice
        target = next((c for c in labelish + texts if c != prompt_col), None)
        if target is None:
            raise ValueError(f"{data}: a choices column {lists[0]!r} but no answer column")
        return head + (f"format:\n  prompt: \"{{{prompt_col}}}\\nAnswer:\"\n  choices_field: {lists[0]}\n"
                       f"  target_field: {target}         # index of the right choice, or its text\n\n"
                       "extraction:\n  kind: none\n\nmetrics: [mc_accuracy]\nmain_metric: mc_accuracy\n"
                       "direction: higher\n\ngeneration:\n  max_new_tokens: 16\n\n" + PROFILES)
    if labelish:  # classification
        label = labelish[-1]
        values = sorted({str(r[label]) for r in rows})
        return head + (f"format:\n  prompt: \"{{{prompt_col}}}\\nLabel:\"\n  answer: \" {{{label}}}\"\n"
                       f"  target_field: {label}\n\nextraction:\n  kind: label\n  labels: {values}\n\n"
                       "metrics: [accuracy, macro_f1, answer_nll]\nmain_metric: accuracy\ndirection: higher\n"
                       "tie_breaker: answer_nll\n\ngeneration:\n  max_new_tokens: 8\n  stop: [\"\\n\"]\n\n" + PROFILES)
    answer_col = next((c for c in ("answer", "completion", "output", "response") if c in texts and c != prompt_col),
                      texts[-1] if len(texts) > 1 else None)
    if answer_col is None:
        raise ValueError(f"{data}: one text column only ({prompt_col!r}); a task needs a prompt and an answer")
    return head + (f"format:\n  prompt: \"{{{prompt_col}}}\\nAnswer:\"\n  answer: \" {{{answer_col}}}\"\n"
                   f"  target_field: {answer_col}\n\nextraction:\n  kind: exact      # first line, normalised\n\n"
                   "metrics: [accuracy, answer_nll]\nmain_metric: accuracy\ndirection: higher\n"
                   "tie_breaker: answer_nll\n\ngeneration:\n  max_new_tokens: 64\n  stop: [\"\\n\"]\n\n" + PROFILES)


def _is_label(rows: list[dict], column: str) -> bool:
    values = Counter(str(r.get(column)) for r in rows)
    return len(values) <= MAX_LABELS and len(values) < len(rows) and all(len(v) <= 40 for v in values)


def _init(args: argparse.Namespace) -> int:
    from adapters_hub.tasks import load_task_file
    from adapters_hub.tasks.sources import read_file

    data = Path(args.data).expanduser()
    rows = read_file(data)
    if not rows:
        raise ValueError(f"{data}: no rows")
    out = Path(args.out) if args.out else data.with_name(f"{args.name}.yaml")
    if out.exists():
        raise ValueError(f"{out} exists; pass --out to write elsewhere")
    text = starter_spec(args.name, rows[:500], data=_relative(data, out),
                        eval_data=_relative(args.eval_data, out) if args.eval_data else None)
    header = (f"# Task {args.name}: written by `lisa-hub task init` from {data.name}; edit it, then\n"
              f"#   lisa-hub task check {out.name}\n#   lisa-hub submit --spec {out.name} --profile quick\n")
    out.write_text(header + text)
    load_task_file(out)  # what we wrote must validate
    print(f"wrote {out}")
    return 0


def _relative(path, spec_file: Path) -> str:
    """`path` as the spec names it: relative to the spec's folder, which must hold it."""
    try:
        return Path(path).expanduser().resolve().relative_to(spec_file.parent.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"{spec_file}: the data {path} must be in the spec's folder or below it "
                         "(a job carries that folder)") from None


def _check(args: argparse.Namespace) -> int:
    from adapters_hub.models import load_tokenizer
    from adapters_hub.tasks import DataLoader, load_task_file
    from adapters_hub.tasks.sources import read_rows

    spec = load_task_file(args.spec)
    profile = spec.profile(args.profile or next(iter(spec.profiles)))
    if spec.dataset.loader in (DataLoader.files, DataLoader.hf):
        train, evaluation = read_rows(spec, "train"), read_rows(spec, "eval")  # every row checked
    else:
        from adapters_hub.tasks import load_rows

        train, evaluation = load_rows(spec, "train", profile), load_rows(spec, "eval", profile)
    print(f"{spec.source_file}: task {spec.name!r} is valid; {len(train)} train rows, {len(evaluation)} eval rows; "
          f"main metric {spec.main_metric.value} ({spec.direction} is better)")
    tok = load_tokenizer(profile.default_base)
    for i, row in enumerate(train[:3], 1):
        prompt, completion = spec.prompt(row, tok), spec.completion(row)  # chat: the template renders the prompt
        n_prompt = len(tok(prompt)["input_ids"])
        n_all = len(tok(prompt + completion)["input_ids"])
        print(f"--- example {i} ({row.get('_where', '')}): {n_prompt} prompt + {n_all - n_prompt} answer tokens "
              f"({profile.default_base} tokenizer)")
        print(f"{prompt}{completion}")
    return 0
