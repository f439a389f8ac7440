"""The paper's allocation (`--allocate entropy`): which layers go to the low format.

Layers ranked by output entropy (paper Eq. 6), the first k of the order take the low
format (BiLLM) and the rest the high one (GPTQ-4 g128); k is the smallest that fits a
memory budget (Eq. 7), the largest whose metric stays within a threshold (Eq. 8, a
binary search), or given. Pure functions of numbers: sizes, entropies, and an
evaluator callback for the threshold search.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from luq.entropy import entropy_ranking
from luq.errors import LuqError
from luq.plan.sizes import Plan, SizeTable

HIGH, LOW = "high", "low"


def layer_order(order: str | Sequence[int], entropy: Sequence[float], seed: int = 0) -> list[int]:
    """The order in which layers go to the low-bit variant.

    "entropy": ascending entropy, the method (Eq. 6). "reverse-entropy": descending.
    "depth": deepest layer first. "random": a seeded permutation. A list of indices is
    taken as given (layers not in it never go low).
    """
    n = len(entropy)
    if not isinstance(order, str):
        bad = [i for i in order if not 0 <= int(i) < n]
        if bad:
            raise LuqError(f"--order names layer(s) {bad}, but the model has layers 0..{n - 1}")
        return [int(i) for i in order]
    if order == "entropy":
        return entropy_ranking(entropy)
    if order == "reverse-entropy":
        return entropy_ranking(entropy)[::-1]
    if order == "depth":
        return list(range(n - 1, -1, -1))
    if order == "random":
        layers = list(range(n))
        random.Random(seed).shuffle(layers)
        return layers
    raise LuqError(f"unknown order {order!r}")


def assignment(order: Sequence[int], k: int, n_layers: int) -> list[str]:
    """Per layer, the variant it gets when the first k layers of `order` go low."""
    if not 0 <= k <= len(order):
        raise LuqError(f"k = {k} low-bit layers asked for, but the order has {len(order)} layers")
    low = set(order[:k])
    return [LOW if i in low else HIGH for i in range(n_layers)]


def entropy_plan(order: Sequence[int], k: int, layer_linears: Sequence[Sequence[str]], high: str, low: str) -> Plan:
    """The per-linear plan of k low layers: every linear of a low layer in `low`, the rest in `high`.

    layer_linears[i]: the full names of decoder layer i's quantized linears."""
    return {name: (low if variant == LOW else high)
            for names, variant in zip(layer_linears, assignment(order, k, len(layer_linears))) for name in names}


def smallest_fitting_k(sizes: SizeTable, plan_for_k: Callable[[int], Plan], n_order: int, budget_bytes: int) -> int:
    """Eq. 7: the smallest k whose artifact fits in `budget_bytes`; one clear error if none does."""
    totals = [sizes.total_bytes(plan_for_k(k)) for k in range(n_order + 1)]
    for k, total in enumerate(totals):
        if total <= budget_bytes:
            return k
    smallest = min(totals)
    raise LuqError(f"no configuration fits {budget_bytes / 1e9:.4g} GB: the smallest reachable is "
                   f"{smallest / 1e9:.4g} GB ({smallest:,} bytes, k = {totals.index(smallest)} of "
                   f"{n_order} layers at low bit)")


@dataclass
class SearchStep:
    """One evaluated count of low layers (the report's "search" rows)."""

    n_low_layers: int
    value: float
    drop: float
    ok: bool


def threshold_search(evaluate: Callable[[int], float], n: int, max_drop: float, *, higher_is_better: bool,
                     search: str = "binary", log: Callable[[SearchStep], None] | None = None,
                     ) -> tuple[int, list[SearchStep]]:
    """Eq. 8: the largest k in 0..n whose metric stays within `max_drop` of k = 0.

    evaluate(k) returns the metric of the model with k low-bit layers. "binary" assumes
    the drop grows with k (the paper's search, log2(n) evaluations); "greedy" adds layers
    one at a time and stops at the first k that breaks the threshold. The drop is
    reference - value for a higher-is-better metric, value - reference otherwise.
    Every evaluated k is returned (and passed to `log`), in evaluation order.
    """
    steps: list[SearchStep] = []
    seen: dict[int, SearchStep] = {}

    def check(k: int) -> bool:
        if k not in seen:
            value = evaluate(k)
            reference = seen[0].value if 0 in seen else value
            drop = (reference - value) if higher_is_better else (value - reference)
            seen[k] = SearchStep(k, value, drop, drop <= max_drop)
            steps.append(seen[k])
            if log is not None:
                log(seen[k])
        return seen[k].ok

    check(0)
    if search == "greedy":
        k = 0
        while k < n and check(k + 1):
            k += 1
        return k, steps
    if search != "binary":
        raise LuqError(f"unknown search {search!r}")
    lo, hi = 0, n  # invariant: lo passes; answer in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if check(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo, steps
