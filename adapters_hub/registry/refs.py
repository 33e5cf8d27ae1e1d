"""Names in the registry: registered-model names, aliases and the refs users type.

    parse_ref("gsm8k-lisa@champion") -> ("gsm8k-lisa", "champion", None)
    parse_ref("gsm8k-lisa/3")        -> ("gsm8k-lisa", None, 3)
    parse_ref("gsm8k-lisa")          -> ("gsm8k-lisa", "champion", None)   # a bare name = its champion
    adapter_model_name("gsm8k", "lora", "dense") -> "gsm8k-lora-dense"
    backbone_model_name("smollm2-135m")          -> "backbone-smollm2-135m"
"""

from __future__ import annotations

import hashlib
import re

CANDIDATE, CHAMPION = "candidate", "champion"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """"name@alias" | "name/3" | "name" (= champion), optionally "models:/"-prefixed -> (name, alias, version)."""
    body = ref.removeprefix("models:/").strip()
    name, alias, version = body, None, None
    if "@" in body:
        name, alias = body.split("@", 1)
    elif "/" in body:
        name, raw = body.split("/", 1)
        if not raw.isdigit():
            raise ValueError(f"adapter ref {ref!r}: version must be a number (name/3) or use name@alias")
        version = int(raw)
    else:
        alias = CHAMPION
    if not _NAME.match(name) or (alias is not None and not _ALIAS.match(alias)):
        raise ValueError(f"adapter ref {ref!r}: expected NAME, NAME@ALIAS or NAME/VERSION "
                         "(letters, digits, '.', '_', '-')")
    return name, alias, version


def check_alias(alias: str) -> str:
    if not _ALIAS.match(alias):
        raise ValueError(f"alias {alias!r}: letters, digits, '_' and '-', starting with a letter")
    return alias


def adapter_model_name(task: str, kind: str, attention: str = "lisa") -> str:
    """<task>-<kind>, or <task>-<kind>-dense for adapters of the dense (unmodified) backbone."""
    name = f"{task}-{kind}" + ("-dense" if attention == "dense" else "")
    if not _NAME.match(name):
        raise ValueError(f"registered model name {name!r}: task and kind may use letters, digits, '.', '_', '-'")
    return name


def base_model_name(base: str) -> str:
    """base-<name>: a base model lisa-hub trained itself (`lisa-hub pretrain`), stored whole."""
    return "base-" + backbone_model_name(base).removeprefix("backbone-")


def backbone_model_name(base: str) -> str:
    """backbone-<base>, with base made MLflow-safe; a short hash keeps sanitised names distinct."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._") or "base"
    if safe != base or len(safe) > 100:
        safe = f"{safe[:100]}-{hashlib.sha256(base.encode()).hexdigest()[:8]}"
    return f"backbone-{safe}"
