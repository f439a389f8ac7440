"""llama.cpp's block formats (ggml types) as luq formats: GPTQ inside ggml's grids, stored as ggml stores them.

A weight [out, in] is stored as ggml stores a tensor whose rows (ne0) are its `in` columns: each row
cut into blocks of 32 (legacy types) or 256 (K-quants, ternary) columns, each block a fixed number of
bytes. `GGMLWeight.blocks` holds exactly those bytes (uint8 [out, in / block * type_size]), so the
GGUF exporter writes them as they are (`to_gguf_bytes`) and `nbytes` is the GGUF tensor's size.

The block layouts (as in ggml-common.h; fp16 fields little endian; "nibbles" of a block of n codes:
byte l holds code l in its low 4 bits and code l + n/2 in its high 4 bits, per run of n codes):

    q8_0    d (fp16) | qs[32] int8                   x = d * q
    q4_0    d | qs[16] nibbles                       x = d * (q - 8),        q in 0..15
    q4_1    d | m (fp16) | qs[16] nibbles            x = d * q + m
    q5_0    d | qh[4] (bit j: code j's 5th bit) | qs[16] nibbles (low 4 bits)    x = d * (q - 16)
    q5_1    d | m | qh[4] | qs[16]                   x = d * q + m,          q in 0..31
    iq4_nl  d | qs[16] nibbles                       x = d * K[q],           K: 16 fixed levels -127..113
  K-quants: 256 columns (a super-block) in sub-blocks of 16 or 32, each with a small integer scale
  (and min) relative to the super-block's fp16 d (and dmin):
    q2_k    scales[16] (sc | mn << 4) | qs[64] (2 bits) | d | dmin     x = d*sc * q - dmin*mn,  16 per sub-block
    q3_k    hmask[32] (3rd bit) | qs[64] (low 2 bits) | scales[12] (6 bits, sc + 32) | d
                                                     x = d*sc * (q - 4),    sc in -32..31, 16 per sub-block
    q4_k    d | dmin | scales[12] (6-bit sc, mn) | qs[128] nibbles (per 64)   x = d*sc * q - dmin*mn, 32 per sub
    q5_k    d | dmin | scales[12] | qh[32] (5th bit) | qs[128]           the same, q in 0..31
    q6_k    ql[128] (low 4 bits, nibbles per 64) | qh[64] (high 2 bits) | scales[16] int8 | d
                                                     x = d*sc * (q - 32),   16 per sub-block
  Ternary (256 columns, one fp16 d):
    tq2_0   qs[64] (2 bits) | d                      x = d * (q - 1),        q in 0..2
    tq1_0   qs[48] (5 trits a byte) | qh[4] (4 trits a byte) | d

Bit fields of several codes share a byte as `_pack_fields` states: byte (g, l) of a run holds codes
(g, s, l) for s = 0.. at bit s * bits.

The solver (`GGML`) is GPTQ with ggml's grid fixed lazily, block by block: when the first column of a
(super-)block is reached, its scales (and mins) are fitted on the weights as the error feedback has
updated them so far, with diag(H) as the importance of each column (what llama.cpp's imatrix does):
a search over candidate scales, each refined by weighted least squares on the codes it selects
(`_Scaled.fit`, `_Affine.fit`); a K-quant's sub-block scales are then themselves quantized onto the
super-block's grid, weighted by how much each one moves the error. fp16 fields are rounded to fp16
first, so the codes are chosen against the numbers stored. The codes are then chosen column by column:
each the nearest grid value of the updated weight, its error spread over the later columns by the OBS
update (U = chol(H^-1), lazy batch updates as in luq.quant.gptq). `GGMLRTN` fits the same grids on
the weights as they are and rounds to nearest: the comparison without error feedback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from luq.errors import LuqError
from luq.quant.base import QuantizedWeight
from luq.quant.hessian import check_problem, inverse_hessian_cholesky, prepare_hessian

QK = 32      # columns per block of the legacy types (q4_0 ... q8_0, iq4_nl)
QK_K = 256   # columns per super-block of the K-quants and the ternary types
_TINY = 1e-30


# ---------------------------------------------------------------------------------------------- bytes

_FP16_MAX = 65504.0


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """The float32 value of the fp16 number that stores `x` (clamped to fp16's range)."""
    return x.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).float()


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[N, 1] numbers -> uint8 [N, 2], fp16 little endian."""
    return x.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).reshape(-1, 1).contiguous().view(torch.uint8)


def _read_fp16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte `at` of each block [N, size] -> float32 [N, 1]."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _pack_fields(u: torch.Tensor, bits: int, groups: int, shifts: int, width: int) -> torch.Tensor:
    """Codes u [N, groups * shifts * width], each < 2**bits -> uint8 [N, groups * width]: byte (g, l) holds
    code (g, s, l) (index g*shifts*width + s*width + l) at bits [s*bits, (s+1)*bits), s < shifts."""
    n = u.shape[0]
    u = u.to(torch.int32).reshape(n, groups, shifts, width)
    at = (torch.arange(shifts, dtype=torch.int32, device=u.device) * bits).view(1, 1, shifts, 1)
    return (u << at).sum(2, dtype=torch.int32).to(torch.uint8).reshape(n, groups * width)


def _unpack_fields(b: torch.Tensor, bits: int, groups: int, shifts: int, width: int) -> torch.Tensor:
    """Inverse of `_pack_fields`: uint8 [N, groups * width] -> int32 codes [N, groups * shifts * width]."""
    n = b.shape[0]
    b = b.to(torch.int32).reshape(n, groups, 1, width)
    at = (torch.arange(shifts, dtype=torch.int32, device=b.device) * bits).view(1, 1, shifts, 1)
    return ((b >> at) & ((1 << bits) - 1)).reshape(n, groups * shifts * width)


def _nibbles(u: torch.Tensor, run: int) -> torch.Tensor:
    """4-bit codes [N, n] -> n/2 bytes: per run of `run` codes, byte l holds codes l and l + run/2."""
    return _pack_fields(u, 4, u.shape[1] // run, 2, run // 2)


def _read_nibbles(b: torch.Tensor, run: int) -> torch.Tensor:
    return _unpack_fields(b, 4, 2 * b.shape[1] // run, 2, run // 2)


def _pack_scales12(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """q4_k/q5_k: eight 6-bit scales and eight 6-bit mins [N, 8] -> 12 bytes: bytes 0-3 and 4-7 hold scales
    and mins 0-3 in their low 6 bits and the top 2 bits of scales / mins 4-7 above; bytes 8-11 the low
    4 bits of scale (low nibble) and min (high nibble) 4-7."""
    sc, mn = sc.to(torch.int32), mn.to(torch.int32)
    lo_sc = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    lo_mn = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return torch.cat([lo_sc, lo_mn, hi], 1).to(torch.uint8)


def _read_scales12(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int32)
    sc = torch.cat([b[:, 0:4] & 63, (b[:, 8:12] & 15) | ((b[:, 0:4] >> 6) << 4)], 1)
    mn = torch.cat([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], 1)
    return sc, mn


def _pack_trits(t: torch.Tensor, per_byte: int) -> torch.Tensor:
    """tq1_0: trits t [N, per_byte, n] (0..2) -> n bytes; byte l = ceil(256 * v / 243) with
    v = sum_j t[j, l] * 3**(4 - j), so that trit j reads back as ((byte * 3**j) mod 256) * 3 >> 8."""
    pw = torch.tensor([81, 27, 9, 3, 1][:per_byte], dtype=torch.int32, device=t.device).view(1, per_byte, 1)
    v = (t.to(torch.int32) * pw).sum(1)
    return ((v * 256 + 242) // 243).to(torch.uint8)


def _read_trits(b: torch.Tensor, per_byte: int) -> torch.Tensor:
    """Inverse of `_pack_trits`: uint8 [N, n] -> trits int32 [N, per_byte * n] (index j * n + l)."""
    pw = torch.tensor([1, 3, 9, 27, 81][:per_byte], dtype=torch.int32, device=b.device).view(1, per_byte, 1)
    x = (b.to(torch.int32).unsqueeze(1) * pw) & 0xFF
    return ((x * 3) >> 8).reshape(b.shape[0], -1)


# ----------------------------------------------------------------------------------------------- grids

def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] for int64 idx of any shape (a gather on the broadcast table: many times faster on the
    CPU than indexing)."""
    flat = idx.reshape(-1, idx.shape[-1] if idx.dim() else 1)
    return table.view(1, -1).expand(flat.shape[0], -1).gather(1, flat).reshape(idx.shape)


_STEPS = 21  # candidate scales per edge of a grid, spread over +-1 level step around the extreme


class _Scaled:
    """value = s * levels[u]: a signed grid (uniform lo..hi, or a table) times one scale."""

    def __init__(self, levels: tuple[int, ...], spread: tuple[float, float] = (-1.0, 1.0)):
        self.levels = tuple(levels)
        self.lo, self.hi = self.levels[0], self.levels[-1]
        self.uniform = self.levels == tuple(range(self.lo, self.hi + 1))
        self.spread = spread
        if not self.uniform:
            mids = [(a + b) / 2 for a, b in zip(self.levels, self.levels[1:])]
            assert all(2 * m == int(2 * m) for m in mids), "table midpoints must be multiples of 1/2"
            centres = torch.arange(2 * self.lo - 2, 2 * self.hi + 2, dtype=torch.float64) / 2 + 0.25
            self._cell_code = torch.bucketize(centres, torch.tensor(mids, dtype=torch.float64))
            self._table = torch.tensor(self.levels, dtype=torch.float32)

    def nearest(self, x: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None = None):
        """(code u, value) of the grid value nearest x; s broadcasts against x (m is unused)."""
        r = torch.where(s == 0, torch.zeros_like(x), x / s)
        if self.uniform:
            q = r.round().clamp(self.lo, self.hi)
            return (q - self.lo).to(torch.int32), s * q
        # a table's midpoints are multiples of 1/2 (asserted): the half-unit cell of x/s names the code
        cell = ((2 * r).floor().clamp(2 * self.lo - 2, 2 * self.hi + 1) - (2 * self.lo - 2)).long()
        u = _lookup(self._cell_code.to(x.device), cell)
        return u.to(torch.int32), s * _lookup(self._table.to(x.device), u)

    def level(self, u: torch.Tensor) -> torch.Tensor:
        if self.uniform:
            return (u + self.lo).float()
        return _lookup(self._table.to(u.device), u.long())

    def fit(self, x: torch.Tensor, w: torch.Tensor, fp16: bool) -> torch.Tensor:
        """Scale s [N, 1] of each row of x [N, B] that minimises sum w (x - s * level)^2 among candidates:
        the row's extreme placed on either edge of the grid, moved by up to `spread` level steps, each
        scale refined by least squares on the codes it selects (then rounded to fp16 if stored so)."""
        ext = x.gather(1, x.abs().argmax(1, keepdim=True))
        best_err = torch.full_like(ext, float("inf"))
        best = torch.zeros_like(ext)
        edges = [(e, step) for e, step in ((self.lo, self.levels[1] - self.levels[0]),
                                            (self.hi, self.levels[-1] - self.levels[-2])) if e != 0]
        for edge, step in edges:
            sign = 1.0 if edge > 0 else -1.0
            for t in torch.linspace(*self.spread, _STEPS).tolist():
                div = edge + sign * t * step
                if abs(div) < 0.5:
                    continue
                u, _ = self.nearest(x, ext / div)
                lv = self.level(u)
                s = (w * x * lv).sum(1, keepdim=True) / (w * lv * lv).sum(1, keepdim=True).clamp_min(_TINY)
                if fp16:
                    s = _fp16(s)
                _, v = self.nearest(x, s)
                err = (w * (x - v) ** 2).sum(1, keepdim=True)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, s, best)
        return best


class _Affine:
    """value = s * u + m, u in 0..nmax (s >= 0); `nonpositive_min`: m <= 0 (the K-quants store -m)."""

    def __init__(self, nmax: int, nonpositive_min: bool):
        self.nmax, self.nonpositive_min = nmax, nonpositive_min

    def nearest(self, x: torch.Tensor, s: torch.Tensor, m: torch.Tensor):
        r = torch.where(s == 0, torch.zeros_like(x), (x - m) / s)
        u = r.round().clamp(0, self.nmax)
        return u.to(torch.int32), s * u + m

    def fit(self, x: torch.Tensor, w: torch.Tensor, fp16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, m) [N, 1] per row of x [N, B] minimising sum w (x - s u - m)^2 among candidates: codes from
        the row's range with the top level moved by up to one step, then (s, m) by weighted least squares
        on those codes (m held at 0 where it would come out above 0 and mins must not)."""
        xmin = x.min(1, keepdim=True).values
        if self.nonpositive_min:
            xmin = xmin.clamp(max=0)
        xmax = x.max(1, keepdim=True).values
        span = xmax - xmin
        sw, swx = w.sum(1, keepdim=True), (w * x).sum(1, keepdim=True)
        best_err = torch.full_like(xmin, float("inf"))
        best_s, best_m = torch.zeros_like(xmin), torch.zeros_like(xmin)
        for t in torch.linspace(-1.0, 1.0, _STEPS).tolist():
            iscale = torch.where(span > 0, (self.nmax + t) / span.clamp_min(_TINY), torch.zeros_like(span))
            u = ((x - xmin) * iscale).round().clamp(0, self.nmax)
            wu = w * u
            swu, swuu, swux = wu.sum(1, keepdim=True), (wu * u).sum(1, keepdim=True), (wu * x).sum(1, keepdim=True)
            det = sw * swuu - swu * swu
            ok = det > 1e-9 * sw * swuu
            det = torch.where(ok, det, torch.ones_like(det))
            s = torch.where(ok, (sw * swux - swu * swx) / det, span / self.nmax)
            m = torch.where(ok, (swuu * swx - swu * swux) / det, xmin)
            if self.nonpositive_min:
                above = m > 0
                s = torch.where(above, swux / swuu.clamp_min(_TINY), s)
                m = torch.where(above, torch.zeros_like(m), m)
            s = s.clamp_min(0)
            if fp16:
                s, m = _fp16(s), _fp16(m)
            _, v = self.nearest(x, s, m)
            err = (w * (x - v) ** 2).sum(1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
        return best_s, best_m


# ----------------------------------------------------------------------------------------- block types

IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


class _BlockType:
    """One ggml type: `fit` a block's grid, `pack` codes and fields into its bytes, `decode` them.

    fit(x [N, block], w [N, block]) -> (scale [N, block], offset [N, block] or None, fields {name: [N, k]}):
    the grid of every element (value = grid.nearest(x, scale, offset)) and what the bytes store of it.
    """

    name: str
    block: int
    type_size: int
    grid: _Scaled | _Affine
    fp16_offsets: tuple[int, ...]   # byte offset in a block of each fp16 field: d, then m or dmin where stored

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block

    def fit(self, x: torch.Tensor, w: torch.Tensor):
        raise NotImplementedError

    def pack(self, u: torch.Tensor, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _OneScale(_BlockType):
    """Legacy and ternary types: one fp16 d per block (and an fp16 m for q4_1 / q5_1)."""

    def __init__(self, name: str, block: int, type_size: int, grid: _Scaled | _Affine, fp16_offsets=(0,)):
        self.name, self.block, self.type_size, self.grid = name, block, type_size, grid
        self.fp16_offsets = fp16_offsets

    def fit(self, x, w):
        n = x.shape[0]
        if isinstance(self.grid, _Affine):
            d, m = self.grid.fit(x, w, fp16=True)
            return d.expand(n, self.block), m.expand(n, self.block), {"d": d, "m": m}
        d = self.grid.fit(x, w, fp16=True)
        return d.expand(n, self.block), None, {"d": d}

    def pack(self, u, fields):
        d = _fp16_bytes(fields["d"])
        if self.name == "q8_0":
            return torch.cat([d, (u ^ 0x80).to(torch.uint8)], 1)   # code u is level u - 128: its int8 byte
        if self.name in ("q4_0", "iq4_nl"):
            return torch.cat([d, _nibbles(u, QK)], 1)
        if self.name == "q4_1":
            return torch.cat([d, _fp16_bytes(fields["m"]), _nibbles(u, QK)], 1)
        if self.name in ("q5_0", "q5_1"):
            qh = _pack_fields(u >> 4, 1, 4, 8, 1)   # bit j of the little-endian uint32: code j's 5th bit
            m = [_fp16_bytes(fields["m"])] if self.name == "q5_1" else []
            return torch.cat([d, *m, qh, _nibbles(u & 15, QK)], 1)
        if self.name == "tq2_0":
            return torch.cat([_pack_fields(u, 2, 2, 4, 32), d], 1)
        if self.name == "tq1_0":   # codes 0-159 five a byte (32 bytes), 160-239 (16 bytes), 240-255 four a byte
            n = u.shape[0]
            return torch.cat([_pack_trits(u[:, :160].reshape(n, 5, 32), 5),
                              _pack_trits(u[:, 160:240].reshape(n, 5, 16), 5),
                              _pack_trits(u[:, 240:].reshape(n, 4, 4), 4), d], 1)
        raise AssertionError(self.name)

    def decode(self, blocks):
        name = self.name
        if name == "q8_0":
            return _read_fp16(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()
        if name in ("q4_0", "iq4_nl"):
            u = _read_nibbles(blocks[:, 2:], QK)
            return _read_fp16(blocks, 0) * self.grid.level(u)
        if name == "q4_1":
            return _read_fp16(blocks, 0) * _read_nibbles(blocks[:, 4:], QK).float() + _read_fp16(blocks, 2)
        if name in ("q5_0", "q5_1"):
            at = 4 if name == "q5_1" else 2
            u = _read_nibbles(blocks[:, at + 4:], QK) | (_unpack_fields(blocks[:, at:at + 4], 1, 4, 8, 1) << 4)
            if name == "q5_0":
                return _read_fp16(blocks, 0) * (u - 16).float()
            return _read_fp16(blocks, 0) * u.float() + _read_fp16(blocks, 2)
        if name == "tq2_0":
            return _read_fp16(blocks, 64) * (_unpack_fields(blocks[:, :64], 2, 2, 4, 32) - 1).float()
        if name == "tq1_0":
            t = torch.cat([_read_trits(blocks[:, :32], 5), _read_trits(blocks[:, 32:48], 5),
                           _read_trits(blocks[:, 48:52], 4)], 1)
            return _read_fp16(blocks, 52) * (t - 1).float()
        raise AssertionError(name)


class _KQuant(_BlockType):
    """K-quants: a super-block of 256 in sub-blocks of `sub`, each with an integer scale on the fp16 grid of
    d (sub_scale levels), and for affine types an integer min on the grid of dmin: x = d*sc * q - dmin*mn."""

    block = QK_K

    def __init__(self, name: str, type_size: int, sub: int, grid: _Scaled | _Affine, sub_scale: _Scaled,
                 fp16_offsets: tuple[int, ...]):
        self.name, self.type_size, self.sub, self.grid, self.sub_scale = name, type_size, sub, grid, sub_scale
        self.n_sub = QK_K // sub
        self.fp16_offsets = fp16_offsets

    def fit(self, x, w):
        n, k = x.shape[0], self.n_sub
        xs, ws = x.reshape(n * k, self.sub), w.reshape(n * k, self.sub)
        affine = isinstance(self.grid, _Affine)
        if affine:   # each sub-block's own (scale, min), then both quantized onto the super-block's grids
            s, m = self.grid.fit(xs, ws, fp16=False)
            u, _ = self.grid.nearest(xs, s, m)
            lv = u.float()
        else:
            s = self.grid.fit(xs, ws, fp16=False)
            u, _ = self.grid.nearest(xs, s)
            lv = self.grid.level(u)
        # an error of e in a sub-block's scale costs e^2 * sum w q^2; in its min, e^2 * sum w
        s = s.view(n, k)
        d = self.sub_scale.fit(s, (ws * lv * lv).sum(1).view(n, k), fp16=True)
        sc = self.sub_scale.level(self.sub_scale.nearest(s, d)[0])
        scale = (d * sc).repeat_interleave(self.sub, 1)
        fields = {"d": d, "sc": sc}
        if not affine:
            return scale, None, fields
        neg_m = -m.view(n, k)
        dmin = self.sub_scale.fit(neg_m, ws.sum(1).view(n, k), fp16=True)
        mn = self.sub_scale.level(self.sub_scale.nearest(neg_m, dmin)[0])
        offset = -(dmin * mn).repeat_interleave(self.sub, 1)
        return scale, offset, {**fields, "dmin": dmin, "mn": mn}

    def pack(self, u, f):
        name, sc = self.name, f["sc"].round().to(torch.int32)
        if name == "q2_k":
            scales = (sc | (f["mn"].round().to(torch.int32) << 4)).to(torch.uint8)
            return torch.cat([scales, _pack_fields(u, 2, 2, 4, 32), _fp16_bytes(f["d"]), _fp16_bytes(f["dmin"])], 1)
        if name == "q3_k":
            s6 = sc + 32
            scales = torch.cat([_pack_fields(s6 & 15, 4, 1, 2, 8), _pack_fields(s6 >> 4, 2, 1, 4, 4)], 1)
            return torch.cat([_pack_fields(u >> 2, 1, 1, 8, 32), _pack_fields(u & 3, 2, 2, 4, 32), scales,
                              _fp16_bytes(f["d"])], 1)
        if name in ("q4_k", "q5_k"):
            head = [_fp16_bytes(f["d"]), _fp16_bytes(f["dmin"]), _pack_scales12(sc, f["mn"].round().to(torch.int32))]
            if name == "q4_k":
                return torch.cat([*head, _nibbles(u, 64)], 1)
            return torch.cat([*head, _pack_fields(u >> 4, 1, 1, 8, 32), _nibbles(u & 15, 64)], 1)
        if name == "q6_k":
            return torch.cat([_nibbles(u & 15, 128), _pack_fields(u >> 4, 2, 2, 4, 32), (sc & 0xFF).to(torch.uint8),
                              _fp16_bytes(f["d"])], 1)
        raise AssertionError(name)

    def decode(self, blocks):
        name, n, k = self.name, blocks.shape[0], self.n_sub
        if name == "q2_k":
            sc, mn = (blocks[:, :16] & 15).float(), (blocks[:, :16] >> 4).float()
            q = _unpack_fields(blocks[:, 16:80], 2, 2, 4, 32).float()
            d, dmin = _read_fp16(blocks, 80), _read_fp16(blocks, 82)
        elif name == "q3_k":
            s6 = torch.cat([_unpack_fields(blocks[:, 96:104], 4, 1, 2, 8),
                            _unpack_fields(blocks[:, 104:108], 2, 1, 4, 4)], 1)
            s6 = (s6[:, :16] & 15) | (s6[:, 16:] << 4)
            u = _unpack_fields(blocks[:, 32:96], 2, 2, 4, 32) | (_unpack_fields(blocks[:, :32], 1, 1, 8, 32) << 2)
            dl = _read_fp16(blocks, 108) * (s6 - 32).float()
            return (dl.unsqueeze(2) * (u - 4).float().view(n, k, self.sub)).reshape(n, QK_K)
        elif name in ("q4_k", "q5_k"):
            d, dmin = _read_fp16(blocks, 0), _read_fp16(blocks, 2)
            sc, mn = _read_scales12(blocks[:, 4:16])
            sc, mn = sc.float(), mn.float()
            if name == "q4_k":
                q = _read_nibbles(blocks[:, 16:], 64).float()
            else:
                q = (_read_nibbles(blocks[:, 48:], 64) | (_unpack_fields(blocks[:, 16:48], 1, 1, 8, 32) << 4)).float()
        elif name == "q6_k":
            u = _read_nibbles(blocks[:, :128], 128) | (_unpack_fields(blocks[:, 128:192], 2, 2, 4, 32) << 4)
            dl = _read_fp16(blocks, 208) * blocks[:, 192:208].contiguous().view(torch.int8).float()
            return (dl.unsqueeze(2) * (u - 32).float().view(n, k, self.sub)).reshape(n, QK_K)
        else:
            raise AssertionError(name)
        dl, ml = (d * sc).unsqueeze(2), (dmin * mn).unsqueeze(2)
        return (dl * q.view(n, k, self.sub) - ml).reshape(n, QK_K)


_TYPES: dict[str, _BlockType] = {t.name: t for t in (
    _OneScale("q8_0", QK, 34, _Scaled(tuple(range(-128, 128)))),
    _OneScale("q5_0", QK, 22, _Scaled(tuple(range(-16, 16)))),
    _OneScale("q5_1", QK, 24, _Affine(31, nonpositive_min=False), fp16_offsets=(0, 2)),
    _OneScale("q4_0", QK, 18, _Scaled(tuple(range(-8, 8)))),
    _OneScale("q4_1", QK, 20, _Affine(15, nonpositive_min=False), fp16_offsets=(0, 2)),
    _OneScale("iq4_nl", QK, 18, _Scaled(IQ4_NL_LEVELS)),
    _KQuant("q6_k", 210, 16, _Scaled(tuple(range(-32, 32))), _Scaled(tuple(range(-128, 128))), (208,)),
    _KQuant("q5_k", 176, 32, _Affine(31, nonpositive_min=True), _Scaled(tuple(range(64))), (0, 2)),
    _KQuant("q4_k", 144, 32, _Affine(15, nonpositive_min=True), _Scaled(tuple(range(64))), (0, 2)),
    _KQuant("q3_k", 110, 16, _Scaled(tuple(range(-4, 4))), _Scaled(tuple(range(-32, 32))), (108,)),
    _KQuant("q2_k", 84, 16, _Affine(3, nonpositive_min=True), _Scaled(tuple(range(16))), (80, 82)),
    # ternary: the scale placed so that anything from a quarter of the extreme up rounds to +-1 is tried
    _OneScale("tq2_0", QK_K, 66, _Scaled((-1, 0, 1), spread=(-0.5, 3.0)), fp16_offsets=(64,)),
    _OneScale("tq1_0", QK_K, 54, _Scaled((-1, 0, 1), spread=(-0.5, 3.0)), fp16_offsets=(52,)),
)}
GGML_TYPES = tuple(_TYPES)
GGML_BITS = {name: t.bits_per_weight for name, t in _TYPES.items()}   # true bits per weight of each type


def block_type(name: str) -> _BlockType:
    try:
        return _TYPES[name]
    except KeyError:
        raise LuqError(f"unknown ggml type {name!r}; known: {', '.join(GGML_TYPES)}") from None


# --------------------------------------------------------------------------------------- stored weight

@dataclass(eq=False, repr=False)
class GGMLWeight(QuantizedWeight):
    """A weight held as ggml's blocks: `blocks` uint8 [out, in / block * type_size], row r the bytes of
    ggml's row r (its ne0 = `in` columns) exactly as a GGUF file stores them."""

    method = "ggml"

    blocks: torch.Tensor
    shape: tuple[int, int]
    type: str

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"blocks": self.blocks}

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "shape": list(self.shape), "type": self.type}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "GGMLWeight":
        return cls(blocks=tensors["blocks"], shape=tuple(config["shape"]), type=str(config["type"]))

    @property
    def nominal_bits_per_weight(self) -> float:
        """ggml's own figure, which is also the true one: every field of a block counted."""
        return block_type(self.type).bits_per_weight

    def _decode(self, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = block_type(self.type)
        rows = blocks.shape[0]
        return t.decode(blocks.reshape(-1, t.type_size)).reshape(rows, self.shape[1]).to(dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._decode(self.blocks[start:stop], dtype)

    def dequantize_index(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._decode(self.blocks[rows], dtype)


def ggml_nbytes(shape: tuple[int, int], type: str) -> int:
    """Bytes of a [out, in] weight as ggml `type` (in a multiple of its block)."""
    t = block_type(type)
    return shape[0] * (shape[1] // t.block) * t.type_size


def to_gguf_bytes(weight: GGMLWeight):
    """(gguf.GGMLQuantizationType, numpy uint8 [out, bytes per row]): the tensor as a GGUF writer takes it."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[weight.type.upper()], weight.blocks.detach().cpu().contiguous().numpy()


def fp16_fields(weight: GGMLWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight as its blocks' fp16 fields times integers: (fields float32 [out, in / block, F], bases int16
    [F, out, in]) with dequantize = sum over f of field f (over its block's columns) * basis f, to float32
    rounding. Every block type decodes linearly in its fp16 fields (d, and m or dmin), so basis f is the
    decode with field f set to 1 and the others to 0: codes times integer sub-block scales, or -mins."""
    t = block_type(weight.type)
    rows, cols = weight.shape
    blocks = weight.blocks.reshape(-1, t.type_size)
    fields = torch.cat([_read_fp16(blocks, at) for at in t.fp16_offsets], 1).reshape(rows, cols // t.block, -1)
    one, zero = _fp16_bytes(torch.ones(1, 1)), _fp16_bytes(torch.zeros(1, 1))
    bases = []
    for f in t.fp16_offsets:
        unit = blocks.clone()
        for at in t.fp16_offsets:
            unit[:, at:at + 2] = (one if at == f else zero).to(unit.device)
        basis = t.decode(unit)
        assert torch.equal(basis, basis.round()) and basis.abs().max() < 2 ** 15, t.name
        bases.append(basis.to(torch.int16).reshape(rows, cols))
    return fields, torch.stack(bases)


def with_fp16_fields(weight: GGMLWeight, fields: torch.Tensor) -> GGMLWeight:
    """The weight with its blocks' fp16 fields replaced by `fields` [out, in / block, F] (rounded to fp16), every
    other byte as it was: the inverse of `fp16_fields`."""
    t = block_type(weight.type)
    blocks = weight.blocks.reshape(-1, t.type_size).clone()
    flat = fields.detach().reshape(blocks.shape[0], len(t.fp16_offsets)).float()
    for i, at in enumerate(t.fp16_offsets):
        blocks[:, at:at + 2] = _fp16_bytes(flat[:, i:i + 1]).to(blocks.device)
    return GGMLWeight(blocks=blocks.reshape(weight.blocks.shape), shape=weight.shape, type=weight.type)


# --------------------------------------------------------------------------------------------- solvers

def _check_type(solver: str, type: str) -> None:
    if type not in _TYPES:
        raise LuqError(f"{solver}: unknown ggml type {type!r}; known: {', '.join(GGML_TYPES)}")


def _check_shape(solver: str, type: str, W: torch.Tensor) -> None:
    block = _TYPES[type].block
    if W.shape[1] % block:
        raise LuqError(f"{solver}({type}): a weight with {W.shape[1]} input columns cannot be stored as {type}, "
                       f"whose blocks hold {block} columns (in_features must be a multiple of {block})")


def _pack(t: _BlockType, codes: torch.Tensor, fields: dict[str, torch.Tensor], shape: tuple[int, int]) -> GGMLWeight:
    """codes [out, in] and fields {name: [out * blocks, k]} -> the weight's bytes."""
    rows, cols = shape
    blocks = t.pack(codes.reshape(-1, t.block), fields)
    assert blocks.shape[1] == t.type_size, (t.name, blocks.shape)
    return GGMLWeight(blocks=blocks.reshape(rows, cols // t.block * t.type_size).contiguous(), shape=shape, type=t.name)


_FIT_CHUNK = 1 << 20   # weights fitted at once: bounds the fit's temporaries (~40 MB) on large layers


def _fit_all(t: _BlockType, W: torch.Tensor, imp: torch.Tensor):
    """Every block's grid on W [out, in] as it is, importance imp [in] -> (scale, offset, fields) as `fit`
    gives them for the [out * blocks, block] view of W, fitted a slice of rows at a time."""
    rows, cols = W.shape
    x = W.reshape(-1, t.block)
    w = imp.view(1, -1, t.block).expand(rows, -1, -1).reshape(-1, t.block)
    step = max(1, _FIT_CHUNK // t.block)
    parts = [t.fit(x[r:r + step], w[r:r + step]) for r in range(0, x.shape[0], step)]
    scale = torch.cat([p[0] for p in parts])
    offset = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    return scale, offset, {k: torch.cat([p[2][k] for p in parts]) for k in parts[0][2]}


def _importance(H: torch.Tensor, damp: float) -> torch.Tensor:
    """diag(H) + damp * mean(diag(H)): each column's weight in the scale fits (never 0)."""
    diag = torch.diagonal(H).float()
    return diag + damp * diag.mean().clamp_min(_TINY)


class _TypeSizes:
    """What the two solvers of a ggml type (its `type` field) know before quantizing."""

    type: str

    def supports(self, shape: tuple[int, int]) -> bool:
        return shape[1] % _TYPES[self.type].block == 0

    def nbytes_bounds(self, shape: tuple[int, int]) -> tuple[int, int] | None:
        """Exact (the size depends only on the shape); None where the type cannot store `shape`."""
        if not self.supports(shape):
            return None
        n = ggml_nbytes(shape, self.type)
        return n, n


@dataclass(frozen=True)
class GGMLRTN(_TypeSizes):
    """A ggml type's grid fitted per block (diag(H)-weighted when H is given) and round-to-nearest."""

    weight_type: ClassVar[type[QuantizedWeight]] = GGMLWeight   # the packed weight quantize returns

    type: str = "q4_k"
    damp: float = 0.01

    def __post_init__(self) -> None:
        _check_type("GGMLRTN", self.type)

    def quantize(self, W: torch.Tensor, H: torch.Tensor | None = None) -> GGMLWeight:
        """W [out, in]; H [in, in] or None (every column weighs alike in the scale fits)."""
        if H is None:   # the checks of check_problem on W alone (no [in, in] identity built for them)
            if not isinstance(W, torch.Tensor) or W.dim() != 2:
                check_problem(W, W, "GGMLRTN")
            if W.numel() == 0 or not W.is_floating_point() or not torch.isfinite(W).all():
                check_problem(W, torch.zeros(W.shape[1], W.shape[1], device=W.device), "GGMLRTN")
            imp = torch.ones(W.shape[1], device=W.device)
        else:
            check_problem(W, H, "GGMLRTN")
            imp = _importance(H.to(W.device), self.damp)
        _check_shape("GGMLRTN", self.type, W)
        t = _TYPES[self.type]
        W = W.detach().float()
        scale, offset, fields = _fit_all(t, W, imp)
        codes, _ = t.grid.nearest(W.reshape(-1, t.block), scale, offset)
        return _pack(t, codes, fields, tuple(W.shape))


GGML_ORDERS = ("blocks", "columns", "natural")


def _solving_order(imp: torch.Tensor, block: int, order: str) -> torch.Tensor:
    """The columns in the order GPTQ solves them: "blocks": whole blocks by decreasing sum of diag(H), in
    each its columns by decreasing diag(H) (a block's columns stay together, so its grid can be fitted when
    it is reached); "columns": all columns by decreasing diag(H); "natural": 0, 1, ..."""
    cols = imp.shape[0]
    if order == "natural":
        return torch.arange(cols, device=imp.device)
    if order == "columns":
        return torch.argsort(imp, descending=True)
    by_block = imp.view(cols // block, block)
    blocks = torch.argsort(by_block.sum(1), descending=True)
    inner = torch.argsort(by_block, dim=1, descending=True)
    return (blocks[:, None] * block + inner[blocks]).reshape(-1)


@dataclass(frozen=True)
class GGML(_TypeSizes):
    """GPTQ inside a ggml type's grid (see the module's docstring); `quantize(W, H)` is the solver.

    type: a name of `GGML_TYPES`. damp: relative damping of H (also the floor of the importance weights).
    block_size: columns per lazy batch update, rounded to whole ggml blocks. order: the solving order
    (`_solving_order`). With "blocks" and "natural" each block's grid is fitted when its first column is
    reached, on the weights as updated so far; with "columns" (act-order across blocks) every grid is
    fitted first on the original weights, as GPTQ's static groups. On SmolLM2's linears (off-grid, the
    problems of tests/test_ggml_formats.py; one-off runs, no result file) "blocks" gave a lower output error
    than "natural" on every type and layer tried; "columns" was below "blocks" for q6_k, q5_k, q4_k on the
    down_projs, on either side of it for q3_k, q2_k and tq*, and above it for the legacy types.
    """

    weight_type: ClassVar[type[QuantizedWeight]] = GGMLWeight   # the packed weight quantize returns

    type: str = "q4_k"
    damp: float = 0.01
    block_size: int = 128
    order: str = "blocks"

    def __post_init__(self) -> None:
        _check_type("GGML", self.type)
        if not (0 <= self.damp < 1):
            raise LuqError(f"GGML: damp must be in [0, 1), got {self.damp}")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise LuqError(f"GGML: block_size must be a positive integer, got {self.block_size}")
        if self.order not in GGML_ORDERS:
            raise LuqError(f"GGML: order must be one of {', '.join(GGML_ORDERS)}; got {self.order!r}")

    def quantize(self, W: torch.Tensor, H: torch.Tensor) -> GGMLWeight:
        check_problem(W, H, "GGML")
        _check_shape("GGML", self.type, W)
        t = _TYPES[self.type]
        W, H, _ = prepare_hessian(W, H, self.damp)
        imp = torch.diagonal(H).clone()   # damped: never 0
        rows, cols = W.shape
        B, nb = t.block, W.shape[1] // t.block
        static = self.order == "columns"
        if static:   # every block's grid on the original weights; per column, in solving order below
            scale, offset, static_fields = _fit_all(t, W, imp)
        perm = _solving_order(imp, B, self.order)
        if static:
            scale_t = scale.reshape(rows, cols)[:, perm].T.contiguous()
            offset_t = None if offset is None else offset.reshape(rows, cols)[:, perm].T.contiguous()
        W, H = W[:, perm], H[perm]
        H = H[:, perm]   # in two steps: at most two [cols, cols] copies alive
        U = inverse_hessian_cholesky(H, self.damp, "GGML")
        del H
        batch = B * max(1, self.block_size // B)   # whole blocks per batch: a block's columns are all in one
        codes = torch.empty(rows, cols, dtype=torch.int32, device=W.device)
        fields: dict[int, dict[str, torch.Tensor]] = {}   # block -> its fields [out, k]
        for b0 in range(0, cols, batch):
            b1 = min(b0 + batch, cols)
            W1t = W[:, b0:b1].T.contiguous()   # the batch transposed: each column contiguous
            U1 = U[b0:b1, b0:b1]
            Err1t = torch.empty_like(W1t)
            codes1t = torch.empty(b1 - b0, rows, dtype=torch.int32, device=W.device)
            for i in range(b1 - b0):
                j = b0 + i
                if static:
                    s, m = scale_t[j], None if offset_t is None else offset_t[j]
                else:
                    if j % B == 0:   # a new block: its grid, fitted on the weights as updated so far
                        block = int(perm[j]) // B
                        place = perm[j:j + B] - block * B   # its columns in solving order, as places in it
                        back = torch.argsort(place)
                        scale, offset, fields[block] = t.fit(W1t[i:i + B][back].T.contiguous(),
                                                             imp[block * B:(block + 1) * B].expand(rows, B))
                        block_scale = scale[:, place].T.contiguous()
                        block_offset = None if offset is None else offset[:, place].T.contiguous()
                    s, m = block_scale[j % B], None if block_offset is None else block_offset[j % B]
                w = W1t[i]
                codes1t[i], q = t.grid.nearest(w, s, m)
                err = (w - q) / U1[i, i]
                W1t[i:].addr_(U1[i, i:], err, alpha=-1)   # OBS update of the batch's later columns
                Err1t[i] = err
            codes[:, b0:b1] = codes1t.T
            W[:, b1:].addmm_(Err1t.T, U[b0:b1, b1:], alpha=-1)   # lazy batch update of the rest
        del W, U
        codes = codes[:, torch.argsort(perm)]
        if not static:   # fields per block [out, k] -> [out * blocks, k], row-major as the blocks are stored
            static_fields = {k: torch.stack([fields[b][k] for b in range(nb)], 1).reshape(rows * nb, -1)
                             for k in fields[0]}
        return _pack(t, codes, static_fields, (rows, cols))
