"""Compiled helpers of the fast kernels, built at first use with the system C compiler.

`expand_int4` (expand_int4.c): one pass from torch's CPU int4 packing to a bfloat16 W^T, the
terms of each input column summed (the dense prompt path of luq.quant.kernels). Built once per
source version into ~/.cache/luq/native (LUQ_NATIVE_DIR moves it; LUQ_NATIVE=0 turns it off);
where no compiler works, `available()` is False and the callers use torch ops instead. The
work is split over torch.get_num_threads() Python threads (ctypes releases the GIL).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("expand_int4.c")
_POOL: dict[int, ThreadPoolExecutor] = {}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _build(target: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler")
    flags = ["-O3", "-shared", "-fPIC"]
    if {"avx2", "fma"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # atomic: concurrent builds do not collide
        lib = Path(tmp) / target.name
        subprocess.run([cc, *flags, str(SOURCE), "-o", str(lib)], check=True, capture_output=True, timeout=120)
        os.replace(lib, target)


@lru_cache(maxsize=None)
def _library():
    if os.environ.get("LUQ_NATIVE", "1") == "0":
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + repr(sorted(_cpu_flags() & {"avx2", "fma"})).encode()).hexdigest()[:16]
    root = Path(os.environ.get("LUQ_NATIVE_DIR") or Path.home() / ".cache" / "luq" / "native")
    target = root / f"expand_int4-{digest}.so"
    try:
        if not target.is_file():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    fn = lib.luq_expand_int4
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    return fn


def available() -> bool:
    return _library() is not None


def expand_int4(packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, starts: torch.Tensor | None,
                terms: torch.Tensor | None, cols: int, r0: int, r1: int) -> torch.Tensor:
    """bfloat16 W^T [cols, r1 - r0] of weight rows [r0, r1) (multiples of 64) from an int4 CPU
    packing (`packed` [N, kt/2], `scales_zeros` [kt/group, N, 2] bfloat16). Input column c sums
    the kernel columns terms[starts[c]:starts[c + 1]] (int64); starts/terms None: column c is
    kernel column c alone."""
    fn = _library()
    n_rows, kt = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(cols, r1 - r0, dtype=torch.bfloat16)
    args = (packed.data_ptr(), scales_zeros.data_ptr(), kt, n_rows, group,
            None if starts is None else starts.data_ptr(), None if terms is None else terms.data_ptr())
    threads = max(1, min(torch.get_num_threads(), cols // 64))
    bounds = [cols * i // threads for i in range(threads + 1)]

    def run(i: int) -> int:
        c0, c1 = bounds[i], bounds[i + 1]
        return fn(*args, c0, c1, r0, r1, out.data_ptr() + c0 * out.stride(0) * out.element_size(), out.stride(0))

    if threads == 1:
        failed = run(0)
    else:
        pool = _POOL.get(threads) or _POOL.setdefault(threads, ThreadPoolExecutor(threads))
        failed = any(pool.map(run, range(threads)))
    if failed:
        raise MemoryError("luq.quant.native.expand_int4: no memory for its row accumulator")
    return out
