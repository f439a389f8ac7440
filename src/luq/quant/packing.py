"""Bit packing: small integer codes <-> bytes, each routine beside its inverse.

Written by hand because the layouts are luq's own stored format (the exact bytes
`nbytes` counts); torch has no sub-byte dtypes for 2/3-bit codes.

Layout: codes run along the last dimension; every 8 consecutive codes of `bits`
bits fill `bits` bytes, little-endian (code k occupies bits [k*bits, (k+1)*bits) of
that group). The last dimension is zero-padded to a multiple of 8 codes (8-bit codes are plain bytes). All
routines are plain tensor ops, so they run on any device.
"""

from __future__ import annotations

import numpy as np
import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_length(n: int, bits: int) -> int:
    """Bytes that `n` codes of `bits` bits take along the last dimension."""
    return n if bits == 8 else (n + 7) // 8 * bits


_PACK_CHUNK = 1 << 20  # codes packed at once (8 MB of int64 temporaries each)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dim into uint8."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"pack_bits: bits must be one of {SUPPORTED_BITS}, got {bits}")
    *lead, n = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if codes.numel() > _PACK_CHUNK and n < _PACK_CHUNK:  # rows at a time: the int64 temporaries stay small
        rows = codes.reshape(-1, n)
        step = _PACK_CHUNK // n
        return torch.cat([pack_bits(rows[r:r + step], bits) for r in range(0, rows.shape[0], step)]).reshape(*lead, -1)
    pad = (-n) % 8
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, -1, 8)
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # one (8*bits)-bit word per 8 codes
    byte_shifts = torch.arange(bits, device=c.device, dtype=torch.int64) * 8
    packed = (word >> byte_shifts) & 0xFF
    return packed.reshape(*lead, -1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 bytes -> int64 codes, last dim cut to `n`."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unpack_bits: bits must be one of {SUPPORTED_BITS}, got {bits}")
    *lead, nbytes = packed.shape
    if bits == 8:
        return packed[..., :n].to(torch.int64)
    if 8 % bits == 0:  # whole codes per byte: shifts on the bytes themselves
        parts = [(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(8 // bits)]
        return torch.stack(parts, -1).reshape(*lead, -1)[..., :n].to(torch.int64)
    p = packed.to(torch.int64).reshape(*lead, nbytes // bits, bits)
    byte_shifts = torch.arange(bits, device=p.device, dtype=torch.int64) * 8
    word = (p << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(8, device=p.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*lead, -1)[..., :n]


def pack_bool(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor along its last dim, 8 per byte (on the CPU by numpy's packbits,
    the same bytes as `pack_bits(mask, 1)` without its int64 temporaries)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.to(torch.bool).numpy(), axis=-1, bitorder="little"))
    return pack_bits(mask.to(torch.int64), 1)


def unpack_bool(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_bool`."""
    return unpack_bits(packed, 1, n).bool()
