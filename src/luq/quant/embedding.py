"""A token embedding stored packed, and the output head tied to it.

`QuantEmbedding` replaces nn.Embedding: a lookup unpacks only the rows it reads
(`QuantizedWeight.dequantize_index`), so a 49k-row table costs its packed bytes in
memory, not a float copy. `TiedQuantHead` replaces an output head tied to that
embedding: it computes from the embedding's packed tensors (no second copy; the
artifact stores them once, under the embedding's name).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from luq.quant.base import PackedModule, QuantizedWeight
from luq.quant.linear import QuantLinear


class QuantEmbedding(PackedModule):
    """y = scale * W_hat[ids], with only the rows of `ids` unpacked (`dtype`: the output dtype).

    scale: the multiplier some families fold into their embedding module (Gemma's sqrt(hidden));
    taken from the module replaced, never stored."""

    def __init__(self, qweight: QuantizedWeight, padding_idx: int | None = None, scale: float = 1.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx, self.scale, self.compute_dtype = padding_idx, float(scale), dtype
        self.weight_config: dict[str, Any] = qweight.config()
        self._weight_cls = type(qweight)
        for name, tensor in qweight.state_dict().items():
            self.register_buffer(name, tensor)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, qweight: QuantizedWeight) -> "QuantEmbedding":
        if qweight.shape != tuple(embedding.weight.shape):
            raise ValueError(f"quantized weight {qweight.shape} does not fit {embedding}")
        device = qweight.device if embedding.weight.is_meta else embedding.weight.device  # meta: a streamed one's
        return cls(qweight.to(device), embedding.padding_idx, embed_scale(embedding), embedding.weight.dtype)

    @property
    def nbytes(self) -> int:
        return self.quantized_weight.nbytes

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows, where = torch.unique(ids.reshape(-1), return_inverse=True)
        table = self.quantized_weight.dequantize_index(rows, self.compute_dtype)
        out = table[where].reshape(*ids.shape, self.embedding_dim)
        return out * self.scale if self.scale != 1.0 else out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, method={self.weight_config['method']}, "
                f"bits_per_weight={self.quantized_weight.bits_per_weight:.3f}")


def embed_scale(embedding: nn.Module) -> float:
    """The multiplier a family folds into its embedding module (Gemma's sqrt(hidden)), else 1."""
    scale = getattr(embedding, "embed_scale", 1.0)
    return float(scale.item() if isinstance(scale, torch.Tensor) else scale)


class TiedQuantHead(nn.Module):
    """The output head of a model whose head is tied to its (packed) input embedding:
    y = x W_hat^T (+ bias), computed by a QuantLinear over the embedding's own buffers.

    The embedding is referenced, not registered, so the state dict holds its tensors once;
    the QuantLinear view is rebuilt when the embedding's buffers move (`.to(device)`)."""

    def __init__(self, embedding: QuantEmbedding, bias: torch.Tensor | None = None):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)
        self.out_features, self.in_features = embedding.num_embeddings, embedding.embedding_dim
        self.register_buffer("bias", bias)
        self._view: QuantLinear | None = None
        self._view_of: tuple | None = None

    def _linear(self) -> QuantLinear:
        key = tuple(b.data_ptr() for b in self.embedding.buffers())
        if self._view is None or self._view_of != key:
            # hand_over=False: its buffers are the embedding's, which the lookups read; freeing them frees nothing
            object.__setattr__(self, "_view", QuantLinear(self.embedding.quantized_weight, None,
                                                          dtype=self.embedding.compute_dtype, hand_over=False))
            self._view_of = key
        return self._view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._linear()(x)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the packed embedding"
