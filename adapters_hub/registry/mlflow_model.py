"""A registered adapter version is an MLflow model (the pyfunc flavor), so MLflow's own tools
load and serve it:

    model = mlflow.pyfunc.load_model("models:/gsm8k-lisa@champion")
    model.predict(["Question: 2+3?\\nAnswer:"], params={"max_new_tokens": 32})   # -> ["5 ..."]
    mlflow models serve -m models:/gsm8k-lisa@champion --env-manager local -p 5001
    curl 127.0.0.1:5001/invocations -H 'content-type: application/json' -d '{"inputs": ["Question: ..."]}'

Layout of the version's artifact folder (what `Registry.register_adapter` logs):

    MLmodel, python_env.yaml, requirements.txt, ...   MLflow's model files
    artifacts/adapter/                                  the adapter folder itself (lisa-hub's)

Adapter-only: the loader builds the adapter's backbone from the base model by name (never
copied into the registry) and, for a LiSA adapter, the base's registered backbone
(`backbone-<base>@champion`: plan, healing, general adapter) from the tracking server the
loading process names; the adapter's base fingerprint and plan hash are checked, so a
replaced backbone is a clear error, not wrong outputs. The loading environment needs
lisa-hub installed (the requirements pin its dependencies). This module imports MLflow's
pyfunc: it is imported only where a model is written or loaded.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.pyfunc import PythonModel

from adapters_hub.registry.store import MODEL_ADAPTER

ARTIFACT_KEY = MODEL_ADAPTER.split("/")[-1]  # the adapter folder inside the MLflow model: artifacts/adapter
DEFAULT_MAX_NEW_TOKENS = 64
REQUIREMENTS = ("torch", "transformers", "peft", "safetensors", "mlflow", "gguf", "accelerate")


def save(adapter_dir: str | Path, dest: str | Path) -> Path:
    """Write the MLflow model of `adapter_dir` to `dest` (a new folder): pyfunc flavor,
    signature (prompts in: a list of strings, a column of completions out, `max_new_tokens`
    param), an input example and pinned requirements."""
    import shutil
    import tempfile
    from importlib.metadata import version

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS)]))
    with tempfile.TemporaryDirectory() as tmp:  # MLflow names the artifact after its folder: "adapter"
        staged = Path(tmp) / ARTIFACT_KEY
        shutil.copytree(adapter_dir, staged)
        mlflow.pyfunc.save_model(
            path=str(dest), python_model=str(Path(__file__).with_name("mlflow_model_code.py")),
            artifacts={ARTIFACT_KEY: str(staged)}, signature=signature,
            input_example=["Question: What is 2 + 3?\nAnswer:"],
            pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS])
    return Path(dest)


class AdapterModel(PythonModel):
    """pyfunc model: the adapter on its backbone; predict = greedy completions."""

    def load_context(self, context) -> None:
        self.lm, self.tok = load_adapter_model(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input, params=None) -> list[str]:
        from adapters_hub.task_eval import generate

        prompts = _prompts(model_input)
        max_new = int((params or {}).get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        return generate(self.lm, self.tok, prompts, max_new_tokens=max_new, batch_size=8, progress=False)


def load_adapter_model(folder: str | Path, *, tracking_uri: str | None = None):
    """(LisaModel with the adapter active, tokenizer) for an adapter folder: its base by
    name, on the dense backbone when its plan is the dense one, else on the base's
    registered backbone."""
    from adapters_hub.backbone import dense_plan, load_backbone, load_lisa_model, registered_backbone_folder
    from adapters_hub.kinds import get_kind, read_config

    folder = Path(folder)
    config = read_config(folder)
    base = config.get("base_model")
    if not base:
        raise ValueError(f"{folder}: the adapter config names no base_model")
    dense = dense_plan(base)
    if config.get("plan_hash") in (None, dense.hash):
        lm, tok = load_lisa_model(base, dense)
    else:  # a LiSA adapter: the base's registered backbone, as serving loads it (unpruned)
        lm, tok = load_backbone(base, registered_backbone_folder(base, tracking_uri=tracking_uri))
    kind = get_kind(config["kind"])
    kind.load(lm, folder, "adapter")  # checks the base fingerprint and the plan hash
    kind.activate(lm, "adapter")
    lm.eval()
    return lm, tok


def _prompts(model_input) -> list[str]:
    """A list of strings, a DataFrame with a `prompt` column (or one column), or a dict."""
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(x) for x in model_input[column]]
    if isinstance(model_input, dict):
        value = model_input.get("prompt", next(iter(model_input.values())))
        return [value] if isinstance(value, str) else [str(x) for x in value]
    return [str(x) for x in model_input]
