"""Compiled helpers, built at first use with the system C compiler.

- `expand_int4` (expand_int4.c): one pass from torch's CPU int4 packing to a bfloat16 W^T, the
  terms of each input column summed (the dense prompt path of luq.quant.kernels).
- `int4_gemv` (int4_gemv.c): a few float32 tokens times a weight read in place from torch's CPU int4
  packing (the few-token path of luq.quant.kernels.Int4Kernel on CPU, in place of torch's int4 op).
- `binary_gemv`, `binary_expand` (binary_gemm.c): binarized weights from their bit planes, few
  tokens by subset-sum lookups, prompts by a bfloat16 W^T tile (luq.quant.kernels.BinaryKernel).
- `compact_gemv`, `compact_expand` (compact_gemm.c): compact BiLLM read from its stored tensors in
  place, the same two paths (luq.quant.kernels.CompactBinaryKernel).
- `split_errors`, `leading_split_errors` (binsearch.c): BiLLM's two searches row by row
  (luq.quant.binsearch).

Each source is built once per version into ~/.cache/luq/native (LUQ_NATIVE_DIR moves it;
LUQ_NATIVE=0 turns it off); where one does not build (no compiler, or a compile error), one
FallbackWarning quotes the compiler's error and names what serves its work instead, `available(name)`
is False and `build_error(name)` says why. The work is split over torch.get_num_threads() Python threads (ctypes
releases the GIL).
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

from luq.errors import warn_fallback

HERE = Path(__file__).parent
_POOL: dict[int, ThreadPoolExecutor] = {}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def compiler() -> str | None:
    """The C compiler the helpers are built with ($CC, else cc or gcc on the PATH), or None."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


class BuildError(OSError):
    """A helper did not build or load; the message quotes the compiler's (or loader's) own error."""


def _build(source: Path, target: Path) -> None:
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler found (set CC, or install gcc)")
    flags = ["-O3", "-shared", "-fPIC"]
    if {"avx2", "fma"} <= cpu_flags():
        flags += ["-mavx2", "-mfma"]
    if "f16c" in cpu_flags():
        flags += ["-mf16c"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # atomic: concurrent builds do not collide
        lib = Path(tmp) / target.name
        try:
            done = subprocess.run([cc, *flags, str(source), "-o", str(lib)], capture_output=True, text=True,
                                  timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            raise BuildError(f"{cc} did not run: {e}") from e
        if done.returncode:
            errors = [ln for ln in done.stderr.splitlines() if "error" in ln] or done.stderr.splitlines()[-1:]
            raise BuildError(f"{cc} failed on {source.name}: {errors[0].strip() if errors else done.returncode}")
        os.replace(lib, target)


# what serves each helper's work where it did not build
FALLBACKS = {"expand_int4": "int4 prompts expand with torch ops (slower)",
             "int4_gemv": "few tokens take torch's int4 op (on AVX2 slower than float32 F.linear)",
             "binary_gemm": "binarized weights take the int4 terms (~6x the memory) or the tiled kernel",
             "compact_gemm": "compact BiLLM takes the bit planes (~2x the memory)",
             "binsearch": "BiLLM's searches run in torch ops (slower)"}


_I, _P = ctypes.c_int64, ctypes.c_void_p
# binary_gemv: plane bytes (8 weights each) per thread at least. Handing a call to the thread pool cost a
# large part of what a single-thread call on SmolLM2's largest linear (110,592 bytes) takes, and on the shared
# 2-core machine a second thread sped no shape up (timed by hand with 2 threads; no result file holds these
# timings), so SmolLM2's linears take one thread and a 4096x4096 layer (2M bytes) several.
GEMV_BYTES_PER_THREAD = 2 ** 19
# int4_gemv: weights per thread at least. `python -m bench.kernels --only gemv` on the shared 2-core machine
# (bench/results/kernels-gemv.json, `thread_split`: one token, rows split over 1 thread vs 2) found a second
# thread slower on every shape it tried, up to 11008x4096 (the pool's handoff), as for binary_gemv above;
# splitting by weights x tokens did not pay either (a one-off run, no result file). So SmolLM2's linears take
# one thread at any token count, and only weights of 4096x4096 and up (two parts there) are split. That file's
# `int4_gemv_macs_per_thread` field is this constant under its former name.
INT4_GEMV_WEIGHTS_PER_THREAD = 2 ** 23
# the functions of each source: name -> argument types (every one returns int: 0, or 1 for no memory)
SIGNATURES = {
    "expand_int4": {"luq_expand_int4": [_P, _P, _I, _I, _I, _P, _P, _I, _I, _I, _I, _P, _I, _I, _I, _I]},
    "int4_gemv": {"luq_int4_gemv": [_P, _P, _P, _I, _I, _I, _I, _I, _I, _P, _I, _I, _I]},
    "binary_gemm": {"luq_binary_tables": [_P, _I, _I, _P],
                    "luq_binary_gemv": [_P, _P, _P, _I, _I, _P, _I, _P, _P, _P, _I, _I, _P, _I, _I, _I, _P, _I],
                    "luq_binary_expand": [_P, _P, _P, _I, _I, _P, _I, _P, _P, _P, _I, _I, _I, _I, _P, _I]},
    "compact_gemm": {"luq_compact_gemv": [_P, _P, _P, _P, _P, _I, _I, _I, _P, _I],
                     "luq_compact_expand": [_P, _P, _I, _I, _P, _I]},
    "binsearch": {"luq_split_errors": [_P, _I, _P, _I, _I, _I, _I, _P],
                  "luq_leading_split_errors": [_P, _P, _I, _P, _I, _I, _I, _P]},
}


@lru_cache(maxsize=None)
def _library(name: str):
    """The functions of `name`.c by name, or the BuildError that kept it from building (one warning that
    quotes it and names the fallback); None where LUQ_NATIVE=0 turns the helpers off."""
    if os.environ.get("LUQ_NATIVE", "1") == "0":
        return None
    source = HERE / f"{name}.c"
    headers = b"".join(h.read_bytes() for h in sorted(HERE.glob("*.h")))  # included by the sources
    flags = repr(sorted(cpu_flags() & {"avx2", "fma", "f16c"})).encode()
    digest = hashlib.sha256(source.read_bytes() + headers + flags).hexdigest()[:16]
    root = Path(os.environ.get("LUQ_NATIVE_DIR") or Path.home() / ".cache" / "luq" / "native")
    target = root / f"{name}-{digest}.so"
    try:
        if not target.is_file():
            _build(source, target)
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        error = e if isinstance(e, BuildError) else BuildError(f"{target.name} did not load: {e}")
        warn_fallback(f"compiled helper {name}.c", str(error), FALLBACKS[name])
        return error
    functions = {}
    for fname, argtypes in SIGNATURES[name].items():
        fn = getattr(lib, fname)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
        functions[fname] = fn
    return functions


def build_error(name: str) -> BuildError | None:
    """Why `name`.c is not available (None where it is, or where LUQ_NATIVE=0 turned it off)."""
    lib = _library(name)
    return lib if isinstance(lib, BuildError) else None


def available(name: str = "expand_int4") -> bool:
    return isinstance(_library(name), dict)


def _pool(threads: int) -> ThreadPoolExecutor:
    return _POOL.get(threads) or _POOL.setdefault(threads, ThreadPoolExecutor(threads))


def expand_int4(packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, starts: torch.Tensor | None,
                terms: torch.Tensor | None, cols: int, r0: int, r1: int, block: int, adjacent: bool,
                dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """bfloat16 W^T [cols, r1 - r0] of weight rows [r0, r1) (multiples of `block`) from an int4 CPU
    packing (`packed` [N, kt/2] in blocks of `block` rows, a byte holding rows 2j and 2j + 1 where
    `adjacent`, else j and j + block/2: kernels.CpuPacking; `scales_zeros` [kt/group, N, 2] bfloat16).
    Input column c sums the kernel columns terms[starts[c]:starts[c + 1]] (int64); starts/terms None:
    column c is kernel column c alone. dtype: bfloat16 (each value rounded once) or float32."""
    fn = _library("expand_int4")["luq_expand_int4"]
    n_rows, kt = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(cols, r1 - r0, dtype=dtype)
    args = (packed.data_ptr(), scales_zeros.data_ptr(), kt, n_rows, group,
            None if starts is None else starts.data_ptr(), None if terms is None else terms.data_ptr())
    threads = max(1, min(torch.get_num_threads(), cols // 64))
    bounds = [cols * i // threads for i in range(threads + 1)]

    def run(i: int) -> int:
        c0, c1 = bounds[i], bounds[i + 1]
        return fn(*args, c0, c1, r0, r1, out.data_ptr() + c0 * out.stride(0) * out.element_size(), out.stride(0),
                  block, int(adjacent), int(dtype == torch.float32))

    if threads == 1:
        failed = run(0)
    else:
        failed = any(_pool(threads).map(run, range(threads)))
    if failed:
        raise MemoryError("luq.quant.native.expand_int4: no memory for its row accumulator")
    return out


def int4_gemv(packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, x: torch.Tensor, block: int,
              adjacent: bool, threads: int, weights_per_thread: int | None = None) -> torch.Tensor:
    """x (float32 [..., kt], the input of each kernel column: gathered by the caller) times W^T -> float32
    [..., N], W read in place from torch's CPU int4 packing (`packed` [N, kt/2] in blocks of `block` rows, a
    byte holding rows 2j and 2j + 1 where `adjacent`, else j and j + block/2: kernels.CpuPacking;
    `scales_zeros` [kt/group, N, 2] bfloat16; w = (q - 8)·s + z), summed in float32. The rows are split
    over up to `threads` threads, one per `weights_per_thread` weights (default INT4_GEMV_WEIGHTS_PER_THREAD)."""
    fn = _library("int4_gemv")["luq_int4_gemv"]
    x = x.contiguous()
    n_rows, kt = packed.shape[0], packed.shape[1] * 2
    T = x.numel() // kt
    out = torch.empty(*x.shape[:-1], n_rows)
    args = (packed.data_ptr(), scales_zeros.data_ptr(), x.data_ptr(), T, kt, n_rows, group)
    blocks = n_rows // block
    threads = min(threads, blocks, n_rows * kt // (weights_per_thread or INT4_GEMV_WEIGHTS_PER_THREAD))
    if threads <= 1:   # the common case (a decode step on a small model): no pool, no closure
        if fn(*args, 0, n_rows, out.data_ptr(), n_rows, block, int(adjacent)):
            raise MemoryError("luq.quant.native.int4_gemv: no memory for its buffers")
        return out
    bounds = [block * (blocks * i // threads) for i in range(threads + 1)]
    _run_parts(lambda i: fn(*args, bounds[i], bounds[i + 1], out.data_ptr(), n_rows, block, int(adjacent)),
               threads, "int4_gemv")
    return out


def _run_parts(run, parts: int, what: str) -> None:
    """run(i) for i < parts, over the thread pool when parts > 1; any nonzero return: MemoryError."""
    failed = run(0) if parts == 1 else any(_pool(parts).map(run, range(parts)))
    if failed:
        raise MemoryError(f"luq.quant.native.{what}: no memory for its buffers")


def _plane_args(planes, params) -> tuple:
    """planes (s1, s2, sal); params (values [rows, n_blocks, 8], row_ref, scale_table, mean_table), the last
    three None unless the values are uint8 codes."""
    s1, s2, sal = planes
    values, row_ref, scale_table, mean_table = params
    kind = 2 if values.dtype == torch.uint8 else int(values.dtype == torch.float16)
    return (s1.data_ptr(), s2.data_ptr(), sal.data_ptr(), sal.numel(), s1.shape[1], values.data_ptr(), kind,
            *(0 if t is None else t.data_ptr() for t in (row_ref, scale_table, mean_table)), s1.shape[2],
            values.shape[1])


def binary_gemv(planes, params: tuple, x: torch.Tensor, threads: int) -> torch.Tensor:
    """x (float32 [T, 8 * nbytes], stored column order, column-scaled) times W^T -> float32 [T, rows], W
    binarized as two bit planes and a salient mask (`planes` = (s1, s2) uint8 [n_blocks, rows,
    block_bytes], sal uint8 [nbytes]: binary_gemm.c) with `params` (`_plane_args`)."""
    lib = _library("binary_gemm")
    x = x.contiguous()
    T, rows, nbytes = x.shape[0], planes[0].shape[1], planes[2].numel()
    tables = torch.empty(T, nbytes, 256)
    lib["luq_binary_tables"](x.data_ptr(), T, nbytes, tables.data_ptr())
    out = torch.empty(T, rows)
    args = _plane_args(planes, params)
    threads = max(1, min(threads, rows * nbytes // GEMV_BYTES_PER_THREAD))
    bounds = [rows * i // threads for i in range(threads + 1)]
    _run_parts(lambda i: lib["luq_binary_gemv"](*args, tables.data_ptr(), T, bounds[i], bounds[i + 1],
                                                out.data_ptr(), rows), threads, "binary_gemv")
    return out


def binary_expand(planes, params: tuple, r0: int, r1: int) -> torch.Tensor:
    """bfloat16 W [r1 - r0, 8 * nbytes] of weight rows [r0, r1) from the planes of `binary_gemv`."""
    lib = _library("binary_gemm")
    out = torch.empty(r1 - r0, 8 * planes[2].numel(), dtype=torch.bfloat16)
    args = _plane_args(planes, params)
    threads = max(1, min(torch.get_num_threads(), (r1 - r0) // 8))
    bounds = [r0 + (r1 - r0) * i // threads for i in range(threads + 1)]
    _run_parts(lambda i: lib["luq_binary_expand"](*args, bounds[i], bounds[i + 1],
                                                  out[bounds[i] - r0:].data_ptr(), out.stride(0)),
               threads, "binary_expand")
    return out


def compact_gemv(dims: torch.Tensor, ptrs: torch.Tensor, x: torch.Tensor, salient: torch.Tensor,
                 threads: int) -> torch.Tensor:
    """x (float32 [T, cols], stored column order, column-scaled) times W^T -> float32 [T, rows], W a compact
    BiLLM weight read in place: `dims` (int64) and `ptrs` (int64 addresses) in compact_gemm.c's order, held
    alive by the caller; salient: long [n_salient], the salient columns in order (their inputs gathered)."""
    tables_fn = _library("binary_gemm")["luq_binary_tables"]
    fn = _library("compact_gemm")["luq_compact_gemv"]
    x = x.contiguous()
    T, rows, nbytes = x.shape[0], int(dims[0]), int(dims[2])
    tables = torch.empty(T, nbytes, 256)
    tables_fn(x.data_ptr(), T, nbytes, tables.data_ptr())
    xs = torch.nn.functional.pad(x.index_select(1, salient), (0, -len(salient) % 8)).contiguous()
    rtables = torch.empty(T, xs.shape[1] // 8, 256)
    tables_fn(xs.data_ptr(), T, xs.shape[1] // 8, rtables.data_ptr())
    out = torch.empty(T, rows)
    threads = max(1, min(threads, rows * nbytes // GEMV_BYTES_PER_THREAD))
    bounds = [rows * i // threads for i in range(threads + 1)]
    _run_parts(lambda i: fn(dims.data_ptr(), ptrs.data_ptr(), x.data_ptr(), tables.data_ptr(), rtables.data_ptr(), T,
                            bounds[i], bounds[i + 1], out.data_ptr(), rows), threads, "compact_gemv")
    return out


def compact_expand(dims: torch.Tensor, ptrs: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """bfloat16 W [r1 - r0, cols] of weight rows [r0, r1) (stored column order, before the column scales)
    from the stored tensors `compact_gemv` reads."""
    fn = _library("compact_gemm")["luq_compact_expand"]
    out = torch.empty(r1 - r0, int(dims[1]), dtype=torch.bfloat16)
    threads = max(1, min(torch.get_num_threads(), (r1 - r0) // 8))
    bounds = [r0 + (r1 - r0) * i // threads for i in range(threads + 1)]
    _run_parts(lambda i: fn(dims.data_ptr(), ptrs.data_ptr(), bounds[i], bounds[i + 1],
                            out[bounds[i] - r0:].data_ptr(), out.stride(0)), threads, "compact_expand")
    return out


def _row_chunks(score, rows: int, row_chunk: int, n_out: int) -> torch.Tensor:
    """sum over chunks of `row_chunk` rows, in chunk order, of score(r0, r1, out) (which adds
    each row's errors into the float64 out [n_out]): the same sum whatever the thread count."""
    bounds = [(r0, min(r0 + row_chunk, rows)) for r0 in range(0, rows, row_chunk)]
    parts = torch.zeros(len(bounds), n_out, dtype=torch.float64)

    def run(i: int) -> int:
        return score(*bounds[i], parts[i].data_ptr())

    threads = min(torch.get_num_threads(), len(bounds))
    failed = any(map(run, range(len(bounds)))) if threads <= 1 else any(_pool(threads).map(run, range(len(bounds))))
    if failed:
        raise MemoryError("luq.quant.native: no memory for a search's row buffers")
    total = torch.zeros(n_out, dtype=torch.float64)
    for part in parts:
        total += part
    return total


def split_errors(sorted_rows: torch.Tensor, splits: torch.Tensor, row_chunk: int) -> torch.Tensor:
    """luq.quant.binsearch.split_errors from the rows sorted ascending (float32 [rows, cols]) and
    the break points (float32 [K], or [rows, K] one per row): float64 [K]."""
    fn = _library("binsearch")["luq_split_errors"]
    s, t = sorted_rows.contiguous(), splits.contiguous()
    rows, cols = s.shape
    n_splits = t.shape[-1]
    stride = n_splits if t.dim() == 2 else 0
    return _row_chunks(lambda r0, r1, out: fn(s.data_ptr(), cols, t.data_ptr(), stride, n_splits, r0, r1, out),
                       rows, row_chunk, n_splits)


def leading_split_errors(x: torch.Tensor, sorted_rows: torch.Tensor, counts: torch.Tensor,
                         row_chunk: int) -> torch.Tensor:
    """luq.quant.binsearch.leading_split_errors from the rows (float32 [rows, cols], columns in
    rank order), the same rows sorted, and the counts (int64 [K], 1 <= n < cols): float64 [K]."""
    fn = _library("binsearch")["luq_leading_split_errors"]
    x, s, counts = x.contiguous(), sorted_rows.contiguous(), counts.contiguous()
    rows, cols = x.shape
    return _row_chunks(lambda r0, r1, out: fn(x.data_ptr(), s.data_ptr(), cols, counts.data_ptr(), len(counts),
                                              r0, r1, out), rows, row_chunk, len(counts))
