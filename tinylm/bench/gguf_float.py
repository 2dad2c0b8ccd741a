"""A float copy of a quantized GGUF, for llama.cpp's own bf16 / f16 decode next to tinylm's (`tinylm bench
--compare llama.cpp:bf16`; benchmarks only).

    path = float_gguf(Path("model.Q4_1.gguf"), Path("/tmp"), "bf16")  # -> /tmp/model.Q4_1.bf16.gguf (cached)

Every metadata key is copied (general.file_type set to the new type); matrices are dequantized with the `gguf`
package and stored as BF16 or F16, vectors (norms) as F32, as llama.cpp's converter stores them.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

TYPES = {"bf16": (QType.BF16, gguf.LlamaFileType.MOSTLY_BF16), "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16)}


def float_gguf(source: Path, folder: Path, kind: str = "bf16") -> Path:
    target = folder / f"{source.stem}.{kind}.gguf"
    if target.exists():
        return target
    qtype, file_type = TYPES[kind]
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(target) + ".part", reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = int(file_type) if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # float32 (rows, columns)
        if weights.ndim == 1:
            writer.add_tensor(tensor.name, weights.astype(np.float32))
        elif qtype == QType.F16:
            writer.add_tensor(tensor.name, weights.astype(np.float16))
        else:
            writer.add_tensor(tensor.name, gguf.quants.quantize(weights, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(target) + ".part").rename(target)
    return target
