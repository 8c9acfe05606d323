"""Hugging Face ``save_pretrained`` directories: config.json + safetensors + tokenizer.json.

    <dir>/                       (a name like step_1000/ or checkpoint-1000/ gives the step)
      config.json                model_type "xlstm" (transformers' xLSTMForCausalLM)
      model.safetensors          or model.safetensors.index.json + the shards it names
      tokenizer.json             Hugging Face `tokenizers`
      tokenizer_config.json      bos/eos/pad tokens, chat_template (optional)
      chat_template.jinja        the chat template, additional_chat_templates/NAME.jinja named ones (optional)

Weights are read shard by shard, tensor by tensor, each straight into a buffer of its own (no
memory map: the mapped pages of a whole shard, often 5 GB, would count against the process until
the file is closed), cast to the requested dtype and moved to the device at once, so the host
never holds a second copy of the model. Nothing is fetched from a hub.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..chat_template import template_files
from ..errors import UserError
from ..tokenizer import HFTokenizer
from . import xlstm
from .protocol import LanguageModel, full_pass, padded_logits

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SUPPORTED_MODEL_TYPES = ("xlstm",)
_STEP = re.compile(r"^(?:step|checkpoint)[_-](\d+)$")
# safetensors' dtype names; bfloat16 and float8 are ml_dtypes' (through jnp), as numpy lacks them.
SAFETENSORS_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32,
    "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16, "BF16": jnp.bfloat16,
    "F32": np.float32, "F64": np.float64, "F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2,
}
# XLA's CPU client adopts a host buffer aligned to this many bytes instead of copying it, so a
# tensor read in the dtype the model wants is never held twice, not even for a moment.
_ALIGNMENT = 64


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """A loaded directory: the model under the contract, its tokenizer and its identity."""

    model: LanguageModel
    tokenizer: HFTokenizer
    path: Path
    step: int
    fingerprint: str
    config: dict  # config.json as written
    model_config: xlstm.XLSTMConfig

    mlflow_run_id = None  # a save_pretrained directory records no training run

    @property
    def hf_config(self) -> dict:
        return self.config

    @functools.cached_property
    def _full_pass(self):
        return full_pass(self.model)

    def logits(self, tokens) -> np.ndarray:
        """tokens int32 [B, T] -> float32 [B, T, V]: one full forward pass from a fresh state."""
        return padded_logits(self._full_pass, self.model.params, tokens)


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory with config.json and safetensors weights (single file or index)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and ((path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file())


def step_of(path: Path) -> int:
    """N for a directory named step_N or checkpoint-N (trainers' and transformers' conventions), else 0."""
    match = _STEP.match(path.name)
    return int(match.group(1)) if match else 0


def read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise UserError(f"not a directory: {path}")
    if not config_path.is_file():
        raise UserError(f"not a Hugging Face checkpoint: {path} has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"not valid JSON: {config_path} ({error})") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{config_path}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in a fixed order; all of them must exist."""
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    index_path = path / INDEX_FILE
    if not index_path.is_file():
        raise UserError(f"not a Hugging Face checkpoint: {path} has no {WEIGHTS_FILE} or {INDEX_FILE}")
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{index_path}: not a safetensors index ({error!r})") from None
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (path / name).is_file()]
    if missing:
        raise UserError(f"{path}: missing weight shards named in {INDEX_FILE}: {', '.join(missing)}")
    return [path / name for name in shards]


def fingerprint(files: list[Path]) -> str:
    """sha256 over the files' names and bytes, streamed in 1 MiB blocks (checkpoints are large)."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def _identity_files(path: Path, weights: list[Path]) -> list[Path]:
    """What decides the model's outputs: config, weights, tokenizer (and its config and chat
    template files, if any)."""
    files = [path / CONFIG_FILE, *weights, path / TOKENIZER_FILE]
    if (path / TOKENIZER_CONFIG_FILE).is_file():
        files.append(path / TOKENIZER_CONFIG_FILE)
    return files + template_files(path)


def checkpoint_info(path: str | os.PathLike) -> dict:
    """``{path, step, fingerprint, mlflow_run_id, hf_config}`` of a directory, without loading its weights."""
    path = Path(path).absolute()
    hf_config = read_config(path)
    files = weight_files(path)
    if not (path / TOKENIZER_FILE).is_file():
        raise UserError(f"{path}: no {TOKENIZER_FILE} (a Hugging Face `tokenizers` file is needed to evaluate)")
    return {"path": str(path), "step": step_of(path), "fingerprint": fingerprint(_identity_files(path, files)),
            "mlflow_run_id": None, "hf_config": hf_config}


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


class MalformedSafetensors(ValueError):
    """A weight file that is not what the safetensors format says (reported with the file's name)."""


def _ints(values: list) -> bool:
    return all(isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in values)


def read_header(handle) -> tuple[dict, int]:
    """{name: {dtype, shape, data_offsets}} of an open safetensors file and where its data begins.

    The format: an 8-byte little-endian header size, that many bytes of JSON, then the data.
    """
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise MalformedSafetensors("shorter than its 8-byte header size")
    (size,) = struct.unpack("<Q", prefix)
    if size > os.fstat(handle.fileno()).st_size - 8:
        raise MalformedSafetensors(f"header size {size} exceeds the file")
    try:
        header = json.loads(handle.read(size))
    except (UnicodeDecodeError, ValueError) as error:
        raise MalformedSafetensors(f"header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise MalformedSafetensors("header is not a JSON object")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if not (isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES
                and isinstance(entry.get("shape"), list) and _ints(entry["shape"])
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and _ints(entry["data_offsets"])):
            raise MalformedSafetensors(f"tensor {name!r} has no valid dtype, shape and data_offsets: {entry!r}")
    return header, 8 + size


def read_tensor(handle, data_start: int, name: str, entry: dict) -> np.ndarray:
    """One tensor of an open safetensors file, read into a fresh aligned buffer."""
    dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    nbytes = end - begin
    if nbytes != dtype.itemsize * math.prod(shape):
        raise MalformedSafetensors(f"tensor {name!r}: data_offsets {entry['data_offsets']} do not fit "
                                   f"{entry['dtype']}{list(shape)}")
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    skip = -raw.ctypes.data % _ALIGNMENT
    buffer = raw[skip : skip + nbytes]
    view = memoryview(buffer)
    handle.seek(data_start + begin)
    filled = 0
    while filled < nbytes:  # one read() returns at most about 2 GB on Linux
        count = handle.readinto(view[filled:])
        if not count:
            raise MalformedSafetensors(f"tensor {name!r} ends past the end of the file")
        filled += count
    return buffer.view(dtype).reshape(shape)


def load_weights(files: list[Path], config: xlstm.XLSTMConfig, dtype) -> dict:
    """Our parameter tree from safetensors files, checked name by name and shape by shape.

    Each tensor goes file -> its own buffer -> cast -> device before the next is read, so at any
    moment the host holds the parameters so far plus at most one tensor (none when the file
    holds the wanted dtype: the device array adopts the buffer).
    """
    expected = xlstm.hf_parameter_shapes(config)
    params: dict = {}
    seen: set[str] = set()
    for file in files:
        try:
            with open(file, "rb") as handle:
                header, data_start = read_header(handle)
                # Names and shapes are checked before any data is read; the data is read in file order.
                for name, entry in header.items():
                    if name not in expected:
                        raise UserError(f"{file.name}: weight {name!r} is not part of the xlstm model config.json describes")
                    shape = tuple(entry["shape"])
                    if shape != expected[name]:
                        raise UserError(f"{file.name}: weight {name} has shape {shape}, config.json implies {expected[name]}")
                for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                    array = read_tensor(handle, data_start, name, entry)
                    _set(params, xlstm.param_path(name), jnp.asarray(array, dtype=dtype))
                    del array  # a cast copy is dropped before the next tensor is read
                    seen.add(name)
        except MalformedSafetensors as error:
            raise UserError(f"not a safetensors file: {file} ({error})") from None
        except OSError as error:
            raise UserError(f"cannot read weight file {file}: {error.strerror or error}") from None
    missing = sorted(set(expected) - seen)
    if missing == ["lm_head.weight"] and config.tie_word_embeddings:
        # A tied export may omit the head; transformers would initialise it randomly instead.
        params["lm_head"] = {"weight": params["backbone"]["embeddings"]}
        missing = []
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"{files[0].parent}: weights missing from the checkpoint: {shown}")
    return params


def load_hf_checkpoint(path: str | os.PathLike, *, dtype: Any = "float32", **overrides) -> HFCheckpoint:
    """Load a ``save_pretrained`` directory of an xLSTMForCausalLM.

    ``dtype`` ("float32" or "bfloat16") is the dtype of the weights in memory, whatever the files
    hold; the recurrent state keeps config.json's ``inference_state_dtype``. ``overrides`` set our
    own config fields (``form``, ``segment_length``).
    """
    path = Path(path).absolute()
    hf_config = read_config(path)
    files = weight_files(path)
    if not (path / TOKENIZER_FILE).is_file():
        raise UserError(f"{path}: no {TOKENIZER_FILE} (a Hugging Face `tokenizers` file is needed to evaluate)")
    config = xlstm.XLSTMConfig.from_hf(hf_config, **overrides)
    weights_dtype = xlstm.resolve_dtype(dtype)
    params = load_weights(files, config, weights_dtype)
    tokenizer = HFTokenizer.load(path)
    return HFCheckpoint(
        model=xlstm.as_language_model(config, params, dtype=weights_dtype),
        tokenizer=tokenizer,
        path=path,
        step=step_of(path),
        fingerprint=fingerprint(_identity_files(path, files)),
        config=hf_config,
        model_config=config,
    )
