"""The real `safetensors` package as a client of lorakit's files, and as a writer of files for
lorakit to read. Driven by tests/unit/test_interop.cpp.

  read FILE         load FILE with safetensors; print JSON {"metadata", "tensors": {name:
                    {"dtype", "shape", "sha256"}}}. Every dtype goes through
                    safetensors.deserialize (raw bytes); the numpy-representable ones are also
                    loaded with safetensors.numpy.load_file and their bytes compared.
  write FILE        write a file with safetensors.numpy.save_file (several dtypes, metadata) and
                    print the same JSON description of what was written.
  serialize OUT     safetensors.numpy.save of a fixed tensor set with one metadata key, raw
                    bytes to OUT (for a byte-for-byte comparison with lorakit's writer).
"""
import hashlib
import json
import sys

import numpy as np
import safetensors
from safetensors.numpy import load_file, save, save_file


def describe_file(path):
    with open(path, "rb") as f:
        data = f.read()
    tensors = {}
    for name, info in safetensors.deserialize(data):
        tensors[name] = {
            "dtype": info["dtype"].upper() if info["dtype"].islower() else info["dtype"],
            "shape": list(info["shape"]),
            "sha256": hashlib.sha256(bytes(info["data"])).hexdigest(),
        }
    # The numpy loader on every dtype numpy has.
    numpy_names = {"F16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"}
    if all(t["dtype"] in numpy_names for t in tensors.values()):
        arrays = load_file(path)
        for name, array in arrays.items():
            digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
            if digest != tensors[name]["sha256"]:
                raise SystemExit(f"numpy loader disagrees with deserialize on {name}")
    with safetensors.safe_open(path, framework="numpy") as f:
        metadata = f.metadata() or {}
    return {"metadata": metadata, "tensors": tensors}


def main():
    command, path = sys.argv[1], sys.argv[2]
    if command == "read":
        print(json.dumps(describe_file(path), sort_keys=True))
    elif command == "write":
        rng = np.random.default_rng(7)
        arrays = {
            "f32.matrix": rng.standard_normal((3, 5)).astype(np.float32),
            "f16.vector": rng.standard_normal(7).astype(np.float16),
            "f64.scalar": np.array(2.5, dtype=np.float64),
            "i64.alpha": np.array(16, dtype=np.int64),
            "u8.bytes": np.arange(10, dtype=np.uint8),
            "i16.neg": np.array([-3, -2, 30000], dtype=np.int16),
            "bool.mask": np.array([True, False, True]),
            "empty": np.zeros((0, 4), dtype=np.float32),
        }
        save_file(arrays, path, metadata={"format": "pt", "ss_network_dim": "16", "note": "é \"quoted\""})
        print(json.dumps(describe_file(path), sort_keys=True))
    elif command == "serialize":
        arrays = {
            "z.weight": np.arange(6, dtype=np.float16).reshape(2, 3),
            "b.weight": np.arange(4, dtype=np.float32).reshape(4, 1),
            "a.alpha": np.array(8, dtype=np.int64),
            "m": np.arange(3, dtype=np.uint8),
        }
        with open(path, "wb") as f:
            f.write(save(arrays, metadata={"format": "pt"}))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
