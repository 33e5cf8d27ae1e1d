"""Hot-swapping adapters on one loaded shared-attention backbone.

    from sdk import Backbone
    bb = Backbone.load(base_model="smollm2-135m")      # base + registered plan, loaded once
    bb.use("gsm8k")                                    # = gsm8k-lisa@champion, from MLflow
    print(bb.generate("Question: 2+3?\\nAnswer:"))
    bb.generate(["q1", "q2"], adapter=["gsm8k", "wikitext2"])   # one adapter per prompt, one batch

Adapters are resolved through the registry (aliases re-checked on every `use`, so a new
`champion` is picked up), downloaded once into a verified local cache, and kept resident
in a bounded LRU pool. A refused adapter (other base, other plan, corrupted) leaves the
active adapter as it was.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEFAULT_KIND = "lisa"


@dataclass(frozen=True)
class ActiveAdapter:
    ref: str          # what the caller asked for
    key: str          # resolved identity: "gsm8k-lisa/3" or an absolute folder path
    kind: str
    name: str         # adapter name inside the backbone
    seconds: float    # time `use` took (resolve + load + activate)


class Backbone:
    """One base model turned into its LiSA backbone, serving many adapters."""

    def __init__(self, lm, tokenizer, *, base_model: str, max_resident: int = 4, tracking_uri: str | None = None,
                 allow_local_folders: bool = True, attention: str = "lisa"):
        self.lm, self.tokenizer, self.base_model = lm, tokenizer, base_model
        self.attention = attention  # "lisa" | "dense": which adapters a bare task name means
        self.max_resident = max_resident
        self.tracking_uri = tracking_uri
        self.allow_local_folders = allow_local_folders  # False: registry references only (serving over HTTP)
        self._resident: OrderedDict[str, tuple[str, str]] = OrderedDict()  # key -> (kind, name)
        self.pinned: set[str] = set()   # resolved keys never evicted
        self.active: ActiveAdapter | None = None
        self.base_adapter: str | None = getattr(lm, "active_adapter", None)  # the bare backbone's own adapter
        self.on_event: "Callable[[str, str], None] | None" = None  # ("load" | "evict", key), e.g. for metrics

    @classmethod
    def load(cls, *, base_model: str = "smollm2-135m", plan_path: str | Path | None = None,
             max_resident: int = 4, tracking_uri: str | None = None, dtype: str | None = None,
             prune: bool = True, attention: str = "lisa") -> "Backbone":
        """Load `base_model` as its registered backbone (`backbone-<base>@champion`: the
        sharing plan and, for a converted backbone, its healing, merged into the weights, and
        its general adapter, active until an adapter is used), or with the plan in
        `plan_path` (a backbone folder or plan.json).

        `prune` (default) drops W_q/W_k of the substituted layers: the memory LiSA saves.
        `dtype` ("bfloat16", "float16"; default float32) halves weights and KV cache.
        `attention="dense"`: the unmodified base, serving the `lora` adapters trained on it
        (`<task>-lora-dense`; a bare task name means that one), many at once, row by row.

        >>> bb = Backbone.load(base_model="tiny-llama", plan_path="plan.json")  # doctest: +SKIP
        >>> bb.memory_report()["kv_bytes_per_token"]  # doctest: +SKIP
        """
        from adapters_hub.backbone import (ATTENTIONS, dense_plan, load_backbone, load_lisa_model,
                                           registered_backbone_folder)
        from adapters_hub.lisa.plan import SharingPlan

        if attention not in ATTENTIONS:
            raise ValueError(f"attention: {attention!r} is not one of {', '.join(ATTENTIONS)}")
        if attention == "dense":
            if plan_path:
                raise ValueError("plan_path: the dense backbone has no plan; give one or the other")
            lm, tok = load_lisa_model(base_model, dense_plan(base_model), dtype=dtype)
            lm.eval()
            tok.padding_side = "left"
            return cls(lm, tok, base_model=base_model, max_resident=max_resident, tracking_uri=tracking_uri,
                       attention="dense")
        path = Path(plan_path) if plan_path else registered_backbone_folder(base_model, tracking_uri=tracking_uri)
        if path.is_dir():
            lm, tok = load_backbone(base_model, path, dtype=dtype, prune=prune)
        else:  # a plan.json alone: no healing, the fresh adapter
            lm, tok = load_lisa_model(base_model, SharingPlan.load(path), dtype=dtype, prune=prune)
        lm.eval()
        tok.padding_side = "left"
        return cls(lm, tok, base_model=base_model, max_resident=max_resident, tracking_uri=tracking_uri)

    def memory_report(self) -> dict[str, int]:
        """Bytes of the loaded parameters (adapters included) and of the KV cache per token."""
        lm = self.lm
        params = sum(p.numel() * p.element_size() for p in lm.parameters())
        cfg = lm.config
        head_dim = lm.plan.head_dim
        item = next(lm.parameters()).element_size()
        kv = lm.plan.kv_bytes_per_token(cfg.num_key_value_heads, item)  # K (d or r) + V (d); dropped: 0
        return {"parameter_bytes": params, "kv_bytes_per_token": kv,
                "dense_kv_bytes_per_token": lm.plan.num_layers * cfg.num_key_value_heads * 2 * head_dim * item,
                "pruned": int(lm.pruned)}

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def preload(self, adapter: str) -> str:
        """Make an adapter resident (resolved, verified, loaded) without activating it;
        returns its resolved identity ("gsm8k-lisa/3" or a folder)."""
        return self._ensure_resident(adapter)[0]

    def pin(self, adapter: str) -> str:
        """Preload an adapter and keep it resident for good (never evicted); returns its identity.

        >>> bb.pin("gsm8k")   # doctest: +SKIP
        'gsm8k-lisa/3'
        """
        key = self._ensure_resident(adapter)[0]
        self.pinned.add(key)
        return key

    def resolve(self, adapter: str) -> tuple[Path, str]:
        """(folder, key) of an adapter reference without loading it (registry I/O only; the
        folder is empty when the key is already resident). Raises LookupError subclasses for
        unknown references."""
        return self._resolve(adapter)

    def load_resolved(self, folder: Path, key: str, *, keep=()) -> tuple[str, str]:
        """(kind, name) of a resolved adapter, loading it into the pool when not resident."""
        return self._load(folder, key, keep)

    def use(self, adapter: str) -> ActiveAdapter:
        """Activate an adapter: a task name ("gsm8k" = gsm8k-lisa@champion), a registry
        reference ("gsm8k-lisa@champion", "gsm8k-lisa/3") or a local adapter folder."""
        start = time.perf_counter()
        key, kind, name = self._ensure_resident(adapter)
        from adapters_hub.kinds import get_kind

        if self.active is not None and self.active.name != name:
            get_kind(self.active.kind).deactivate(self.lm, self.active.name)
        get_kind(kind).activate(self.lm, name)
        self.active = ActiveAdapter(adapter, key, kind, name, time.perf_counter() - start)
        self._evict()  # the previous active adapter may go now
        return self.active

    @contextmanager
    def bare(self):
        """The bare backbone (its own adapter, no task adapter) inside the block; the active
        adapter is active again after it.

        >>> with bb.bare(): base_text = bb.generate("Question: ...")  # doctest: +SKIP
        """
        from adapters_hub.kinds import get_kind

        active = self.active
        if active is not None:
            get_kind(active.kind).deactivate(self.lm, active.name)
        if self.base_adapter is not None and getattr(self.lm, "active_adapter", None) != self.base_adapter:
            self.lm.set_adapter(self.base_adapter)
        try:
            yield self
        finally:
            if active is not None:
                get_kind(active.kind).activate(self.lm, active.name)

    def generate(self, prompts: str | list[str], *, adapter: str | list[str] | None = None,
                 max_new_tokens: int = 64) -> list[str]:
        """Greedy completions. `adapter`: None (the active one), one ref for all, or one per prompt."""
        import torch

        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        per_row = None
        if isinstance(adapter, list):
            if len(adapter) != len(prompts):
                raise ValueError(f"adapter: {len(adapter)} adapters for {len(prompts)} prompts")
            from adapters_hub.kinds import batching_kinds, get_kind

            resolved = [self._resolve(ref) for ref in adapter]
            for ref, (folder, key) in zip(adapter, resolved):  # the kind first: a refusal loads nothing
                if not get_kind(kind := self.kind_of(folder, key)).batches_per_row:
                    raise ValueError(f"adapter: mixed batches take {', '.join(batching_kinds())} adapters only; "
                                     f"{ref!r} is {kind}")
            names = []
            for folder, key in resolved:  # the batch's own adapters are never evicted while it loads
                names.append(self._load(folder, key, names)[1])
            per_row = names
        elif adapter is not None:
            self.use(adapter)
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = self.lm.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=self.tokenizer.pad_token_id, adapter_names=per_row)
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return texts[0] if single else texts

    def kind_of(self, folder: Path, key: str) -> str:
        """The adapter kind of a resolved adapter, without loading it (the resident entry, or
        its folder's adapter_config.json): serving decides what it can batch before loading."""
        from adapters_hub.kinds import read_config

        if key in self._resident:
            return self._resident[key][0]
        return read_config(folder)["kind"]

    def is_resident(self, key: str) -> bool:
        return key in self._resident

    # ------------------------------------------------------------------ internals

    def _ensure_resident(self, ref: str, keep=()) -> tuple[str, str, str]:
        folder, key = self._resolve(ref)
        kind, name = self._load(folder, key, keep)
        return key, kind, name

    def _load(self, folder: Path, key: str, keep=()) -> tuple[str, str]:
        from adapters_hub.kinds import get_kind, read_config

        if key in self._resident:
            self._resident.move_to_end(key)
            return self._resident[key]
        config = read_config(folder)
        kind = config["kind"]
        name = "a_" + re.sub(r"[^A-Za-z0-9_]", "_", key)[-60:]
        get_kind(kind).load(self.lm, folder, name)  # raises on another base / plan; nothing changed
        self._resident[key] = (kind, name)
        if self.on_event is not None:
            self.on_event("load", key)
        self._evict(keep={name, *keep})
        return kind, name

    def _evict(self, keep=()) -> None:
        """Least recently used first, down to max_resident; never a pinned or the active adapter
        or `keep` (so a swap or a mixed batch may hold a few more until the next `use`)."""
        from adapters_hub.kinds import get_kind

        keep = {*keep, *([self.active.name] if self.active else [])}
        for old_key, (old_kind, old_name) in list(self._resident.items()):
            if len(self._resident) <= self.max_resident:
                return
            if old_name not in keep and old_key not in self.pinned:
                del self._resident[old_key]
                get_kind(old_kind).delete(self.lm, old_name)
                if self.on_event is not None:
                    self.on_event("evict", old_key)

    def _resolve(self, ref: str) -> tuple[Path, str]:
        from adapters_hub import registry

        if self.allow_local_folders:
            path = Path(ref).expanduser()
            if path.is_dir():
                return path, str(path.resolve())
        elif _looks_like_path(ref):  # never touch the file system for it: no hint whether it exists
            raise registry.AdapterNotFoundError(f"{ref!r} is not a registry reference (name, name@alias, name/3); "
                                                f"local adapter folders are not served here")

        name, _, version = registry.parse_ref(ref)
        if version is not None and f"{name}/{version}" in self._resident:
            return Path(), f"{name}/{version}"  # a pinned version never changes: no registry round trip
        try:
            info = registry.get_adapter(ref, tracking_uri=self.tracking_uri)
        except registry.AdapterNotFoundError:
            if "@" in ref or "/" in ref:
                raise
            # a bare name that is no registered model is a task name ("gsm8k", "math-qa")
            from adapters_hub.registry.refs import adapter_model_name

            kind = DEFAULT_KIND if self.attention == "lisa" else "lora"
            ref = f"{adapter_model_name(ref, kind, self.attention)}@champion"
            info = registry.get_adapter(ref, tracking_uri=self.tracking_uri)
        if info.tags.get("base_model") not in (None, self.base_model):
            from adapters_hub.errors import AdapterMismatchError

            raise AdapterMismatchError(f"{ref}: adapter is for base {info.tags.get('base_model')!r}, "
                                       f"this backbone is {self.base_model!r}")
        key = f"{info.name}/{info.version}"
        if key in self._resident:
            return Path(), key
        return registry.resolve(key, tracking_uri=self.tracking_uri), key


def _looks_like_path(ref: str) -> bool:
    """A reference that can only mean a file-system path (registry names are [A-Za-z0-9._-]+)."""
    body = ref.removeprefix("models:/")
    if not body or body.startswith((".", "~", "/")) or "\\" in body or "\0" in body:
        return True
    name, _, rest = body.partition("@") if "@" in body else body.partition("/")
    return not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or ("/" in body and "@" not in body
                                                                       and not rest.isdigit())
