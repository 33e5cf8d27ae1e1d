"""Attention distillation: a regulariser pulling each substituted layer's attention towards
the attention the original layer would compute on the same input.

    with distillation(lisa_model) as d:
        out = lisa_model(input_ids=ids, attention_mask=am, labels=labels)
        loss = out.loss + beta * d.loss()

For every substituted layer the teacher is softmax(Q K^T / sqrt(d) + mask) with the layer's
own frozen W_q/W_k (so it must run before `prune_qk`), the student is the LiSA attention,
and the term is KL(teacher || student) averaged over batch, heads and query positions.
`d.loss()` is the mean over layers of the terms of the last forward pass.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from adapters_hub.lisa.scores import DistillCollector


class AttentionDistiller:
    def __init__(self, collector: DistillCollector) -> None:
        self._collector = collector

    def loss(self) -> torch.Tensor:
        terms = self._collector.terms
        if not terms:
            raise RuntimeError("distillation: no terms collected; run a forward pass with an active adapter "
                               "inside the `with distillation(...)` block first")
        return torch.stack(terms).mean()

    def per_layer(self) -> list[float]:
        return [float(t.detach()) for t in self._collector.terms]


@contextlib.contextmanager
def distillation(lisa_model) -> Iterator[AttentionDistiller]:
    if getattr(lisa_model, "pruned", False):
        raise RuntimeError("distillation: W_q/W_k of the substituted layers were pruned (prune_qk); "
                           "distil before pruning")
    bus = lisa_model.bus
    if bus.distill is not None:
        raise RuntimeError("distillation: already active on this model")
    bus.distill = DistillCollector()
    lisa_model.bind_routes()  # the collector reads Z: every layer on the reference route
    try:
        yield AttentionDistiller(bus.distill)
    finally:
        bus.distill = None
        lisa_model.bind_routes()
