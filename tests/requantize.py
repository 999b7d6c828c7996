"""Write a copy of a GGUF model with its quantized tensors re-encoded in another type (through the
`gguf` package's own quantizer), for tests that need the same model in several formats."""
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants


def requantize(src: Path, dst: Path, qtype: GGMLQuantizationType) -> Path:
    r = GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(str(dst), arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in r.tensors:
        # ggml order [.., cols]: rows of `cols` values, as the quantizers expect
        shape = tuple(int(n) for n in reversed(t.shape))
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w.add_tensor(t.name, np.asarray(t.data).reshape(shape))
            continue
        values = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
        w.add_tensor(t.name, quants.quantize(values, qtype), raw_shape=quants.quant_shape_to_byte_shape(shape, qtype),
                     raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
