"""lm-evaluation-harness for JAX recurrent language models, tracked in MLflow.

Names are imported on first use: MLflow loads this package through its run-context entry
point, and that must not pay for importing JAX.
"""

import importlib

_EXPORTS = {
    "Checkpoint": "mlflow_lmeval.models.checkpoint",
    "load": ("mlflow_lmeval.models.loading", "load_any"),
    "LanguageModel": "mlflow_lmeval.models.protocol",
    "from_linen_cache": "mlflow_lmeval.models.protocol",
    "from_nnx": "mlflow_lmeval.models.protocol",
    "EvalConfig": "mlflow_lmeval.config",
    "UserError": "mlflow_lmeval.errors",
    "evaluate": "mlflow_lmeval.evaluation",
    "evaluate_model": "mlflow_lmeval.workflows",
    "TokenizerProtocol": "mlflow_lmeval.tokenizer",
    "TrackingError": "mlflow_lmeval.tracking",
    "TrackingUnavailable": "mlflow_lmeval.tracking",
    "LMEvalCallback": "mlflow_lmeval.callback",
    "set_experiment": "mlflow_lmeval.tracking",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (a list, built from the table above)


def __getattr__(name):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'mlflow_lmeval' has no attribute {name!r}")
    module, attribute = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
