"""Compact BiLLM: BiLLM's binarization with its side information stored in few bits.

BiLLM stores ~3 true bits per weight: 1 sign bit, a 1-bit concentrated/sparse bitmap
over every non-salient weight, and 8 fp16 numbers per row per 128-column block (1 bit
per weight). This format keeps BiLLM's solver (Hessian salience, order-2 salient
columns, error propagation as in GPTQ) and changes what it stores:

  signs            1 bit per weight (first-order sign)
  residual_signs   1 bit per salient weight (second-order sign)
  salient_cols     1 bit per input column
  sparse_codes     the sparse group, structured: in each run of G_b columns of a row, the
                   k_b non-salient weights of largest |w| ((G_b, k_b) searched per block
                   among `sparse_runs`); which k_b of the G_b, as one number of the
                   combinatorial number system, ceil(log2 C(G_b, k_b)) bits per run: k_b/G_b
                   of the weights are sparse for log2 C(G_b, k_b) / G_b bits per weight
                   (64 columns, 8 sparse: 32 bits, 0.5 bit/weight; a bitmap costs 1)
  sparse_runs      uint8 [n_blocks, 2]: log2(G_b), k_b (k_b = 0: no sparse group)
  col_scale        (only with `col_scale`) fp16 [in], or (col_scale_bits = 8) uint8 log codes,
                   12 per octave: each column's rms in its block (after the errors of the
                   blocks before it), over the block's mean; every value of the column is
                   multiplied by it
  scale_codes      `scale_bits` per (row, block, group): a = ref_r * 2^(-code / steps),
                   a log grid of 2^scale_bits values spanning ~8 octaves below ref_r
  mean_codes       (only with `means`) `mean_bits` per (row, block, group):
                   m = a * (code - h) / h, h = 2^(mean_bits - 1); without, m = 0
  row_ref          fp16 [out]: ref_headroom (4) x the row's max |w| (over its column scales),
                   the top of its scale grid; or (row_ref_bits = 8) uint8 log codes, 8 per
                   octave (rounded up) under ref_top, one fp16
  perm             (only with `act_order`) the input column of each stored column,
                   ceil(log2 in) bits each: the columns are solved and stored by decreasing
                   diag H, as GPTQ's act-order

Groups per (row, block): salient order 1, salient order 2, concentrated, sparse. The
solver binarizes with the decoded (stored) scales and means, so its error is the error
of what is stored, and `dequantize` reproduces its weights bit for bit.

With `column_feedback` the block is solved as GPTQ solves a group: the groups, scales and
means are fitted first (each column weighted by (col_scale / U_jj)^2, its price in output
error), then the signs are chosen one column at a time, each column's error propagated to
the block's later columns before the next is chosen.

The searches can pay for bytes: the number of salient columns n and the sparse runs of
each block minimise  err + lam * E * bits / weights  (E: the block's sum of w^2, bits:
what that choice stores), so lam = 0 is BiLLM's error-only search and lam > 0 a smaller
format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch

from luq.errors import LuqError
from luq.quant.base import QuantizedWeight
from luq.quant.billm import SALIENT_METRICS, BinaryParts, block_values, unpack_signs
from luq.quant.binsearch import leading_split_errors
from luq.quant.hessian import check_problem, inverse_hessian_cholesky, prepare_hessian
from luq.quant.packing import pack_bits, pack_bool, packed_length, unpack_bits, unpack_bool

N_GROUPS = 4  # salient order 1, salient order 2, concentrated, sparse (billm's slots)
OCTAVES = 8   # by default the scale grid spans about this many octaves below the row's reference
COL_STEPS, COL_TOP = 12, 64  # 8-bit column scales: 2^((code - 192) / 12), up to 2^(63/12)


def steps_per_octave(scale_bits: int, octaves: int = OCTAVES) -> int:
    return max(1, 2 ** scale_bits // octaves)


def decode_scales(row_ref: torch.Tensor, codes: torch.Tensor, scale_bits: int, octaves: int = OCTAVES) -> torch.Tensor:
    """Scales from their codes: row_ref [rows] (fp16), codes [rows, ...] ints -> float32."""
    ref = row_ref.float().reshape(-1, *([1] * (codes.dim() - 1)))
    return ref * torch.exp2(-codes.float() / steps_per_octave(scale_bits, octaves))


def encode_scales(row_ref: torch.Tensor, a: torch.Tensor, scale_bits: int, octaves: int = OCTAVES) -> torch.Tensor:
    """Nearest code (in log scale) of scales a [rows, ...] under row_ref [rows]."""
    ref = row_ref.float().reshape(-1, *([1] * (a.dim() - 1)))
    ratio = (a / ref.clamp_min(1e-30)).clamp_min(1e-30)
    code = torch.round(-torch.log2(ratio) * steps_per_octave(scale_bits, octaves))
    return code.clamp(0, 2 ** scale_bits - 1).to(torch.int64)


def encode_row_refs(ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row references (> 0) -> (uint8 codes [rows], fp16 top [1]): ref ~ top * 2^((code - 255) / 8),
    rounded up so that no row's grid starts below its reference."""
    top = ref.float().max().half().float()
    code = torch.ceil(torch.log2(ref.float() / top) * 8) + 255
    return code.clamp(0, 255).to(torch.uint8), top.half().reshape(1)


def decode_row_refs(codes: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    return top.float() * torch.exp2((codes.float() - 255) / 8)


def encode_column_scales(cs: torch.Tensor) -> torch.Tensor:
    """Column scales (> 0) -> uint8 log codes, 12 per octave, 2^-16 .. 2^5.25."""
    code = torch.round(torch.log2(cs) * COL_STEPS) + 256 - COL_TOP
    return code.clamp(0, 255).to(torch.uint8)


def decode_column_scales(codes: torch.Tensor) -> torch.Tensor:
    return torch.exp2((codes.float() - (256 - COL_TOP)) / COL_STEPS)


def unpack_scale_codes(scale_codes: torch.Tensor, scale2_delta: torch.Tensor | None, start: int, stop: int,
                       n_blocks: int, scale_bits: int, delta_bits: int) -> torch.Tensor:
    """int64 [rows, n_blocks, 4] scale codes of rows [start, stop) (scale_codes already sliced).
    With delta_bits, the salient order-2 code is stored apart as its step below the order-1 code."""
    if not delta_bits:
        return unpack_bits(scale_codes, scale_bits, n_blocks * N_GROUPS).reshape(-1, n_blocks, N_GROUPS)
    rest = unpack_bits(scale_codes, scale_bits, n_blocks * (N_GROUPS - 1)).reshape(-1, n_blocks, N_GROUPS - 1)
    delta = unpack_bits(scale2_delta[start:stop], delta_bits, n_blocks)
    return torch.stack([rest[..., 0], rest[..., 0] + delta, rest[..., 1], rest[..., 2]], -1)


def decode_means(a: torch.Tensor, codes: torch.Tensor, mean_bits: int) -> torch.Tensor:
    h = 2 ** (mean_bits - 1)
    return a * ((codes.float() - h) / h)


def encode_means(a: torch.Tensor, m: torch.Tensor, mean_bits: int) -> torch.Tensor:
    h = 2 ** (mean_bits - 1)
    code = torch.round(m / a.clamp_min(1e-30) * h) + h
    return code.clamp(0, 2 * h - 1).to(torch.int64)


@dataclass(eq=False, repr=False)
class CompactBiLLMWeight(QuantizedWeight):
    """A compact-BiLLM weight in packed form (layout in the module docstring)."""

    method = "billm-compact"

    signs: torch.Tensor            # uint8 [out, packed(in)]
    residual_signs: torch.Tensor   # uint8 [out, packed(n_salient_cols)]
    salient_cols: torch.Tensor     # uint8 [packed(in)]
    sparse_codes: torch.Tensor     # uint8 [out, packed(sum over blocks of runs_b * code_bits(G_b, k_b))]
    sparse_runs: torch.Tensor      # uint8 [n_blocks, 2]: log2 G_b, k_b
    scale_codes: torch.Tensor      # uint8 [out, packed(n_blocks * 4, scale_bits)]
    mean_codes: torch.Tensor | None  # uint8 [out, packed(n_blocks * 4, mean_bits)], or None
    row_ref: torch.Tensor          # fp16 [out], or uint8 [out] log codes under ref_top
    col_scale: torch.Tensor | None  # fp16 [in], or None
    shape: tuple[int, int]
    block_size: int
    scale_bits: int
    mean_bits: int
    scale_octaves: int = OCTAVES
    ref_top: torch.Tensor | None = None  # fp16 [1]: the top of the 8-bit row references, or None
    perm: torch.Tensor | None = None  # uint8 [packed(in * perm_bits(in))]: act-order's column order, or None
    scale2_delta: torch.Tensor | None = None  # uint8 [out, packed(n_blocks, delta_bits)], or None
    delta_bits: int = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"signs": self.signs, "residual_signs": self.residual_signs, "salient_cols": self.salient_cols,
              "sparse_codes": self.sparse_codes, "sparse_runs": self.sparse_runs,
              "scale_codes": self.scale_codes, "row_ref": self.row_ref}
        for name in ("mean_codes", "col_scale", "perm", "ref_top", "scale2_delta"):
            if getattr(self, name) is not None:
                sd[name] = getattr(self, name)
        return sd

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "shape": list(self.shape), "block_size": self.block_size,
                "scale_bits": self.scale_bits, "mean_bits": self.mean_bits, "scale_octaves": self.scale_octaves,
                **({"delta_bits": self.delta_bits} if self.delta_bits else {})}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "CompactBiLLMWeight":
        return cls(**{k: tensors[k] for k in ("signs", "residual_signs", "salient_cols", "sparse_codes",
                                              "sparse_runs", "scale_codes", "row_ref")},
                   mean_codes=tensors.get("mean_codes"), col_scale=tensors.get("col_scale"), perm=tensors.get("perm"), ref_top=tensors.get("ref_top"),
                   scale2_delta=tensors.get("scale2_delta"), delta_bits=int(config.get("delta_bits", 0)), shape=tuple(config["shape"]),
                   block_size=int(config["block_size"]), scale_bits=int(config["scale_bits"]),
                   mean_bits=int(config["mean_bits"]), scale_octaves=int(config.get("scale_octaves", OCTAVES)))

    @property
    def n_blocks(self) -> int:
        return -(-self.shape[1] // self.block_size)

    def salient_mask(self) -> torch.Tensor:
        return unpack_bool(self.salient_cols, self.shape[1])

    @property
    def nominal_bits_per_weight(self) -> float:
        """BiLLM's paper accounting (as `BiLLMWeight`): 1 sign bit, a second one per salient
        weight and the column mask; the side information is left out."""
        rows, cols = self.shape
        n_salient = int(self.salient_mask().sum())
        return (rows * cols + rows * n_salient + cols) / (rows * cols)

    def _code_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Rows [start, stop): their scale grid's reference [rows], scale codes and mean codes (None
        without means), int64 [rows, n_blocks, 4]."""
        codes = unpack_scale_codes(self.scale_codes[start:stop], self.scale2_delta, start, stop, self.n_blocks,
                                   self.scale_bits, self.delta_bits)
        ref = self.row_ref[start:stop] if self.ref_top is None else decode_row_refs(self.row_ref[start:stop], self.ref_top)
        mcodes = None if self.mean_codes is None else unpack_bits(
            self.mean_codes[start:stop], self.mean_bits, self.n_blocks * N_GROUPS).reshape(codes.shape)
        return ref, codes, mcodes

    def parameters_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded scales and means [rows, n_blocks, 4] (float32) of rows [start, stop)."""
        ref, codes, mcodes = self._code_rows(start, stop)
        a = decode_scales(ref, codes, self.scale_bits, self.scale_octaves)
        return a, (torch.zeros_like(a) if mcodes is None else decode_means(a, mcodes, self.mean_bits))

    def parameter_codes(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """The scales and means of rows [start, stop) as codes and what decodes them: (row_ref float32
        [rows], codes int64 [rows, n_blocks, 8] (the 4 scale codes, then the 4 mean codes), scale_table,
        mean_table float32 [max code + 1]), with a = row_ref * scale_table[code] and m = a *
        mean_table[code]: `parameters_rows` with a table entry per code."""
        ref, codes, mcodes = self._code_rows(start, stop)
        device = codes.device
        top = int(codes.max()) + 1 if codes.numel() else 1
        scale_table = decode_scales(torch.ones(1, device=device), torch.arange(top, device=device)[None],
                                    self.scale_bits, self.scale_octaves)[0]
        if mcodes is None:
            mcodes, mean_table = torch.zeros_like(codes), torch.zeros(1, device=device)
        else:
            levels = torch.arange(2 ** self.mean_bits, device=device)
            mean_table = decode_means(torch.ones(len(levels), device=device), levels, self.mean_bits)
        return ref.float(), torch.cat([codes, mcodes], -1), scale_table, mean_table

    def _sparse_code_bits(self, runs_bk: list[list[int]]) -> int:
        """Bits per row of all blocks' sparse codes."""
        return sum(_sparse_bits(min(self.block_size, self.shape[1] - b * self.block_size), 1 << log2g, k)
                   for b, (log2g, k) in enumerate(runs_bk))

    def block_widths(self) -> list[int]:
        cols = self.shape[1]
        return [min(self.block_size, cols - c0) for c0 in range(0, cols, self.block_size)]

    def sparse_positions(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sparse group of rows [start, stop) as positions (`sparse_positions_from_bits`)."""
        runs_bk = self.sparse_runs.tolist()
        bits = unpack_bool(self.sparse_codes[start:stop], self._sparse_code_bits(runs_bk))
        return sparse_positions_from_bits(bits, runs_bk, self.block_widths())

    def sparse_columns(self, positions: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The input column each position of `sparse_positions` names, or -1 where it names no sparse
        weight (past its block's end, or a salient column): int64 [rows, npos]."""
        device = positions.device
        block = torch.repeat_interleave(torch.arange(self.n_blocks), offsets.diff()).to(device)
        widths = torch.tensor(self.block_widths(), device=device)
        col = torch.where(positions < widths[block], positions + block * self.block_size, -1)
        salient = torch.nn.functional.pad(self.salient_mask().to(device), (0, 1))   # column -1: the pad, not salient
        return col.masked_fill(salient[col], -1)

    def sparse_rows(self, start: int, stop: int) -> torch.Tensor:
        """bool [rows, in]: the sparse group of rows [start, stop) (salient columns excluded)."""
        rows, cols = stop - start, self.shape[1]
        col = self.sparse_columns(*self.sparse_positions(start, stop))
        mask = torch.zeros(rows, cols + 1, dtype=torch.bool, device=self.signs.device)
        return mask.scatter_(1, col.masked_fill(col < 0, cols), True)[:, :cols]   # no sparse weight: a spare column

    def decoded_column_scales(self) -> torch.Tensor:
        """float32 [in]: the column scales (stored as fp16, or as 8-bit log codes)."""
        if self.col_scale.dtype == torch.uint8:
            return decode_column_scales(self.col_scale)
        return self.col_scale.float()

    def binary_parts(self, start: int, stop: int) -> BinaryParts:
        """Rows [start, stop) unpacked (signs, masks, decoded scales and means, column scales), in
        stored column order (`column_order` maps it back when stored in act-order)."""
        salient = self.salient_mask()
        sign1, sign2 = unpack_signs(self.signs[start:stop], self.residual_signs[start:stop], salient)
        scales, means = self.parameters_rows(start, stop)
        col_scale = None if self.col_scale is None else self.decoded_column_scales()
        return BinaryParts(sign1, sign2, self.sparse_rows(start, stop), salient, scales, means, col_scale,
                           self.block_size, None if self.perm is None else self.column_order())

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.binary_parts(start, stop).values(dtype)

    @staticmethod
    def stored_from_parts(parts: BinaryParts) -> dict[str, torch.Tensor]:
        """The stored tensors `binary_parts` (all rows) gives back exactly: the signs (the sparse codes
        and the scale codes are not rebuilt from their decoded values)."""
        return {"signs": pack_bool(parts.sign1), "residual_signs": pack_bool(parts.sign2[:, parts.salient])}

    def column_order(self) -> torch.Tensor:
        """int64 [in]: the input column of each stored column (act-order)."""
        cols = self.shape[1]
        bits = perm_bits(cols)
        return bits_to_codes(unpack_bool(self.perm, cols * bits)[None, :], bits, cols)[0]


@dataclass(frozen=True)
class CompactBiLLM:
    """Compact-BiLLM settings; `quantize(W, H)` is the solver (see the module docstring).

    block_size: columns per block. scale_bits: bits of each scale code (3..8). means:
    store a mean per group (mean_bits each) or binarize around 0. sparse_runs: the (G, k)
    a block may choose from: k sparse weights per run of G columns (G a power of 2 in
    2..128, 0 <= k < G; k = 0: no sparse group).
    col_scale: a stored fp16 scale per input column. max_salient_cols: salient columns
    per block searched in 1..max_salient_cols-1 (none when 1). lam: price of a stored bit
    in the searches, as a fraction of the block's energy per bit per weight (0: error only).
    column_feedback: signs chosen column by column with GPTQ's error feedback inside the
    block. act_order: columns solved by decreasing diag H (their order stored). scale_octaves:
    the span of the scale grid below the row reference, ref_headroom x the row's max |w|.
    col_scale_bits, row_ref_bits: 16 (fp16) or 8 (log codes). refits (with column_feedback):
    times the scales and means are fitted again to the values the columns had when their
    signs were chosen, and the signs chosen again. delta_bits (> 0): the salient order-2 scale
    stored as 0..2^delta_bits - 1 steps of the grid below the order-1 scale (it is smaller),
    delta_bits instead of scale_bits.
    """

    weight_type: ClassVar[type[QuantizedWeight]] = CompactBiLLMWeight   # the packed weight quantize returns

    block_size: int = 128
    scale_bits: int = 5
    means: bool = False
    mean_bits: int = 4
    sparse_runs: tuple[tuple[int, int], ...] = ((64, 8),)
    col_scale: bool = True
    max_salient_cols: int = 50
    lam: float = 0.2
    salient_metric: str = "hessian"
    damp: float = 0.01
    column_feedback: bool = False
    scale_octaves: int = OCTAVES
    ref_headroom: float = 4.0
    col_scale_bits: int = 16
    act_order: bool = False
    row_ref_bits: int = 16
    refits: int = 0
    delta_bits: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise LuqError(f"CompactBiLLM: block_size must be a positive integer, got {self.block_size}")
        if not 3 <= self.scale_bits <= 8:
            raise LuqError(f"CompactBiLLM: scale_bits must be in 3..8, got {self.scale_bits}")
        if not 2 <= self.mean_bits <= 8:
            raise LuqError(f"CompactBiLLM: mean_bits must be in 2..8, got {self.mean_bits}")
        if not self.sparse_runs or not all(len(r) == 2 and 2 <= r[0] <= 128 and r[0] & (r[0] - 1) == 0
                                           and 0 <= r[1] < r[0] and code_bits(*r) <= 62 for r in self.sparse_runs):
            raise LuqError(f"CompactBiLLM: sparse_runs must be (G, k) pairs, G a power of 2 in 2..128, "
                           f"0 <= k < G, C(G, k) < 2^62; got {self.sparse_runs}")
        if self.max_salient_cols < 1:
            raise LuqError(f"CompactBiLLM: max_salient_cols must be >= 1, got {self.max_salient_cols}")
        if self.lam < 0:
            raise LuqError(f"CompactBiLLM: lam must be >= 0, got {self.lam}")
        if self.salient_metric not in SALIENT_METRICS:
            raise LuqError(f"CompactBiLLM: salient_metric must be one of {SALIENT_METRICS}, "
                           f"got {self.salient_metric!r}")
        if not (0 <= self.damp < 1):
            raise LuqError(f"CompactBiLLM: damp must be in [0, 1), got {self.damp}")
        if not 1 <= self.scale_octaves <= 2 ** self.scale_bits:
            raise LuqError(f"CompactBiLLM: scale_octaves must be in 1..2^scale_bits, got {self.scale_octaves}")
        if not self.ref_headroom >= 1:
            raise LuqError(f"CompactBiLLM: ref_headroom must be >= 1, got {self.ref_headroom}")
        if self.row_ref_bits not in (8, 16):
            raise LuqError(f"CompactBiLLM: row_ref_bits must be 8 or 16, got {self.row_ref_bits}")
        if not isinstance(self.delta_bits, int) or not 0 <= self.delta_bits < self.scale_bits:
            raise LuqError(f"CompactBiLLM: delta_bits must be in 0..scale_bits-1, got {self.delta_bits}")
        if not isinstance(self.refits, int) or self.refits < 0:
            raise LuqError(f"CompactBiLLM: refits must be a non-negative integer, got {self.refits}")
        if self.col_scale_bits not in (8, 16):
            raise LuqError(f"CompactBiLLM: col_scale_bits must be 8 or 16, got {self.col_scale_bits}")

    def nbytes_bounds(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Least: no salient column, the cheapest sparse runs; most: the searches' largest choices."""
        rows, cols = shape
        widths = [min(self.block_size, cols - c0) for c0 in range(0, cols, self.block_size)]
        n_blocks = len(widths)
        fixed = (rows * packed_length(cols, 1) + packed_length(cols, 1) + 2 * n_blocks
                 + (2 * rows if self.row_ref_bits == 16 else rows + 2)
                 + (rows * packed_length(n_blocks * N_GROUPS, self.scale_bits) if not self.delta_bits else
                    rows * (packed_length(n_blocks * (N_GROUPS - 1), self.scale_bits)
                            + packed_length(n_blocks, self.delta_bits)))
                 + (rows * packed_length(n_blocks * N_GROUPS, self.mean_bits) if self.means else 0)
                 + (self.col_scale_bits // 8 * cols if self.col_scale else 0)
                 + (packed_length(cols * perm_bits(cols), 1) if self.act_order else 0))
        sparse = [[_sparse_bits(w, g, k) for g, k in self.sparse_runs] for w in widths]
        most_salient = sum(min(self.max_salient_cols, w) - 1 for w in widths)
        return (fixed + rows * packed_length(sum(map(min, sparse)), 1),
                fixed + rows * (packed_length(sum(map(max, sparse)), 1) + packed_length(most_salient, 1)))

    def quantize(self, W: torch.Tensor, H: torch.Tensor) -> CompactBiLLMWeight:
        check_problem(W, H, "CompactBiLLM")
        W, H, _ = prepare_hessian(W, H, self.damp)
        order = None
        if self.act_order:  # columns solved (and stored) by decreasing diag H, as GPTQ's act-order
            order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
            W, H = W[:, order], H[order][:, order]
        U = inverse_hessian_cholesky(H, self.damp, "CompactBiLLM")
        del H
        rows, cols = W.shape
        n_blocks = -(-cols // self.block_size)
        salient = torch.zeros(cols, dtype=torch.bool, device=W.device)
        sign1 = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
        sign2 = torch.zeros_like(sign1)
        scale_codes = torch.zeros(rows, n_blocks, N_GROUPS, dtype=torch.int64, device=W.device)
        mean_codes = torch.zeros_like(scale_codes)
        col_scale = torch.ones(cols, device=W.device)
        sparse_codes, runs = [], []
        row_ref, ref_top = self._row_reference(W), None
        if self.row_ref_bits == 8:
            stored_ref, ref_top = encode_row_refs(row_ref)
            row_ref = decode_row_refs(stored_ref, ref_top)

        for b, c0 in enumerate(range(0, cols, self.block_size)):
            c1 = min(c0 + self.block_size, cols)
            Wb = W[:, c0:c1]
            if self.col_scale:
                col_scale[c0:c1] = self._stored_column_scales(column_scales(Wb))
            Wn = Wb / col_scale[None, c0:c1]
            d = torch.diagonal(U)[c0:c1]
            salience = Wb ** 2 / d[None, :] ** 2 if self.salient_metric == "hessian" else Wb.abs()
            energy = float((Wn.double() ** 2).sum())
            sal_b = self._search_salient_cols(Wn, salience, energy)
            run_b, codes_b, sparse_b = self._search_sparse(Wn, sal_b, energy, row_ref)
            sal_mask = sal_b[None, :].expand_as(Wn)
            # with column feedback, each column's weight in the fit of the scales: its squared error
            # costs (col_scale / U_jj)^2 of output error (GPTQ's objective)
            fit_w = (col_scale[c0:c1] / d) ** 2 if self.column_feedback else None
            salient[c0:c1] = sal_b
            sparse_codes.append(codes_b)
            runs.append(run_b)
            target = Wn
            for _ in range(1 + (self.refits if self.column_feedback else 0)):
                (s_sal, sc_sal, mc_sal), (s_con, sc_con, mc_con), (s_spa, sc_spa, mc_spa) = (
                    self._binarize(target, sal_mask, 2, row_ref, fit_w),
                    self._binarize(target, ~sal_mask & ~sparse_b, 1, row_ref, fit_w),
                    self._binarize(target, sparse_b, 1, row_ref, fit_w))
                sign1[:, c0:c1] = s_sal[0] | s_con[0] | s_spa[0]
                sign2[:, c0:c1] = s_sal[1]
                scale_codes[:, b] = torch.stack([sc_sal[0], sc_sal[1], sc_con[0], sc_spa[0]], 1)
                mean_codes[:, b] = torch.stack([mc_sal[0], mc_sal[1], mc_con[0], mc_spa[0]], 1)
                a = decode_scales(row_ref, scale_codes[:, b], self.scale_bits, self.scale_octaves)
                m = decode_means(a, mean_codes[:, b], self.mean_bits) if self.means else torch.zeros_like(a)
                if self.column_feedback:
                    # refits: the scales fitted again to the values the columns had when their
                    # signs were chosen (after the feedback of the block's earlier columns)
                    Err, seen = self._signs_column_by_column(Wb, U[c0:c1, c0:c1], col_scale[c0:c1], sal_b, sparse_b,
                                                             a, m, sign1[:, c0:c1], sign2[:, c0:c1])
                    target = seen / col_scale[None, c0:c1]
            if not self.column_feedback:
                Qb = block_values(sign1[:, c0:c1], sign2[:, c0:c1], sparse_b, sal_b, a, m)
                if self.col_scale:
                    Qb = Qb * col_scale[None, c0:c1]
                E = Wb - Qb
                Err = torch.linalg.solve_triangular(U[c0:c1, c0:c1], E, upper=True, left=False)
            W[:, c1:] -= Err @ U[c0:c1, c1:]

        flat = lambda c, bits: pack_bits(c.reshape(rows, -1), bits)  # noqa: E731
        return CompactBiLLMWeight(
            signs=pack_bool(sign1), residual_signs=pack_bool(sign2[:, salient]), salient_cols=pack_bool(salient),
            sparse_codes=pack_bool(torch.cat(sparse_codes, 1)),
            sparse_runs=torch.tensor(runs, dtype=torch.uint8, device=W.device).reshape(-1, 2),
            scale_codes=flat(scale_codes if not self.delta_bits else scale_codes[..., [0, 2, 3]], self.scale_bits),
            scale2_delta=flat(scale_codes[..., 1] - scale_codes[..., 0], self.delta_bits) if self.delta_bits else None,
            delta_bits=self.delta_bits,
            mean_codes=flat(mean_codes, self.mean_bits) if self.means else None,
            row_ref=row_ref if ref_top is None else stored_ref, ref_top=ref_top, col_scale=self._column_scale_storage(col_scale) if self.col_scale else None,
            shape=(rows, cols), block_size=self.block_size, scale_bits=self.scale_bits, mean_bits=self.mean_bits,
            scale_octaves=self.scale_octaves,
            perm=None if order is None else pack_bool(codes_to_bits(order[None, :], perm_bits(cols))[0]))

    def _column_scale_storage(self, cs: torch.Tensor) -> torch.Tensor:
        return encode_column_scales(cs) if self.col_scale_bits == 8 else cs.half()

    def _stored_column_scales(self, cs: torch.Tensor) -> torch.Tensor:
        """The column scales as dequantization will read them back, float32."""
        return decode_column_scales(encode_column_scales(cs)) if self.col_scale_bits == 8 else cs.half().float()

    @staticmethod
    def _signs_column_by_column(Wb, Ubb, cs, sal_b, sparse_b, a, m, sign1, sign2) -> torch.Tensor:
        """The block's signs chosen one column at a time, each column's error propagated to the
        block's later columns first (GPTQ inside the block; the groups, scales and means stay as
        searched). Writes sign1/sign2 [rows, width] in place; returns the block's Err (E U_bb^-1)
        and the values [rows, width] the columns had when their signs were chosen."""
        rows, width = Wb.shape
        Wb = Wb.clone()
        Err = torch.empty_like(Wb)
        seen = Wb  # column j holds its value when its signs are chosen (updated in place)
        for j in range(width):
            v = Wb[:, j] / cs[j]
            if sal_b[j]:
                s1 = v - m[:, 0] >= 0
                first = torch.where(s1, a[:, 0], -a[:, 0]) + m[:, 0]
                s2 = v - first - m[:, 1] >= 0
                q = first + (torch.where(s2, a[:, 1], -a[:, 1]) + m[:, 1])
                sign2[:, j] = s2
            else:
                g = torch.where(sparse_b[:, j], 3, 2)
                ag, mg = a.gather(1, g[:, None])[:, 0], m.gather(1, g[:, None])[:, 0]
                s1 = v - mg >= 0
                q = torch.where(s1, ag, -ag) + mg
            sign1[:, j] = s1
            Err[:, j] = (Wb[:, j] - q * cs[j]) / Ubb[j, j]
            Wb[:, j + 1:] -= Err[:, j, None] * Ubb[j, j + 1:][None, :]
        return Err, seen

    def _row_reference(self, W: torch.Tensor) -> torch.Tensor:
        """fp16 [rows]: the top of each row's scale grid, ref_headroom x the row's largest |w| (over
        the column scales the original W would get), before any error is propagated."""
        if self.col_scale:
            W = torch.cat([W[:, c0:c0 + self.block_size] / column_scales(W[:, c0:c0 + self.block_size])[None, :]
                           for c0 in range(0, W.shape[1], self.block_size)], 1)
        return (W.abs().amax(1) * self.ref_headroom).clamp_min(1e-8).half()

    def _binarize(self, w: torch.Tensor, mask: torch.Tensor, order: int, row_ref: torch.Tensor,
                  col_weight: torch.Tensor | None = None):
        """Residual binarization of the masked entries of w per row with stored (decoded)
        scales and means. Returns (signs [order, rows, cols] bool (False off the mask),
        scale codes [order, rows], mean codes [order, rows])."""
        maskf = mask.to(w.dtype)
        weight = maskf if col_weight is None else maskf * col_weight[None, :]
        count = maskf.sum(1).clamp_min(1) if col_weight is None else weight.sum(1).clamp_min(1e-30)
        approx = torch.zeros_like(w)
        signs, scodes, mcodes = [], [], []
        for _ in range(order):
            residual = (w - approx) * maskf
            mean = (residual * weight).sum(1) / count if self.means else torch.zeros_like(count)
            scale = ((residual - mean[:, None]).abs() * weight).sum(1) / count
            sc = encode_scales(row_ref, scale, self.scale_bits, self.scale_octaves)
            if scodes and self.delta_bits:  # order 2: a few steps below order 1's code
                sc = torch.minimum(torch.maximum(sc, scodes[0]), scodes[0] + (2 ** self.delta_bits - 1))
            scale = decode_scales(row_ref, sc, self.scale_bits, self.scale_octaves)
            if self.means:
                mc = encode_means(scale, mean, self.mean_bits)
                mean = decode_means(scale, mc, self.mean_bits)
            else:
                mc = torch.zeros_like(sc)
            positive = residual - mean[:, None] >= 0
            approx = approx + (torch.where(positive, scale[:, None], -scale[:, None]) + mean[:, None]) * maskf
            signs.append(positive & mask)
            scodes.append(sc)
            mcodes.append(mc)
        return torch.stack(signs), torch.stack(scodes), torch.stack(mcodes)

    def _search_salient_cols(self, Wb: torch.Tensor, salience: torch.Tensor, energy: float) -> torch.Tensor:
        """BiLLM's structural search, each extra salient column priced at one bit per row."""
        rows, n_cols = Wb.shape
        chosen = torch.zeros(n_cols, dtype=torch.bool, device=Wb.device)
        if min(self.max_salient_cols, n_cols) <= 1:
            return chosen
        candidates = torch.arange(1, min(self.max_salient_cols, n_cols), device=Wb.device)
        ranked = torch.argsort(salience.sum(0), descending=True)
        score = leading_split_errors(Wb[:, ranked], candidates)
        score = score + self.lam * energy * (rows * candidates.double()) / Wb.numel()
        chosen[ranked[:int(candidates[score.argmin()])]] = True
        return chosen

    def _search_sparse(self, Wb: torch.Tensor, salient: torch.Tensor, energy: float, row_ref: torch.Tensor):
        """The sparse runs (G, k) of the block: per row, in each run of G columns, the k
        non-salient weights of largest |w| are sparse. (G, k) minimises the error of
        binarizing the concentrated and sparse groups (with stored scales) plus lam * its
        code bits. Returns ((log2 G, k), packed codes [rows, bytes], sparse mask [rows, width])."""
        rows, width = Wb.shape
        magnitude = Wb.abs().masked_fill(salient[None, :], -1.0)
        plain = ~salient[None, :].expand_as(Wb)
        best = None
        for g, k in self.sparse_runs:
            log2g, runs = g.bit_length() - 1, -(-width // g)
            if k == 0:
                idx, sparse = None, torch.zeros_like(plain)
            else:
                padded = torch.nn.functional.pad(magnitude, (0, runs * g - width), value=-2.0)
                idx = padded.reshape(rows, runs, g).topk(k, -1).indices.sort(-1).values  # [rows, runs, k]
                col = (idx + torch.arange(runs, device=Wb.device)[None, :, None] * g).reshape(rows, -1)
                sparse = torch.zeros(rows, runs * g, dtype=torch.bool, device=Wb.device)
                sparse = sparse.scatter_(1, col, True)[:, :width] & plain
            err = 0.0
            for group in (plain & ~sparse, sparse):
                signs, sc, mc = self._binarize(Wb, group, 1, row_ref)
                a = decode_scales(row_ref, sc[0], self.scale_bits, self.scale_octaves)
                m = decode_means(a, mc[0], self.mean_bits) if self.means else torch.zeros_like(a)
                approx = torch.where(signs[0], a[:, None], -a[:, None]) + m[:, None]
                err += float(((Wb - approx) ** 2 * group).sum())
            score = err + self.lam * energy * rows * _sparse_bits(width, g, k) / Wb.numel()
            if best is None or score < best[0]:
                codes = (torch.zeros(rows, 0, dtype=torch.bool, device=Wb.device) if k == 0
                         else codes_to_bits(encode_combinations(idx, g), code_bits(g, k)))
                best = (score, (log2g, k), codes, sparse)
        return best[1:]


def column_scales(Wb: torch.Tensor) -> torch.Tensor:
    """Each column's rms over the block's mean rms (floored at 1e-4), float32 [cols]."""
    rms = Wb.pow(2).mean(0).sqrt()
    return (rms / rms.mean().clamp_min(1e-30)).clamp_min(1e-4)


def perm_bits(cols: int) -> int:
    """Bits of one stored column index."""
    return max(1, (cols - 1).bit_length())


def _sparse_bits(width: int, g: int, k: int) -> int:
    """Bits per row of the sparse codes of a block `width` columns wide, k per run of g."""
    return -(-width // g) * code_bits(g, k)


def sparse_positions_from_bits(bits: torch.Tensor, runs_bk: list[list[int]], widths: list[int],
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-of-G codes of every block (bool [rows, bits], as stored before packing) -> positions int64
    [rows, npos] and offsets int64 [n_blocks + 1]: block b's positions are [offsets[b], offsets[b + 1]), k_b
    per run of G_b columns, run by run, each the column's offset in the block (ascending in a run). A
    position past the block's end (its last run's padding) or on a salient column is not sparse.
    Inverse: `sparse_bits_from_positions`."""
    rows, out, offsets, at = bits.shape[0], [], [0], 0
    for width, (log2g, k) in zip(widths, runs_bk):
        if k:
            g = 1 << log2g
            runs, n_bits = -(-width // g), _sparse_bits(width, g, k)
            idx = decode_combinations(bits_to_codes(bits[:, at:at + n_bits], code_bits(g, k), runs), g, k)
            at += n_bits
            out.append((idx + torch.arange(runs, device=idx.device)[None, :, None] * g).reshape(rows, -1))
        offsets.append(offsets[-1] + (out[-1].shape[1] if k else 0))
    positions = torch.cat(out, 1) if out else torch.zeros(rows, 0, dtype=torch.int64, device=bits.device)
    return positions, torch.tensor(offsets, dtype=torch.int64)


def sparse_positions_from_mask(mask: torch.Tensor, salient: torch.Tensor, runs_bk: list[list[int]],
                               widths: list[int]) -> torch.Tensor:
    """The positions `sparse_positions_from_bits` gives, from the sparse group as a mask (bool [rows, in],
    `sparse_rows`), where a run holds fewer than k non-salient columns, filled as the solver's top-k fills
    them (its salient columns, then the padding past the block's end: chosen by the same top-k call on
    stand-in magnitudes, so equal where that call breaks the ties alike; callers check)."""
    rows, out, c0 = mask.shape[0], [], 0
    for width, (log2g, k) in zip(widths, runs_bk):
        if k:
            g = 1 << log2g
            runs = -(-width // g)
            stand_in = torch.where(mask[:, c0:c0 + width], 1.0, 0.0).masked_fill(salient[None, c0:c0 + width], -1.0)
            padded = torch.nn.functional.pad(stand_in, (0, runs * g - width), value=-2.0)
            idx = padded.reshape(rows, runs, g).topk(k, -1).indices.sort(-1).values
            out.append((idx + torch.arange(runs, device=idx.device)[None, :, None] * g).reshape(rows, -1))
        c0 += width
    return torch.cat(out, 1) if out else torch.zeros(rows, 0, dtype=torch.int64, device=mask.device)


def sparse_bits_from_positions(positions: torch.Tensor, runs_bk: list[list[int]], widths: list[int]) -> torch.Tensor:
    """Inverse of `sparse_positions_from_bits`: positions [rows, npos] (any integer dtype) -> bool [rows, bits]."""
    rows, out, at = positions.shape[0], [], 0
    for width, (log2g, k) in zip(widths, runs_bk):
        if k:
            g = 1 << log2g
            runs = -(-width // g)
            idx = positions[:, at:at + runs * k].long().reshape(rows, runs, k) % g
            at += runs * k
            out.append(codes_to_bits(encode_combinations(idx, g), code_bits(g, k)))
    return torch.cat(out, 1) if out else torch.zeros(rows, 0, dtype=torch.bool, device=positions.device)


# --------------------------------------------------------------------------- k-of-G codes


def code_bits(g: int, k: int) -> int:
    """Bits of one k-of-g code: ceil(log2 C(g, k)) (0 when there is one choice)."""
    return (math.comb(g, k) - 1).bit_length()


@lru_cache(maxsize=None)
def _binomials(g: int, k: int) -> torch.Tensor:
    """int64 [k + 1, g]: entry [i, c] = C(c, i)."""
    return torch.tensor([[math.comb(c, i) for c in range(g)] for i in range(k + 1)], dtype=torch.int64)


def encode_combinations(idx: torch.Tensor, g: int) -> torch.Tensor:
    """Sorted positions idx [..., k] (distinct, in 0..g-1) -> their rank among the C(g, k)
    k-subsets, sum_i C(idx_i, i + 1) (the combinatorial number system), int64 [...]."""
    k = idx.shape[-1]
    table = _binomials(g, k).to(idx.device)
    return sum(table[i + 1][idx[..., i]] for i in range(k))


def decode_combinations(codes: torch.Tensor, g: int, k: int) -> torch.Tensor:
    """Inverse of `encode_combinations`: int64 codes [...] -> sorted positions [..., k]."""
    table = _binomials(g, k).to(codes.device)
    rest, out = codes.clone(), []
    for i in range(k, 0, -1):  # the largest position c with C(c, i) <= rest, then the next
        c = torch.searchsorted(table[i], rest.contiguous(), right=True) - 1
        rest -= table[i][c]
        out.append(c)
    return torch.stack(out[::-1], -1)


def codes_to_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 codes [rows, runs] of `bits` bits each -> bool [rows, runs * bits], low bit first
    (the blocks' bits are concatenated along the row and packed once: no padding per block)."""
    planes = (codes[..., None] >> torch.arange(bits, device=codes.device)) & 1
    return planes.reshape(codes.shape[0], -1).bool()


def bits_to_codes(bits_: torch.Tensor, bits: int, runs: int) -> torch.Tensor:
    """Inverse of `codes_to_bits`."""
    planes = bits_.reshape(bits_.shape[0], runs, bits).to(torch.int64)
    return (planes << torch.arange(bits, device=bits_.device)).sum(-1)
