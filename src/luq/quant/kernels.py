"""Fast forwards for packed weights, chosen per format and device.

A *kernel* is built once from a QuantizedWeight (at the first forward on a device, because
the packed layout of torch's int4 kernels depends on the device) and then computes
y = x W_hat^T without materialising W_hat for a few tokens:

- `Int4Kernel`: torch's int4 matmul (`_weight_int4pack_mm_for_cpu` on CPU, tinygemm's
  `_weight_int4pack_mm` on CUDA: `Int4Ops`), whose weight is w = (q - 8)·s + z with q in
  0..15 and one (s, z) per row per group of 32..256 columns.
  Every stored format is transcoded into a sum of such *terms*, concatenated along the inner
  dimension, each term reading its own gather of the input columns (`Int4Terms`):
    GPTQ <= 4 bits: one term (act-order `g_idx` groups: the input columns are permuted
      into group order);
    GPTQ 5..8 bits: two terms, the high and low 4-bit digits of each code (16·s and s);
    BiLLM and compact BiLLM (on CUDA; on CPU with LUQ_KERNEL=int4 or no compiler): in each block,
      salient columns and the others are gathered
      into separate groups of 32; three terms (two when the means are zero): the first
      sign, the second sign (salient) or the signed sparse mask (others), and the sparse
      mask times the difference of the means. The column scales of compact BiLLM multiply
      the input.
  Exact up to bfloat16: the kernel takes bfloat16 activations (its float32 path is far slower
  on CPU), rounds its scales to bfloat16 and returns bfloat16.
  On an x86 CPU with AVX2 and FMA where torch's capability is AVX2 or the portable default
  (`INT4_GEMV_CAPABILITIES`: there torch's op is slower than float32 F.linear on small layers), few
  tokens (< `dense_from`) take a compiled GEMV instead (`Int4Kernel.gemv_mm`: luq.quant.native.int4_gemv)
  that reads the same packed terms in place, with float32 activations and sums (the scales and zeros
  stay the op's bfloat16 ones). Its times against the op and float32 F.linear, per shape and token
  count: `python -m bench.kernels --only gemv` (bench/results/kernels-gemv.json); a whole model's
  decode with it: `python -m bench.inference` on an AVX2 CPU (bench/results/inference-avx2.json); both
  rendered in docs/performance.md. Where it does not build, torch's op serves (one FallbackWarning);
  AVX-512's op was not measured against it and serves there.
  The kernel's time grows linearly with the tokens (it re-expands the weight for every 4
  rows of input), so from `DENSE_FROM_TOKENS` tokens on (prompts) the same packed terms are
  expanded once per call into a transient bfloat16 tile of W^T, `DENSE_TILE_BYTES` at most,
  and multiplied by one dense bfloat16 GEMM (`Int4Kernel.dense`); nothing dense stays
  resident. The expansion reads torch's CPU packing, which differs per CPU capability
  (`CpuPacking`: blocks of 64 rows on AVX-512, 32 on AVX2 and the portable default, two rows
  per byte; `cpu_packing` finds this process's by packing a probe), in one compiled pass that
  also sums the terms of each input column (luq.quant.native), or with torch ops where the
  helper does not build (the terms side by side, slower); where the packing is none of
  these, prompts stay on the int4 kernel. Every such fallback warns once (FallbackWarning).
  CUDA (compute capability 8.0+): the codes go to tinygemm nibble-packed (`pack_nibbles`: two
  columns per byte, the even one high) with the widest inner k-tiling that divides the inner
  dimension (`inner_k_tiles`); its dense prompt path reads tinygemm's tiled packing back with
  torch ops (`_expand_tinygemm`), from `DENSE_FROM_TOKENS_CUDA` tokens. Each CUDA kernel is probed
  once at build (`probed_kernel`): a fixed random input through the op must match the terms' exact
  weight to SELF_CHECK_TOL, else (or if the op raises: old GPU, missing op) one warning line and the
  tiled kernel. `python bench/cuda_check.py` checks and times it on a GPU; its probes, errors and times
  on an H200 are in bench/results/cuda_check-*.json (docs/performance.md, "CUDA").
- `BinaryKernel` (CPU, binarized weights: the default where the compiled helper builds): BiLLM and
  compact BiLLM kept as two 1-bit planes (first sign; one second plane: the second sign on salient
  columns, the sparse mask on the others), the salient column mask, the per-row-per-block scales and
  means (BiLLM's float16; compact BiLLM's 1-byte codes, a row reference and two tables, decoded as
  `dequantize` decodes them) and the input gather (each block's salient columns first, then
  act-order) and column scales. It gives back the stored tensors its planes determine
  (`stored_tensors`), so that its QuantLinear frees them: what a layer then holds, against its stored
  bits and against the int4 terms, is in bench/results/kernels-binary.json (docs/performance.md). Few
  tokens (< `BINARY_DENSE_FROM_TOKENS`): per token, a table of the 256 subset sums of the 8 inputs of
  each byte position; per row and block, five sums by lookups (one per byte of each plane and two on
  salient bytes) combined with the block's 4 scales and means, in float32 from float32 inputs
  (matches `dequantize()` to float32 rounding: tests/test_kernels.py, LOOKUP_TOL). Prompts: a transient
  bfloat16 tile of W (DENSE_TILE_BYTES at most) expanded from the planes, one bfloat16 GEMM. Both in C
  (luq.quant.native, binary_gemm.c). Their times against the int4 terms, and the token count from which
  the tile wins, per shape: `python -m bench.kernels --only binary` (bench/results/kernels-binary.json).
  LUQ_KERNEL=int4 keeps the terms.
- `CompactBinaryKernel` (CPU, compact BiLLM: the default where the compiled helpers build): the same two
  paths read from the stored tensors themselves (signs, salient mask, second signs on salient columns,
  scale codes: compact_gemm.c), plus the sparse group decoded once into a byte per sparse weight (or a
  bit per weight where that is no larger), so that a layer holds about its stored bits rather than
  twice them (bench/results/kernels-binary.json).
- `TiledKernel`: anything the int4 kernel refuses (shapes not divisible by 16 rows / 32
  columns, other devices, a CUDA kernel that failed its probe): de-quantize a tile of rows and
  multiply, tile by tile.

`kernel_for(qweight, device)` picks one (LUQ_KERNEL=int4 / tiled / binary forces one); `QuantLinear`
caches it (not in the state dict). A kernel's `nbytes` is what it holds in memory; its
`stored_tensors()` (Int4Kernel: GPTQ's codes where its packing is one `expand_codes` reads;
BinaryKernel: what the weight's `stored_from_parts` rebuilds) are the stored tensors it gives back
exactly, which `QuantLinear` then frees.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from luq.errors import warn_fallback
from luq.quant import native
from luq.quant.base import ROW_TILE, QuantizedWeight
from luq.quant.packing import pack_bits, pack_bool, unpack_bits, unpack_bool

INT4_GROUPS = (256, 128, 64, 32)
TERM_GROUP = 32      # kernel group of the binarized transcoding (salient / other columns of a block)
# Inputs of at least this many tokens take the dense bfloat16 path (expand + GEMM) instead of the int4
# kernel, for weights of one int4 term (GPTQ <= 4 bits) and of several (8-bit GPTQ, BiLLM). Set from the
# per-shape `crossover` fields of bench/results/kernels.json (`python -m bench.kernels`; docs/performance.md,
# "Prompts"): "one term" is the crossover of most GPTQ-4 shapes there. "several terms": that file times only
# BiLLM (three terms), whose crossovers lie below this value; the code keeps the higher value for every
# weight of several terms, 8-bit GPTQ's two included, which the file does not time.
DENSE_FROM_TOKENS = {"one term": 32, "several terms": 16}
# BinaryKernel: from this many tokens on, the bfloat16 tile + GEMM instead of the subset-sum lookups. The
# per-shape crossovers are the `crossover` fields of bench/results/kernels-binary.json (`python -m bench.kernels
# --only binary`); they differ by shape and format, and the code uses the smallest of them, so on the shapes
# whose crossover is later, counts between this one and theirs take the tile where the lookups timed faster.
BINARY_DENSE_FROM_TOKENS = 4
# CompactBinaryKernel: a position in a block is one byte, NO_POSITION marking a stored code that names no
# sparse weight (a salient column, or one past the block's end)
NO_POSITION, MAX_POSITION_BLOCK = 255, 248
DENSE_TILE_BYTES = 16 * 2 ** 20   # bound on the transient bfloat16 weight tile of that path
# Below this many kernel weights (rows x inner columns), the CPU int4 op runs on one thread: waking
# torch's other OpenMP threads (OMP_WAIT_POLICY=PASSIVE) costs more than a small product takes.
# `python -m bench.kernels --only threads` (bench/results/kernels-threads.json, `rows`: one token, 2 threads
# vs 1; docs/performance.md) finds one thread faster up to 1024x1024 (1 M weights) and two threads faster
# from 2048x2048 (4 M); the threshold sits between them.
INT4_ONE_THREAD_BELOW = 2 * 2 ** 20
# torch's CPU capabilities on which few tokens (< dense_from) take the compiled int4 GEMV
# (luq.quant.native.int4_gemv) instead of torch's op, on an x86 CPU with AVX2 and FMA. AVX2: `python -m
# bench.kernels --only gemv` (bench/results/kernels-gemv.json, `one_token` and `by_tokens`; AVX2 EPYC) has the
# GEMV faster than the op at every shape and token count it times. The portable default
# (ATEN_CPU_CAPABILITY=default), where the op was slower still, was timed once by hand (no result file).
# AVX-512's op (block-64 packing, which the GEMV reads too) is not measured against it, so it keeps the op.
INT4_GEMV_CAPABILITIES = ("AVX2", "DEFAULT")
# Where the GEMV serves, prompts take the dense path only from this many tokens: the GEMV's time grows with the
# tokens, the dense path's expansion is paid once per call. bench/results/kernels-gemv.json (`by_tokens`) has
# the GEMV faster than the dense path at every count it times, up to 31 tokens; the value was set by a one-off
# run at 64 to 384 tokens on SmolLM2's shapes (2 threads, AVX2 EPYC), where the GEMV still won at 192 and the
# two were mixed above. No result file holds that run.
GEMV_DENSE_FROM_TOKENS = 192
TINYGEMM_N_TILE, TINYGEMM_K_TILE = 8, 16   # rows and columns per tile of tinygemm's (CUDA) packing
# On CUDA, prompts from this many tokens take the dense path (expand + cuBLAS): tinygemm dequantizes the
# whole weight again for every 16 tokens. Set from the `crossover` fields of bench/results/cuda_check-4096.json
# (every format) and cuda_check-576.json (the op stays faster about as far as it was timed): `python
# bench/cuda_check.py` on an H200, docs/performance.md, "CUDA". Those runs' `dense_from` field (128) is the
# constant in the code when they were made, not this value.
DENSE_FROM_TOKENS_CUDA = 512
# relative output error the build probe accepts: bfloat16 rounding errs by the order of 2^-8 (the errors the probe
# saw on an H200: bench/results/cuda_check-*.json), a wrong layout by the order of 1
SELF_CHECK_TOL = 2e-2


@dataclass(frozen=True)
class CpuPacking:
    """One of torch's CPU int4 packings (`_convert_weight_to_int4pack_for_cpu`), which differ per CPU
    capability: uint8 [N, K / 2] holding, per block of `block` weight rows and per column, block / 2
    bytes; byte j of a column holds two rows of the block, the first in the low nibble:
    rows (2j, 2j + 1) where `adjacent`, else (j, j + block / 2). Measured with torch 2.13: AVX-512
    (64, split), AVX2 (32, split), the portable default (32, adjacent). `cpu_packing()` finds the
    one of this process by packing a probe."""

    block: int
    adjacent: bool

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        """Codes int [N, K] in 0..15 (N a multiple of `block`) -> the packed uint8 [N, K / 2]."""
        n, k = q.shape
        low, high = self._pair(q.to(torch.uint8).view(n // self.block, self.block, k).transpose(1, 2))
        return (low | (high << 4)).reshape(n, k // 2)

    def unpack(self, packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Inverse of `pack`, transposed: packed rows (whole blocks) -> out [K, rows] (any dtype), in place."""
        n, k = packed.shape[0], packed.shape[1] * 2
        p = packed.reshape(n // self.block, k, self.block // 2)
        low, high = self._pair(out.view(k, n // self.block, self.block).transpose(0, 1))
        low.copy_(p & 15)
        high.copy_(p >> 4)
        return out

    def _pair(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [..., block] (the rows of a block) -> views [..., block / 2]: the rows each byte holds in its
        low nibble and in its high one."""
        if self.adjacent:
            pairs = t.unflatten(-1, (self.block // 2, 2))
            return pairs[..., 0], pairs[..., 1]
        halves = t.unflatten(-1, (2, self.block // 2))
        return halves[..., 0, :], halves[..., 1, :]


CPU_PACKINGS = (CpuPacking(64, False), CpuPacking(32, False), CpuPacking(32, True))


@lru_cache(maxsize=None)
def cpu_packing(capability: str) -> CpuPacking | None:
    """The packing torch's CPU int4 op uses in this process (`capability`: torch's CPU capability,
    the cache key): the first of CPU_PACKINGS that reproduces it on random codes, or None (one
    warning: prompts then stay on the int4 op)."""
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = convert(q, 1)
    for packing in CPU_PACKINGS:
        if packed.dtype == torch.uint8 and packed.shape == (128, 32) and torch.equal(packing.pack(q), packed):
            return packing
    warn_fallback("int4 prompt path", f"torch's CPU int4 packing on {capability} is none luq knows "
                  f"(shape {tuple(packed.shape)}, {packed.dtype})", "the int4 op serves prompts too")
    return None


def gemm_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the prompt paths' GEMM: bfloat16 on GPUs and on CPUs with bfloat16 dot products
    (avx512_bf16, AMX, Arm's bf16), float32 elsewhere. On an AVX2 CPU torch's bfloat16 GEMM is emulated:
    the dense bfloat16 row of bench/results/inference-avx2.json (`python -m bench.inference`) shows its prefill."""
    if device.type != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if _bf16_dot_products() else torch.float32


def _tile_bytes(weights: int, device: torch.device) -> int:
    """Bytes of a transient prompt tile of `weights` weights: bfloat16, plus its copy in the GEMM's dtype."""
    gemm = gemm_dtype(device)
    return weights * (2 + (0 if gemm == torch.bfloat16 else gemm.itemsize))


@lru_cache(maxsize=1)
def _bf16_dot_products() -> bool:
    return bool(native.cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class Int4Ops:
    """One device's int4 matmul. pack(q): codes int32 [N, K] in 0..15 -> the packed weight;
    mm(x bfloat16 [M, K], packed, group, scales_zeros bfloat16 [K / group, N, 2]) -> bfloat16 [M, N],
    with w = (q - 8)·s + z. layout: "cpu" (torch's CPU kernel, its packing `packing`: None where none
    of CPU_PACKINGS) or "tinygemm" (CUDA, probed once per kernel at build: `kernel_for`)."""

    pack: Callable[[torch.Tensor], torch.Tensor]
    mm: Callable
    layout: str
    packing: CpuPacking | None = None


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] in 0..15 as tinygemm's input: uint8 [N, K / 2], column 2i in the high nibble
    of byte i and column 2i + 1 in the low one."""
    return ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 [N, K / 2] -> uint8 [N, K]."""
    return torch.stack([p >> 4, p & 15], -1).reshape(p.shape[0], -1)


def inner_k_tiles(k: int) -> int:
    """tinygemm's inner k-tiles for K columns: the widest load (8, 4 or 2 tiles of 16 columns) that divides K."""
    tiles = next((t for t in (8, 4, 2) if k % (TINYGEMM_K_TILE * t) == 0), None)
    if tiles is None:
        raise ValueError(f"tinygemm needs K % 32 == 0, got K = {k}")
    return tiles


def tinygemm_ops(convert, mm) -> Int4Ops:
    """Int4Ops over tinygemm's two ops: convert(uint8 [N, K / 2], inner_k_tiles) -> int32
    [N / 8, K / (16·inner_k_tiles), 32, inner_k_tiles / 2], and mm."""
    return Int4Ops(lambda q: convert(pack_nibbles(q), inner_k_tiles(q.shape[1])), mm, "tinygemm")


def int4_ops(device: torch.device) -> Int4Ops | None:
    """The int4 matmul of `device`, or None (one warning where a device that has one in some torch cannot
    use it here)."""
    if device.type == "cpu":
        convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
        mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
        if convert is None or mm is None:
            warn_fallback("int4 kernel on cpu", f"torch {torch.__version__} has no CPU int4 op",
                          "the tiled de-quantizing kernel serves GPTQ")
            return None
        return Int4Ops(lambda q: convert(q, 1), mm, "cpu", cpu_packing(torch.backends.cpu.get_cpu_capability()))
    if device.type == "cuda":
        convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack", None)
        mm = getattr(torch.ops.aten, "_weight_int4pack_mm", None)
        if convert is None or mm is None:
            _warn_tiled(device, "torch has no tinygemm ops")
            return None
        # tinygemm's bfloat16 mma needs sm_80+; older NVIDIA GPUs get its kernel compiled empty (garbage, no error)
        if torch.version.hip is None and torch.cuda.get_device_capability(device) < (8, 0):
            _warn_tiled(device, f"compute capability {torch.cuda.get_device_capability(device)} < (8, 0)")
            return None
        return tinygemm_ops(convert, mm)
    _warn_tiled(device, "luq has no int4 kernel for this device type")
    return None


def _warn_tiled(device: torch.device, why: str) -> None:
    """One line per device and cause: its int4 kernel is not used."""
    warn_fallback(f"int4 kernel on {device}", why, "the tiled de-quantizing kernel serves it")


class TiledKernel(nn.Module):
    """Generic fallback: de-quantize `row_tile` output rows at a time and multiply."""

    name = "tiled"

    def __init__(self, qweight: QuantizedWeight, row_tile: int = ROW_TILE):
        super().__init__()
        self.qweight, self.row_tile = qweight, row_tile

    @property
    def nbytes(self) -> int:
        return 0

    @property
    def transient_nbytes(self) -> int:
        """Peak bytes of the de-quantized tile a forward holds."""
        return 4 * self.qweight.shape[1] * min(self.qweight.shape[0], self.row_tile)

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        rows = self.qweight.shape[0]
        x = x.to(dtype)
        if rows <= self.row_tile:
            return nn.functional.linear(x, self.qweight.dequantize_rows(0, rows, dtype))
        out = torch.empty(*x.shape[:-1], rows, dtype=dtype, device=x.device)
        for r0 in range(0, rows, self.row_tile):
            r1 = min(r0 + self.row_tile, rows)
            out[..., r0:r1] = nn.functional.linear(x, self.qweight.dequantize_rows(r0, r1, dtype))
        return out


@dataclass
class Int4Terms:
    """A weight as the int4 kernel's input: y = (x·col_scale)[:, index] W_t^T, where
    W_t[r, j] = scale[r, j // group] · codes[r, j] + zero[r, j // group].

    codes: integers [rows, K_t], each group's codes spanning at most 16 values; index: long
    [K_t], the input column read by each kernel column (in_features = a zero column), None
    for the identity; col_scale: float [in] or None. stored: where the codes determine stored
    tensors, the map from codes (int32 [rows, K_t]) to them (holding nothing large of its own)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    index: torch.Tensor | None
    group: int
    col_scale: torch.Tensor | None = None
    stored: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None

    def dense(self, cols: int) -> torch.Tensor:
        """W_hat [rows, cols] as these terms compute it (float32; for tests)."""
        rows, kt = self.codes.shape
        w = (self.codes.float().reshape(rows, -1, self.group) * self.scale[..., None]
             + self.zero[..., None]).reshape(rows, kt)
        index = torch.arange(kt, device=w.device) if self.index is None else self.index
        out = torch.zeros(rows, cols + 1, device=w.device).index_add_(1, index, w)[:, :cols]
        return out if self.col_scale is None else out * self.col_scale[None, :]

    def rows(self, r0: int, r1: int) -> "Int4Terms":
        """The terms of output rows [r0, r1)."""
        return Int4Terms(self.codes[r0:r1], self.scale[r0:r1], self.zero[r0:r1], self.index, self.group,
                         self.col_scale)


class Int4Kernel(nn.Module):
    """A weight transcoded into int4 terms (`Int4Terms`), packed once for this device by `ops`."""

    name = "int4"

    def __init__(self, terms: Int4Terms, in_features: int, ops: Int4Ops):
        super().__init__()
        rows, kt = terms.codes.shape
        g = terms.codes.reshape(rows, kt // terms.group, terms.group).to(torch.int32)
        # Shift each group's codes by k so they land in 0..15 with k = 0 where they allow it:
        # the bfloat16 zero z - k·s then stays exactly z (often 0) instead of carrying a rounding
        # error that every activation of the group multiplies.
        lo, hi = -8 - g.amin(-1), 7 - g.amax(-1)
        k = torch.minimum(torch.maximum(torch.zeros_like(lo), lo), hi)
        q = (g + 8 + k[..., None]).reshape(rows, kt)
        zero = terms.zero - k * terms.scale
        self._stored, self.shift = terms.stored, (None if terms.stored is None else k.to(torch.int8))
        self.packed = ops.pack(q.contiguous())
        self.scales_zeros = torch.stack([terms.scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.group, self.index, self.col_scale = terms.group, terms.index, terms.col_scale
        self._mm, self.layout = ops.mm, ops.layout
        self.packing = ops.packing
        # rows the expansion reads at a time
        self.block = TINYGEMM_N_TILE if ops.layout != "cpu" else ops.packing.block if ops.packing else 0
        self.pad = terms.index is not None and bool((terms.index == in_features).any())
        self.rows, self.kt, self.in_features = rows, kt, in_features
        self.dense_from = (DENSE_FROM_TOKENS["one term" if kt == in_features else "several terms"]
                           if ops.layout == "cpu" else DENSE_FROM_TOKENS_CUDA)
        self.zero_free = not bool(self.scales_zeros[..., 1].any())
        # the dense path reads the packing back: only where it is the layout `expand_codes` knows
        self.dense_ok = self._layout_known() and torch.equal(self.expand_codes(0, rows), q.t().to(torch.uint8))
        if not self.dense_ok and self.block:
            why = (f"{rows} rows are not a multiple of the packing's block of {self.block}" if rows % self.block
                   else f"the {ops.layout} packing of a {rows}x{kt} weight does not read back")
            warn_fallback("int4 prompt path", why, "the int4 op serves prompts too (slower from ~32 tokens)")
        self.native = self.dense_ok and ops.layout == "cpu" and native.available()
        # few tokens on CPU: the compiled GEMV reads the same packing in place, where it beats torch's op
        self.gemv = self.dense_ok and ops.layout == "cpu" and self.gemv_pays() and native.available("int4_gemv")
        if self.gemv:
            self.dense_from = max(self.dense_from, GEMV_DENSE_FROM_TOKENS)
        self.starts = self.by_column = None          # input column c sums kernel columns by_column[starts[c]:starts[c+1]]
        if self.native and terms.index is not None:
            self.by_column = torch.argsort(terms.index, stable=True)
            counts = torch.bincount(terms.index, minlength=in_features + 1)[:in_features]
            self.starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    @property
    def nbytes(self) -> int:
        """Bytes this kernel holds beyond the stored weight (packed codes, scales, gathers)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_zeros, self.index, self.col_scale,
                                                          self.starts, self.by_column, self.shift) if t is not None)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors the packed codes give back exactly (the terms' `stored` map), where the
        packing is one `expand_codes` reads."""
        if self._stored is None or not self.dense_ok:
            return {}
        q = self.expand_codes(0, self.rows).t().to(torch.int32)
        g = q.view(self.rows, -1, self.group) - 8 - self.shift[..., None].to(torch.int32)
        return self._stored(g.view(self.rows, self.kt))

    def _layout_known(self) -> bool:
        """Whether the packed weight has the shape of the layout `expand_codes` reads (its values are checked after)."""
        if not self.block or self.rows % self.block:
            return False
        if self.layout == "cpu":
            return self.packed.dtype == torch.uint8 and self.packed.numel() == self.rows * self.kt // 2
        tiles = inner_k_tiles(self.kt)
        shape = (self.rows // TINYGEMM_N_TILE, self.kt // (TINYGEMM_K_TILE * tiles), 32, tiles // 2)
        return self.packed.dtype == torch.int32 and tuple(self.packed.shape) == shape and self.packed.is_contiguous()

    def expand_codes(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The packed codes of rows [r0, r1) (multiples of `block`), transposed: [kt, r1 - r0],
        uint8 (or written into `out`, converting)."""
        if out is None:
            out = torch.empty(self.kt, r1 - r0, dtype=torch.uint8, device=self.packed.device)
        if self.layout == "cpu":
            return self._expand_cpu(r0, r1, out)
        return self._expand_tinygemm(r0, r1, out)

    def _expand_cpu(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [r0, r1) of torch's CPU packing of this process (`CpuPacking.unpack`)."""
        return self.packing.unpack(self.packed[r0:r1], out)

    def _expand_tinygemm(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """tinygemm's packing (int32 [N / 8, K / (16·t), 32, t / 2], t inner k-tiles), read from
        torch's int4mm.cu: word [n_tile, k_outer, lane, j] holds 8 codes of row 8·n_tile + lane // 4;
        its byte b (little-endian) holds columns k = 16·t·k_outer + 32·j + 16·(b % 2) + 8·h + 2·(lane % 4)
        + b // 2, h = 0 in the low nibble and 1 in the high one.
        Undone here by one strided copy per nibble (the `bench/cuda_check.py` probe and the build's
        round trip check it on the device)."""
        t = inner_k_tiles(self.kt)
        n_tiles, k_outer = (r1 - r0) // TINYGEMM_N_TILE, self.kt // (TINYGEMM_K_TILE * t)
        # bytes as [n_tile, k_outer, lane // 4, lane % 4, j, b // 2, b % 2]
        p = self.packed[r0 // TINYGEMM_N_TILE:r1 // TINYGEMM_N_TILE].view(torch.uint8)
        p = p.view(n_tiles, k_outer, TINYGEMM_N_TILE, 4, t // 2, 2, 2)
        # out as [k_outer, j, b % 2, nibble, lane % 4, b // 2, n_tile, lane // 4]
        dst = out.view(k_outer, t // 2, 2, 2, 4, 2, n_tiles, TINYGEMM_N_TILE)
        order = (1, 4, 6, 3, 5, 0, 2)
        dst[:, :, :, 0].copy_((p & 15).permute(order))
        dst[:, :, :, 1].copy_((p >> 4).permute(order))
        return out

    def dense_tile(self, r0: int, r1: int) -> torch.Tensor:
        """W_t^T for rows [r0, r1): bfloat16 [kt, r1 - r0], (q - 8)·s + z as the kernel computes it
        (each value rounded once to bfloat16, twice where the group has a zero)."""
        wt = self.expand_codes(r0, r1, torch.empty(self.kt, r1 - r0, dtype=torch.bfloat16, device=self.packed.device))
        w = wt.view(-1, self.group, r1 - r0)
        sz = self.scales_zeros[:, r0:r1]
        w.sub_(8).mul_(sz[:, None, :, 0].contiguous())   # contiguous: the strided view is slower
        if not self.zero_free:
            w.add_(sz[:, None, :, 1].contiguous())
        return wt

    def weight_t(self, r0: int, r1: int) -> torch.Tensor:
        """The transient tile of the dense path: bfloat16 [inner, r1 - r0], where inner is
        in_features (compiled expansion: the terms of each input column summed in float32) or kt
        (torch ops: the terms side by side; the input is gathered to match)."""
        if self.native:
            return native.expand_int4(self.packed, self.scales_zeros, self.group, self.starts, self.by_column,
                                      self.in_features, r0, r1, self.packing.block, self.packing.adjacent,
                                      gemm_dtype(self.packed.device))
        return self.dense_tile(r0, r1)

    @property
    def tile_rows(self) -> int:
        """Rows per transient tile of the dense path (a multiple of `block`, DENSE_TILE_BYTES at most)."""
        inner = self.in_features if self.native else self.kt
        return max(self.block, DENSE_TILE_BYTES // (self._tile_itemsize * inner) // self.block * self.block)

    @property
    def _tile_itemsize(self) -> int:
        """Bytes per weight of the transient tile: the compiled expansion writes the GEMM's dtype; the torch
        ops write bfloat16, copied to the GEMM's dtype where that is another."""
        gemm = gemm_dtype(self.packed.device)
        return gemm.itemsize if self.native else 2 + (0 if gemm == torch.bfloat16 else gemm.itemsize)

    @property
    def transient_nbytes(self) -> int:
        """Peak bytes of the transient weight tile of the dense path (0 where prompts stay on int4): the
        bfloat16 tile, and its float32 copy where the GEMM runs in float32."""
        inner = self.in_features if self.native else self.kt
        return self._tile_itemsize * inner * min(self.rows, self.tile_rows) if self.dense_ok else 0

    def dense(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [tokens, in_features] (bfloat16, column-scaled) times W^T, tile by tile of rows, the GEMM in
        `gemm_dtype(device)` (float32 on CPUs without bfloat16 dot products: there a bfloat16 GEMM is
        several times slower than float32's)."""
        if not self.native:
            x2 = self.gather(x2, transposed=True)
        gemm = gemm_dtype(x2.device)
        x2, step = x2.to(gemm), self.tile_rows
        if step >= self.rows:
            return x2 @ self.weight_t(0, self.rows).to(gemm)
        out = torch.empty(x2.shape[0], self.rows, dtype=gemm, device=x2.device)
        for r0 in range(0, self.rows, step):
            r1 = min(r0 + step, self.rows)
            out[:, r0:r1] = x2 @ self.weight_t(r0, r1).to(gemm)
        return out

    def gather(self, x2: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """The input column read by each kernel column (a zero column for padding), along the last dimension.
        transposed (x2 2-D): gathered as rows of x2^T (a strided result, faster than gathering columns
        for long inputs)."""
        if self.pad:
            x2 = nn.functional.pad(x2, (0, 1))
        if self.index is None:
            return x2
        return x2.t().index_select(0, self.index).t() if transposed else x2.index_select(-1, self.index)

    def prepare(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [tokens, in_features] as both paths take it: column-scaled, bfloat16."""
        if self.col_scale is not None:
            x2 = x2 * self.col_scale
        return x2.to(torch.bfloat16)

    def packed_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (`prepare`d) times W^T through the device's int4 kernel (one CPU thread for a small
        weight: INT4_ONE_THREAD_BELOW)."""
        x2 = self.gather(x2).contiguous()
        threads = torch.get_num_threads()
        if self.layout != "cpu" or threads == 1 or self.rows * self.kt >= INT4_ONE_THREAD_BELOW:
            return self._mm(x2, self.packed, self.group, self.scales_zeros)
        torch.set_num_threads(1)
        try:
            return self._mm(x2, self.packed, self.group, self.scales_zeros)
        finally:
            torch.set_num_threads(threads)

    @staticmethod
    def gemv_pays() -> bool:
        """Whether few tokens take the compiled GEMV (`gemv_mm`) in this process rather than torch's CPU op:
        where it has its AVX2 + FMA loop and torch's capability is one of INT4_GEMV_CAPABILITIES."""
        return ({"avx2", "fma"} <= native.cpu_flags()
                and torch.backends.cpu.get_cpu_capability() in INT4_GEMV_CAPABILITIES)

    def gemv_mm(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] times W^T -> float32 [..., rows], through the compiled GEMV that reads the CPU
        packing in place (luq.quant.native.int4_gemv): the input column-scaled and gathered in float32 (not
        rounded to bfloat16), float32 sums; the weight is the op's, (q - 8)·s + z with bfloat16 s and z."""
        x = x.float()
        if self.col_scale is not None:
            x = x * self.col_scale
        return native.int4_gemv(self.packed, self.scales_zeros, self.group, self.gather(x), self.block,
                                self.packing.adjacent, torch.get_num_threads())

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.gemv and x.numel() < self.dense_from * x.shape[-1]:   # fewer tokens than dense_from
            return self.gemv_mm(x).to(dtype)
        lead = x.shape[:-1]
        x2 = self.prepare(x.reshape(-1, x.shape[-1]))
        y = self.dense(x2) if self.dense_ok and x2.shape[0] >= self.dense_from else self.packed_mm(x2)
        return y.to(dtype).reshape(*lead, -1)


def salient_first(salient: torch.Tensor, block_size: int) -> torch.Tensor:
    """long [in]: the columns of each block, its salient ones first (stable): the kernel's column order,
    so that most bytes of the planes hold only salient or only plain columns (fewer lookups per byte)."""
    cols = salient.numel()
    key = torch.arange(cols) // block_size * 2 + (~salient).long()
    return torch.argsort(key, stable=True)


class BinaryKernel(nn.Module):
    """A binarized weight (anything with `binary_parts`) as two bit planes, 1 bit per weight each,
    little-endian within bytes, block by block (`_by_block`), the columns of each stored block in
    `salient_first` order: the first sign (`s1`) and one second plane (`s2`: the second sign on salient
    columns, the sparse mask on the others: the two bits per weight BiLLM stores); the salient mask as
    bits (`sal`); the per-row-per-block scales and means (`params` [rows, n_blocks, 8]: float16 where
    that holds them exactly, as BiLLM stores them, else float32); the input column of each kernel
    column (`order`: that order, and act-order where stored) and the column scales. Few tokens:
    subset-sum lookups in float32 (native.binary_gemv); from `dense_from` tokens: a transient bfloat16
    tile of W and one bfloat16 GEMM (native.binary_expand). Needs the compiled helper (`supports`).

    `stored_tensors()` gives back the stored tensors these planes determine exactly (the weight's
    `stored_from_parts`), so that a QuantLinear need not keep its own copy of them."""

    name = "binary"

    def __init__(self, qweight, row_chunk: int = ROW_TILE):
        super().__init__()
        rows, cols = qweight.shape
        s1_chunks, s2_chunks, params, perm = [], [], [], None
        for r0 in range(0, rows, row_chunk):   # a chunk of rows unpacked at a time
            p = qweight.binary_parts(r0, min(r0 + row_chunk, rows))
            if perm is None:
                perm = salient_first(p.salient.cpu(), p.block_size)
                sal = p.salient.cpu()[perm]
            s1, s2, sp = (m.cpu()[:, perm] for m in (p.sign1, p.sign2, p.sparse))
            s1_chunks.append(self._by_block(s1, p.block_size))
            s2_chunks.append(self._by_block(torch.where(sal, s2, sp), p.block_size))
            params.append(torch.cat([p.scales, p.means], -1).float().cpu())
        self.s1, self.s2 = torch.cat(s1_chunks, 1).contiguous(), torch.cat(s2_chunks, 1).contiguous()
        self.sal = pack_bool(sal)
        self.params, self.row_ref, self.scale_table, self.mean_table = self._param_values(qweight, torch.cat(params))
        self.perm = perm.to(torch.int32)   # kernel column -> stored column (to give the stored bits back)
        self.order = self.perm if p.column_order is None else p.column_order.cpu()[perm].to(torch.int32)  # -> input
        self.col_scale = None if p.col_scale is None else p.col_scale.float().cpu()[perm]
        self.rows, self.in_features, self.block_size = rows, cols, p.block_size
        self.dense_from = BINARY_DENSE_FROM_TOKENS
        self._stored_from_parts = getattr(type(qweight), "stored_from_parts", None)

    @staticmethod
    def _param_values(qweight, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(values, row_ref, scale_table, mean_table) for the C kernel: uint8 codes [rows, n_blocks, 8] with
        their row references and tables where the weight has them (`parameter_codes`, compact BiLLM: 1 byte
        a parameter instead of 4) and they decode to exactly `params`; else float16 where that is exact
        (BiLLM stores float16; with F16C about as fast as float32, in a one-off timing), else float32."""
        codes = getattr(qweight, "parameter_codes", None)
        if codes is not None:
            ref, c, scale_table, mean_table = (t.cpu() for t in codes(0, qweight.shape[0]))
            if int(c.max()) < 256 and torch.equal(BinaryKernel._decode(ref, c, scale_table, mean_table), params):
                pad = lambda t: nn.functional.pad(t.float(), (0, 256 - len(t))).contiguous()   # noqa: E731
                return c.to(torch.uint8).contiguous(), ref.contiguous(), pad(scale_table), pad(mean_table)
        half = params.half()
        return (half if torch.equal(half.float(), params) else params).contiguous(), None, None, None

    @staticmethod
    def _decode(ref: torch.Tensor, codes: torch.Tensor, scale_table: torch.Tensor, mean_table: torch.Tensor):
        """Scales and means [rows, n_blocks, 8] from their codes, as the C kernel decodes them."""
        codes = codes.long()
        scales = ref[:, None, None] * scale_table[codes[..., :4]]
        return torch.cat([scales, scales * mean_table[codes[..., 4:]]], -1)

    @property
    def param_args(self) -> tuple:
        return self.params, self.row_ref, self.scale_table, self.mean_table

    def parts(self) -> "BinaryParts":
        """The weight's bits, scales and means as `binary_parts(0, rows)` gives them (stored column
        order; column scales and order left out): the inverse of the plane layout."""
        from luq.quant.billm import BinaryParts

        def unblock(plane: torch.Tensor) -> torch.Tensor:   # [n_blocks, rows, bytes] -> bool [rows, in], stored order
            bits = unpack_bool(plane.transpose(0, 1).reshape(self.rows, -1), self.in_features)  # padding cut
            return torch.empty_like(bits).index_copy_(1, self.perm.long(), bits)

        salient = torch.empty(self.in_features, dtype=torch.bool)
        salient[self.perm.long()] = unpack_bool(self.sal, self.in_features)
        s1, second = unblock(self.s1), unblock(self.s2)
        params = (self.params.float() if self.row_ref is None
                  else self._decode(self.row_ref, self.params, self.scale_table, self.mean_table))
        return BinaryParts(s1, second & salient, second & ~salient, salient, params[..., :4], params[..., 4:],
                           None, self.block_size)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors these planes give back exactly (by the weight class's `stored_from_parts`)."""
        return {} if self._stored_from_parts is None else self._stored_from_parts(self.parts())

    @staticmethod
    def _by_block(mask: torch.Tensor, block_size: int) -> torch.Tensor:
        """bool [rows, in] as packed bytes block by block: uint8 [n_blocks, rows, block_size / 8]
        (the last block zero-padded), so that the decode path reads each block of all rows as one stream."""
        rows, cols = mask.shape
        packed = nn.functional.pad(pack_bool(mask), (0, -cols % block_size // 8))
        return packed.view(rows, -1, block_size // 8).transpose(0, 1)

    @staticmethod
    def supports(qweight) -> bool:
        """Byte-aligned columns and blocks, and the compiled helper."""
        cols = qweight.shape[1]
        return cols % 8 == 0 and qweight.block_size % 8 == 0 and native.available("binary_gemm")

    @property
    def planes(self) -> tuple[torch.Tensor, ...]:
        return self.s1, self.s2, self.sal

    @property
    def nbytes(self) -> int:
        """Bytes this kernel holds (planes, mask, scales and means, gathers, column scales)."""
        held = {id(t): t for t in (*self.planes, *self.param_args, self.perm, self.order, self.col_scale)
                if t is not None}
        return sum(t.numel() * t.element_size() for t in held.values())

    @property
    def tile_rows(self) -> int:
        """Rows per transient tile of the prompt path (DENSE_TILE_BYTES at most)."""
        return max(8, DENSE_TILE_BYTES // (2 * self.in_features) // 8 * 8)

    @property
    def transient_nbytes(self) -> int:
        return _tile_bytes(self.in_features * min(self.rows, self.tile_rows), torch.device("cpu"))

    def prepare(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [tokens, in] as the planes read it: float32, kernel column order, column-scaled."""
        x2 = x2.float().index_select(1, self.order)
        return x2 if self.col_scale is None else x2 * self.col_scale

    def lookup(self, x2: torch.Tensor) -> torch.Tensor:
        """Few tokens: float32 [tokens, rows] (x2 `prepare`d)."""
        return native.binary_gemv(self.planes, self.param_args, x2, torch.get_num_threads())

    def weight(self, r0: int, r1: int) -> torch.Tensor:
        """The transient tile of the prompt path: bfloat16 W [r1 - r0, in] in kernel column order."""
        return native.binary_expand(self.planes, self.param_args, r0, r1)

    def dense(self, x2: torch.Tensor) -> torch.Tensor:
        """Prompts: [tokens, rows], tile by tile of rows (x2 `prepare`d): each tile expanded in bfloat16, the
        GEMM in `gemm_dtype` (the inputs rounded to bfloat16 as the tile's weights are)."""
        gemm = gemm_dtype(x2.device)
        xb, step = x2.to(torch.bfloat16).to(gemm), self.tile_rows
        if step >= self.rows:
            return nn.functional.linear(xb, self.weight(0, self.rows).to(gemm))
        out = torch.empty(xb.shape[0], self.rows, dtype=gemm)
        for r0 in range(0, self.rows, step):
            r1 = min(r0 + step, self.rows)
            out[:, r0:r1] = nn.functional.linear(xb, self.weight(r0, r1).to(gemm))
        return out

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = self.prepare(x.reshape(-1, x.shape[-1]))
        y = self.dense(x2) if x2.shape[0] >= self.dense_from else self.lookup(x2)
        return y.to(dtype).reshape(*lead, -1)


class CompactBinaryKernel(BinaryKernel):
    """A compact BiLLM weight (`CompactBiLLMWeight`) multiplied from its stored tensors (compact_gemm.c):
    the salient mask, second signs and scale (delta, mean) codes are the very tensors its QuantLinear holds,
    read in stored column order, salient columns through the mask. What the kernel holds besides: the signs
    block by block (`_by_block`: read in stored order they strided the rows, which cost time); the sparse
    group decoded once (`sparse`, block by block too), as positions (one byte per sparse weight: 0.63 bit per
    weight at 5 of 64; NO_POSITION where a stored code names no sparse weight, its value kept in
    `not_sparse`) or, where that is no larger (8 or more of 64), as a bit per weight: decoding the k-of-G
    codes at every token would cost more than the product; each row's scale reference as float32, the two
    code tables, and the act-order gather and column scales ([in]). It gives the signs and sparse codes back
    (`stored_tensors`), so that its QuantLinear frees them. Few tokens: per row and block, one lookup per byte of the signs and per salient byte, the second
    signs by lookups in the salient inputs' own tables, two loads per sparse position (or two lookups per
    byte of the bits), in float32 as BinaryKernel; prompts: a transient bfloat16 tile of W and one bfloat16
    GEMM. `build` gives None where the C kernel's decoding of the scale codes would not give
    `parameters_rows` exactly or a position does not fit a byte (BinaryKernel then serves the weight).
    What it holds against the stored bits and against the planes, and its time against the planes':
    `python -m bench.kernels --only binary` (bench/results/kernels-binary.json; docs/performance.md)."""

    name = "compact"

    def __init__(self, qweight, sparse: torch.Tensor, offsets: torch.Tensor | None, ref: torch.Tensor,
                 scale_table: torch.Tensor, mean_table: torch.Tensor,
                 not_sparse: tuple[torch.Tensor, torch.Tensor] | None = None):
        nn.Module.__init__(self)
        self.not_sparse = not_sparse   # (flat indices, stored values) of the NO_POSITION entries
        rows, cols = qweight.shape
        salient_mask = qweight.salient_mask().cpu()
        stored = {n: getattr(qweight, n) for n in ("salient_cols", "residual_signs", "scale_codes",
                                                    "scale2_delta", "mean_codes") if getattr(qweight, n) is not None}
        # the weight's own tensors, where they are laid out as the C kernel reads them (else copies, counted)
        self._copies = {n: t.cpu().contiguous() for n, t in stored.items()
                        if not (t.is_contiguous() and t.device.type == "cpu")}
        self.stored = {**stored, **self._copies}
        # the signs block by block (`_by_block`): a copy, and the stored signs handed over
        self._bytes = self._byte_widths(qweight)
        self.signs = self._by_block(qweight.signs.cpu(), self._bytes)
        self.sparse, self.sparse_map = sparse, offsets is None
        self.offsets = torch.zeros(qweight.n_blocks + 1, dtype=torch.int64) if offsets is None else offsets
        self.row_ref, self.scale_table, self.mean_table = ref, scale_table, mean_table
        self.salient = torch.nonzero(salient_mask).flatten().to(torch.int32)
        per_block = nn.functional.pad(salient_mask, (0, -cols % qweight.block_size)).view(-1, qweight.block_size)
        self.sal_start = nn.functional.pad(per_block.sum(1).cumsum(0), (1, 0))
        order = qweight.column_order().cpu().to(torch.int32) if qweight.perm is not None else None
        self.order = order   # None: the stored order is the input's
        self.col_scale = None if qweight.col_scale is None else qweight.decoded_column_scales().cpu()
        self.rows, self.in_features, self.block_size = rows, cols, qweight.block_size
        self.dense_from = BINARY_DENSE_FROM_TOKENS
        self._runs, self._widths = qweight.sparse_runs.tolist(), qweight.block_widths()
        d, st = qweight.delta_bits, self.stored
        dims = [rows, cols, cols // 8, qweight.block_size, qweight.n_blocks, st["residual_signs"].shape[1],
                sparse.numel() // rows if rows else 0, st["scale_codes"].shape[1], qweight.scale_bits, 3 if d else 4,
                st["scale2_delta"].shape[1] if d else 0, d,
                st["mean_codes"].shape[1] if "mean_codes" in st else 0,
                qweight.mean_bits if "mean_codes" in st else 0, int(self.sparse_map)]
        ptrs = [self.signs, st["salient_cols"], st["residual_signs"], sparse, self.offsets, self.sal_start,
                st["scale_codes"], st.get("scale2_delta"), st.get("mean_codes"), ref, scale_table, mean_table]
        self.dims = torch.tensor(dims, dtype=torch.int64)
        self.ptrs = torch.tensor([0 if t is None else t.data_ptr() for t in ptrs], dtype=torch.int64)

    @classmethod
    def build(cls, qweight) -> "CompactBinaryKernel | None":
        """The kernel, or None where the C kernel's decoding of the scale codes would not give
        `parameters_rows` exactly or a sparse position does not fit a byte."""
        rows, cols = qweight.shape
        ref, codes, scale_table, mean_table = (t.cpu() for t in qweight.parameter_codes(0, rows))
        scales, means = qweight.parameters_rows(0, rows)
        if not torch.equal(BinaryKernel._decode(ref, codes, scale_table, mean_table),
                           torch.cat([scales, means], -1).cpu()):
            return None
        del codes, scales, means
        positions, offsets = qweight.sparse_positions(0, rows)
        not_sparse = None
        if positions.shape[1] >= cols // 8:   # as many bytes as a bit per weight: the bits (faster to read)
            sparse = cls._by_block(pack_bool(qweight.sparse_rows(0, rows).cpu()), cls._byte_widths(qweight))
            offsets = None
        elif qweight.block_size > MAX_POSITION_BLOCK:
            return None
        else:   # a code naming a salient column or one past its block's end: NO_POSITION (kept for the codes)
            widths = offsets.diff().tolist()
            invalid = cls._by_block(qweight.sparse_columns(positions, offsets).cpu() < 0, widths)
            positions = cls._by_block(positions.cpu().to(torch.uint8), widths)
            not_sparse = (torch.nonzero(invalid).flatten(), positions[invalid])
            sparse = positions.masked_fill(invalid, NO_POSITION).contiguous()
        return cls(qweight, sparse, offsets, ref.float().contiguous(), scale_table.float().contiguous(),
                   mean_table.float().contiguous(), not_sparse)

    @staticmethod
    def supports(qweight) -> bool:
        """Compact BiLLM with byte-aligned columns and blocks, and the compiled helpers."""
        return (getattr(qweight, "method", None) == "billm-compact" and qweight.shape[1] % 8 == 0
                and qweight.block_size % 8 == 0 and native.available("binary_gemm")
                and native.available("compact_gemm"))

    def parts(self):
        raise NotImplementedError("CompactBinaryKernel reads the stored tensors: it has no planes to unpack")

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensor it holds in another form: the sparse codes, re-encoded from the positions
        (or the bits: their QuantLinear checks the result equal before it frees its own)."""
        from luq.quant.billm_compact import sparse_bits_from_positions, sparse_positions_from_mask

        positions = self.sparse
        if self.not_sparse is not None and len(self.not_sparse[0]):
            positions = positions.index_put((self.not_sparse[0],), self.not_sparse[1])
        if not self.sparse_map:
            positions = self._by_row(positions, self.rows, self.offsets.diff().tolist())
        else:
            salient = unpack_bool(self.stored["salient_cols"], self.in_features)
            mask = unpack_bool(self._by_row(self.sparse, self.rows, self._bytes), self.in_features)
            positions = sparse_positions_from_mask(mask, salient, self._runs, self._widths)
        return {"signs": self._by_row(self.signs, self.rows, self._bytes),
                "sparse_codes": pack_bool(sparse_bits_from_positions(positions, self._runs, self._widths))}

    @staticmethod
    def _byte_widths(qweight) -> list[int]:
        """Bytes of each block's columns in a packed row (whole bytes: `supports`)."""
        return [w // 8 for w in qweight.block_widths()]

    @staticmethod
    def _by_block(t: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """[rows, sum(widths)] -> 1-D, block by block: block b's `widths[b]` columns of all rows ([rows, widths[b]])
        after block b - 1's, so that the C kernel reads a block of all rows as one stream. Inverse: `_by_row`."""
        return torch.cat([part.flatten() for part in t.split(widths, 1)])

    @staticmethod
    def _by_row(flat: torch.Tensor, rows: int, widths: list[int]) -> torch.Tensor:
        """Inverse of `_by_block`: [rows, sum(widths)]."""
        return torch.cat([part.view(rows, -1) for part in flat.split([rows * w for w in widths])], 1)

    @property
    def nbytes(self) -> int:
        """Bytes this kernel holds beyond its weight's stored tensors (sparse group, references, tables,
        offsets, salient columns, gather, column scales, and any copy of a stored tensor it made)."""
        own = (self.signs, self.sparse, *(self.not_sparse or ()), self.offsets, self.row_ref, self.scale_table, self.mean_table,
               self.salient, self.sal_start, self.order, self.col_scale, self.dims, self.ptrs,
               *self._copies.values())
        return sum(t.numel() * t.element_size() for t in own if t is not None)

    def prepare(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [tokens, in] as the kernel reads it: float32, stored column order, column-scaled."""
        x2 = x2.float()
        if self.order is not None:
            x2 = x2.index_select(1, self.order)
        return x2 if self.col_scale is None else x2 * self.col_scale

    def lookup(self, x2: torch.Tensor) -> torch.Tensor:
        return native.compact_gemv(self.dims, self.ptrs, x2, self.salient, torch.get_num_threads())

    def weight(self, r0: int, r1: int) -> torch.Tensor:
        return native.compact_expand(self.dims, self.ptrs, r0, r1)


# --------------------------------------------------------------------------- transcoders


def gptq_terms(q) -> Int4Terms:
    """GPTQ codes as int4 terms: one 4-bit digit per term (1 term up to 4 bits, 2 up to 8); KernelRefused
    where its groups have none."""
    rows, cols = q.shape
    index = col_group = None
    if q.g_idx is not None:
        groups = q.g_idx.long()
        index = torch.argsort(groups, stable=True)
        counts = torch.bincount(groups, minlength=q.n_groups)
        if bool((counts[:-1] != q.group_size).any()):
            raise KernelRefused("its act-order groups are of unequal sizes")
        col_group = groups[index]
    width = min(q.group_size, cols)
    group = next((g for g in INT4_GROUPS if width % g == 0 and cols % g == 0), None)
    if group is None:
        raise KernelRefused(f"no int4 group of {INT4_GROUPS} divides its groups of {width} and its {cols} columns")
    if col_group is None:
        col_group = torch.arange(cols, device=q.scales.device) // width
    codes = unpack_bits(q.qweight, q.bits, cols).to(torch.int32)
    if index is not None:
        codes = codes[:, index]
    kgroup = col_group[::group]                         # luq group of each kernel group
    scale = q.scales.float()[:, kgroup]
    zero = (torch.full_like(scale, float(2 ** q.bits // 2), dtype=torch.int32) if q.qzeros is None
            else unpack_bits(q.qzeros, q.bits, q.n_groups).to(torch.int32)[:, kgroup])
    zero = zero.to(torch.int32)
    digits = 1 if q.bits <= 4 else 2
    parts_c, parts_s = [], []
    for d in reversed(range(digits)):                   # high digit first
        cd = (codes >> (4 * d)) & 15
        zd = (zero >> (4 * d)) & 15 if digits > 1 else zero
        gc = cd.reshape(rows, -1, group) - zd[..., None]
        parts_c.append(gc.reshape(rows, cols))
        parts_s.append(scale * float(16 ** d))
    stored = _gptq_stored(q, index, kgroup, group, digits)
    if digits == 2:
        index = torch.arange(cols, device=codes.device) if index is None else index
        index = torch.cat([index, index])
    return Int4Terms(torch.cat(parts_c, 1), torch.cat(parts_s, 1), torch.zeros_like(torch.cat(parts_s, 1)),
                     index, group, stored=stored)


def _gptq_stored(q, index: torch.Tensor | None, kgroup: torch.Tensor, group: int,
                 digits: int) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """The inverse of `gptq_terms`: its codes (codes minus zeros, digit by digit, kernel column
    order) -> GPTQ's `qweight`. Holds the weight's own packed `qzeros`, not the weight."""
    rows, cols = q.shape
    qzeros, bits, n_groups = q.qzeros, q.bits, q.n_groups

    def stored(codes: torch.Tensor) -> dict[str, torch.Tensor]:
        zero = (torch.full((rows, len(kgroup)), 2 ** bits // 2, dtype=torch.int32, device=codes.device)
                if qzeros is None else unpack_bits(qzeros, bits, n_groups).to(torch.int32)[:, kgroup])
        c = torch.zeros(rows, cols, dtype=torch.int32, device=codes.device)
        for i, d in enumerate(reversed(range(digits))):   # high digit first, as gptq_terms
            zd = (zero >> (4 * d)) & 15 if digits > 1 else zero
            c += ((codes[:, i * cols:(i + 1) * cols].view(rows, -1, group) + zd[..., None]) << (4 * d)).view(rows, cols)
        if index is not None:
            c = torch.empty_like(c).index_copy_(1, index, c)
        return {"qweight": pack_bits(c, bits)}

    return stored


def binary_terms(qweight, group: int = TERM_GROUP) -> Int4Terms:
    """BiLLM / compact BiLLM (anything with `binary_parts`) as 2 or 3 int4 terms (module doc)."""
    from luq.quant.billm import CONCENTRATED, SALIENT_1, SALIENT_2, SPARSE

    rows, cols = qweight.shape
    p = qweight.binary_parts(0, rows)
    device = p.sign1.device
    salient = p.salient.cpu()
    full_cols, full_block, full_sal, other_cols, other_block = [], [], [], [], []
    for b, c0 in enumerate(range(0, cols, p.block_size)):
        c1 = min(c0 + p.block_size, cols)
        ids = torch.arange(c0, c1)
        for kind, sel in ((True, ids[salient[c0:c1]]), (False, ids[~salient[c0:c1]])):
            if not len(sel):
                continue
            padded = torch.cat([sel, torch.full((-len(sel) % group,), cols, dtype=torch.long)])
            full_cols.append(padded)
            full_block += [b] * (len(padded) // group)
            full_sal += [kind] * (len(padded) // group)
            if not kind:
                other_cols.append(padded)
                other_block += [b] * (len(padded) // group)
    L1, L2 = torch.cat(full_cols).to(device), torch.cat(other_cols).to(device)
    b1 = torch.tensor(full_block, device=device)
    sal1 = torch.tensor(full_sal, device=device)
    b2 = torch.tensor(other_block, device=device)

    def gather(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(mask, (0, 1)).index_select(1, index).to(torch.int32)

    valid1, valid2 = (L1 < cols).to(torch.int32), (L2 < cols).to(torch.int32)
    s1 = (2 * gather(p.sign1, L1) - 1) * valid1
    sal_col = nn.functional.pad(p.salient, (0, 1)).index_select(0, L1)
    a, m = p.scales, p.means                                          # [rows, n_blocks, 4]
    is_sal = sal1[None, :]
    a_sal1, a_sal2, a_conc, a_sparse = (a[:, b1, s] for s in (SALIENT_1, SALIENT_2, CONCENTRATED, SPARSE))
    m_sal, m_conc = m[:, b1, SALIENT_1] + m[:, b1, SALIENT_2], m[:, b1, CONCENTRATED]
    code_a = s1
    code_b = torch.where(sal_col[None, :], (2 * gather(p.sign2, L1) - 1) * valid1, gather(p.sparse, L1) * s1)
    codes = [code_a, code_b]
    scales = [torch.where(is_sal, a_sal1, a_conc), torch.where(is_sal, a_sal2, a_sparse - a_conc)]
    zeros = [torch.where(is_sal, m_sal, m_conc), torch.zeros_like(a_conc)]
    index = [L1, L1]
    dm = m[:, b2, SPARSE] - m[:, b2, CONCENTRATED]
    if bool((dm != 0).any()):
        codes.append(gather(p.sparse, L2) * valid2)
        scales.append(dm)
        zeros.append(torch.zeros_like(dm))
        index.append(L2)
    index, col_scale = torch.cat(index), p.col_scale
    if p.column_order is not None:  # stored in act-order: stored column j reads input column order[j]
        index = torch.cat([p.column_order, torch.tensor([cols], device=device)])[index]
        if col_scale is not None:
            col_scale = torch.empty_like(col_scale).index_copy_(0, p.column_order, col_scale)
    return Int4Terms(torch.cat(codes, 1), torch.cat(scales, 1), torch.cat(zeros, 1), index, group, col_scale)


class KernelRefused(ValueError):
    """A weight the int4 kernel cannot take (its shape or groups); the message says why."""


def int4_terms(qweight: QuantizedWeight) -> Int4Terms:
    """The int4 transcoding of a stored weight; KernelRefused where its format or shape has none."""
    rows, cols = qweight.shape
    if rows % 16 or cols % 32:
        raise KernelRefused(f"{rows} rows, {cols} columns: the int4 kernel needs multiples of 16 and 32")
    if qweight.method == "gptq":
        return gptq_terms(qweight)
    if hasattr(qweight, "binary_parts"):
        return binary_terms(qweight)
    raise KernelRefused("its format has no int4 transcoding")


def describe(qweight: QuantizedWeight) -> str:
    """A weight's kind in a warning: format and shape ("gptq 4-bit g128 576x1536")."""
    config, (rows, cols) = qweight.config(), qweight.shape
    bits = f" {config['bits']}-bit" if "bits" in config else ""
    group = f" g{config['group_size']}" if config.get("group_size") else ""
    return f"{qweight.method}{bits}{group} {rows}x{cols}"


def kernel_for(qweight: QuantizedWeight, device: torch.device) -> nn.Module:
    """The fastest kernel that computes this weight exactly (up to bfloat16 rounding) on `device`.
    LUQ_KERNEL=tiled forces the generic path, LUQ_KERNEL=int4 the int4 terms and LUQ_KERNEL=binary the
    bit planes for binarized weights, compact BiLLM included (for comparisons; the default on CPU is
    `CompactBinaryKernel` for compact BiLLM and `BinaryKernel` for BiLLM). Any other fallback to a slower
    or larger path warns once per cause (`luq.errors.FallbackWarning`)."""
    choice = os.environ.get("LUQ_KERNEL", "auto")
    if device.type == "cpu" and choice in ("auto", "binary") and hasattr(qweight, "binary_parts"):
        if choice == "auto" and CompactBinaryKernel.supports(qweight):
            kernel = CompactBinaryKernel.build(qweight)
            if kernel is not None:
                return kernel
            warn_fallback(f"compact kernel for {describe(qweight)}",
                          f"its blocks are wider than {MAX_POSITION_BLOCK} columns (a byte per sparse position) "
                          "or its scale codes do not fit a byte",
                          "the bit-plane kernel serves it (~2x the memory)")
        if BinaryKernel.supports(qweight):
            return BinaryKernel(qweight)
        if native.available("binary_gemm"):   # else the helper's own build warning said so
            warn_fallback(f"bit-plane kernel for {describe(qweight)}",
                          f"its columns or blocks are not whole bytes (block {qweight.block_size})",
                          "the int4 terms serve it (~6x the memory), or the tiled kernel where they refuse it too")
    if choice == "tiled":
        return TiledKernel(qweight)
    ops = int4_ops(device)
    if ops is None:
        return TiledKernel(qweight)
    try:
        terms = int4_terms(qweight.to(device))
    except KernelRefused as e:
        warn_fallback(f"int4 kernel for {describe(qweight)}", str(e), "the tiled de-quantizing kernel serves it")
        return TiledKernel(qweight)
    if ops.layout == "cpu":
        return Int4Kernel(terms, qweight.shape[1], ops)
    return probed_kernel(terms, qweight.shape[1], ops, device) or TiledKernel(qweight)


def probed_kernel(terms: Int4Terms, in_features: int, ops: Int4Ops, device: torch.device) -> Int4Kernel | None:
    """An Int4Kernel on ops that no test here ran (CUDA's tinygemm), kept only where a probe input
    through it matches the terms' exact weight (`Int4Terms.dense`) to SELF_CHECK_TOL; else None and
    one warning line per device. A dense path that fails its own probe is turned off."""
    try:
        kernel = Int4Kernel(terms, in_features, ops)
        x = _probe_input(in_features, device)
        x2 = kernel.prepare(x)
        error = _probe_error(kernel.packed_mm(x2), x, terms, in_features)
    except Exception as e:  # a missing op, a GPU or build without the kernel: the tiled path serves it
        _warn_tiled(device, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None
    if not error < SELF_CHECK_TOL:   # `not <`: NaN fails too
        _warn_tiled(device, f"its output is off by {error:.3g} relative on a probe input")
        return None
    if kernel.dense_ok and not _probe_error(kernel.dense(x2), x, terms, in_features) < SELF_CHECK_TOL:
        warn_fallback(f"dense prompt path on {device}", "its read-back of the packing failed the build probe",
                      "the int4 op serves prompts too")
        kernel.dense_ok = False
    return kernel


def _probe_input(in_features: int, device: torch.device, tokens: int = 3) -> torch.Tensor:
    """A fixed random input (3 tokens: a partial tile of 16), bfloat16 values in float32."""
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randn(tokens, in_features, generator=g, device=device).bfloat16().float()


def _probe_error(y: torch.Tensor, x: torch.Tensor, terms: Int4Terms, in_features: int) -> float:
    """||y - x W^T|| / ||x W^T|| with W the terms' exact float32 weight, built ROW_TILE rows at a time."""
    rows = terms.codes.shape[0]
    ref = torch.cat([x @ terms.rows(r0, min(r0 + ROW_TILE, rows)).dense(in_features).t()
                     for r0 in range(0, rows, ROW_TILE)], 1)
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()   # a zero weight: 0, not NaN
