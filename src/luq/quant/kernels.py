"""Fast forwards for packed weights, chosen per format and device.

A *kernel* is built once from a QuantizedWeight (at the first forward on a device, because
the packed layout of torch's int4 CPU kernel depends on the CPU) and then computes
y = x W_hat^T without ever materialising W_hat as a whole:

- `Int4Kernel`: GPTQ with 2, 3 or 4 bits, groups contiguous (or act-order `g_idx` groups,
  served by permuting the activations into group order), group widths that are multiples of
  32: torch's int4 matmul (`_weight_int4pack_mm_for_cpu`, CPU only for now). Codes below 16 fit its 4-bit grid exactly: w = (q - 8)·s + z with z = s·(8 - zero).
  It wants bfloat16 activations (the float32 path is ~25× slower on CPU), so x is cast to
  bfloat16 and the output cast back; the scales are rounded to bfloat16 too.
- `TiledKernel`: every other format (8-bit GPTQ, BiLLM, shapes the int4 kernel refuses):
  unpack a tile of rows with byte lookup tables and multiply, tile by tile.

`kernel_for(qweight, device)` picks one; `QuantLinear` caches it (not in the state dict).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from luq.quant.base import ROW_TILE, QuantizedWeight

INT4_GROUPS = (256, 128, 64, 32)


def _int4_ops(device: torch.device):
    if device.type == "cpu":
        return (getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None),
                getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None))
    # CUDA's int4 op takes another packed input layout (not wired yet): the tiled path serves it
    return None, None


@functools.lru_cache(maxsize=None)
def _bit_table(bits: int, device: str) -> torch.Tensor:
    """[256, 8 // bits] int16: the codes held by each byte value (little-endian, as pack_bits)."""
    per = 8 // bits
    b = torch.arange(256, dtype=torch.int16)[:, None]
    shifts = torch.arange(per, dtype=torch.int16) * bits
    return ((b >> shifts) & ((1 << bits) - 1)).to(device)


def unpack_lut(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """pack_bits' inverse for 1/2/4/8 bits by one table lookup per byte (int16 codes)."""
    if bits == 8:
        return packed[..., :n].to(torch.int16)
    table = _bit_table(bits, str(packed.device))
    return table[packed.long()].reshape(*packed.shape[:-1], -1)[..., :n]


class TiledKernel(nn.Module):
    """Generic fallback: de-quantize `row_tile` output rows at a time and multiply."""

    name = "tiled"

    def __init__(self, qweight: QuantizedWeight, row_tile: int = ROW_TILE):
        super().__init__()
        self.qweight, self.row_tile = qweight, row_tile

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


class Int4Kernel(nn.Module):
    """GPTQ (bits <= 4) through torch's int4 matmul, repacked once for this device."""

    name = "int4"

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, perm: torch.Tensor | None,
                 mm):
        super().__init__()
        self.packed, self.scales_zeros, self.group, self.perm, self._mm = packed, scales_zeros, group, perm, mm

    @classmethod
    def build(cls, q, device: torch.device) -> "Int4Kernel | None":
        convert, mm = _int4_ops(device)
        rows, cols = q.shape
        if convert is None or q.bits > 4 or rows % 16 or cols % 32:
            return None
        perm = None
        if q.g_idx is not None:
            groups = q.g_idx.long()
            perm = torch.argsort(groups, stable=True)
            counts = torch.bincount(groups, minlength=q.n_groups)
            if bool((counts[:-1] != q.group_size).any()):
                return None
        width = min(q.group_size, cols)
        group = next((g for g in INT4_GROUPS if width % g == 0 and cols % g == 0), None)
        if group is None:
            return None
        codes = unpack_lut(q.qweight.to(device), q.bits, cols).to(torch.int32) if q.bits != 3 else None
        if codes is None:
            from luq.quant.packing import unpack_bits
            codes = unpack_bits(q.qweight.to(device), q.bits, cols).to(torch.int32)
        col_group = torch.arange(cols, device=device) // width if q.g_idx is None else q.g_idx.to(device).long()
        if perm is not None:
            perm = perm.to(device)
            codes, col_group = codes[:, perm], col_group[perm]
        # kernel group k covers columns [k*group, (k+1)*group); its luq group is that of its first column
        kgroup = col_group[::group]
        scale = q.scales.to(device).float()[:, kgroup]                     # [rows, cols/group]
        if q.qzeros is None:
            zero = torch.full_like(scale, float(2 ** q.bits // 2))
        else:
            zero = unpack_lut(q.qzeros.to(device), q.bits, q.n_groups).float()[:, kgroup] \
                if q.bits != 3 else _unpack3(q.qzeros.to(device), q.n_groups).float()[:, kgroup]
        # Re-centre each group's codes so the kernel's offset 8 lands on its zero point where the
        # codes allow it: the bfloat16 zero term s·(8 - zero) then vanishes instead of carrying a
        # rounding error that every activation of the group multiplies.
        g = codes.reshape(rows, cols // group, group)
        lo, hi = -g.amin(-1).float(), 15.0 - g.amax(-1).float()
        offset = torch.minimum(torch.maximum(8.0 - zero, lo), hi)          # codes + offset stay in [0, 15]
        codes = (g + offset.to(torch.int32)[..., None]).reshape(rows, cols)
        shift = scale * (8.0 - zero - offset)
        scales_zeros = torch.stack([scale, shift], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed = convert(codes.contiguous(), 1)
        return cls(packed, scales_zeros, group, perm, mm)

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.perm is not None:
            x2 = x2[:, self.perm]
        y = self._mm(x2.to(torch.bfloat16).contiguous(), self.packed, self.group, self.scales_zeros)
        return y.to(dtype).reshape(*lead, -1)


def _unpack3(packed: torch.Tensor, n: int) -> torch.Tensor:
    from luq.quant.packing import unpack_bits
    return unpack_bits(packed, 3, n)


def kernel_for(qweight: QuantizedWeight, device: torch.device) -> nn.Module:
    """The fastest kernel that computes this weight exactly (up to bfloat16 rounding) on `device`.
    LUQ_KERNEL=tiled forces the generic path (for comparisons)."""
    if os.environ.get("LUQ_KERNEL", "auto") != "tiled" and qweight.method == "gptq":
        k = Int4Kernel.build(qweight, device)
        if k is not None:
            return k
    return TiledKernel(qweight)
