"""The real `gguf` package (llama.cpp's gguf-py) as a client of lorakit's GGUF files, and as the
reference writer. Driven by tests/unit/test_interop.cpp.

  read FILE        load FILE with gguf.GGUFReader; print JSON {"version", "kv": {key: {"type",
                   "value"}}, "tensors": [{"name", "type", "shape", "values"}]}: shape in NumPy
                   order, values dequantized to float (gguf.quants.dequantize) for every tensor.
  write OUT        write a fixed adapter-like file with gguf.GGUFWriter (F32, F16, BF16 and Q8_0
                   tensors; string, float, uint32, bool and array values) and print the same
                   JSON description of what was written.
"""
import json
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q


def field_value(field):
    t = field.types[0]
    if t == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if t == gguf.GGUFValueType.ARRAY:
        inner = field.types[1] if len(field.types) > 1 else None
        if inner == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    value = field.parts[field.data[0]].tolist()[0]
    if t == gguf.GGUFValueType.BOOL:
        return bool(value)
    return value


def describe(path):
    reader = gguf.GGUFReader(path)
    kv = {}
    version = None
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            if name == "GGUF.version":
                version = int(field.parts[field.data[0]][0])
            continue
        kv[name] = {"type": field.types[0].name, "value": field_value(field)}
    tensors = []
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = [int(x) for x in reversed(t.shape.tolist())]
        tensors.append({
            "name": t.name,
            "type": t.tensor_type.name,
            "shape": shape,
            "values": np.asarray(values, dtype=np.float64).reshape(-1).tolist(),
        })
    return {"version": version, "kv": kv, "tensors": tensors}


def write(out):
    w = gguf.GGUFWriter(out, "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 16.0)
    w.add_uint32("general.quantization_version", 2)
    w.add_bool("lorakit.flag", True)
    w.add_array("lorakit.names", ["a", "bc"])
    rng = np.random.default_rng(7)
    a = rng.standard_normal((4, 64)).astype(np.float32)
    b = rng.standard_normal((8, 4)).astype(np.float32)
    w.add_tensor("blk.0.attn_q.weight.lora_a", a)
    w.add_tensor("blk.0.attn_q.weight.lora_b", b.astype(np.float16))
    q = gguf.quants.quantize(a, Q.Q8_0)
    w.add_tensor("blk.0.attn_k.weight.lora_a", q, raw_shape=q.shape, raw_dtype=Q.Q8_0)
    bf = gguf.quants.quantize(b, Q.BF16)
    w.add_tensor("blk.0.attn_k.weight.lora_b", bf, raw_shape=bf.shape, raw_dtype=Q.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return describe(out)


def main():
    command, path = sys.argv[1], sys.argv[2]
    if command == "read":
        print(json.dumps(describe(path)))
    elif command == "write":
        print(json.dumps(write(path)))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
