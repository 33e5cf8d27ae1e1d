"""lm-evaluation-harness on lisa-hub models (tiny-llama, local task files): its numbers equal
our own evaluator's for the same metric, and a silently dropped adapter is an error."""

from __future__ import annotations

import json

import pytest
import torch

from adapters_hub import harness
from adapters_hub.backbone import dense_plan, load_lisa_model
from adapters_hub.kinds import get_kind
from adapters_hub.task_eval import generate, mc_accuracy
from tests.conftest import needs_data

pytestmark = pytest.mark.slow  # lm-eval builds its task index and environment report per run (~5-20 s)

ROWS = [{"question": f"Tom has {a} apples and buys {b} more. How many now?",
         "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in ((3, 4), (10, 5), (7, 8), (2, 9), (12, 1), (6, 6))]


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return harness.write_gsm8k_tasks(tmp_path / "tasks", data)


def _dense():
    lm, tok = load_lisa_model("tiny-llama", dense_plan("tiny-llama"))
    return lm.eval(), tok


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_multiple_choice_accuracy_equals_our_evaluator(task_dir):
    lm, tok = _dense()
    results = harness.evaluate(harness.HarnessLM(lm, tok), tasks=["lisa_gsm8k_mc"], include_path=task_dir)
    rows = [json.loads(line) for line in (task_dir / "gsm8k_mc.jsonl").read_text().splitlines()]
    ours = mc_accuracy(lm, tok, [f"Question: {r['question']}\nAnswer:" for r in rows],
                       [([" " + c for c in r["choices"]], r["label"]) for r in rows], batch_size=4, progress=False)
    assert results["lisa_gsm8k_mc"]["acc,none"] == pytest.approx(ours, abs=1e-9)
    assert all(len(r["choices"]) == 4 and r["choices"][r["label"]] == str(eval(row["answer"].split("=")[0]))
               for r, row in zip(rows, ROWS))


def test_generate_until_and_rolling_loglikelihood_match_plain_computations(task_dir):
    lm, tok = _dense()
    hlm = harness.HarnessLM(lm, tok, batch_size=3)
    prompts = [f"Question: {r['question']}\nAnswer:" for r in ROWS[:3]]
    got = hlm.generate_until(_instances("generate_until", [(p, {"until": ["\n\n"], "max_gen_toks": 12}) for p in prompts]))
    plain = generate(lm, tok, prompts, max_new_tokens=12, batch_size=3, stop=["\n\n"], progress=False)
    assert got == [t.split("\n\n")[0] for t in plain]
    text = "The quick brown fox jumps over the lazy dog."
    (rolled,) = hlm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    ids = torch.tensor([[tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
                        + tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=ids).logits.float(), -1)
    assert rolled == pytest.approx(float(logp[0, :-1].gather(1, ids[0, 1:, None]).sum()), rel=1e-5)
    # the generate task runs end to end through the harness too
    results = harness.evaluate(hlm, tasks=["lisa_gsm8k"], include_path=task_dir, limit=2)
    assert 0.0 <= results["lisa_gsm8k"]["exact_match,after-marker"] <= 1.0


def test_an_adapter_that_changes_nothing_is_refused_and_one_that_does_is_scored(tmp_path, task_dir):
    from sdk.hotswap import Backbone

    lm, tok = _dense()
    bb = Backbone(lm, tok, base_model="tiny-llama", attention="dense")
    kind = get_kind("lora")
    kind.add(lm, "zero", {"r": 2, "lora_alpha": 4})  # B = 0: no update at all
    kind.save(lm, "zero", tmp_path / "zero")
    kind.delete(lm, "zero")
    bb.use(str(tmp_path / "zero"))
    with pytest.raises(harness.AdapterHadNoEffectError, match="exactly as the bare backbone"):
        harness.evaluate(harness.HarnessLM(lm, tok, reference=bb.bare, name="zero"), tasks=["lisa_gsm8k_mc"],
                         include_path=task_dir)
    kind.add(lm, "real", {"r": 2, "lora_alpha": 4})
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B.real" in name:
                p.normal_(0, 0.1)
    kind.save(lm, "real", tmp_path / "real")
    kind.delete(lm, "real")
    bb.use(str(tmp_path / "real"))
    results = harness.evaluate(harness.HarnessLM(lm, tok, reference=bb.bare), tasks=["lisa_gsm8k_mc"],
                               include_path=task_dir)
    assert "acc,none" in results["lisa_gsm8k_mc"]
    ids = torch.tensor([[5, 9, 13]])
    with torch.no_grad():
        active = lm(input_ids=ids).logits
        with bb.bare():
            bare = lm(input_ids=ids).logits
    assert not torch.equal(active, bare) and torch.equal(lm(input_ids=ids).logits, active)  # bare() restores


@needs_data("gsm8k/test.jsonl")
def test_local_gsm8k_task_files_read_the_data_mirror(tmp_path):
    from adapters_hub import settings

    folder = harness.write_gsm8k_tasks(tmp_path, settings.data_dir() / "gsm8k" / "test.jsonl", n=16)
    rows = (folder / "gsm8k_mc.jsonl").read_text().splitlines()
    assert len(rows) == 16 and {"lisa_gsm8k.yaml", "lisa_gsm8k_mc.yaml"} <= {p.name for p in folder.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'answer'"):
        harness.write_gsm8k_tasks(tmp_path / "x", bad)
