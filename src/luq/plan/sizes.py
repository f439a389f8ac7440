"""The plan (linear -> format) and what it weighs, to the byte.

A plan maps the full module name of every quantized linear (e.g.
'model.layers.3.self_attn.q_proj') to a format name of the menu. It is the one
currency between planning, the final pass, assembly, the report and the artifact.
Units outside the decoder layers (the token embedding, an untied head, the vision
tower's and projector's linears) join it when the budget covers them; for those,
`KEEP` is one more choice: stored unquantized, at the storage dtype, as without luq.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Plan = dict[str, str]
KEEP = "keep"  # a unit outside the decoder stored unquantized (a plan value, not a registry format)


@dataclass(frozen=True)
class LinearSizes:
    """One unit of the plan: its decoder layer (None outside the decoder), its weight count,
    and per format its stored bytes and the paper's nominal bits per weight."""

    layer: int | None
    n_weights: int
    bytes: Mapping[str, int]
    nominal_bits: Mapping[str, float]


@dataclass(frozen=True)
class SizeTable:
    """Exact bytes of an artifact for any plan: the unquantized tensors (embeddings, norms,
    head, vision tower, projector, biases, at the storage dtype) plus each linear's bytes
    in its planned format."""

    base_bytes: int
    linears: Mapping[str, LinearSizes]

    @property
    def names(self) -> list[str]:
        return list(self.linears)

    @property
    def n_weights(self) -> int:
        return sum(s.n_weights for s in self.linears.values())

    def quantized_bytes(self, plan: Plan) -> int:
        return sum(self.linears[name].bytes[fmt] for name, fmt in plan.items())

    def total_bytes(self, plan: Plan) -> int:
        return self.base_bytes + self.quantized_bytes(plan)

    def avg_bits(self, plan: Plan) -> float:
        """True bits per quantized weight, from stored bytes (units kept unquantized left out)."""
        quantized = {n: f for n, f in plan.items() if f != KEEP}
        return 8.0 * self.quantized_bytes(quantized) / sum(self.linears[n].n_weights for n in quantized)

    def nominal_avg_bits(self, plan: Plan) -> float:
        """The paper's per-weight average of nominal bits (over quantized weights)."""
        quantized = {n: f for n, f in plan.items() if f != KEEP}
        return (sum(self.linears[n].nominal_bits[f] * self.linears[n].n_weights for n, f in quantized.items())
                / sum(self.linears[n].n_weights for n in quantized))

    def layer_bytes(self, plan: Plan, layer: int) -> int:
        return sum(self.linears[n].bytes[f] for n, f in plan.items() if self.linears[n].layer == layer)

    def layer_weights(self, layer: int) -> int:
        return sum(s.n_weights for s in self.linears.values() if s.layer == layer)

    def formats(self) -> list[str]:
        """The formats every linear has a size for."""
        sets = [set(s.bytes) for s in self.linears.values()]
        return sorted(set.intersection(*sets)) if sets else []

    def extreme_plan(self, formats: Sequence[str], largest: bool = False) -> Plan:
        """Each linear in its smallest (or largest) format among `formats`."""
        pick = max if largest else min
        return {name: pick([f for f in formats if f in s.bytes] if s.layer is not None else s.bytes,
                           key=lambda f: s.bytes[f])
                for name, s in self.linears.items()}


def uniform_plan(names: Sequence[str], fmt: str) -> Plan:
    return {name: fmt for name in names}


def layer_plan(plan: Plan, prefix: str) -> dict[str, str]:
    """The part of a plan inside one decoder layer, by names relative to the layer."""
    return {name[len(prefix):]: fmt for name, fmt in plan.items() if name.startswith(prefix)}
