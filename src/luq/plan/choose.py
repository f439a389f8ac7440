"""Where a rule becomes a plan: what sizes the menu can reach (known before quantizing), the menu hint,
and the plan under the config's stopping rule from the measured sizes and costs.

Pure of models and files: the caller hands in the size and cost tables, the plans' layer structure,
and, for a threshold rule, `evaluate(plan)` (the real metric of the model with that plan assembled)
and the full-precision `reference` score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from luq.config import LUQConfig
from luq.errors import LuqError
from luq.plan.entropy import entropy_plan, layer_order, smallest_fitting_k, threshold_search
from luq.plan.measured import Costs, knapsack, lagrangian_bound, smallest_budget_within
from luq.plan.sizes import Plan, SizeTable
from luq.plan.speed import Limit, decode_limits, knapsack_within, plan_decode_ns, table_error
from luq.quant.formats import COMPACT_MENU

FRONTIER_POINTS = 12   # plans of the measured frontier drawn in the report, evenly spaced in bytes


@dataclass
class Decision:
    """A plan and how it was found: the rule's search steps, the frontier of plans the report draws, and
    per allocation its own facts (entropy: the order and n_low_layers; measured: the predicted cost, the knapsack's
    grid and its gap to the Lagrangian lower bound)."""

    plan: Plan
    search: list[dict] = field(default_factory=list)
    frontier: list[dict] = field(default_factory=list)
    order: list[int] | None = None
    n_low_layers: int | None = None
    predicted_cost: float | None = None
    knapsack: dict | None = None
    measured_cost: float | None = None


def check_reachable(config: LUQConfig, bounds: tuple[int, int] | None, kept_kinds: Sequence[str]) -> None:
    """A budget below the least bytes any plan of the menu reaches (`bounds`, known before quantizing)
    is refused now, with the smallest reachable size."""
    if bounds is not None and config.budget_gb is not None and bounds[0] > config.budget_gb * 1e9:
        raise LuqError(f"no configuration fits {config.budget_gb:.4g} GB: the smallest reachable with formats "
                       f"{','.join(config.menu())} is {bounds[0] / 1e9:.4g} GB ({bounds[0]:,} bytes)"
                       + (f", with {','.join(kept_kinds)} kept unquantized" if kept_kinds else ""))


def compact_hint(config: LUQConfig, gptq3_bounds: tuple[int, int] | None) -> str | None:
    """One line for a measured budget below the uniform GPTQ-3 g128 decoder's size (`gptq3_bounds`, the
    other units at their smallest) whose menu has none of the compact 1-bit formats: there they lower
    the perplexity many times over (docs/results.md, section 3)."""
    if config.budget_gb is None or config.allocate != "measured" or set(config.menu()) & set(COMPACT_MENU):
        return None
    if gptq3_bounds is None or config.budget_gb * 1e9 >= gptq3_bounds[0]:
        return None
    return (f"hint: {config.budget_gb:.4g} GB is below a GPTQ-3 g128 decoder ({gptq3_bounds[0] / 1e9:.4g} GB); "
            "the compact 1-bit formats do far better there: --formats default,compact")


def choose_plan(config: LUQConfig, sizes: SizeTable, costs: Costs | None, names: list[list[str]],
                units: Sequence[str], entropy: Sequence[float] | None, evaluate: Callable[[Plan], float] | None,
                reference: Callable[[], float] | None, higher_is_better: bool, log: Callable[[str], None]) -> Decision:
    """The plan under the config's stopping rule. names: each decoder layer's linears (full names);
    units: the planned units outside the decoder; entropy: per layer (the paper's order);
    evaluate/reference: the real metric of a plan / of full precision (threshold rules only)."""
    budget = int(config.budget_gb * 1e9) if config.budget_gb is not None else None
    if config.allocate == "entropy":
        return _entropy_decision(config, sizes, names, units, entropy, budget, evaluate, higher_is_better, log)
    menu = list(config.menu())
    smallest = sizes.total_bytes(sizes.extreme_plan(menu))
    largest = sizes.total_bytes(sizes.extreme_plan(menu, largest=True))

    # llama.cpp's decode, held to a reference where the plan is bound for a GGUF file (luq.plan.speed)
    # faster than the reference by a margin: the one asked for, or by default the speed table's error, which is
    # dropped where no plan of the budget reaches it (the reference itself then holds the plan)
    limits = decode_limits(config.measured.speed_of if config.for_gguf() else None, sizes)
    default_margin = config.measured.speed_margin is None
    margin = table_error() if default_margin else config.measured.speed_margin
    held: dict[int, tuple[Limit | None, float]] = {}   # id of a plan's result -> its reference, the margin kept

    def plan_for_budget(b: int):
        limit, kept = limits(b), margin
        if limit is None:
            result = knapsack(sizes, costs, menu, b)
        else:
            try:
                result = knapsack_within(sizes, costs, menu, b, limit.ns / (1 + margin), known=limit.plan)
            except LuqError:
                if not (default_margin and margin):
                    raise
                kept = 0.0
                result = knapsack_within(sizes, costs, menu, b, limit.ns, known=limit.plan)
        held[id(result)] = (limit, kept)
        return result

    frontier = []
    for b in torch.linspace(smallest, largest, FRONTIER_POINTS).tolist():
        try:
            frontier.append({"budget_bytes": int(b), "plan": plan_for_budget(int(b)).plan})
        except LuqError:   # no plan of so few bytes decodes as fast as --speed-of asks
            continue
    steps = []
    if budget is not None:
        result = plan_for_budget(budget)
        bound, _ = lagrangian_bound(sizes, costs, menu, budget)
    else:
        full = reference()
        log(f"  full precision: {config.metric} {full:.4f}")
        result, history = smallest_budget_within(
            plan_for_budget, evaluate, full, config.max_drop, smallest, largest, higher_is_better=higher_is_better,
            log=lambda s: log(f"  budget {s.budget_bytes / 1e9:.4f} GB ({s.total_bytes:,} bytes): {config.metric} "
                              f"{s.value:.4f} (drop {s.drop:+.4f}) {'ok' if s.ok else 'too far'}"))
        steps = [asdict(s) for s in history]
        bound, _ = lagrangian_bound(sizes, costs, menu, result.total_bytes)
    if result.cost_lower_bound is not None:   # held to a decode time too: the two-limit bound is the tighter
        bound = max(bound, result.cost_lower_bound)
    speed = {}
    plan_ns = plan_decode_ns(sizes, result.plan) if config.for_gguf() else None
    if plan_ns is not None:   # llama.cpp's decode, predicted (luq.plan.speed)
        limit, margin = held.get(id(result), (None, 0.0))
        speed = {"predicted_decode_tps": 1e9 / plan_ns, "speed_of": config.measured.speed_of,
                 "speed_held_to": None if limit is None else limit.what,
                 "speed_of_decode_tps": None if limit is None else 1e9 / limit.ns,
                 "speed_margin": None if limit is None else margin,
                 "held_to_decode_tps": None if limit is None else 1e9 * (1 + margin) / limit.ns}
        log(f"  predicted llama.cpp decode: {1e9 / plan_ns:.0f} tokens/s"
            + ("" if limit is None else f" (held to {limit.what}: {1e9 / limit.ns:.0f}, "
                                        f"{margin:.1%} faster: {1e9 * (1 + margin) / limit.ns:.0f})"))
    return Decision(result.plan, steps, frontier, predicted_cost=result.cost,
                    knapsack={"cell_bytes": result.cell_bytes, "lagrangian_lower_bound": bound,
                              "gap": result.cost - bound, **speed})


def _entropy_decision(config: LUQConfig, sizes: SizeTable, names, units, entropy, budget, evaluate,
                      higher_is_better, log) -> Decision:
    """The paper's rule: layers in the config's order, the first k at `low` (k: Eq. 7 budget, Eq. 8
    threshold, or --n-low-layers)."""
    order = layer_order(config.entropy.order, entropy, seed=config.calibration.seed)

    def plan_for_k(k: int) -> Plan:
        return {**entropy_plan(order, k, names, config.entropy.high, config.entropy.low), **{u: config.entropy.high for u in units}}

    steps = []
    if budget is not None:
        k = smallest_fitting_k(sizes, plan_for_k, len(order), budget)
    elif config.entropy.n_low_layers is not None:
        k = config.entropy.n_low_layers
    else:
        k, search = threshold_search(
            lambda kk: evaluate(plan_for_k(kk)), len(order), config.max_drop, higher_is_better=higher_is_better,
            search=config.entropy.search,
            log=lambda s: log(f"  {s.n_low_layers:3d} low layers: {config.metric} {s.value:.4f} (drop {s.drop:+.4f}) "
                              f"{'ok' if s.ok else 'too far'}"))
        steps = [asdict(s) for s in search]
    frontier = [{"n_low_layers": kk, "plan": plan_for_k(kk)} for kk in range(len(order) + 1)]
    return Decision(plan_for_k(k), steps, frontier, order=order, n_low_layers=k)
