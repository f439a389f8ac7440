"""The plainest 1-bit baseline: per-row sign(w) times mean|w| (XNOR-Net style, data-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from luq.quant.base import QuantizedWeight
from luq.quant.hessian import check_problem
from luq.quant.packing import pack_bool, packed_length, unpack_bool


@dataclass(eq=False, repr=False)
class SignWeight(QuantizedWeight):
    """W_hat[r, j] = scale[r] * sign(W[r, j])."""

    method = "sign"

    signs: torch.Tensor   # uint8 [out, packed(in)]
    scale: torch.Tensor   # fp16 [out]
    shape: tuple[int, int]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"signs": self.signs, "scale": self.scale}

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "shape": list(self.shape)}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "SignWeight":
        return cls(signs=tensors["signs"], scale=tensors["scale"], shape=tuple(config["shape"]))

    @property
    def nominal_bits_per_weight(self) -> float:
        """One sign bit per weight."""
        return 1.0

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        positive = unpack_bool(self.signs[start:stop], self.shape[1])
        scale = self.scale[start:stop].float()[:, None]
        return torch.where(positive, scale, -scale).to(dtype)


@dataclass(frozen=True)
class Sign:
    """sign(w) * mean|w| per output row; ignores H (accepted for a uniform interface)."""

    weight_type: ClassVar[type[QuantizedWeight]] = SignWeight   # the packed weight quantize returns

    def nbytes_bounds(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Exact: a sign bit per weight (rows padded to whole bytes) and an fp16 scale per row."""
        n = shape[0] * (packed_length(shape[1], 1) + 2)
        return n, n

    def quantize(self, W: torch.Tensor, H: torch.Tensor | None = None) -> SignWeight:
        check_problem(W, torch.eye(W.shape[1], device=W.device) if H is None else H, "Sign")
        W = W.detach().float()
        return SignWeight(signs=pack_bool(W >= 0), scale=W.abs().mean(1).half(), shape=tuple(W.shape))
