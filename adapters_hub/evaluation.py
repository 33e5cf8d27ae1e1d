"""Model quality measurements shared by the CLI, the jobs and the benchmarks."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def perplexity(model, blocks: "torch.Tensor", *, batch_size: int = 1, progress: bool = True) -> float:
    """exp(mean next-token NLL) over the rows of `blocks` (n, T), each scored on its own."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress):
            ids = blocks[start : start + batch_size].to(device)  # (B, T)
            logits = model(input_ids=ids, use_cache=False).logits.float()  # (B, T, V)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum")
            total_nll += nll.item()
            total_tokens += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)
