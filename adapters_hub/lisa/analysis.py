"""Cross-layer attention analysis: how close is each layer's attention to its predecessor's?

For every layer l >= 1 and calibration text, the Jensen-Shannon divergence (natural log,
max ln 2) between head i of layer l and head j of layer l-1, averaged over query positions:

    JS_l[i, j] = mean_t JS(A_l[i, t, :], A_{l-1}[j, t, :])          # (H, H) per layer
    raw_l[h]     = JS_l[h, h]                                       # heads compared by index
    perm_l       = Hungarian matching on JS_l (linear_sum_assignment) # perm_l[h]: donor head for head h
    aligned_l[h] = JS_l[h, perm_l[h]]

Memory is bounded: batches are processed one at a time and, within a forward pass, only the
previous layer's attention probabilities are held (an observer on every layer folds the
(H, H) divergences into running sums). Optional sensitivity: perplexity on the calibration
blocks when layer l alone uses aligned direct sharing (a fresh LiSA adapter), minus the base.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

REPORT_NAME = "report.json"
HEATMAP_NAME = "heatmap.png"


@dataclass
class AttentionReport:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    pair_js: np.ndarray                    # (L, H, H); layer 0 is NaN (no predecessor)
    n_texts: int = 0
    n_tokens: int = 0
    base: str | None = None
    fingerprint: str | None = None
    sensitivity: dict[int, float] | None = None  # layer -> ppl(layer l shared alone) - base ppl
    base_ppl: float | None = None
    drop_sensitivity: dict[int, float] | None = None  # layer -> ppl(layer l's attention dropped alone) - base ppl
    layer_types: list[str] | None = None   # per-layer attention kinds where the model mixes them (plan.attention_kinds)
    perm: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        from scipy.optimize import linear_sum_assignment

        self.pair_js = np.asarray(self.pair_js, dtype=np.float64)
        self.perm = [list(range(self.num_heads))]
        for l in range(1, self.num_layers):
            _, cols = linear_sum_assignment(self.pair_js[l])
            self.perm.append([int(c) for c in cols])

    # ---- derived numbers ----------------------------------------------------------
    @property
    def raw(self) -> np.ndarray:  # (L, H), divergence of head h to the predecessor's head h
        return np.stack([np.diagonal(m) for m in self.pair_js])

    @property
    def aligned(self) -> np.ndarray:  # (L, H), after the best permutation
        return np.stack([m[np.arange(self.num_heads), p] for m, p in zip(self.pair_js, self.perm)])

    @property
    def raw_mean(self) -> list[float]:
        return [float(x) for x in self.raw.mean(axis=1)]

    @property
    def aligned_mean(self) -> list[float]:
        return [float(x) for x in self.aligned.mean(axis=1)]

    def lines(self) -> list[str]:
        out = [f"{'layer':>5} {'raw JS':>8} {'aligned':>8} {'sens dppl':>9} {'drop dppl':>9}  perm"]
        for l in range(1, self.num_layers):
            cells = []
            for table in (self.sensitivity, self.drop_sensitivity):
                value = (table or {}).get(l)
                cells.append(f"{value:9.3f}" if value is not None else f"{'-':>9}")
            out.append(f"{l:5d} {self.raw_mean[l]:8.4f} {self.aligned_mean[l]:8.4f} {' '.join(cells)}  {self.perm[l]}")
        return out

    # ---- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def clean(a):  # NaN (layer 0) -> null
            return [None if (isinstance(x, float) and math.isnan(x)) else x for x in a]

        layers = []
        for l in range(1, self.num_layers):
            layers.append({"layer": l, "raw_mean": self.raw_mean[l], "aligned_mean": self.aligned_mean[l],
                           "raw_per_head": self.raw[l].tolist(), "aligned_per_head": self.aligned[l].tolist(),
                           "perm": self.perm[l], "pair_js": self.pair_js[l].tolist(),
                           "sensitivity_dppl": (self.sensitivity or {}).get(l),
                           "drop_sensitivity_dppl": (self.drop_sensitivity or {}).get(l)})
        return {"base": self.base, "fingerprint": self.fingerprint, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "n_texts": self.n_texts, "n_tokens": self.n_tokens, "base_ppl": self.base_ppl,
                "divergence": "Jensen-Shannon, natural log (max ln 2 = 0.693), mean over query positions",
                "layer_types": self.layer_types,
                "raw_mean": clean(self.raw_mean), "aligned_mean": clean(self.aligned_mean), "layers": layers}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttentionReport":
        h = data["num_heads"]
        pair = np.full((data["num_layers"], h, h), np.nan)
        sens, drop = {}, {}
        for entry in data["layers"]:
            pair[entry["layer"]] = np.asarray(entry["pair_js"])
            if entry.get("sensitivity_dppl") is not None:
                sens[entry["layer"]] = entry["sensitivity_dppl"]
            if entry.get("drop_sensitivity_dppl") is not None:
                drop[entry["layer"]] = entry["drop_sensitivity_dppl"]
        return cls(data["num_layers"], h, data["num_kv_heads"], data["head_dim"], pair, data["n_texts"],
                   data["n_tokens"], data.get("base"), data.get("fingerprint"), sens or None, data.get("base_ppl"),
                   drop or None, data.get("layer_types"))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / REPORT_NAME).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        self.heatmap(directory / HEATMAP_NAME)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "AttentionReport":
        path = Path(directory)
        path = path / REPORT_NAME if path.is_dir() else path
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def heatmap(self, path: str | Path) -> Path:
        """Three panels: layers x {raw, aligned} (annotated), then per-head raw and aligned."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = np.arange(1, self.num_layers)
        both = np.stack([np.asarray(self.raw_mean)[1:], np.asarray(self.aligned_mean)[1:]], axis=1)  # (L-1, 2)
        vmax = float(np.nanmax(self.raw[1:])) or 1.0
        height = max(4.0, 0.28 * len(rows) + 1.5)
        fig, axes = plt.subplots(1, 3, figsize=(4 + 0.35 * self.num_heads * 2 + 3, height),
                                 gridspec_kw={"width_ratios": [2, self.num_heads, self.num_heads]})
        panels = [(both, ["raw", "aligned"], "mean JS to layer l-1"),
                  (self.raw[1:], [str(h) for h in range(self.num_heads)], "per head, by index (raw)"),
                  (self.aligned[1:], [str(h) for h in range(self.num_heads)], "per head, after alignment")]
        for ax, (data, xlabels, title) in zip(axes, panels):
            im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_xticks(range(len(xlabels)), xlabels)
            ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.set_ylabel("layer l")
        for i in range(len(rows)):
            for j in range(2):
                axes[0].text(j, i, f"{both[i, j]:.2f}", ha="center", va="center", fontsize=6,
                             color="white" if both[i, j] < 0.6 * vmax else "black")
        fig.colorbar(im, ax=axes, shrink=0.6, label="Jensen-Shannon divergence (nats, max ln 2)")
        name = self.base or "model"
        fig.suptitle(f"{name}: attention of layer l vs layer l-1 ({self.n_texts} texts, {self.n_tokens} tokens)",
                     fontsize=10)
        path = Path(path)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path


# ---------------------------------------------------------------------------------------
class _Accumulator:
    """Observer on every layer: folds JS(layer l, layer l-1) of one batch into running sums."""

    def __init__(self, num_layers: int, num_heads: int) -> None:
        self.sums = np.zeros((num_layers, num_heads, num_heads))
        self.weight = np.zeros(num_layers)
        self.prev = None            # (B, H, Tq, Tk) probabilities of the previous layer
        self.prev_neg_ent = None    # (B, H, Tq): sum p log p
        self.row_weight = None      # (B, Tq): 1 for real query tokens

    def __call__(self, layer: int, probs, mask) -> None:
        import torch

        with torch.no_grad():
            probs = probs.detach().float()
            neg_ent = torch.special.xlogy(probs, probs).sum(-1)  # (B, H, Tq)
            if layer > 0 and self.prev is not None:
                w = self.row_weight  # (B, Tq)
                h = probs.shape[1]
                for i in range(h):  # one head of layer l against all heads of layer l-1
                    m = 0.5 * (probs[:, i : i + 1] + self.prev)                         # (B, H, Tq, Tk)
                    js = 0.5 * (neg_ent[:, i : i + 1] + self.prev_neg_ent) - torch.special.xlogy(m, m).sum(-1)
                    js = js.clamp_min(0.0)                                              # (B, H, Tq)
                    self.sums[layer, i] += (js * w[:, None]).sum(dim=(0, 2)).double().cpu().numpy()
                self.weight[layer] += float(w.sum())
            self.prev, self.prev_neg_ent = probs, neg_ent


def _batches(batches, batch_size: int):
    import torch

    if isinstance(batches, torch.Tensor):
        batches = [batches[i : i + batch_size] for i in range(0, len(batches), batch_size)]
    for b in batches:
        if isinstance(b, torch.Tensor):
            yield {"input_ids": b}
        else:
            yield dict(b)


def analyze_attention(
    model,
    batches: "Iterable | Any",
    *,
    batch_size: int = 1,
    sensitivity: bool = False,
    sensitivity_blocks=None,
    progress: bool = True,
    base: str | None = None,
) -> AttentionReport:
    """Measure adjacent-layer attention divergence of a HF LLaMA-family model.

    batches: a LongTensor (N, T) (split into `batch_size` rows) or an iterable of LongTensors
    or dicts with input_ids and optional attention_mask (padded query rows are ignored).
    sensitivity: also measure each layer's perplexity change under aligned direct sharing
    on `sensitivity_blocks` (default: the calibration tensor when one was given).
    """
    import torch
    from tqdm.auto import tqdm

    from adapters_hub.lisa.model import SharingPatch
    from adapters_hub.lisa.plan import SharingPlan, attention_kinds
    from adapters_hub.models import fingerprint

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    fp = fingerprint(model)
    acc = _Accumulator(n_layers, n_heads)
    device = next(model.parameters()).device
    empty = SharingPlan(n_layers, n_heads, head_dim)
    patch = SharingPatch(model, empty, score_all=True)
    patch.bus.observer = acc
    patch.bind_routes()  # the observer reads every layer's probabilities: the reference route
    n_texts = n_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(list(_batches(batches, batch_size)), desc="attention analysis", disable=not progress):
                ids = batch["input_ids"].to(device)
                am = batch.get("attention_mask")
                am = am.to(device) if am is not None else None
                acc.row_weight = (am.float() if am is not None else torch.ones(ids.shape, device=device))
                acc.prev = acc.prev_neg_ent = None
                model(input_ids=ids, attention_mask=am, use_cache=False)
                acc.prev = acc.prev_neg_ent = None  # free the last layer's probabilities
                n_texts += ids.shape[0]
                n_tokens += int(acc.row_weight.sum())
    finally:
        patch.bus.observer = None
        patch.restore()
        model.train(was_training)
    if n_texts == 0:
        raise ValueError("batches: no calibration text given")
    pair = acc.sums / np.maximum(acc.weight, 1e-9)[:, None, None]
    pair[0] = np.nan
    report = AttentionReport(n_layers, n_heads, cfg.num_key_value_heads, head_dim, pair, n_texts, n_tokens,
                             base=base or getattr(cfg, "lisa_hub_base", None), fingerprint=fp,
                             layer_types=attention_kinds(cfg))
    if sensitivity:
        blocks = sensitivity_blocks if sensitivity_blocks is not None else batches
        if not isinstance(blocks, torch.Tensor):
            raise ValueError("sensitivity_blocks: give a LongTensor (N, T) of calibration blocks")
        report.base_ppl, report.sensitivity = layer_sensitivity(model, report, blocks, progress=progress,
                                                                fingerprint=fp)
    return report


def layer_sensitivity(model, report: AttentionReport, blocks, *, progress: bool = True,
                      fingerprint: str | None = None, fit_blocks=None, fit_steps: int = 0,
                      fit_queries: int | None = None,
                      aligner: str = "linear") -> tuple[float, dict[int, float]]:
    """Perplexity change on `blocks` when layer l alone is substituted (donor l - 1, the
    report's head permutation; every `shareable_layers` l): with the fresh adapter (aligned direct sharing), or, with
    `fit_blocks` and `fit_steps`, after local initialisation of that layer on `fit_blocks`."""
    from adapters_hub.lisa.plan import SharingPlan, attention_kinds, shareable_layers

    def prepare(lm) -> None:
        if fit_steps:
            from adapters_hub.lisa.local_init import local_init

            local_init(lm, fit_blocks, steps=fit_steps, queries=fit_queries, log=None)

    layers = shareable_layers(report.num_layers, attention_kinds(model.config))  # the rest are never candidates
    plans = {l: SharingPlan.for_model(model, [l], perms={l: report.perm[l]}) for l in layers}
    return _one_layer_scan(model, blocks, plans, desc="layer sensitivity", progress=progress, aligner=aligner,
                           fingerprint=fingerprint, prepare=prepare)


def _one_layer_scan(model, blocks, plans: dict, *, desc: str, progress: bool, fingerprint: str | None,
                    aligner: str = "linear", prepare=None) -> tuple[float, dict[int, float]]:
    """(base perplexity, {layer: perplexity change}) with each of `plans` applied alone
    (and `prepare(lm)` run on it first); the model's requires_grad flags are kept."""
    from tqdm.auto import tqdm

    from adapters_hub.evaluation import perplexity
    from adapters_hub.lisa.config import LisaConfig
    from adapters_hub.lisa.model import LisaModel

    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    base_ppl = perplexity(model, blocks, progress=False)
    out: dict[int, float] = {}
    try:
        for l, plan in tqdm(plans.items(), desc=desc, disable=not progress):
            lm = LisaModel(model, LisaConfig(plan=plan, aligner=aligner), fingerprint=fingerprint or "analysis")
            try:
                if prepare is not None:
                    prepare(lm)
                out[l] = perplexity(lm, blocks, progress=False) - base_ppl
            finally:
                lm.unload()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, p.requires_grad))
    return base_ppl, out


def drop_sensitivity(model, blocks, *, progress: bool = True, fingerprint: str | None = None,
                     layers=None) -> tuple[float, dict[int, float]]:
    """Perplexity change on `blocks` when layer l's attention alone is dropped (a plan with
    `dropped=[l]`, the path a hybrid backbone runs; no training: a dropped branch has no
    tensors). `layers` default: every layer a plan may drop (not layer 0, not the first layer
    of an attention kind)."""
    from adapters_hub.lisa.plan import SharingPlan

    cfg = model.config
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    firsts = {types.index(kind) for kind in set(types)}
    layers = [l for l in range(1, cfg.num_hidden_layers) if l not in firsts] if layers is None else list(layers)
    plans = {l: SharingPlan.for_model(model, [], dropped=[l]) for l in layers}
    return _one_layer_scan(model, blocks, plans, desc="drop sensitivity", progress=progress, fingerprint=fingerprint)


def plan_figure(plan, report: AttentionReport, path: str | Path) -> Path:
    """Per layer: the plan's choice (keep / share / drop) and the two measured sensitivities
    (perplexity change with that layer alone shared, or alone dropped), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"keep": "#bbbbbb", "share": "#1f77b4", "drop": "#d62728"}
    layers = np.arange(plan.num_layers)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * plan.num_layers + 2), 3.6))
    for offset, table, label, hatch in ((-0.2, report.sensitivity, "shared alone", ""),
                                        (0.2, report.drop_sensitivity, "dropped alone", "//")):
        values = [max((table or {}).get(int(l), float("nan")), 1e-3) for l in layers]
        ax.bar(layers + offset, values, width=0.4, color=[colors[plan.choice(int(l))] for l in layers],
               hatch=hatch, edgecolor="black", linewidth=0.3, label=label)
    ax.set_yscale("log")
    ax.set_xticks(layers, [str(l) for l in layers], fontsize=7)
    ax.set_xlabel("layer (colour: the plan's choice; grey keep, blue share, red drop)")
    ax.set_ylabel("calibration perplexity change")
    ax.legend(fontsize=8)
    ax.set_title(plan.summary(report.num_kv_heads), fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
