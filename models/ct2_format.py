"""Read and write CTranslate2 `model.bin` files (binary format version 6), without the ctranslate2 library.

Layout (little-endian): u32 version; string spec name; u32 spec revision; u32 variable count; per variable:
string name, u8 rank, u32 per dim, u8 dtype, u32 byte count, raw data; then u32 alias count and
(alias, target) string pairs. Strings are a u16 length (including a trailing NUL) then the bytes.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SUPPORTED_VERSION = 6
# CTranslate2 dtype code -> (numpy dtype used to read the bytes, torch dtype of the result)
DTYPE_CODES = {
    0: (np.dtype("<f4"), torch.float32),
    1: (np.dtype("i1"), torch.int8),
    2: (np.dtype("<i2"), torch.int16),
    3: (np.dtype("<i4"), torch.int32),
    4: (np.dtype("<f2"), torch.float16),
    5: (np.dtype("<u2"), torch.bfloat16),  # bit pattern read as u16, reinterpreted below
}
TORCH_TO_CODE = {torch_dtype: code for code, (_, torch_dtype) in DTYPE_CODES.items()}


@dataclass
class Ct2Model:
    """A parsed `model.bin`: variables by name (0-d tensors for scalars) and name aliases."""

    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    accessed: set[str] = field(default_factory=set, repr=False)  # names read through `get` (leftover checks)

    def get(self, name: str) -> torch.Tensor:
        """A variable by name, following aliases (e.g. `decoder/projection/weight`)."""
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise KeyError(f"variable {name!r} not in the CTranslate2 model ({self.spec})")
        self.accessed.add(name)
        return self.variables[name]


class _Reader:
    def __init__(self, buffer: bytes | bytearray | memoryview):
        self.buffer, self.offset = buffer, 0

    def unpack(self, fmt: str):
        try:
            values = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        except struct.error as err:
            raise ValueError(f"truncated CTranslate2 model: {err} at byte {self.offset}") from err
        self.offset += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.unpack("H")
        if self.offset + length > len(self.buffer):
            raise ValueError(f"truncated CTranslate2 model: string at byte {self.offset} runs past the end")
        raw = bytes(self.buffer[self.offset : self.offset + length])
        self.offset += length
        return raw.rstrip(b"\0").decode("utf-8")

    def array(self, code: int, shape: list[int], num_bytes: int) -> torch.Tensor:
        if code not in DTYPE_CODES:
            raise ValueError(f"unknown CTranslate2 dtype code {code} at byte {self.offset}")
        np_dtype, torch_dtype = DTYPE_CODES[code]
        count = num_bytes // np_dtype.itemsize
        if self.offset + num_bytes > len(self.buffer):
            raise ValueError(
                f"truncated CTranslate2 model: {shape} tensor at byte {self.offset} runs past the end"
            )
        if count != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"byte count {num_bytes} does not match shape {shape} ({np_dtype})")
        data = np.frombuffer(self.buffer, dtype=np_dtype, count=count, offset=self.offset).copy()
        self.offset += num_bytes
        tensor = torch.from_numpy(data).reshape(shape)
        return tensor.view(torch.bfloat16) if torch_dtype is torch.bfloat16 else tensor


def read_ct2_model(paths: str | Path | Sequence[str | Path]) -> Ct2Model:
    """Parse a `model.bin`; a list of paths is concatenated first (models split into `.part1`, `.part2`)."""
    parts = [paths] if isinstance(paths, str | Path) else list(paths)
    buffer = b"".join(Path(p).read_bytes() for p in parts)
    reader = _Reader(buffer)
    version = reader.unpack("I")
    if version != SUPPORTED_VERSION:
        raise ValueError(
            f"CTranslate2 binary version {version} is not supported (expected {SUPPORTED_VERSION})"
        )
    spec, revision = reader.string(), reader.unpack("I")
    variables = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        rank = reader.unpack("B")
        shape = [reader.unpack("I") for _ in range(rank)]
        code, num_bytes = reader.unpack("B"), reader.unpack("I")
        variables[name] = reader.array(code, shape, num_bytes)
    aliases = {}
    for _ in range(reader.unpack("I")):
        alias = reader.string()
        aliases[alias] = reader.string()
    if reader.offset != len(buffer):
        raise ValueError(
            f"{len(buffer) - reader.offset} trailing bytes after the aliases: truncated or wrong parts?"
        )
    return Ct2Model(spec, revision, variables, aliases)


def _write_string(out: io.BufferedIOBase, text: str) -> None:
    raw = text.encode("utf-8") + b"\0"
    out.write(struct.pack("<H", len(raw)) + raw)


def write_ct2_model(path: str | Path, model: Ct2Model) -> None:
    """Write `model` in the same format (used by tests to round-trip, and to build small fixtures)."""
    with open(path, "wb") as out:
        out.write(struct.pack("<I", SUPPORTED_VERSION))
        _write_string(out, model.spec)
        out.write(struct.pack("<II", model.revision, len(model.variables)))
        for name, tensor in model.variables.items():
            if tensor.dtype not in TORCH_TO_CODE:
                raise ValueError(f"{name}: dtype {tensor.dtype} has no CTranslate2 code")
            code = TORCH_TO_CODE[tensor.dtype]
            _write_string(out, name)
            out.write(struct.pack("<B", tensor.dim()) + struct.pack(f"<{tensor.dim()}I", *tensor.shape))
            data = tensor.detach().cpu().contiguous()
            if data.dtype is torch.bfloat16:  # numpy has no bfloat16: write the bit pattern
                array = data.view(torch.int16).numpy().view(np.uint16).astype(DTYPE_CODES[code][0])
            else:
                array = data.numpy().astype(DTYPE_CODES[code][0], copy=False)
            raw = array.tobytes()
            out.write(struct.pack("<BI", code, len(raw)) + raw)
        out.write(struct.pack("<I", len(model.aliases)))
        for alias, target in model.aliases.items():
            _write_string(out, alias)
            _write_string(out, target)
