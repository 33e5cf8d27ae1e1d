"""Batch inference on Ray Data: a JSONL file of prompts through adapters, any mix per row.

    lisa-hub batch --input prompts.jsonl --output out.jsonl --adapter gsm8k
    lisa-hub batch --input prompts.jsonl --output out.jsonl --adapter-column adapter --actors 2

    import sdk
    r = sdk.batch_generate(input="prompts.jsonl", output="out.jsonl", adapter_column="adapter")
    r.rows, r.failed, r.tokens_per_s

Input: one JSON object per line with a `prompt` (`prompt_column`) and, with
`adapter_column`, the adapter of that row (a task name, a registry reference or an adapter
folder; empty or missing = `adapter`, else the bare backbone). Output: one line per
non-blank input line, in input order (`index`: its 0-based line number): {"index", "prompt", "adapter", "completion", "finish_reason", "error"}
plus the input's other fields. A line that is not JSON, has no prompt, or names an adapter
that does not resolve fails alone (its `error` says why); the others are unaffected.

The pipeline: the driver reads and checks the lines, `ray.data.from_items` spreads them,
`map_batches` runs them on a pool of actors (`actors`, each loading one backbone as serving
does, `Backbone.load`) where a batch's rows decode together whatever their adapters (the
serving decode loop, sdk/decode.py), and the results stream back in input order to the
output file. Progress shows in the Ray dashboard (Jobs -> the driver -> Ray Data) and on
the terminal. It runs on the local stack or any cluster `RAY_ADDRESS` names.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BatchResult:
    output: Path
    rows: int            # lines written (= input lines)
    failed: int          # lines with an error
    tokens: int          # generated tokens
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def batch_generate(*, input: str | Path, output: str | Path, base_model: str = "smollm2-135m",
                   attention: str = "lisa", plan_path: str | Path | None = None, adapter: str | None = None,
                   adapter_column: str | None = None, prompt_column: str = "prompt", max_new_tokens: int = 64,
                   batch_size: int = 16, actors: int = 1, num_cpus: float = 1.0,
                   tracking_uri: str | None = None) -> BatchResult:
    """Generate a completion for every line of `input` into `output` (same order), greedy.

    >>> r = batch_generate(input="prompts.jsonl", output="out.jsonl", adapter="gsm8k")  # doctest: +SKIP
    >>> r.rows, r.failed  # doctest: +SKIP
    (1000, 0)
    """
    import ray

    from adapters_hub import settings
    from jobs.runtime import connect
    from sdk.client import resolve_address

    start = time.perf_counter()
    input, output = Path(input), Path(output)
    if not input.is_file():
        raise FileNotFoundError(f"input: {input} does not exist")
    if batch_size < 1 or actors < 1 or max_new_tokens < 1:
        raise ValueError("batch_size, actors and max_new_tokens must be >= 1")
    items = read_rows(input, prompt_column=prompt_column, adapter_column=adapter_column, adapter=adapter)
    if not items:
        raise ValueError(f"input: {input} has no lines")
    resolve_address()  # the local stack (started when nothing runs) or RAY_ADDRESS
    connect()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output lines in input order
    uri = tracking_uri or settings.mlflow_uri()
    ds = ray.data.from_items(items).map_batches(
        Generate, fn_constructor_kwargs={"base_model": base_model, "attention": attention,
                                         "plan_path": str(plan_path) if plan_path else None, "tracking_uri": uri,
                                         "max_new_tokens": max_new_tokens},
        batch_size=batch_size, concurrency=actors, num_cpus=num_cpus, batch_format="pandas")
    output.parent.mkdir(parents=True, exist_ok=True)
    failed = tokens = written = 0
    tmp = output.with_name(output.name + ".partial")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in ds.iter_rows():
            row = {k: _plain(v) for k, v in row.items() if k != "_extra"} | json.loads(row["_extra"])
            failed += bool(row["error"])
            tokens += int(row.pop("tokens") or 0)
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            written += 1
    tmp.replace(output)  # a crash leaves no half-written output under the final name
    return BatchResult(output, written, failed, tokens, round(time.perf_counter() - start, 2))


def read_rows(path: Path, *, prompt_column: str, adapter_column: str | None, adapter: str | None) -> list[dict]:
    """The input lines as pipeline rows; a bad line becomes a row with its error set."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for index, line in enumerate(fh):
            if not line.strip():
                continue
            row = {"index": index, "prompt": "", "adapter": adapter or "", "error": "", "_extra": "{}"}
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                row["error"] = f"{path}:{index + 1}: not JSON ({err.msg})"
                rows.append(row)
                continue
            if not isinstance(data, dict):
                row["error"] = f"{path}:{index + 1}: a line must be a JSON object"
            elif not isinstance(data.get(prompt_column), str) or not data[prompt_column]:
                row["error"] = f"{path}:{index + 1}: field {prompt_column!r} must be a non-empty string"
            else:
                row["prompt"] = data[prompt_column]
                if adapter_column and data.get(adapter_column):
                    row["adapter"] = str(data[adapter_column])
                extra = {k: v for k, v in data.items() if k not in (prompt_column, "index", "prompt", "adapter",
                                                                    "completion", "finish_reason", "error")}
                row["_extra"] = json.dumps(extra)
            rows.append(row)
    return rows


class Generate:
    """A Ray Data actor: one backbone; each batch's rows decode together, one adapter per row."""

    def __init__(self, *, base_model: str, attention: str, plan_path: str | None, tracking_uri: str,
                 max_new_tokens: int):
        from sdk.hotswap import Backbone

        self.bb = Backbone.load(base_model=base_model, plan_path=plan_path, attention=attention,
                                tracking_uri=tracking_uri, max_resident=8)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch):
        from adapters_hub.kinds import get_kind
        from sdk.decode import Row, decode_rows

        bb, rows, names = self.bb, [], {}
        batch = batch.copy()
        batch["completion"], batch["finish_reason"], batch["tokens"] = "", "", 0
        errors = list(batch["error"])
        for i, (prompt, ref) in enumerate(zip(batch["prompt"], batch["adapter"])):
            if errors[i]:
                continue
            try:
                if ref and ref not in names:  # resolve once per batch; an unknown adapter fails its rows only
                    folder, key = bb.resolve(ref)
                    kind = bb.kind_of(folder, key)
                    if not get_kind(kind).batches_per_row:
                        raise ValueError(f"a {kind} adapter does not decode row by row")
                    names[ref] = bb.load_resolved(folder, key, keep=list(names.values()))[1]
                name = names[ref] if ref else bb.base_adapter
            except Exception as err:
                errors[i] = f"adapter {ref!r}: {type(err).__name__}: {err}"
                continue
            row = Row(prompt_ids=bb.tokenizer(prompt).input_ids, adapter_name=name, max_new_tokens=self.max_new_tokens)
            row.index = i
            rows.append(row)
        try:
            decode_rows(bb.lm, bb.tokenizer, rows)
        except Exception:  # one row broke the batch: decode them one by one, so it fails alone
            for row in rows:
                row.tokens, row.text, row.emitted, row.finish_reason = [], "", 0, None
                try:
                    decode_rows(bb.lm, bb.tokenizer, [row])
                except Exception as err:
                    errors[row.index] = f"generation failed: {type(err).__name__}: {err}"
        for row in rows:
            batch.at[batch.index[row.index], "completion"] = row.text
            batch.at[batch.index[row.index], "finish_reason"] = row.finish_reason
            batch.at[batch.index[row.index], "tokens"] = len(row.tokens)
        batch["error"] = errors
        return batch


def _plain(value):
    """numpy scalars to Python (json)."""
    return value.item() if hasattr(value, "item") else value
