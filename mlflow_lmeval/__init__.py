"""lm-evaluation-harness for JAX recurrent language models, tracked in MLflow."""

from .config import EvalConfig
from .errors import UserError
from .models.checkpoint import Checkpoint, load_checkpoint as load
from .models.protocol import LanguageModel, from_linen_cache, from_nnx

__all__ = ["Checkpoint", "EvalConfig", "LanguageModel", "UserError", "from_linen_cache", "from_nnx", "load"]
