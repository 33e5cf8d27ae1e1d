"""GPU checks (`pytest -m gpu`, run by scripts/gpu_check.sh on a lent GPU; skipped without
CUDA): the fast path equals the reference path on the GPU, in fp32 and bf16, and merged
healing equals the unmerged model there."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 6e-2)])
def test_fast_path_equals_reference_on_the_gpu(tiny, dtype, tol):
    from tests.test_lisa_model import make, padded_batch, randomize

    lm = make(tiny)
    randomize(lm, scale=0.1)
    lm.to("cuda", dtype)
    lm.eval()
    _, ids, mask = padded_batch([16, 9])
    ids, mask = ids.cuda(), mask.cuda()
    out = {}
    for fast in (False, True):
        lm.fast_path = fast
        with torch.no_grad():
            out[fast] = lm(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    assert (out[True] - out[False])[real].abs().max() < tol


def test_merged_healing_equals_unmerged_on_the_gpu(tiny, tmp_path):
    from adapters_hub.lisa import LisaConfig, LisaModel, healing
    from tests.test_healing import randomize_healing
    from tests.test_lisa_model import make

    lm = make(tiny)
    healing.attach(lm.model, healing.HealingConfig(rank=4), shared_layers=lm.plan.layers)
    randomize_healing(lm.model)
    lm.save_adapter(tmp_path / "adapter")
    folder = healing.save(lm.model, tmp_path / "healing")
    lm.to("cuda").eval()
    ids = torch.randint(3, 259, (2, 20), device="cuda")
    with torch.no_grad():
        want = lm(input_ids=ids).logits
    served = copy.deepcopy(tiny[0]).cuda()
    healing.merge(served, folder)
    slm = LisaModel(served, LisaConfig(plan=lm.plan), fingerprint=lm.base_fingerprint)
    slm.load_adapter(tmp_path / "adapter", "general", activate=True)
    slm.eval()
    with torch.no_grad():
        assert (slm(input_ids=ids).logits - want).abs().max() < 1e-3
