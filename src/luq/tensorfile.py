"""safetensors files read and written one tensor at a time, with plain file reads and writes.

`safetensors.torch.load_file` / `save_file` hold every tensor of a file in memory at once,
and `safe_open` maps the file, so every page it touches counts as resident until it is
closed. Streaming a 7B model needs neither: `TensorFiles` reads one named tensor with
`readinto` (the memory is the tensor's own), and `write_safetensors` writes a file whose
header is known from names, shapes and dtypes alone, each tensor's bytes at its offset as
they become available. The bytes written are those `save_file` writes (same header, same
order: by dtype rank, then name), so a file is the same whichever way it was made.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

# safetensors' dtype order (its Rust enum), lowest first; files list tensors highest dtype first
_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64",
          "U64")
_CODES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
          torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64",
          torch.int64: "I64", torch.uint64: "U64"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path | str) -> tuple[int, dict[str, dict]]:
    """(offset of the data block, {name: {"dtype", "shape", "data_offsets"}}) of one file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


class TensorFiles:
    """Named tensors in one safetensors file or a sharded set (its index JSON), read one at a time."""

    def __init__(self, files: Iterable[Path | str]):
        self.where: dict[str, tuple[Path, int, dict]] = {}
        for path in files:
            start, header = read_header(path)
            for name, info in header.items():
                self.where[name] = (Path(path), start, info)

    @classmethod
    def in_dir(cls, folder: Path | str, stem: str = "model") -> "TensorFiles":
        """The tensors of a model directory: `{stem}.safetensors.index.json`'s shards, else
        `{stem}.safetensors`, else every *.safetensors file there."""
        folder = Path(folder)
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return cls(folder / n for n in names)
        single = folder / f"{stem}.safetensors"
        return cls([single] if single.is_file() else sorted(folder.glob("*.safetensors")))

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        info = self.where[name][2]
        return _DTYPES[info["dtype"]], tuple(info["shape"])

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name`, in memory of its own (no mapping of the file). With `dtype`, a
        floating tensor is converted to it a chunk at a time as it is read, so the stored copy
        is never whole in memory beside the converted one (the values are `.to(dtype)`'s)."""
        path, start, info = self.where[name]
        stored, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        convert = dtype is not None and dtype != stored and stored.is_floating_point
        out = torch.empty(shape if convert else (end - begin,), dtype=dtype if convert else torch.uint8)
        if end > begin:
            with open(path, "rb", buffering=0) as f:
                f.seek(start + begin)
                if not convert:
                    _read_into(f, out.numpy(), path, name)
                else:
                    flat, step = out.reshape(-1), _CHUNK // _itemsize(stored)
                    buffer = torch.empty(step * _itemsize(stored), dtype=torch.uint8)
                    for a in range(0, flat.numel(), step):
                        n = min(step, flat.numel() - a)
                        part = buffer[:n * _itemsize(stored)]
                        _read_into(f, part.numpy(), path, name)
                        flat[a:a + n].copy_(part.view(stored))
        return out if convert else out.view(stored).reshape(shape)


_CHUNK = 1 << 24  # bytes read at a time when converting


def _read_into(f, array, path, name) -> None:
    view = memoryview(array)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise OSError(f"{path} is truncated (tensor {name})")
        got += n


def file_layout(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """The header bytes save_file would write for these (dtype, shape)s, and each tensor's
    offset in the file."""
    order = sorted(specs, key=lambda n: (-_ORDER.index(_CODES[specs[n][0]]), n))
    header, offsets, pos = {}, {}, 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name in order:
        dtype, shape = specs[name]
        size = _itemsize(dtype) * int(torch.Size(shape).numel())
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + size]}
        offsets[name], pos = pos, pos + size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    head = struct.pack("<Q", len(blob)) + blob
    return head, {name: len(head) + off for name, off in offsets.items()}


def write_safetensors(path: Path | str, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                      fill: Callable[[Callable[[str, torch.Tensor], None]], None],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file of `specs` (name -> (dtype, shape)); `fill(put)` calls
    `put(name, tensor)` once per name, in any order, with the tensor's values."""
    head, offsets = file_layout(specs, metadata)
    written: set[str] = set()
    with open(path, "wb") as f:
        f.write(head)

        def put(name: str, t: torch.Tensor) -> None:
            dtype, shape = specs[name]
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: got {t.dtype} {tuple(t.shape)}, the header says {dtype} {tuple(shape)}")
            f.seek(offsets[name])
            if t.numel():
                f.write(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
            written.add(name)

        fill(put)
        missing = set(specs) - written
        if missing:
            raise ValueError(f"no values given for {sorted(missing)[:3]}")
        end = max((o + _itemsize(specs[n][0]) * int(torch.Size(specs[n][1]).numel()) for n, o in offsets.items()),
                  default=len(head))
        f.truncate(end)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of `tensors` (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # hashed in place, not copied
    return h.hexdigest()
