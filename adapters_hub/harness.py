"""lm-evaluation-harness on lisa-hub models: a base, a LiSA backbone or an adapter on it.

    from adapters_hub import harness
    lm = harness.HarnessLM(bb.lm, bb.tokenizer, reference=bb.bare)      # lm_eval.api.model.LM
    results = harness.evaluate(lm, tasks=["lisa_gsm8k_mc"], include_path=folder, limit=64)
    results["lisa_gsm8k_mc"]["acc,none"]

`HarnessLM` answers the harness's three request types with the model as it is loaded (the
adapter active, the fast path on):

  loglikelihood          (context, continuation) -> (summed log p of the continuation tokens,
                         whether greedy decoding would produce them); the continuation's tokens
                         are found as TRL and our own evaluator find them (`answer_tokens`), so
                         multiple choice scores equal `task_eval.mc_accuracy`
  loglikelihood_rolling  a whole text's log-likelihood over disjoint windows of `max_length`
                         (lm-eval's own window helpers, as its HF model does)
  generate_until         greedy continuation cut at the request's `until` strings

A silently dropped adapter (lm-eval#2432: outputs identical to the base's) is an error, not
a result: with `reference` (a context manager that runs the bare backbone), the first
requests are scored with and without the adapter, and identical logits raise
`AdapterHadNoEffectError`.

`write_gsm8k_tasks(folder, data)` writes two task files over a local GSM8K JSONL (no hub):
`lisa_gsm8k` (generate, exact match of the number after "####") and `lisa_gsm8k_mc`
(multiple choice: the right answer among three wrong numbers).
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

from lm_eval.api.model import LM

PROMPT = "Question: {{question}}\nAnswer:"  # the gsm8k task spec's prompt, in lm-eval's jinja


class AdapterHadNoEffectError(RuntimeError):
    """The adapter leaves the model's outputs exactly as the bare backbone's."""


class HarnessLM(LM):
    """lm-eval's model interface over a (LisaModel or HF) causal LM and its tokenizer."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int = 1024,
                 reference: Callable[[], AbstractContextManager] | None = None, name: str = "adapter"):
        super().__init__()
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.reference, self.name = reference, name
        self.checked = reference is None
        self.prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    # -------------------------------------------------------------- request types

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from adapters_hub.task_eval import answer_tokens

        items = []
        for req in requests:
            context, continuation = req.args
            if context:
                ids, first = answer_tokens(self.tok, context, continuation)
            else:  # no context: the continuation is predicted from the prefix token
                ids = [self.prefix_token_id] + self.tok(continuation, add_special_tokens=False)["input_ids"]
                first = 1
            items.append((ids, first))
        self._check_adapter([ids for ids, _ in items[:4]])
        return self._score(items)

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval import utils

        out = []
        for req in requests:
            (text,) = req.args
            tokens = self.tok(text, add_special_tokens=False)["input_ids"]
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1))
            items = [(context + target, len(context)) for context, target in windows]
            self._check_adapter([ids for ids, _ in items[:1]])
            out.append(sum(logp for logp, _ in self._score(items)))
        return out

    def generate_until(self, requests) -> list[str]:
        from adapters_hub.task_eval import generate

        self._check_adapter([self.tok(r.args[0])["input_ids"][-self.max_length:] for r in requests[:4]])
        groups: dict[str, list[int]] = {}  # requests with the same settings decode together
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        texts: dict[int, str] = {}
        for key, indices in groups.items():
            kwargs = json.loads(key)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            outputs = generate(self.model, self.tok, [requests[i].args[0] for i in indices],
                               max_new_tokens=int(kwargs.get("max_gen_toks", 256)), batch_size=self.batch_size,
                               max_prompt_len=self.max_length, stop=until or None, progress=False)
            for i, text in zip(indices, outputs):
                for stop in until:  # the harness expects the text before the first stop string
                    text = text.split(stop)[0]
                texts[i] = text
        return [texts[i] for i in range(len(requests))]

    # -------------------------------------------------------------- internals

    def _score(self, items: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(summed log p of ids[first:], greedy?) per item, batched with right padding."""
        import torch

        device = next(self.model.parameters()).device
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        out: list[tuple[float, bool]] = []
        with torch.no_grad():
            for start in range(0, len(items), self.batch_size):
                batch = []
                for ids, first in items[start : start + self.batch_size]:
                    cut = max(0, len(ids) - self.max_length)  # keep the end: the continuation is there
                    batch.append((ids[cut:], max(1, first - cut)))
                width = max(len(ids) for ids, _ in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for i, (ids, _) in enumerate(batch):
                    input_ids[i, : len(ids)] = torch.tensor(ids)
                    attention[i, : len(ids)] = 1
                logits = self.model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                    use_cache=False).logits.float()
                logp = torch.log_softmax(logits, dim=-1)  # (B, T, V)
                for i, (ids, first) in enumerate(batch):
                    targets = torch.tensor(ids[first:], device=device)
                    rows = logp[i, first - 1 : len(ids) - 1]  # position t-1 predicts token t
                    total = float(rows.gather(1, targets[:, None]).sum())
                    out.append((total, bool((rows.argmax(-1) == targets).all())))
        return out

    def _check_adapter(self, sequences: list[list[int]]) -> None:
        """Once: the adapter must change the logits of these sequences (lm-eval#2432)."""
        if self.checked or not sequences:
            return
        import torch

        def logits():
            with torch.no_grad():
                return [self.model(input_ids=torch.tensor([s[-self.max_length:]]), use_cache=False).logits
                        for s in sequences]

        with_adapter = logits()
        with self.reference():
            without = logits()
        self.checked = True
        if all(torch.equal(a, b) for a, b in zip(with_adapter, without)):
            raise AdapterHadNoEffectError(
                f"{self.name}: the adapter leaves the logits of the first {len(sequences)} requests exactly as the "
                "bare backbone's (its updates are zero, or it was not applied); refusing to report a score "
                "that would be the base model's")


def evaluate(lm: HarnessLM, *, tasks: list[str], include_path: str | Path | None = None,
             limit: int | None = None, num_fewshot: int | None = None) -> dict[str, dict]:
    """lm-eval's `simple_evaluate` on `lm`: {task: {metric: value}}. Task names are lm-eval's
    (fetched from the hub by the harness) or those of the YAML files under `include_path`."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:  # only the local files when they hold every task: indexing lm-eval's own takes ~20 s
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    manager = manager or TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"tasks: {unknown} are not lm-eval tasks"
                         + (f" nor in {include_path}" if include_path else ""))
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          log_samples=False, bootstrap_iters=0)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
            for task, metrics in out["results"].items()}


# ----------------------------------------------------------------------------- local task files


def write_gsm8k_tasks(folder: str | Path, data: str | Path, *, n: int | None = None, seed: int = 0) -> Path:
    """Two lm-eval task files over a local GSM8K JSONL (`question`, `answer` ending in
    "#### N"): `lisa_gsm8k` (generate_until, exact match of N) and `lisa_gsm8k_mc` (the
    right N among three wrong ones, `choices` and `label` per row). `n`: the first n rows."""
    import random

    import yaml

    from adapters_hub.tasks.scoring import extract_number_after_marker

    folder, data = Path(folder), Path(data)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with data.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                number = extract_number_after_marker(row["answer"], "####")
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{data}:{line_no}: not a GSM8K row ({type(err).__name__}: {err})") from None
            if number is None:
                raise ValueError(f"{data}:{line_no}: field 'answer' has no '#### <number>'")
            rows.append({"question": row["question"], "answer": row["answer"], "number": number})
            if n and len(rows) == n:
                break
    rng = random.Random(seed)
    mc = folder / "gsm8k_mc.jsonl"
    with mc.open("w", encoding="utf-8") as fh:
        for row in rows:
            right = float(row["number"])
            wrong = sorted({_num(right * f + d) for f, d in ((1, 1), (1, -1), (2, 0), (1, 10), (0.5, 0))} - {_num(right)})
            options = [_num(right)] + rng.sample(wrong, 3)
            rng.shuffle(options)
            fh.write(json.dumps({"question": row["question"], "choices": options,
                                 "label": options.index(_num(right))}) + "\n")
    gen = folder / "gsm8k.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    local = {"dataset_path": "json", "test_split": "test", "doc_to_text": PROMPT}
    tasks = {
        "lisa_gsm8k": {
            **local, "dataset_kwargs": {"data_files": {"test": str(gen)}}, "output_type": "generate_until",
            "doc_to_target": "{{number}}",
            "generation_kwargs": {"until": ["\n\n", "\nQuestion:"], "max_gen_toks": 256, "do_sample": False},
            "filter_list": [{"name": "after-marker", "filter": [
                {"function": "regex", "regex_pattern": r"#### (\-?[0-9\.\,]+)"}, {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": False,
                             "regexes_to_ignore": [",", r"\$", r"\.$"]}]},
        "lisa_gsm8k_mc": {
            **local, "dataset_kwargs": {"data_files": {"test": str(mc)}}, "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}", "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
    }
    for name, task in tasks.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **task}, sort_keys=False), encoding="utf-8")
    return folder


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
