"""models/hf.py reads safetensors files itself (no memory map): the same tensors as the safetensors
library, and a damaged file is a one-line error that names it."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlflow_lmeval.errors import UserError
from mlflow_lmeval.models import hf

SINGLE = Path(__file__).parent / "fixtures" / "hf_xlstm" / "single"


def test_tensors_equal_the_safetensors_library(tmp_path):
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2], np.int64),
               "c": np.zeros((0, 5), np.float16), "d": np.array(2.5, np.float64)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "np"})
    with open(tmp_path / "t.safetensors", "rb") as handle:
        header, start = hf.read_header(handle)
        read = {name: hf.read_tensor(handle, start, name, entry) for name, entry in header.items()}
    expected = load_file(tmp_path / "t.safetensors")
    assert read.keys() == expected.keys()
    for name, array in read.items():  # the same bytes read by two readers: exact
        assert array.dtype == expected[name].dtype and array.shape == expected[name].shape
        np.testing.assert_array_equal(array, expected[name])


def test_bfloat16_file_reads_as_the_library_does():
    with open(SINGLE / "model.safetensors", "rb") as handle:
        header, start = hf.read_header(handle)
        name, entry = next(iter(header.items()))
        array = hf.read_tensor(handle, start, name, entry)
    assert entry["dtype"] == "BF16" and array.ctypes.data % 64 == 0
    from safetensors import safe_open

    with safe_open(SINGLE / "model.safetensors", framework="numpy") as library:
        np.testing.assert_array_equal(array.view(np.uint16), library.get_tensor(name).view(np.uint16))


def damaged(tmp_path, how: str) -> Path:
    directory = Path(shutil.copytree(SINGLE, tmp_path / "damaged"))
    file = directory / "model.safetensors"
    data = file.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    if how == "truncated":
        data = data[:-100]
    elif how == "header size":
        data = struct.pack("<Q", len(data)) + data[8:]
    elif how == "not json":
        data = data[:8] + b"{" * size + data[8 + size :]
    elif how in ("dtype", "offsets"):
        name = min(n for n in header if n != "__metadata__")
        if how == "dtype":
            header[name]["dtype"] = "F7"
        else:
            header[name]["data_offsets"][1] -= 2
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= size
        text = text.ljust(size)  # JSON allows trailing spaces, as the format's padding
        data = data[:8] + text + data[8 + size :]
    file.write_bytes(data)
    return directory


@pytest.mark.parametrize("how, reason", [
    ("truncated", "ends past the end of the file"),
    ("header size", "header size .* exceeds the file"),
    ("not json", "header is not JSON"),
    ("dtype", "has no valid dtype, shape and data_offsets"),
    ("offsets", r"data_offsets \[\d+, \d+\] do not fit BF16\["),
])
def test_damaged_weight_file_is_a_one_line_error(tmp_path, how, reason):
    with pytest.raises(UserError, match=f"not a safetensors file: .*model.safetensors \\(.*{reason}") as error:
        hf.load_hf_checkpoint(damaged(tmp_path, how))
    assert "\n" not in str(error.value)
