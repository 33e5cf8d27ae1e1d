"""Batch inference on Ray Data (sdk/batch.py) on the session's real Ray head: output lines in
input order, each line's adapter applied (the same text as Backbone.generate), bad lines
failing alone with their error."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.stack


def _lora_folder(path, seed):
    from adapters_hub.backbone import dense_plan, load_lisa_model
    from adapters_hub.kinds import get_kind

    lm, _ = load_lisa_model("tiny-llama", dense_plan("tiny-llama"))
    kind = get_kind("lora")
    kind.add(lm, "a", {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "o_proj"]})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return kind.save(lm, "a", path)


def test_batch_output_is_in_input_order_with_each_rows_adapter_and_bad_rows_fail_alone(ray_stack, tmp_path,
                                                                                        monkeypatch):
    import sdk

    monkeypatch.setenv("LISA_HUB_HOME", str(ray_stack[0]))  # the session's head, found as a user's would be
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    a, b = str(_lora_folder(tmp_path / "a", 1)), str(_lora_folder(tmp_path / "b", 2))
    prompts = ["Question: 2+3?\nAnswer:", "The cat sat on the", "Hi", "Once upon a time", "x", "Tell me"]
    lines = []
    for i, p in enumerate(prompts):
        lines.append(json.dumps({"prompt": p, "adapter": [a, b, ""][i % 3], "id": f"q{i}"}))
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"adapter": a}))  # no prompt
    lines.append(json.dumps({"prompt": "Hello", "adapter": str(tmp_path / "missing")}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")

    result = sdk.batch_generate(input=tmp_path / "in.jsonl", output=tmp_path / "out.jsonl", base_model="tiny-llama",
                                attention="dense", adapter_column="adapter", max_new_tokens=6, batch_size=3,
                                num_cpus=0.5)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in out] == list(range(len(lines))) and result.rows == len(lines)
    errors = {r["index"]: r["error"] for r in out if r["error"]}
    assert sorted(errors) == [2, 4, 8] and result.failed == 3
    assert "not JSON" in errors[2] and "'prompt'" in errors[4] and "missing" in errors[8]
    good = [r for r in out if not r["error"]]
    assert [r["id"] for r in good] == [f"q{i}" for i in range(len(prompts))]  # the input's own fields come along

    bb = sdk.Backbone.load(base_model="tiny-llama", attention="dense")
    expected = [bb.generate(r["prompt"], adapter=r["adapter"], max_new_tokens=6) if r["adapter"] else
                _bare(bb, r["prompt"]) for r in good]
    assert [r["completion"] for r in good] == expected
    for folder in (a, b):  # each adapter really acts: on some of its rows the bare backbone says something else
        mine = [r for r in good if r["adapter"] == folder]
        assert any(r["completion"] != _bare(bb, r["prompt"]) for r in mine), folder
    assert result.tokens > 0 and result.tokens_per_s > 0


def _bare(bb, prompt):
    with bb.bare():
        return bb.generate(prompt, max_new_tokens=6)
