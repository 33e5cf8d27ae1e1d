"""The model code MLflow stores with every adapter version (MLflow's "models from code":
no pickled object). Loading it needs lisa-hub installed; see registry/mlflow_model.py."""

import mlflow

from adapters_hub.registry.mlflow_model import AdapterModel

mlflow.models.set_model(AdapterModel())
