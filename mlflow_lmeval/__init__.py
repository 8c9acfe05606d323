"""lm-evaluation-harness for JAX recurrent language models, tracked in MLflow."""

from .errors import UserError
from .models.checkpoint import Checkpoint, load_checkpoint as load
from .models.protocol import LanguageModel, from_linen_cache, from_nnx

__all__ = ["Checkpoint", "LanguageModel", "UserError", "from_linen_cache", "from_nnx", "load"]
