"""How a budget becomes a plan (`--allocate measured`, the default).

Inputs: the size table (exact stored bytes of every linear in every format of the menu,
plus the unquantized rest) and the cost table (per linear and format, the measured
sensitivity: predicted KL from full precision when that linear alone takes that format,
luq.sensitivity). Costs are taken as additive over linears.

Budget: a multiple-choice knapsack. Each linear picks exactly one format; minimise the
summed cost subject to base bytes + summed bytes <= budget. Solved exactly by dynamic
programming on a byte grid (`knapsack`): each choice's bytes above its linear's smallest
format are rounded *up* to grid cells, so every plan it returns truly fits; the grid is
fine enough (50,000 cells over the range of choices) that the rounding costs little, and
`lagrangian_bound` gives a lower bound on the true optimum to show the gap.

Threshold (`--max-drop`): the smallest budget whose knapsack plan, assembled and
evaluated for real, stays within the drop (`smallest_budget_within`, a bisection over
budgets: each step is a real evaluation, never a prediction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from luq.errors import LuqError
from luq.plan.sizes import Plan, SizeTable

Costs = Mapping[str, Mapping[str, float]]  # linear name -> format -> predicted cost
GRID_CELLS = 50_000


@dataclass(frozen=True)
class KnapsackResult:
    plan: Plan
    cost: float            # summed predicted cost of the plan
    total_bytes: int       # exact artifact bytes of the plan
    cell_bytes: int        # the byte grid's resolution
    cost_lower_bound: float | None = None   # Lagrangian lower bound on the least cost (a solver that has one)


def _choices(sizes: SizeTable, costs: Costs, formats: Sequence[str]) -> list[tuple[str, list[str], np.ndarray, np.ndarray]]:
    """Per unit, its options: the decoder's linears choose among `formats`, the units outside
    the decoder among their own menu (every format they were sized in, KEEP included)."""
    out = []
    for name, s in sizes.linears.items():
        fmts = [f for f in (formats if s.layer is not None else s.bytes) if f in s.bytes and f in costs.get(name, {})]
        if not fmts:
            raise LuqError(f"linear {name} has no size and cost for any of {', '.join(formats)}")
        out.append((name, fmts, np.array([s.bytes[f] for f in fmts], dtype=np.int64),
                    np.array([max(0.0, float(costs[name][f])) for f in fmts], dtype=np.float64)))
    return out


def knapsack(sizes: SizeTable, costs: Costs, formats: Sequence[str], budget_bytes: int,
             grid_cells: int = GRID_CELLS) -> KnapsackResult:
    """The plan of least summed cost whose artifact fits `budget_bytes` (exact DP on a byte grid)."""
    items = _choices(sizes, costs, formats)
    floor = sizes.base_bytes + sum(int(w.min()) for _, _, w, _ in items)
    if floor > budget_bytes:
        raise LuqError(f"no plan fits {budget_bytes / 1e9:.4g} GB: the smallest reachable with formats "
                       f"{','.join(formats)} is {floor / 1e9:.4g} GB ({floor:,} bytes)")
    spare = budget_bytes - floor  # bytes to spend above every linear's smallest format
    span = sum(int(w.max() - w.min()) for _, _, w, _ in items)
    cell = max(1, math.ceil(min(spare, span) / grid_cells))
    capacity = min(spare, span) // cell
    best = np.zeros(capacity + 1)  # best[c]: least cost of the items so far within c cells
    picks = np.empty((len(items), capacity + 1), dtype=np.int16)
    for i, (_, _, w, c) in enumerate(items):
        extra = np.ceil((w - w.min()) / cell).astype(np.int64)
        new = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int16)
        for j in range(len(w)):
            if extra[j] > capacity:
                continue
            shifted = np.full(capacity + 1, np.inf)
            shifted[extra[j]:] = best[:capacity + 1 - extra[j]] + c[j]
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = j
        best, picks[i] = new, pick
    plan: Plan = {}
    cap = capacity
    for i in range(len(items) - 1, -1, -1):
        name, fmts, w, _ = items[i]
        j = int(picks[i, cap])
        plan[name] = fmts[j]
        cap -= int(np.ceil((w[j] - w.min()) / cell))
    plan = {name: plan[name] for name in sizes.linears}
    return KnapsackResult(plan, plan_cost(plan, costs), sizes.total_bytes(plan), cell)


def plan_cost(plan: Plan, costs: Costs) -> float:
    return float(sum(costs[name][fmt] for name, fmt in plan.items()))


def lagrangian_bound(sizes: SizeTable, costs: Costs, formats: Sequence[str], budget_bytes: int,
                     iterations: int = 100) -> tuple[float, KnapsackResult | None]:
    """Lagrangian relaxation: each linear alone minimises cost + lam * bytes; lam is bisected
    to the budget. Returns (a lower bound on the optimum's cost, the best feasible plan the
    relaxation found, or None)."""
    items = _choices(sizes, costs, formats)
    capacity = budget_bytes - sizes.base_bytes

    def solve(lam: float) -> tuple[float, int, Plan]:
        value, used, plan = 0.0, 0, {}
        for name, fmts, w, c in items:
            j = int(np.argmin(c + lam * w))
            value += c[j] + lam * w[j]
            used += int(w[j])
            plan[name] = fmts[j]
        return value - lam * capacity, used, plan

    lo, hi = 0.0, 1.0
    while solve(hi)[1] > capacity and hi < 1e30:
        hi *= 4
    bound, feasible = -math.inf, None
    for lam in np.concatenate([[0.0], np.geomspace(1e-30, hi, 8)]):
        bound = max(bound, solve(lam)[0])
    for _ in range(iterations):
        mid = (lo + hi) / 2
        value, used, plan = solve(mid)
        bound = max(bound, value)
        if used <= capacity:
            hi = mid
            cost = plan_cost(plan, costs)
            if feasible is None or cost < feasible.cost:
                feasible = KnapsackResult(plan, cost, sizes.total_bytes(plan), 1)
        else:
            lo = mid
    return bound, feasible


@dataclass
class BudgetStep:
    budget_bytes: int
    total_bytes: int
    value: float
    drop: float
    ok: bool


def smallest_budget_within(plan_for_budget: Callable[[int], KnapsackResult], evaluate: Callable[[Plan], float],
                           reference: float, max_drop: float, lo_bytes: int, hi_bytes: int, *,
                           higher_is_better: bool, steps: int = 8,
                           log: Callable[[BudgetStep], None] | None = None) -> tuple[KnapsackResult, list[BudgetStep]]:
    """The smallest budget in [lo_bytes, hi_bytes] whose plan's real metric drops at most `max_drop`
    from `reference` (the full-precision model's), by bisection over budgets (the drop is taken to
    shrink as the budget grows). One clear error if even `hi_bytes` breaks the threshold."""
    history: list[BudgetStep] = []

    def check(budget: int) -> tuple[bool, KnapsackResult]:
        result = plan_for_budget(budget)
        value = evaluate(result.plan)
        drop = (reference - value) if higher_is_better else (value - reference)
        step = BudgetStep(budget, result.total_bytes, value, drop, drop <= max_drop)
        history.append(step)
        if log is not None:
            log(step)
        return step.ok, result

    ok, best = check(hi_bytes)
    if not ok:
        raise LuqError(f"even the largest plan ({best.total_bytes / 1e9:.4g} GB) drops the metric by "
                       f"{history[-1].drop:.4g}, more than --max-drop {max_drop}")
    lo, hi = lo_bytes, hi_bytes
    for _ in range(steps):
        if hi - lo <= max(1, hi // 1000):
            break
        mid = (lo + hi) // 2
        ok, result = check(mid)
        if ok:
            hi, best = mid, result
        else:
            lo = mid
    return best, history
