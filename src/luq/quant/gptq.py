"""GPTQ (Frantar et al., 2022): layer-wise OBS quantization with lazy batch updates.

For each column j (in act-order if asked), in blocks of `block_size` columns:
    q_j   = grid(w_j)                                  quantize one column
    err_j = (w_j - q_j) / U_jj                          U = chol(H^-1), upper
    W[:, j:] -= err_j * U[j, j:]                        OBS update (Alg. 1, within the block)
and after each block, W[:, later] -= Err_block @ U[block, later]   (lazy batch update).
Group grids (scale, zero) are fitted on the error-updated weights when the first
column of each group is reached, as the reference does, or on the original W before
solving (static groups, the default). With `clip`, the static grids are fitted a second
way too (`fit_grid_clipped`), the problem solved on each, and each row kept from the
solution of less output error (`_better_rows`).

The stored form (`GPTQWeight`): codes packed `bits` bits each, fp16 scales per row
per group, zeros packed at `bits` bits (none when symmetric: the zero is implied),
and `g_idx` (column -> group) when act-order reorders the groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from luq.errors import LuqError
from luq.quant.base import OMIT_AT_DEFAULT, QuantizedWeight
from luq.quant.hessian import check_problem, inverse_hessian_cholesky, prepare_hessian
from luq.quant.packing import pack_bits, packed_length, unpack_bits

GPTQ_BITS = (1, 2, 3, 4, 6, 8)
_FP16_MAX = 65504.0
_FP16_MIN_SCALE = 2.0 ** -24  # smallest positive fp16


def fit_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max uniform grid per row of w [rows, cols] -> (scale [rows], zero [rows]).

    As the reference quantizer: the range always includes 0; an all-zero row gets
    [-1, 1]; symmetric grids centre the zero at (maxq + 1) / 2. The scale is rounded
    to fp16 here, because fp16 is what is stored and what dequantization will read.
    """
    maxq = 2 ** bits - 1
    zeros = torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp(_FP16_MIN_SCALE, _FP16_MAX).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


CLIP_SHRINKS = tuple(1 - 0.02 * i for i in range(11))   # the range kept: 100%, 98%, ..., 80%


def fit_grid_clipped(w: torch.Tensor, bits: int, sym: bool,
                     importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-max grid of each row of w [rows, cols] with its range shrunk by the factor in CLIP_SHRINKS of
    least importance-weighted rounding error, sum_j importance_j (w_j - q_j)^2 (importance: the Hessian's
    diagonal over these columns, imatrix's weighting) -> (scale [rows], zero [rows])."""
    best_err = best_scale = best_zero = None
    for shrink in CLIP_SHRINKS:
        scale, zero = fit_grid(w * shrink, bits, sym)
        _, q = quantize_to_grid(w, scale[:, None], zero[:, None], bits)
        err = ((w - q) ** 2 * importance).sum(dim=1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _stack_grids(grids: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(scale [rows], zero [rows]) per group] -> (scales, zeros) [rows, n_groups]."""
    return torch.stack([s for s, _ in grids], 1), torch.stack([z for _, z in grids], 1)


_ROW_ERROR_COLUMNS = 1024   # columns of H in float64 at a time: bounds the copy on wide layers


def _better_rows(W: torch.Tensor, H: torch.Tensor, ridge: float,
                 solved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 solve_group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of several solutions (codes, scales, zeros) of one problem, each row's of least output error
    (w - q) H (w - q)^T, on the Hessian without the damping `ridge` (H - ridge I: the inputs' own)."""
    best = None
    for codes, scales, zeros in solved:
        E = (W - scales[:, solve_group] * (codes - zeros[:, solve_group])).double()
        err = -ridge * (E * E).sum(dim=1)
        for c0 in range(0, H.shape[1], _ROW_ERROR_COLUMNS):   # in float64, whose sums near-ties do not flip
            c1 = c0 + _ROW_ERROR_COLUMNS
            err += ((E @ H[:, c0:c1].double()) * E[:, c0:c1]).sum(dim=1)
        if best is None:
            best = [err, codes, scales, zeros]
            continue
        better = err < best[0]
        best = [torch.where(better, err, best[0])] + [torch.where(better[:, None], new, old)
                                                       for new, old in zip((codes, scales, zeros), best[1:])]
    return best[1], best[2], best[3]


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round w onto the grid: (codes, dequantized values); broadcasting like w."""
    codes = torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)
    return codes, scale * (codes - zero)


@dataclass(eq=False, repr=False)
class GPTQWeight(QuantizedWeight):
    """A weight on a uniform grid per (row, group): W_hat[r, j] = scale[r, g] * (code[r, j] - zero[r, g])."""

    method = "gptq"

    qweight: torch.Tensor          # uint8 [out, packed(in)] codes in original column order
    scales: torch.Tensor           # fp16 [out, n_groups]
    qzeros: torch.Tensor | None    # uint8 [out, packed(n_groups)]; None when symmetric
    g_idx: torch.Tensor | None     # uint8/int16/int32 [in] group of each column; None when groups are contiguous
    shape: tuple[int, int]
    bits: int
    group_size: int                # columns per group (== in for one group per row)

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def sym(self) -> bool:
        return self.qzeros is None

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"qweight": self.qweight, "scales": self.scales}
        if self.qzeros is not None:
            sd["qzeros"] = self.qzeros
        if self.g_idx is not None:
            sd["g_idx"] = self.g_idx
        return sd

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "shape": list(self.shape), "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "GPTQWeight":
        return cls(qweight=tensors["qweight"], scales=tensors["scales"], qzeros=tensors.get("qzeros"),
                   g_idx=tensors.get("g_idx"), shape=tuple(config["shape"]), bits=int(config["bits"]),
                   group_size=int(config["group_size"]))

    @property
    def nominal_bits_per_weight(self) -> float:
        """The figure papers quote for GPTQ: the code width alone (scales and zeros left out)."""
        return float(self.bits)

    def column_groups(self) -> torch.Tensor:
        """Group index of every input column (int64 [in])."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.shape[1], device=self.scales.device) // self.group_size

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        cols = self.shape[1]
        codes = unpack_bits(self.qweight[start:stop], self.bits, cols).float()
        groups = self.column_groups()
        scale = self.scales[start:stop].float()[:, groups]
        if self.qzeros is None:
            zero = float((2 ** self.bits) // 2)
        else:
            zero = unpack_bits(self.qzeros[start:stop], self.bits, self.n_groups).float()[:, groups]
        return (scale * (codes - zero)).to(dtype)

    def dequantize_index(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Only the rows `rows` (any order, repeats allowed): an embedding lookup unpacks what it reads."""
        picked = GPTQWeight(self.qweight[rows], self.scales[rows], None if self.qzeros is None else self.qzeros[rows],
                            self.g_idx, (int(rows.numel()), self.shape[1]), self.bits, self.group_size)
        return picked.dequantize_rows(0, int(rows.numel()), dtype)


def _index_dtype(n: int) -> torch.dtype:
    """Smallest integer dtype that holds indices 0..n-1."""
    return torch.uint8 if n <= 2 ** 8 else torch.int16 if n <= 2 ** 15 else torch.int32


def pack_gptq_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, groups: torch.Tensor | None,
                     bits: int, group_size: int, sym: bool) -> GPTQWeight:
    """Store codes [out, in] (original column order), per-group scales/zeros [out, n_groups]."""
    rows, cols = codes.shape
    g_idx = None if groups is None else groups.to(_index_dtype(scales.shape[1]))
    return GPTQWeight(
        qweight=pack_bits(codes, bits),
        scales=scales.half().contiguous(),
        qzeros=None if sym else pack_bits(zeros, bits),
        g_idx=g_idx, shape=(rows, cols), bits=bits, group_size=group_size,
    )


def gptq_nbytes(shape: tuple[int, int], bits: int, group_size: int | None, sym: bool, with_g_idx: bool) -> int:
    """Exact stored bytes of a `GPTQWeight` of `shape` (codes, fp16 scales, packed zeros, g_idx)."""
    rows, cols = shape
    n_groups = -(-cols // _group_width(group_size, cols))
    total = rows * packed_length(cols, bits) + rows * n_groups * 2
    if not sym:
        total += rows * packed_length(n_groups, bits)
    if with_g_idx:
        total += cols * torch.empty((), dtype=_index_dtype(n_groups)).element_size()
    return total


def _check_settings(solver: str, bits: int, group_size: int | None) -> None:
    if bits not in GPTQ_BITS:
        raise LuqError(f"{solver}: bits must be one of {GPTQ_BITS}, got {bits}")
    if group_size is not None and group_size != -1 and (not isinstance(group_size, int) or group_size <= 0):
        raise LuqError(f"{solver}: group_size must be a positive integer, or -1/None for one group per row; got {group_size}")


def _group_width(group_size: int | None, cols: int) -> int:
    """Columns per group; the last group of a row may be narrower when it does not divide `cols`."""
    return cols if group_size in (None, -1) else min(group_size, cols)


@dataclass(frozen=True)
class RTN:
    """Round-to-nearest on the same grid and stored form as GPTQ (no Hessian): the data-free baseline."""

    weight_type: ClassVar[type[QuantizedWeight]] = GPTQWeight   # the packed weight quantize returns

    bits: int = 4
    group_size: int | None = 128
    sym: bool = False

    def __post_init__(self) -> None:
        _check_settings("RTN", self.bits, self.group_size)

    def nbytes_bounds(self, shape: tuple[int, int]) -> tuple[int, int]:
        n = gptq_nbytes(shape, self.bits, self.group_size, self.sym, with_g_idx=False)
        return n, n

    def quantize(self, W: torch.Tensor, H: torch.Tensor | None = None) -> GPTQWeight:
        if H is None:
            H = torch.eye(W.shape[1], device=W.device) if isinstance(W, torch.Tensor) and W.dim() == 2 else W
        check_problem(W, H, "RTN")
        W = W.detach().float()
        rows, cols = W.shape
        gs = _group_width(self.group_size, cols)
        codes = torch.empty_like(W)
        scales, zeros = [], []
        for c0 in range(0, cols, gs):
            scale, zero = fit_grid(W[:, c0:c0 + gs], self.bits, self.sym)
            codes[:, c0:c0 + gs], _ = quantize_to_grid(W[:, c0:c0 + gs], scale[:, None], zero[:, None], self.bits)
            scales.append(scale)
            zeros.append(zero)
        return pack_gptq_weight(codes, torch.stack(scales, 1), torch.stack(zeros, 1), None, self.bits, gs, self.sym)


@dataclass(frozen=True)
class GPTQ:
    """GPTQ settings; `quantize(W, H)` is the solver.

    bits: 2, 3, 4 or 8. group_size: columns per scale/zero (-1 or None: one per row; a
    size that does not divide the columns leaves a narrower last group). act_order:
    quantize columns in decreasing diag(H) order. sym: symmetric grid (zero implied,
    not stored). damp: relative damping, H += damp * mean(diag H) * I. block_size:
    columns per lazy batch update. static_groups: fit every group's grid on the
    original W before any update, so groups stay contiguous under act-order and no
    g_idx is stored (llmcompressor's default "static" order). With
    static_groups=False each act-order group's grid is fitted on the error-updated
    weights when the group starts and `g_idx` maps columns to groups (the reference
    GPTQ's act-order). On 21 real SmolLM2 linears both give the same error on
    average (tests/test_solvers_real.py); static is the default since it stores fewer bytes
    and reads weights without a gather. clip (static groups only): solve twice, on the min-max
    grids and on `fit_grid_clipped`'s, and keep each row from the solution of less output error
    (w - q) H (w - q)^T: GPTQ's objective is a sum over rows that never mix, so the choice is exact
    and no row errs more than on min-max grids (error and time: bench/results/gptq-clip.json).
    """

    weight_type: ClassVar[type[QuantizedWeight]] = GPTQWeight   # the packed weight quantize returns

    bits: int = 4
    group_size: int | None = 128
    act_order: bool = True
    sym: bool = False
    damp: float = 0.01
    block_size: int = 128
    static_groups: bool = True
    clip: bool = field(default=False, metadata={OMIT_AT_DEFAULT: True})   # added after caches existed

    def __post_init__(self) -> None:
        _check_settings("GPTQ", self.bits, self.group_size)
        if not (0 <= self.damp < 1):
            raise LuqError(f"GPTQ: damp must be in [0, 1), got {self.damp}")
        if self.clip and not self.static_groups:
            raise LuqError("GPTQ: clip searches grids fitted before solving, so it needs static_groups=True")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise LuqError(f"GPTQ: block_size must be a positive integer, got {self.block_size}")

    def nbytes_bounds(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Exact: GPTQ's stored size depends only on the shape and the settings."""
        n = gptq_nbytes(shape, self.bits, self.group_size, self.sym,
                        with_g_idx=self.act_order and not self.static_groups)
        return n, n

    def quantize(self, W: torch.Tensor, H: torch.Tensor) -> GPTQWeight:
        check_problem(W, H, "GPTQ")
        W, H, _ = prepare_hessian(W, H, self.damp)
        cols = W.shape[1]
        bits, sym = self.bits, self.sym
        gs = _group_width(self.group_size, cols)
        n_groups = (cols + gs - 1) // gs

        grid_sets = [None]   # None: each group's grid fitted on the updated weights when the group starts
        if self.static_groups:  # grids of the original, unpermuted groups
            grid_sets = [_stack_grids([fit_grid(W[:, c0:c0 + gs], bits, sym) for c0 in range(0, cols, gs)])]
            if self.clip:
                importance = torch.diagonal(H)
                grid_sets.append(_stack_grids([fit_grid_clipped(W[:, c0:c0 + gs], bits, sym, importance[c0:c0 + gs])
                                               for c0 in range(0, cols, gs)]))

        perm = torch.argsort(torch.diagonal(H), descending=True) if self.act_order else None
        if perm is not None:
            W = W[:, perm]
            H = H[perm]  # in two steps, so that at most two [cols, cols] copies are alive
            H = H[:, perm]
        U = inverse_hessian_cholesky(H, self.damp, "GPTQ")
        if len(grid_sets) == 1:
            del H

        # group of each column in the (possibly permuted) solving order
        orig_col = perm if perm is not None else torch.arange(cols, device=W.device)
        solve_group = orig_col // gs if self.static_groups else torch.arange(cols, device=W.device) // gs
        solved = [self._solve(W.clone() if len(grid_sets) > 1 else W, U, grids, solve_group, n_groups)
                  for grids in grid_sets]
        if len(solved) == 1:
            codes, scales, zeros = solved[0]
        else:
            ridge = self.damp * float(torch.diagonal(H).mean()) / (1 + self.damp)   # what prepare_hessian added
            codes, scales, zeros = _better_rows(W, H, ridge, solved, solve_group)
            del H
        del W, U  # not needed to pack: memory for packing's temporaries

        if perm is None:
            return pack_gptq_weight(codes, scales, zeros, None, bits, gs, sym)
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        if self.static_groups:  # groups are the original contiguous ones
            return pack_gptq_weight(codes, scales, zeros, None, bits, gs, sym)
        return pack_gptq_weight(codes, scales, zeros, solve_group[invperm], bits, gs, sym)

    def _solve(self, W: torch.Tensor, U: torch.Tensor, grids: tuple[torch.Tensor, torch.Tensor] | None,
               solve_group: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """GPTQ's column loop over W (in solving order; updated in place) -> (codes, scales, zeros).
        grids: (scales, zeros) [rows, n_groups] fixed in advance, or None to fit each group when it starts."""
        rows, cols = W.shape
        bits, sym, gs = self.bits, self.sym, _group_width(self.group_size, cols)
        codes = torch.zeros_like(W)
        if grids is None:
            scales = torch.zeros(rows, n_groups, device=W.device)
            zeros = torch.zeros(rows, n_groups, device=W.device)
        else:
            scales, zeros = grids
        solve_group_list = solve_group.tolist()

        # the working block is held transposed ([columns, rows]) so each column is contiguous
        for b0 in range(0, cols, self.block_size):
            b1 = min(b0 + self.block_size, cols)
            W1t = W[:, b0:b1].T.contiguous()
            U1 = U[b0:b1, b0:b1]
            Err1t = torch.empty_like(W1t)
            codes1t = torch.empty_like(W1t)
            for i in range(b1 - b0):
                j = b0 + i
                g = solve_group_list[j]
                if grids is None and j % gs == 0:
                    # the group's grid, on the weights as updated so far (in and past this block)
                    group_w = torch.cat([W1t[i:i + gs].T, W[:, b1:j + gs]], dim=1)
                    scales[:, g], zeros[:, g] = fit_grid(group_w, bits, sym)
                if i == 0 or j % gs == 0 or grids is not None:
                    scale_g, zero_g = scales[:, g].contiguous(), zeros[:, g].contiguous()
                w = W1t[i]
                codes1t[i], q = quantize_to_grid(w, scale_g, zero_g, bits)
                err = (w - q) / U1[i, i]
                W1t[i:].addr_(U1[i, i:], err, alpha=-1)  # OBS update of the block's later columns
                Err1t[i] = err
            codes[:, b0:b1] = codes1t.T
            W[:, b1:].addmm_(Err1t.T, U[b0:b1, b1:], alpha=-1)  # lazy batch update of the rest
        return codes, scales, zeros
