"""QuantLinear: a drop-in nn.Linear that computes straight from the packed weight."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from luq.quant.base import ROW_TILE, PackedModule, QuantizedWeight
from luq.quant.kernels import kernel_for


class QuantLinear(PackedModule):
    """y = x W_hat^T + b, computed by the fastest kernel of the weight's format
    (luq.quant.kernels: torch's int4 matmul for GPTQ and, off CPU, binarized weights; on CPU
    binarized weights from their bit planes (BinaryKernel); else one tile of output rows
    unpacked at a time).

    The packed tensors are buffers (they follow `.to(device)` and appear in the state dict
    under their stored names); no full-precision copy of the weight is kept, only one tile
    of `row_tile` rows exists while a forward runs. `dtype` is the compute dtype (default:
    the input's).

    The kernel is built at the first forward. Where it can give stored tensors back exactly
    (`kernel.stored_tensors()`, checked equal to the buffers once), the module frees its own
    copies of them (`hand_over`, default True): it then holds the kernel's layout of the
    weight instead of the stored one beside it, about the stored bytes rather than twice
    them. What it handed over is rebuilt where the stored form is asked for: the state dict,
    `quantized_weight`, a move, and when the kernel is dropped (`drop_derived`).
    """

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, row_tile: int = ROW_TILE, hand_over: bool = True):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.weight_config: dict[str, Any] = qweight.config()
        self.compute_dtype = dtype
        self.row_tile = row_tile
        self.hand_over = hand_over
        self._weight_cls = type(qweight)
        for name, tensor in qweight.state_dict().items():
            self.register_buffer(name, tensor)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype or bias.dtype))
        self._stored_nbytes = qweight.nbytes

    @classmethod
    def from_linear(cls, linear: nn.Linear, qweight: QuantizedWeight, dtype: torch.dtype | None = None) -> "QuantLinear":
        if qweight.shape != (linear.out_features, linear.in_features):
            raise ValueError(f"quantized weight {qweight.shape} does not fit {linear}")
        return cls(qweight.to(linear.weight.device), linear.bias, dtype=dtype)

    @property
    def handed_over(self) -> tuple[str, ...]:
        """The stored tensors the kernel holds in place of this module's buffers (freed)."""
        return self.__dict__.get("_handed_over", ())

    def _given_back(self, names) -> dict[str, torch.Tensor]:
        """The handed-over tensors `names`, rebuilt by the kernel, on this module's device."""
        if not names:
            return {}
        rebuilt = self.__dict__["_kernel"].stored_tensors()
        return {n: rebuilt[n].to(self.qweight_device) for n in names}

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        own = super().stored_tensors()
        own.update(self._given_back([n for n in self.handed_over if n not in own]))
        return {n: own[n] for n in self.stored_names if n in own}

    def drop_derived(self) -> None:
        """Drop the kernel, first putting back the buffers it held (unless swapped meanwhile: a
        streamed layer going back to disk)."""
        for name, t in self._given_back([n for n in self.handed_over if self._buffers.get(n) is None]).items():
            self._buffers[name] = t
        self.__dict__.pop("_handed_over", None)
        self.__dict__.pop("_kernel", None)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The stored form, handed-over tensors rebuilt (in the buffers' order)."""
        stored = self.stored_tensors()
        for name, buf in self._buffers.items():
            t = stored.get(name, buf)
            if t is not None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, *args, **kwargs):
        self.drop_derived()   # the buffers back in place, to be written into
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight (bias excluded)."""
        return self._stored_nbytes

    @property
    def resident_nbytes(self) -> int:
        """Bytes this module holds in memory: the stored tensors it still holds, the bias, and
        the kernel's (counted once built: after the first forward or `kernel`)."""
        own = sum(b.numel() * b.element_size() for b in self._buffers.values() if b is not None)
        kernel = self.__dict__.get("_kernel")
        return own + (kernel.nbytes if kernel is not None else 0)

    @property
    def kernel(self) -> nn.Module:
        """The fast forward for this format on this device (luq.quant.kernels), built at the
        first call and cached outside the state dict; moving the module drops it."""
        k = self.__dict__.get("_kernel")
        if k is None:
            k = kernel_for(self.quantized_weight, self.qweight_device)
            self.__dict__["_kernel"] = k
            if self.hand_over:
                self._hand_over(k)
        return k

    def _hand_over(self, kernel: nn.Module) -> None:
        """Free the buffers the kernel gives back exactly (compared once, here)."""
        given = getattr(kernel, "stored_tensors", dict)()
        handed = []
        for name, t in given.items():
            buf = self._buffers.get(name)
            if (buf is not None and buf.dtype == t.dtype and buf.shape == t.shape
                    and torch.equal(buf, t.to(buf.device))):
                handed.append(name)
        if len(handed) == len(self.stored_names):   # one stays: it tells the device
            handed.pop()
        for name in handed:
            self._buffers[name] = None
        self.__dict__["_handed_over"] = tuple(handed)

    @property
    def qweight_device(self) -> torch.device:
        return next(b for n, b in self._buffers.items() if b is not None and n != "bias").device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        out = self.kernel.forward(x, dtype)  # not kernel(...): nn.Module's call machinery costs time every token
        if self.bias is not None:
            out += self.bias.to(dtype)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"method={self.weight_config['method']}, "
                f"bits_per_weight={8 * self.nbytes / (self.in_features * self.out_features):.3f}")


def replace_linears(parent: nn.Module, weights: dict[str, QuantizedWeight],
                    dtype: torch.dtype | None = None, dense: bool = False,
                    device: torch.device | str | None = None) -> dict[str, nn.Module]:
    """Swap each named nn.Linear under `parent` for a QuantLinear of its packed weight
    (dense=True: for an nn.Linear holding the dequantized weight, for fast evaluation).

    `weights` maps module names relative to `parent` to packed weights; the modules
    replaced are returned by name, so that `restore_linears` can put them back. device: where
    the new modules go (default: where each old one is; a streamed one's is the meta device).
    """
    replaced = {}
    for name, qweight in weights.items():
        owner_name, _, attr = name.rpartition(".")
        owner = parent.get_submodule(owner_name) if owner_name else parent
        old = getattr(owner, attr)
        bias = old.bias if isinstance(old, nn.Linear) else getattr(old, "bias", None)
        where = device if device is not None else _module_device(old)
        if dense and torch.device(where).type == "meta":  # a streamed layer: its values come with the layer
            rows, cols = qweight.shape
            new = nn.Linear(cols, rows, bias=bias is not None, device="meta", dtype=dtype or old.weight.dtype)
        elif dense:
            weight = qweight.to(where).dequantize(dtype or old.weight.dtype)
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=where, dtype=weight.dtype)
            new.weight.data = weight
            if bias is not None:
                new.bias.data = bias.detach().to(weight.dtype)
        else:
            new = QuantLinear(qweight.to(where), bias, dtype=dtype)
        setattr(owner, attr, new)
        replaced[name] = old
    return replaced


def restore_linears(parent: nn.Module, replaced: dict[str, nn.Module]) -> None:
    """Inverse of `replace_linears`."""
    for name, old in replaced.items():
        owner_name, _, attr = name.rpartition(".")
        setattr(parent.get_submodule(owner_name) if owner_name else parent, attr, old)


def _module_device(module: nn.Module) -> torch.device:
    return next(iter(list(module.parameters()) + list(module.buffers()))).device


def kernels_by_format(model: nn.Module, plan: dict[str, str]) -> dict[str, dict[str, int]]:
    """Format name -> {kernel name: linears} for the QuantLinears of `plan` (linear name -> format) in
    `model`, each kernel built here for its module's device (as its first forward would: any fallback
    warns now, not in the middle of a generation)."""
    out: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and name in plan:
            kinds = out.setdefault(plan[name], {})
            kinds[module.kernel.name] = kinds.get(module.kernel.name, 0) + 1
    return out


def kernel_line(kernels: dict[str, dict[str, int]]) -> str:
    """One line saying which kernel serves each format ("gptq4-g128: int4 x210; billm: binary x70")."""
    return "kernels: " + "; ".join(f"{fmt}: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
                                   for fmt, kinds in sorted(kernels.items()))

