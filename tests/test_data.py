"""Data loaders: the offline mirror, and a clear error when neither mirror nor hub works."""

from __future__ import annotations

import json

import pytest

from adapters_hub import data
from adapters_hub.models import byte_tokenizer
from tests.conftest import needs_data


@needs_data("gsm8k/test.jsonl", "wikitext2/test.raw.txt")
def test_shared_mirror_loads():
    rows = data.load_task_rows("gsm8k", "test")
    assert len(rows) == 1319 and "####" in rows[0]["answer"]
    text = data.load_text("wikitext2")
    assert text.lstrip().startswith("= Robert Boulter =")


def test_mirror_folder_layout(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    rows = [{"question": "1+1?", "answer": "2\n#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    (tmp_path / "gsm8k" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setenv("LISA_HUB_DATA_DIR", str(tmp_path))
    assert data.load_task_rows("gsm8k", "train") == rows


def test_neither_mirror_nor_hub_names_both_options(tmp_path, monkeypatch):
    monkeypatch.setenv("LISA_HUB_DATA_DIR", str(tmp_path))  # empty mirror
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the hub is unreachable here anyway; fail fast
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    # both libraries read the variables at import: tell the imported modules too
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(data.DataUnavailableError) as err:
        data.load_task_rows("gsm8k", "test")
    msg = str(err.value)
    assert "LISA_HUB_DATA_DIR" in msg and "gsm8k/test.jsonl" in msg and "hub" in msg


def test_unknown_names_are_listed():
    with pytest.raises(KeyError, match="unknown corpus 'wiki'.*wikitext2"):
        data.load_text("wiki")
    with pytest.raises(KeyError, match="no split 'dev'"):
        data.load_task_rows("gsm8k", "dev")


def test_token_blocks_shape_and_order():
    tok = byte_tokenizer()
    blocks = data.token_blocks(tok, "abcdefghij" * 10, n_blocks=3, block_len=7)
    assert blocks.shape == (3, 7)
    assert tok.decode(blocks.flatten()) == ("abcdefghij" * 10)[:21]
    with pytest.raises(ValueError, match="fewer than"):
        data.token_blocks(tok, "short", n_blocks=2, block_len=10)


@needs_data("wikitext2/test.raw.txt")
def test_trainable_text_stops_where_the_held_out_tenth_of_wikitext2_begins():
    text = data.load_text("wikitext2")
    usable = data.trainable_text("wikitext2")
    assert len(usable) == 1_157_338 and text.startswith(usable)  # the mirror README's offset
    assert text[len(usable):].startswith(" = = Equestrian = = ")


def test_held_out_start_is_a_line_start_at_or_after_the_cut():
    text = "a\n" * 50                                            # 100 characters
    assert data.held_out_start("wikitext2", text) == 90           # 90% = 90, a line start
    long_lines = "a" * 85 + "\n" + "b" * 10 + "\n" + "c" * 4     # 90% = 92, inside the b line
    assert data.held_out_start("wikitext2", long_lines) == 97     # -> the c line
    assert data.held_out_start("tinyshakespeare", text) == len(text)  # nothing held out
