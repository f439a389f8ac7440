"""What every solver returns: a weight in its stored (packed) form."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

# a solver's dataclass field with this metadata key set is left out of its format's settings (the cache key)
# while at its default, so a setting added later keeps the caches written before it
OMIT_AT_DEFAULT = "omit_at_default"

# Output rows dequantized at once when a whole matrix is asked for; bounds the
# temporary memory of `dequantize` and of QuantLinear's forward.
ROW_TILE = 1024


class QuantizedWeight(ABC):
    """A [out, in] weight held only as plain tensors (codes, scales, masks, bitmaps).

    `state_dict()` is exactly what is stored; `nbytes` counts all of it; `config()`
    holds the few integers needed to read it back (shape, bits, ...).
    """

    method: ClassVar[str]
    shape: tuple[int, int]

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stored tensors, by name."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings needed, with `state_dict()`, to rebuild this weight."""

    @classmethod
    @abstractmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "QuantizedWeight":
        """Inverse of (`state_dict()`, `config()`)."""

    @abstractmethod
    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Output rows [start, stop) of the weight, unpacked to `dtype`."""

    def dequantize_index(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `rows` (int64, any order) of the weight; formats whose rows can be unpacked alone
        override this (an embedding lookup reads a few rows of a large table)."""
        return self.dequantize(dtype)[rows]

    @property
    @abstractmethod
    def nominal_bits_per_weight(self) -> float:
        """Bits per weight as the method's paper counts them (see each subclass)."""

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight, shaped like the original W."""
        rows = self.shape[0]
        return torch.cat([self.dequantize_rows(r, min(r + ROW_TILE, rows), dtype)
                          for r in range(0, rows, ROW_TILE)])

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored form: every tensor of `state_dict()`."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @property
    def bits_per_weight(self) -> float:
        """True bits per weight: 8 * nbytes / number of weights."""
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    @property
    def device(self) -> torch.device:
        return next(iter(self.state_dict().values())).device

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """A copy with every stored tensor on `device`."""
        return type(self).from_state_dict({k: v.to(device) for k, v in self.state_dict().items()}, self.config())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={self.shape}, bits_per_weight={self.bits_per_weight:.3f}, "
                f"nominal={self.nominal_bits_per_weight:.3f})")


class PackedModule(nn.Module):
    """A module holding one QuantizedWeight as buffers under its stored names (plus an optional
    `bias`), with `_weight_cls` and `weight_config` set by the subclass."""

    def _apply(self, fn, recurse=True):
        """Moves follow `.to(device)`, but the packed tensors keep their stored dtypes:
        `model.to(torch.bfloat16)` must not round fp16 scales to bf16 (the bias follows)."""
        self.drop_derived()  # built for one device: rebuilt after a move (what it held given back first)
        stored = {n: b for n, b in self._buffers.items() if b is not None and n != "bias"}
        super()._apply(fn, recurse)
        for name, before in stored.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def drop_derived(self) -> None:
        """Free what was built from the buffers (a fast kernel). `.to()` does it itself; whoever
        swaps the buffers otherwise (a streamed layer going back to disk) calls this."""

    @property
    def stored_names(self) -> list[str]:
        """The names of the stored tensors (buffers), whether held now or not."""
        return [name for name in self._buffers if name != "bias"]

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (this module's buffers)."""
        return {name: buf for name, buf in self._buffers.items() if name != "bias" and buf is not None}

    @property
    def quantized_weight(self) -> QuantizedWeight:
        """The packed weight, over this module's stored tensors."""
        return self._weight_cls.from_state_dict(self.stored_tensors(), self.weight_config)
