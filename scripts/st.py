# SPDX-License-Identifier: Apache-2.0
"""A small safetensors reader and writer on NumPy, for the examples in docs/ (any safetensors
library works as well). save(path, {name: array}, {name: dtype}) writes; load(path) returns
{name: array} (BF16 tensors come back as their uint16 bit patterns)."""
import json
import struct

import numpy as np

_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.float16): "F16",
          np.dtype(np.int32): "I32", np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8",
          np.dtype(np.bool_): "BOOL"}
_TYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I32": np.int32,
          "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_, "BF16": np.uint16}


def save(path, tensors, dtypes=None):
    """Writes `tensors` in order; `dtypes` overrides a tensor's safetensors dtype name."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        dtype = (dtypes or {}).get(name) or _NAMES[array.dtype]
        blob = array.tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def load(path):
    """Every tensor of the file, as NumPy arrays."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        begin, end = t["data_offsets"]
        out[name] = np.frombuffer(data[begin:end], dtype=_TYPES[t["dtype"]]).reshape(t["shape"])
    return out
