"""The peers of the frontier as luq solvers, so their results are packed, cached and counted
like luq's own: llmcompressor's GPTQ (see bench/peer.py) and HQQ (data-free, mobiusml/hqq).

`PeerGPTQ(bits).quantize(W, H)` runs llmcompressor's GPTQ and stores its codes in luq's
GPTQ container (the same codes, fp16 scales and packed integer zeros per group of 128:
the bytes compressed-tensors' pack-quantized format needs, less its int32 padding).
`HQQ(bits, group_size).quantize(W)` runs HQQ's half-quadratic optimiser of scale and
zero per group; its zero is a float, so `HQQWeight` stores codes packed at `bits` plus an
fp16 scale and an fp16 zero per group (HQQ's own layout without its optional 8-bit
scale/zero quantization). Each solver declares the packed weight it returns (`weight_type`), so a
format registered over it (bench/frontier.py: `register_format(Format(..., HQQ(...)), replace=True)`)
has its stored weights read back by luq's cache like luq's own.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from luq.quant import QuantizedWeight
from luq.quant.gptq import GPTQWeight, pack_gptq_weight
from luq.quant.packing import pack_bits, unpack_bits


def hqq_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from hqq.core.quantize import Quantizer  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


@dataclass(frozen=True)
class PeerGPTQ:
    """llmcompressor's GPTQ (memoryless min-max grids, static act-order), asymmetric, g128."""

    weight_type: ClassVar[type[QuantizedWeight]] = GPTQWeight   # the packed weight quantize returns

    bits: int = 4
    group_size: int = 128
    act_order: bool = True

    def quantize(self, W: torch.Tensor, H: torch.Tensor) -> GPTQWeight:
        from bench.peer import peer_gptq, peer_qparams

        dequantized = peer_gptq(W, H, bits=self.bits, group_size=self.group_size, act_order=self.act_order)
        scale, zero = peer_qparams(W, bits=self.bits, group_size=self.group_size)  # [out, n_groups]
        scale = scale.half().float()  # stored in fp16, like luq's GPTQ (and the model's dtype in compressed-tensors)
        zero = zero + 2 ** (self.bits - 1)  # compressed-tensors' "int" codes are signed: shift to [0, 2^bits)
        groups = torch.arange(W.shape[1], device=W.device) // self.group_size
        codes = torch.round(dequantized / scale[:, groups] + zero[:, groups]).clamp(0, 2 ** self.bits - 1)
        return pack_gptq_weight(codes, scale, zero, None, self.bits, self.group_size, sym=False)


@dataclass(eq=False, repr=False)
class HQQWeight(QuantizedWeight):
    """W_hat[r, j] = scale[r, g] * (code[r, j] - zero[r, g]), groups of `group_size` columns, float zero."""

    method = "hqq"

    qweight: torch.Tensor   # uint8 [out, packed(in)]
    scales: torch.Tensor    # fp16 [out, n_groups]
    zeros: torch.Tensor     # fp16 [out, n_groups]
    shape: tuple[int, int]
    bits: int
    group_size: int

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "shape": list(self.shape), "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "HQQWeight":
        return cls(qweight=tensors["qweight"], scales=tensors["scales"], zeros=tensors["zeros"],
                   shape=tuple(config["shape"]), bits=int(config["bits"]), group_size=int(config["group_size"]))

    @property
    def nominal_bits_per_weight(self) -> float:
        return float(self.bits)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = unpack_bits(self.qweight[start:stop], self.bits, self.shape[1]).float()
        groups = torch.arange(self.shape[1], device=codes.device) // self.group_size
        scale = self.scales[start:stop].float()[:, groups]
        zero = self.zeros[start:stop].float()[:, groups]
        return (scale * (codes - zero)).to(dtype)


@dataclass(frozen=True)
class HQQ:
    """HQQ (data-free): codes in [0, 2^bits), scale and zero per group optimised by HQQ."""

    weight_type: ClassVar[type[QuantizedWeight]] = HQQWeight   # the packed weight quantize returns

    bits: int = 2
    group_size: int = 64

    def quantize(self, W: torch.Tensor, H: torch.Tensor | None = None) -> HQQWeight:
        from hqq.core.quantize import Quantizer

        rows, cols = W.shape
        if cols % self.group_size:
            raise ValueError(f"HQQ needs group_size to divide the {cols} columns")
        codes, meta = Quantizer.quantize(W.detach().float(), nbits=self.bits, group_size=self.group_size,
                                         optimize=True, round_zero=False, axis=1, bitpack=False,
                                         compute_dtype=torch.float32, device=str(W.device))
        n_groups = cols // self.group_size
        # axis=1: codes [rows * n_groups, group_size], scale and zero [rows * n_groups, 1], row-major
        codes = codes.reshape(rows, cols)
        scales = meta["scale"].reshape(rows, n_groups).half()
        zeros = meta["zero"].reshape(rows, n_groups).half()
        return HQQWeight(qweight=pack_bits(codes, self.bits), scales=scales.contiguous(), zeros=zeros.contiguous(),
                         shape=(rows, cols), bits=self.bits, group_size=self.group_size)
