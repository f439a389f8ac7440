"""Files: written so that nothing half-written is ever read (a file, a directory), JSON and JSONL read and
written, checksums, and the cache root. The quantized-model artifact is `luq.artifact`'s."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from luq.errors import LuqError


def cache_root() -> Path:
    """``$LUQ_CACHE`` if set, else ``~/.cache/luq`` (created on demand): variant caches, built models,
    compiled helpers' sources of truth live under it."""
    root = Path(os.environ.get("LUQ_CACHE") or Path.home() / ".cache" / "luq").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_dir_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target` if it exists, else `build(tmp)` into a temporary sibling directory that is
    then renamed into place (a concurrent builder that wins the race is fine)."""
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON at `path`, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read 4 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path: Path):
    """(line number, 'file:line', record) for each non-blank line of a JSONL file;
    a line that is not a JSON object is one LuqError naming its place."""
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LuqError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise LuqError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield number, where, record
