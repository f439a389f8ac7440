"""BiLLM (Huang et al., 2024): 1-bit post-training quantization with salient columns.

Per block of `block_size` columns, on weights already updated by the errors of the
blocks before it:
  1. salience of each weight, s = w^2 / [H^-1]_jj^2  (Eq. 2; [H^-1]_jj read from the
     Cholesky factor, as the reference does);
  2. structural search: columns ranked by summed salience, the number of salient
     columns chosen among 1..max_salient_cols-1 by the binarization error;
  3. salient columns: residual binarization of order 2 (Eq. 4-5),
     w ~ (a1 * s1 + m1) + (a2 * s2 + m2), per row;
  4. non-salient weights: the bell-shaped split (Eq. 7-8) at a break point p searched
     over quantiles of |w|; the concentrated group |w| < p and the sparse group
     |w| >= p are binarized separately, each with its own scale a and mean m;
  5. the block's error is propagated to the later columns, as in GPTQ (Eq. 1 of GPTQ),
     W[:, later] -= (E U_bb^-1) U[block, later].

Binarization of a group (order 1): m = mean(w), a = mean|w - m|, w ~ a * sign(w - m) + m.

The stored form (`BiLLMWeight`), all of it counted in `nbytes`:
  signs            1 bit per weight (first-order sign)
  residual_signs   1 bit per salient weight (second-order sign)
  sparse_bitmap    1 bit per non-salient weight (concentrated 0 / sparse 1)
  salient_cols     1 bit per input column
  scales, means    fp16 [out, n_blocks, 4]: salient order 1, salient order 2,
                   concentrated, sparse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from luq.errors import LuqError
from luq.quant.base import QuantizedWeight
from luq.quant.binsearch import leading_split_errors, split_errors
from luq.quant.hessian import check_problem, inverse_hessian_cholesky, prepare_hessian
from luq.quant.packing import pack_bool, packed_length, unpack_bool

# slots of the per-(row, block) parameters
SALIENT_1, SALIENT_2, CONCENTRATED, SPARSE = range(4)
SALIENT_METRICS = ("hessian", "magnitude")
COMPENSATIONS = ("obs", "reference")


def binarize(w: torch.Tensor, mask: torch.Tensor | None, order: int, fp16_params: bool = False):
    """Residual binarization of the entries of w [rows, cols] selected by mask, per row.

    mask None selects every entry. Returns (approx, signs [order, rows, cols] bool,
    scales [order, rows], means [order, rows]); approx is 0 outside the mask. With
    fp16_params the scale and mean are rounded to fp16 as they are stored, so that
    approx is exactly what dequantization gives.
    """
    approx = torch.zeros_like(w)
    maskf = None if mask is None else mask.to(w.dtype)
    count = w.new_full((w.shape[0],), w.shape[1]) if mask is None else maskf.sum(1).clamp_min(1)
    signs, scales, means = [], [], []
    for _ in range(order):
        residual = w - approx
        mean = (residual if maskf is None else residual * maskf).sum(1) / count
        if fp16_params:
            mean = mean.half().float()
        centred = residual - mean[:, None]
        scale = (centred.abs() if maskf is None else centred.abs() * maskf).sum(1) / count
        if fp16_params:
            scale = scale.half().float()
        positive = centred >= 0  # a zero residual takes +1: a stored bit has no zero
        step = binary_value(positive, scale[:, None], mean[:, None])
        approx = approx + (step if maskf is None else step * maskf)
        signs.append(positive if mask is None else positive & mask)
        scales.append(scale)
        means.append(mean)
    return approx, torch.stack(signs), torch.stack(scales), torch.stack(means)


def binary_value(positive: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """a * sign + m, with sign = +1 where `positive` else -1."""
    return torch.where(positive, scale, -scale) + mean


def block_values(sign1: torch.Tensor, sign2: torch.Tensor, sparse: torch.Tensor, salient: torch.Tensor,
                 scales: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The dequantized block [rows, cols] from its bits and its [rows, 4] scales and means.

    sign1, sign2, sparse: bool [rows, cols] (sign2 read on salient columns, sparse on the
    others); salient: bool [cols]. The one formula both the solver and `dequantize` use,
    so the stored form reproduces the solver's weights bit for bit.
    """
    def value(positive, slot):
        return binary_value(positive, scales[:, slot, None], means[:, slot, None])

    salient_value = value(sign1, SALIENT_1) + value(sign2, SALIENT_2)
    plain_value = torch.where(sparse, value(sign1, SPARSE), value(sign1, CONCENTRATED))
    return torch.where(salient[None, :], salient_value, plain_value)


@dataclass(eq=False, repr=False)
class BinaryParts:
    """The unpacked content of rows of a binarized weight (BiLLM and compact BiLLM): the one
    input of their dequantization and of the fast kernel (luq.quant.kernels) alike.

    sign1, sign2, sparse: bool [rows, in] (sign2 meaningful on salient columns, sparse on the
    others); salient: bool [in]; scales, means: float32 [rows, n_blocks, 4] (slots SALIENT_1,
    SALIENT_2, CONCENTRATED, SPARSE); col_scale: float32 [in] multiplying every value, or None.
    """

    sign1: torch.Tensor
    sign2: torch.Tensor
    sparse: torch.Tensor
    salient: torch.Tensor
    scales: torch.Tensor
    means: torch.Tensor
    col_scale: torch.Tensor | None
    block_size: int
    column_order: torch.Tensor | None = None

    def values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized rows [rows, in]."""
        rows, cols = self.sign1.shape
        out = torch.empty(rows, cols, dtype=torch.float32, device=self.sign1.device)
        for b, c0 in enumerate(range(0, cols, self.block_size)):
            c1 = min(c0 + self.block_size, cols)
            out[:, c0:c1] = block_values(self.sign1[:, c0:c1], self.sign2[:, c0:c1], self.sparse[:, c0:c1],
                                         self.salient[c0:c1], self.scales[:, b], self.means[:, b])
        if self.col_scale is not None:
            out *= self.col_scale[None, :]
        if self.column_order is not None:  # stored column i is input column column_order[i]
            out = torch.empty_like(out).index_copy_(1, self.column_order, out)
        return out.to(dtype)


def unpack_signs(signs: torch.Tensor, residual_signs: torch.Tensor, salient: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first signs of every column and the residual signs of the salient ones (zero
    elsewhere), unpacked to bool [rows, in]: the sign planes both binarized layouts share."""
    cols = salient.numel()
    sign1 = unpack_bool(signs, cols)
    sign2 = torch.zeros(sign1.shape, dtype=torch.bool, device=sign1.device)
    sign2[:, salient] = unpack_bool(residual_signs, int(salient.sum()))
    return sign1, sign2


@dataclass(eq=False, repr=False)
class BiLLMWeight(QuantizedWeight):
    """A BiLLM-binarized weight in packed form (layout in the module docstring)."""

    method = "billm"

    signs: torch.Tensor            # uint8 [out, packed(in)]
    residual_signs: torch.Tensor   # uint8 [out, packed(n_salient_cols)]
    sparse_bitmap: torch.Tensor    # uint8 [out, packed(in - n_salient_cols)]
    salient_cols: torch.Tensor     # uint8 [packed(in)]
    scales: torch.Tensor           # fp16 [out, n_blocks, 4]
    means: torch.Tensor            # fp16 [out, n_blocks, 4]
    shape: tuple[int, int]
    block_size: int

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"signs": self.signs, "residual_signs": self.residual_signs, "sparse_bitmap": self.sparse_bitmap,
                "salient_cols": self.salient_cols, "scales": self.scales, "means": self.means}

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "shape": list(self.shape), "block_size": self.block_size}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "BiLLMWeight":
        return cls(**{k: tensors[k] for k in ("signs", "residual_signs", "sparse_bitmap", "salient_cols",
                                              "scales", "means")},
                   shape=tuple(config["shape"]), block_size=int(config["block_size"]))

    def salient_mask(self) -> torch.Tensor:
        """bool [in]: which input columns are salient."""
        return unpack_bool(self.salient_cols, self.shape[1])

    @property
    def nominal_bits_per_weight(self) -> float:
        """BiLLM paper's accounting: 1 sign bit per weight, a second for salient weights, and
        the 1-bit column mask; the group bitmap and the fp16 scales and means are left out."""
        rows, cols = self.shape
        n_salient = int(self.salient_mask().sum())
        return (rows * cols + rows * n_salient + cols) / (rows * cols)

    def binary_parts(self, start: int, stop: int) -> BinaryParts:
        """Rows [start, stop) unpacked (signs, masks, float32 scales and means)."""
        cols = self.shape[1]
        salient = self.salient_mask()
        n_salient = int(salient.sum())
        sign1, sign2 = unpack_signs(self.signs[start:stop], self.residual_signs[start:stop], salient)
        sparse = torch.zeros_like(sign2)
        sparse[:, ~salient] = unpack_bool(self.sparse_bitmap[start:stop], cols - n_salient)
        return BinaryParts(sign1, sign2, sparse, salient, self.scales[start:stop].float(),
                           self.means[start:stop].float(), None, self.block_size)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.binary_parts(start, stop).values(dtype)

    @staticmethod
    def stored_from_parts(parts: BinaryParts) -> dict[str, torch.Tensor]:
        """Inverse of `binary_parts` over all rows: the stored tensors of every weight and of every
        (row, block) (the column mask, a bit per column, is left to its owner)."""
        salient = parts.salient
        return {"signs": pack_bool(parts.sign1), "residual_signs": pack_bool(parts.sign2[:, salient]),
                "sparse_bitmap": pack_bool(parts.sparse[:, ~salient]), "scales": parts.scales.half(),
                "means": parts.means.half()}


def order_statistics(x: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """x.sort().values[ranks] for a 1-D x (on the CPU by numpy's vectorised sort: faster
    than np.partition at the 81 ranks of BiLLM's break points, in a one-off timing)."""
    if x.device.type != "cpu":
        return x.sort().values[ranks]
    return torch.from_numpy(np.sort(x.numpy())[ranks])


@dataclass(frozen=True)
class BiLLM:
    """BiLLM settings; `quantize(W, H)` is the solver.

    block_size: columns per block (128 in the paper). salient_metric: "hessian"
    (w^2/[H^-1]_jj^2, the paper's) or "magnitude" (|w|). max_salient_cols: the search
    tries 1..max_salient_cols-1 salient columns per block (the reference's 50).
    split_quantiles: candidate break points, as quantiles of the non-salient |w| (the
    reference's 0.10..0.90 by 0.01). damp: relative Hessian damping. compensation:
    "obs" propagates the block's error exactly, E U_bb^-1 (the OBS update for the
    whole block); "reference" divides each column's error by U_jj alone, as the
    reference code does.
    """

    weight_type: ClassVar[type[QuantizedWeight]] = BiLLMWeight   # the packed weight quantize returns

    block_size: int = 128
    salient_metric: str = "hessian"
    max_salient_cols: int = 50
    split_quantiles: tuple[float, ...] = tuple(round(0.10 + 0.01 * i, 2) for i in range(81))
    damp: float = 0.01
    compensation: str = "obs"

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise LuqError(f"BiLLM: block_size must be a positive integer, got {self.block_size}")
        if self.salient_metric not in SALIENT_METRICS:
            raise LuqError(f"BiLLM: salient_metric must be one of {SALIENT_METRICS}, got {self.salient_metric!r}")
        if self.compensation not in COMPENSATIONS:
            raise LuqError(f"BiLLM: compensation must be one of {COMPENSATIONS}, got {self.compensation!r}")
        if not (0 <= self.damp < 1):
            raise LuqError(f"BiLLM: damp must be in [0, 1), got {self.damp}")
        if not self.split_quantiles or not all(0 < q < 1 for q in self.split_quantiles):
            raise LuqError("BiLLM: split_quantiles must be a non-empty list of numbers in (0, 1)")

    def nbytes_bounds(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Signs, second-order signs and the group bitmap together take one bit per weight
        each, whatever the salient columns (up to byte padding of the two split rows)."""
        rows, cols = shape
        n_blocks = -(-cols // self.block_size)
        least = 2 * rows * packed_length(cols, 1) + packed_length(cols, 1) + rows * n_blocks * 4 * 2 * 2
        return least, least + rows

    def quantize(self, W: torch.Tensor, H: torch.Tensor) -> BiLLMWeight:
        check_problem(W, H, "BiLLM")
        W, H, _ = prepare_hessian(W, H, self.damp)
        U = inverse_hessian_cholesky(H, self.damp, "BiLLM")
        del H
        rows, cols = W.shape
        n_blocks = (cols + self.block_size - 1) // self.block_size
        salient = torch.zeros(cols, dtype=torch.bool, device=W.device)
        sign1 = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
        sign2 = torch.zeros_like(sign1)
        sparse = torch.zeros_like(sign1)
        scales = torch.zeros(rows, n_blocks, 4, device=W.device)
        means = torch.zeros_like(scales)

        for b, c0 in enumerate(range(0, cols, self.block_size)):
            c1 = min(c0 + self.block_size, cols)
            Wb = W[:, c0:c1]
            d = torch.diagonal(U)[c0:c1]
            salience = Wb ** 2 / d[None, :] ** 2 if self.salient_metric == "hessian" else Wb.abs()
            sal_b = self._search_salient_cols(Wb, salience)
            split = self._search_break_point(Wb, sal_b)
            sal_mask = sal_b[None, :].expand_as(Wb)
            sparse_b = (Wb.abs() >= split) & ~sal_mask
            q_sal, s_sal, a_sal, m_sal = binarize(Wb, sal_mask, 2, fp16_params=True)
            q_con, s_con, a_con, m_con = binarize(Wb, ~sal_mask & ~sparse_b, 1, fp16_params=True)
            q_spa, s_spa, a_spa, m_spa = binarize(Wb, sparse_b, 1, fp16_params=True)
            salient[c0:c1] = sal_b
            sign1[:, c0:c1] = s_sal[0] | s_con[0] | s_spa[0]
            sign2[:, c0:c1] = s_sal[1]
            sparse[:, c0:c1] = sparse_b
            scales[:, b] = torch.stack([a_sal[0], a_sal[1], a_con[0], a_spa[0]], 1)
            means[:, b] = torch.stack([m_sal[0], m_sal[1], m_con[0], m_spa[0]], 1)

            # the three groups' values are disjoint (0 elsewhere) and come from the stored fp16
            # parameters by block_values' formula: their sum is what dequantization gives
            Qb = q_sal + q_con + q_spa
            E = Wb - Qb
            Ubb = U[c0:c1, c0:c1]
            if self.compensation == "obs":
                Err = torch.linalg.solve_triangular(Ubb, E, upper=True, left=False)
            else:
                Err = E / torch.diagonal(Ubb)[None, :]
            W[:, c1:] -= Err @ U[c0:c1, c1:]

        return BiLLMWeight(
            signs=pack_bool(sign1),
            residual_signs=pack_bool(sign2[:, salient]),
            sparse_bitmap=pack_bool(sparse[:, ~salient]),
            salient_cols=pack_bool(salient),
            scales=scales.half(), means=means.half(),
            shape=(rows, cols), block_size=self.block_size,
        )

    def _search_salient_cols(self, Wb: torch.Tensor, salience: torch.Tensor) -> torch.Tensor:
        """Structural search: the number of top-salience columns whose order-2 binarization,
        beside an order-2 binarization of the rest, gives the least squared error."""
        n_cols = Wb.shape[1]
        chosen = torch.zeros(n_cols, dtype=torch.bool, device=Wb.device)
        if min(self.max_salient_cols, n_cols) <= 1:
            return chosen
        candidates = torch.arange(1, min(self.max_salient_cols, n_cols), device=Wb.device)
        ranked = torch.argsort(salience.sum(0), descending=True)
        errors = leading_split_errors(Wb[:, ranked], candidates)  # salient candidates lead
        chosen[ranked[:int(candidates[errors.argmin()])]] = True
        return chosen

    def _search_break_point(self, Wb: torch.Tensor, salient: torch.Tensor) -> float:
        """Bell-shaped split: the break point p (a quantile of the non-salient |w|) whose
        concentrated/sparse binarization gives the least squared error (the salient
        columns' error does not depend on p, so only the non-salient part is scored)."""
        plain = Wb[:, ~salient]
        if plain.numel() == 0:
            return float("inf")
        magnitude = plain.abs().flatten()
        n = magnitude.numel()
        splits = order_statistics(magnitude, [min(int(q * (n - 1)), n - 1) for q in self.split_quantiles])
        return splits[split_errors(plain, splits).argmin()].item()
