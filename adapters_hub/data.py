"""Text corpora and task datasets: Hugging Face `datasets` (the real hub path) or an
offline mirror folder (LISA_HUB_DATA_DIR, layout of ../shared/data).

An explicitly set mirror that holds the file wins over the hub: runs are reproducible and
never wait on network time-outs. Without a mirror we go to the hub; when that fails too,
`DataUnavailableError` names both options.

  load_text("wikitext2")               -> str   (the test split, raw)
  trainable_text("wikitext2")          -> str   (the same without its held-out last 10%)
  load_task_rows("gsm8k", "train")     -> list[dict]  ({"question", "answer"})
  token_blocks(tokenizer, text, n_blocks=8, block_len=1024) -> LongTensor (n_blocks, block_len)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapters_hub import settings

if TYPE_CHECKING:
    import torch


class DataUnavailableError(LookupError):
    """Neither the offline mirror nor the Hugging Face hub could provide a dataset."""


@dataclass(frozen=True)
class Source:
    hf_path: str                # Hugging Face dataset id
    hf_config: str | None
    text_field: str             # column holding the text (corpora) or "" (task rows)
    mirror: dict[str, str]      # split -> file under LISA_HUB_DATA_DIR


CORPORA: dict[str, Source] = {
    "wikitext2": Source("Salesforce/wikitext", "wikitext-2-raw-v1", "text", {"test": "wikitext2/test.raw.txt"}),
    "tinyshakespeare": Source("karpathy/tiny_shakespeare", None, "text", {"train": "tinyshakespeare/input.txt"}),
}
TASK_DATA: dict[str, Source] = {
    "gsm8k": Source("openai/gsm8k", "main", "", {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}),
}


def load_text(name: str, split: str | None = None) -> str:
    """A whole text corpus as one string (WikiText-2 raw: lines joined as in the raw file)."""
    source = _lookup(CORPORA, name, "corpus")
    split = split or next(iter(source.mirror))
    mirror = _mirror_file(source, name, split)
    if mirror is not None:
        return mirror.read_text(encoding="utf-8")
    rows = _from_hub(source, name, split)
    return "".join(row[source.text_field] for row in rows)  # raw wikitext lines keep their "\n"


# The evaluation slice: the first 8 x 1024 tokens of a corpus, which perplexity numbers
# (eval-ppl, the conversion, the benchmarks) score. Calibration starts after it. Not the
# same thing as the held-out tail below, which nothing but a final evaluation reads.
EVAL_SLICE_TOKENS = 8 * 1024

# Corpora whose tail is held out: never trained, calibrated, tuned or selected on. The
# held-out part starts at the first line that begins at or after this fraction of the
# characters (WikiText-2 test: offset 1,157,338, the line " = = Equestrian = = ").
HELD_OUT_FRACTION = {"wikitext2": 0.1}


def held_out_start(name: str, text: str) -> int:
    """Character offset where the held-out tail of corpus `name` begins (len(text) if none)."""
    frac = HELD_OUT_FRACTION.get(name)
    if not frac:
        return len(text)
    cut = math.ceil((1.0 - frac) * len(text))
    if cut == 0 or text[cut - 1] == "\n":  # a line starts exactly at the cut
        return cut
    end_of_line = text.find("\n", cut)
    return len(text) if end_of_line < 0 else end_of_line + 1


def trainable_text(name: str, split: str | None = None) -> str:
    """`load_text` without the held-out tail: what training and calibration may read."""
    text = load_text(name, split)
    return text[: held_out_start(name, text)]


def held_out_text(name: str, split: str | None = None) -> str:
    """The held-out tail of a corpus: for evaluation only (`lisa-hub eval-ppl --data
    wikitext2-heldout`); nothing trains, calibrates or tunes on it."""
    text = load_text(name, split)
    tail = text[held_out_start(name, text):]
    if not tail:
        raise ValueError(f"{name}: has no held-out tail")
    return tail


# Texts `lisa-hub eval-ppl --data` scores: name -> (corpus, which part). "eval" is the head
# of the corpus (its first blocks: what the conversion reports), "held-out" its tail.
EVAL_TEXTS = {"wikitext2": ("wikitext2", "eval"), "wikitext2-heldout": ("wikitext2", "held-out"),
              "tinyshakespeare": ("tinyshakespeare", "eval")}


def eval_text(name: str) -> str:
    if name not in EVAL_TEXTS:
        raise ValueError(f"data: unknown {name!r}; known: {', '.join(EVAL_TEXTS)} (or --text FILE)")
    corpus, part = EVAL_TEXTS[name]
    return held_out_text(corpus) if part == "held-out" else load_text(corpus)


def load_task_rows(name: str, split: str) -> list[dict]:
    """The rows of a task dataset split, as plain dicts."""
    source = _lookup(TASK_DATA, name, "task dataset")
    mirror = _mirror_file(source, name, split)
    if mirror is not None:
        with mirror.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    return [dict(row) for row in _from_hub(source, name, split)]


def token_blocks(tokenizer, text: str, *, n_blocks: int, block_len: int) -> "torch.Tensor":
    """The first n_blocks * block_len tokens of `text`, as non-overlapping rows (no BOS)."""
    import torch

    need = n_blocks * block_len
    chars = need * 8  # tokenize a prefix only; grow it if it was too short
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise ValueError(f"text has {len(ids)} tokens, fewer than n_blocks * block_len = {need}")
    return torch.tensor(ids[:need], dtype=torch.long).view(n_blocks, block_len)


def _lookup(table: dict[str, Source], name: str, what: str) -> Source:
    if name not in table:
        raise KeyError(f"unknown {what} {name!r}; known: {', '.join(table)}")
    return table[name]


def _mirror_file(source: Source, name: str, split: str) -> Path | None:
    if split not in source.mirror:
        raise KeyError(f"{name}: no split {split!r}; known: {', '.join(source.mirror)}")
    root = settings.data_dir()
    if root is None:
        return None
    path = root / source.mirror[split]
    return path if path.is_file() else None


def _from_hub(source: Source, name: str, split: str):
    try:
        import datasets

        return datasets.load_dataset(source.hf_path, source.hf_config, split=split)
    except Exception as err:  # offline, unknown id, auth, ...: all mean "not available here"
        root = settings.data_dir()
        where = f"{root / source.mirror[split]} does not exist" if root else "LISA_HUB_DATA_DIR is not set"
        raise DataUnavailableError(
            f"dataset {name!r} ({split}) is not available: the Hugging Face hub failed "
            f"({err.__class__.__name__}: {str(err)[:200]}) and the offline mirror is unusable ({where}). "
            f"Set LISA_HUB_DATA_DIR to a folder holding {source.mirror[split]} (e.g. ../shared/data), "
            "or give this machine access to the hub."
        ) from err
