"""Self-contained checkpoints: one directory per step, everything needed to evaluate it later.

    step_<N>/
      params/          orbax PyTree checkpoint of the parameters (one zarr array directory per leaf)
      tokenizer.model  a copy of the SentencePiece model
      metadata.json    format, step, model config, fingerprint, optional mlflow_run_id

The layout is deterministic: two saves of the same parameters give byte-identical ``params/``
directories, so DVC's hash of a checkpoint changes only when its contents do. Checkpoints written
before (orbax's default OCDBT layout, whose data files are named and split anew on every save)
still load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import UserError
from ..tokenizer import Tokenizer
from . import mlstm
from .loading import require_directory
from .protocol import LanguageModel, full_pass, padded_logits

FORMAT = "mlflow_lmeval.checkpoint/1"
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.model"
PARAMS_DIR = "params"
# What orbax writes per save and restore never reads: the save's start and commit times, and the
# absolute path it was saved to. Removed, so that a save's bytes depend on the parameters alone.
ORBAX_PER_SAVE_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")


def fingerprint(config: mlstm.MLSTMConfig, params, tokenizer_bytes: bytes) -> str:
    """A digest of what decides the model's outputs: config, tokenizer and every parameter."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    digest.update(hashlib.sha256(tokenizer_bytes).digest())
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return "sha256:" + digest.hexdigest()


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    step: int,
    config: mlstm.MLSTMConfig,
    params,
    tokenizer: Tokenizer,
    mlflow_run_id: str | None = None,
) -> Path:
    """Write ``directory/step_<step>/`` atomically (a temporary directory renamed into place)."""
    import orbax.checkpoint as ocp  # imported lazily here and below: 0.4-0.5 s measured on this machine, after JAX

    final = Path(directory).absolute() / f"step_{step}"
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # Without OCDBT each leaf is one zarr directory named by its tree path, its chunks compressed
    # deterministically; OCDBT names its data files at random and splits them by thread timing.
    # Host (numpy) leaves: the layout then records no device (no `_sharding` naming cpu:0 or cuda:0).
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False))
    with _quiet_ocdbt_merge():
        checkpointer.save(staging / PARAMS_DIR, jax.tree.map(np.asarray, params))
    for name in ORBAX_PER_SAVE_FILES:
        (staging / PARAMS_DIR / name).unlink(missing_ok=True)
    (staging / TOKENIZER_FILE).write_bytes(tokenizer.model_bytes)
    metadata = {
        "format": FORMAT,
        "step": int(step),
        "model": {"family": "mlstm", "config": dataclasses.asdict(config)},
        "fingerprint": fingerprint(config, params, tokenizer.model_bytes),
        "mlflow_run_id": mlflow_run_id,
    }
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


class _SkipOcdbtMerge(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT" not in str(record.msg)


@contextlib.contextmanager
def _quiet_ocdbt_merge():
    """orbax 0.12 tries to merge OCDBT files after every save and warns, through absl, that a
    checkpoint without OCDBT has none: noise on every save, so that one warning is dropped."""
    quiet = _SkipOcdbtMerge()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: the reference model, its tokenizer and its identity."""

    path: Path
    step: int
    config: mlstm.MLSTMConfig
    params: object
    tokenizer: Tokenizer
    fingerprint: str
    mlflow_run_id: str | None

    @functools.cached_property
    def model(self) -> LanguageModel:
        return mlstm.as_language_model(self.config, self.params)

    @functools.cached_property
    def _full_pass(self):
        return full_pass(self.model)

    def logits(self, tokens) -> np.ndarray:
        """tokens int32 [B, T] -> float32 [B, T, V]: one full forward pass from a fresh state."""
        return padded_logits(self._full_pass, self.params, tokens)


def _read_metadata(path: Path) -> dict:
    file = path / METADATA_FILE
    require_directory(path)
    if not file.is_file():
        raise UserError(f"not a checkpoint (no {METADATA_FILE}): {path}")
    try:
        metadata = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"corrupt checkpoint metadata in {file}: {error}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise UserError(f"unsupported checkpoint format in {file} (expected {FORMAT})")
    return metadata


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> Checkpoint:
    """Load a checkpoint written by ``save_checkpoint``.

    Parameters are restored against the structure the config implies, so dtypes and nesting
    survive. With ``verify`` the fingerprint is recomputed and a mismatch is reported as corrupt.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    metadata = _read_metadata(path)
    try:
        model = metadata["model"]
        if model.get("family") != "mlstm":
            raise UserError(f"unknown model family {model.get('family')!r} in {path}")
        config = mlstm.MLSTMConfig(**model["config"]).validate()
        step = int(metadata["step"])
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"corrupt checkpoint metadata in {path}: {error!r}") from None
    tokenizer = Tokenizer.load(path / TOKENIZER_FILE)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the model's "
            f"({config.vocab_size}) in {path}"
        )
    # Host (numpy) leaves: a restore onto device shardings would compare the saving process's device
    # topology with this one's, and fail when one process saved what several processes load.
    target = jax.tree.map(lambda leaf: np.empty(leaf.shape, leaf.dtype), jax.eval_shape(lambda: mlstm.init_params(config)))
    try:
        params = jax.tree.map(jnp.asarray, ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target))
    except Exception as error:  # orbax raises many types for missing or damaged files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        # tensorstore appends its whole JSON spec; the first clause says what is wrong
        first_line = first_line if len(first_line) <= 200 else first_line[:197] + "..."
        raise UserError(f"corrupt checkpoint parameters in {path}: {first_line}") from None
    expected = metadata.get("fingerprint")
    if verify and fingerprint(config, params, tokenizer.model_bytes) != expected:
        raise UserError(f"corrupt checkpoint {path}: contents do not match the recorded fingerprint")
    return Checkpoint(path, step, config, params, tokenizer, expected, metadata.get("mlflow_run_id"))
