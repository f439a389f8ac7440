"""How fast llama.cpp decodes a plan, and the knapsack held to a decode speed (`--speed-of REF`).

By default (`--speed-of auto`) a plan of llama.cpp's block types is held to the predicted decode speed of
the file a user would otherwise run: the largest of llama.cpp's presets that fits the same budget, typed
as `llama-quantize` would type it (`luq.plan.presets`); below the smallest preset nothing holds it. The
plan must be predicted faster than that by a margin (`--speed-margin`; by default the table's own median
error on files it was not fitted on), so that the table's error does not leave it slower in llama.cpp.

A plan of llama.cpp block types runs in llama.cpp at a speed its types decide: on an x86 CPU llama.cpp's
dot products for Q4_1, Q5_0, Q5_1 and Q5_K take far longer per weight than those of Q4_0, IQ4_NL or the
other K-quants, so the plan of least predicted KL at a size can decode slower than llama.cpp's own file
of that size. The model here: a token's decode time is the sum over the plan's weights of the seconds per
weight of each one's type (`ns_per_weight`), a table `python -m bench.ggml_speed` fits from llama-bench
runs of one-type files and checks on files it was not fitted on (the shipped table,
`luq/data/ggml_decode_speed.json`, is written by that bench with `--package` and names its source and
CPU). The weights of a tied embedding count once, as the output head's product (its row lookup costs
next to nothing).

`knapsack_within`: the knapsack of `luq.plan.measured` under the byte budget and a decode time, solved by
pricing time: for a price p the plan of least (cost + p x time) is an exact knapsack; the least p whose
plan is fast enough is found by bisection (the plan's time falls as p rises), then the step the price
leaves between the last slow and fast plans is narrowed greedily (`_blend`), and the plan improved by
local search (`_exchange`: the one or two linears' format changes that lower the cost most within both
limits, until none does). Every priced plan also bounds the optimum from below (Lagrangian duality:
cost(p) + p x (time(p) - limit) for the plan of least cost + p x time, up to the byte grid's rounding); the
result carries the best bound, so a report can say how far from the least cost the plan can be.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

from luq.errors import LuqError
from luq.plan.measured import Costs, KnapsackResult, _choices, knapsack
from luq.plan.presets import preset_plans
from luq.plan.sizes import KEEP, Plan, SizeTable
from luq.quant import get_format

TABLE = "ggml_decode_speed.json"
AUTO, NONE = "auto", "none"   # --speed-of: llama.cpp's preset of the budget's size / no decode limit
BISECTION_STEPS = 30


@cache
def speed_table() -> dict:
    """The shipped table: {"ns_per_weight": {ggml type: ns}, "source": ..., "cpu": ..., ...}."""
    path = resources.files("luq") / "data" / TABLE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LuqError(f"the decode speed table {TABLE} is missing or unreadable ({e}); reinstall luq") from None


def ns_per_weight() -> dict[str, float]:
    return speed_table()["ns_per_weight"]


def table_error() -> float:
    """The table's median relative error in decode speed on files it was not fitted on (the default margin)."""
    return float(speed_table().get("check_median_abs_error") or 0.0)


def format_ns(fmt: str) -> float | None:
    """Nanoseconds per weight a token of a format's ggml type takes; None for a format with no ggml type or
    one the table has not measured."""
    ggml_type = get_format(fmt).ggml_type if fmt != KEEP else None
    return None if ggml_type is None else ns_per_weight().get(ggml_type)


def plan_decode_ns(sizes: SizeTable, plan: Plan) -> float | None:
    """Predicted nanoseconds of a token's decode spent in the plan's weights; None where a format's speed
    is unknown."""
    total = 0.0
    for name, fmt in plan.items():
        ns = format_ns(fmt)
        if ns is None:
            return None
        total += ns * sizes.linears[name].n_weights
    return total


def gguf_decode_ns(path: str | Path) -> float:
    """Predicted nanoseconds of a token's decode spent in a GGUF file's quantized tensors (float vectors
    left out; a float matrix, or a type the table has not measured, is refused)."""
    import gguf

    table = ns_per_weight()
    try:
        tensors = gguf.GGUFReader(str(path)).tensors
    except (OSError, ValueError) as e:
        raise LuqError(f"--speed-of {path}: not a readable GGUF file ({e})") from None
    total = 0.0
    for t in tensors:
        ggml_type = t.tensor_type.name.lower()
        if ggml_type in table:
            total += table[ggml_type] * int(t.n_elements)
        elif len(t.shape) > 1 and int(t.shape[-1]) > 1:
            raise LuqError(f"--speed-of {path}: tensor {t.name} is {ggml_type.upper()}, whose decode speed the "
                           f"table ({TABLE}) has not measured")
    return total


def _is_file(ref: str) -> bool:
    return Path(ref).suffix == ".gguf" or Path(ref).is_file()


def _measured_type(ref: str) -> float:
    table = ns_per_weight()
    if ref not in table:
        raise LuqError(f"--speed-of takes {AUTO}, {NONE}, a GGUF file or a ggml type the speed table has measured "
                       f"({', '.join(sorted(table))}); got {ref!r}")
    return table[ref]


def reference_decode_ns(ref: str, sizes: SizeTable) -> float:
    """The decode time a plan is held to: a GGUF file's (a path), or the model's with every linear and unit
    in one ggml type (a type name; `check_reference` has checked that it stores them)."""
    if _is_file(ref):
        return gguf_decode_ns(ref)
    return _measured_type(ref) * sum(s.n_weights for s in sizes.linears.values())


class Limit(NamedTuple):
    """A reference's decode time (ns a token, predicted), what the reference is, and its own plan where it
    is one of the model's (a preset). A plan is held to ns / (1 + margin)."""

    ns: float
    what: str
    plan: Plan | None = None


def decode_limits(ref: str | None, sizes: SizeTable) -> Callable[[int], Limit | None]:
    """For a budget in bytes, the reference a plan is held to; None: no limit (`none`, or `auto` with no
    preset of so few bytes)."""
    if ref is None or ref == NONE:
        return lambda budget_bytes: None
    if ref != AUTO:
        limit = Limit(reference_decode_ns(ref, sizes), ref)
        return lambda budget_bytes: limit
    presets = [(sizes.total_bytes(plan), -plan_decode_ns(sizes, plan), name, plan)
               for name, plan in (preset_plans(sizes) or {}).items()]

    def of_budget(budget_bytes: int) -> Limit | None:
        fitting = [p for p in presets if p[0] <= budget_bytes]
        if not fitting:
            return None
        nbytes, minus_ns, name, plan = max(fitting, key=lambda p: p[:3])   # the largest; of two alike, the faster
        return Limit(-minus_ns, f"llama.cpp's {name} ({nbytes / 1e6:.1f} MB, as llama-quantize types it)", plan)
    return of_budget


def check_reference(ref: str, shapes: Sequence[tuple[int, int]]) -> None:
    """Refuse a `--speed-of` reference before any work: a GGUF file must be readable with every matrix in a
    measured type; a type name must be measured and able to store every decoder linear (`shapes`)."""
    if ref in (AUTO, NONE):
        return
    if _is_file(ref):
        if not Path(ref).is_file():
            raise LuqError(f"--speed-of {ref}: no such file")
        gguf_decode_ns(ref)
        return
    _measured_type(ref)
    unfit = [tuple(s) for s in shapes if not get_format(ref).supports(tuple(s))]
    if unfit:
        raise LuqError(f"--speed-of {ref}: {ref} cannot store a {unfit[0][0]}x{unfit[0][1]} linear (its rows); name a "
                       "file or a type of 32-weight blocks")


def knapsack_within(sizes: SizeTable, costs: Costs, formats: Sequence[str], budget_bytes: int,
                    max_ns: float, known: Plan | None = None) -> KnapsackResult:
    """The plan of least summed cost that fits `budget_bytes` and decodes within `max_ns` a token
    (predicted); formats whose speed is unknown are left out. `known`: a plan (the reference preset's) that
    the local search also starts from where it is within both limits, so the result is never worse than it."""
    max_ns *= 1 + 1e-9   # a plan exactly as fast as the reference (its own types) is fast enough
    times = {name: {f: format_ns(f) for f in c} for name, c in costs.items()}
    timed = {name: {f: c[f] for f in c if times[name][f] is not None} for name, c in costs.items()}

    bound = -math.inf   # the best Lagrangian lower bound on the least cost within both limits

    def priced(price: float) -> KnapsackResult:
        nonlocal bound
        per_ms = {name: {f: c[f] + price * times[name][f] * sizes.linears[name].n_weights / 1e6 for f in c}
                  for name, c in timed.items()}
        r = knapsack(sizes, per_ms, formats, budget_bytes)
        cost = sum(costs[n][f] for n, f in r.plan.items())
        bound = max(bound, cost + price * (plan_decode_ns(sizes, r.plan) - max_ns) / 1e6)
        return KnapsackResult(r.plan, cost, r.total_bytes, r.cell_bytes)

    def ns(r: KnapsackResult) -> float:
        return plan_decode_ns(sizes, r.plan)

    best = priced(0.0)
    if ns(best) <= max_ns:
        return replace(best, cost_lower_bound=best.cost)
    fastest = knapsack(sizes, {name: {f: times[name][f] * sizes.linears[name].n_weights for f in c}
                               for name, c in timed.items()}, formats, budget_bytes)
    if ns(fastest) > max_ns:
        raise LuqError(f"no plan of {budget_bytes / 1e9:.4g} GB decodes as fast as asked: the fastest is predicted "
                       f"at {1e9 / ns(fastest):.0f} tokens/s, asked for {1e9 / max_ns:.0f} (--speed-of, "
                       "--speed-margin)")
    lo, hi = 0.0, 1e-3
    slow = best
    while ns(fast := priced(hi)) > max_ns:
        lo, hi, slow = hi, hi * 4, fast
    for _ in range(BISECTION_STEPS):   # in log space: the price spans orders of magnitude
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 4
        r = priced(mid)
        if ns(r) <= max_ns:
            hi, fast = mid, r
        else:
            lo, slow = mid, r
        if hi - lo <= 1e-3 * hi:
            break
    blended = _blend(sizes, costs, fast, slow, budget_bytes, max_ns)
    options = {n: {f: timed[n][f] for f in fmts if f in timed[n]} for n, fmts, _, _ in _choices(sizes, costs, formats)}
    plan = _exchange(sizes, options, blended.plan, budget_bytes, max_ns)
    if (known is not None and all(f in options[n] for n, f in known.items())
            and plan_decode_ns(sizes, known) <= max_ns and sizes.total_bytes(known) <= budget_bytes):
        other = _exchange(sizes, options, known, budget_bytes, max_ns)
        plan = min(plan, other, key=lambda p: sum(costs[n][f] for n, f in p.items()))
    return replace(blended, plan=plan, cost=sum(costs[n][f] for n, f in plan.items()),
                   total_bytes=sizes.total_bytes(plan), cost_lower_bound=bound)


def _blend(sizes: SizeTable, costs: Costs, fast: KnapsackResult, slow: KnapsackResult, budget_bytes: int,
           max_ns: float) -> KnapsackResult:
    """Between the two plans the bisection ends on (one fast enough, one not), the priced knapsack can
    leave a wide step: from the fast plan, take the slow plan's format for a linear wherever that lowers
    the cost and the plan still fits both limits, the most cost saved per nanosecond added first."""
    plan = dict(fast.plan)
    nbytes, t = sizes.total_bytes(plan), plan_decode_ns(sizes, plan)

    def delta(name: str) -> tuple[float, float, int]:
        a, b = plan[name], slow.plan[name]
        n = sizes.linears[name].n_weights
        return (costs[name][b] - costs[name][a], (format_ns(b) - format_ns(a)) * n,
                sizes.linears[name].bytes[b] - sizes.linears[name].bytes[a])

    moves = [(name, *delta(name)) for name in plan if plan[name] != slow.plan[name]]
    moves = [m for m in moves if m[1] < 0]
    for name, dc, dt, db in sorted(moves, key=lambda m: m[1] / max(m[2], 1e-9) if m[2] > 0 else -math.inf):
        if t + dt <= max_ns and nbytes + db <= budget_bytes:
            plan[name] = slow.plan[name]
            t, nbytes = t + dt, nbytes + db
    return KnapsackResult(plan, sum(costs[n][f] for n, f in plan.items()), nbytes, fast.cell_bytes)


def _exchange(sizes: SizeTable, options: Costs, plan: Plan, budget_bytes: int, max_ns: float) -> Plan:
    """Local search from a plan within both limits: take the change of one linear's format, or of two
    linears' together (one gains, the other pays its bytes or time), that lowers the summed cost most while
    the plan stays within both limits; repeat until no such change is left. `options`: per linear, the
    formats it may take and their costs."""
    names = list(plan)
    pairs = [(i, f) for i, n in enumerate(names) for f in options[n]]
    linear = np.array([i for i, _ in pairs])
    cost = np.array([options[names[i]][f] for i, f in pairs], dtype=np.float64)
    time = np.array([format_ns(f) * sizes.linears[names[i]].n_weights for i, f in pairs], dtype=np.float64)
    nbytes = np.array([sizes.linears[names[i]].bytes[f] for i, f in pairs], dtype=np.int64)
    where = {pair: k for k, pair in enumerate(pairs)}
    at = np.array([where[(i, plan[n])] for i, n in enumerate(names)])   # each linear's option now
    eps = 1e-12
    for _ in range(100 * len(names)):
        now = at[linear]
        dc, dt, db = cost - cost[now], time - time[now], nbytes - nbytes[now]
        slack_t, slack_b = max_ns - float(time[at].sum()), budget_bytes - sizes.base_bytes - int(nbytes[at].sum())
        single = np.where((dc < -eps) & (dt <= slack_t + 1e-9) & (db <= slack_b), dc, np.inf)
        gain = np.flatnonzero(dc < -eps)     # first of a pair: lowers the cost
        pays = np.flatnonzero((dt < 0) | (db < 0))   # second: frees time or bytes
        move, change = None, -eps
        if np.isfinite(single.min()):
            move, change = (int(single.argmin()),), float(single.min())
        if gain.size and pays.size:
            both = dc[gain][:, None] + dc[pays][None, :]
            fits = ((dt[gain][:, None] + dt[pays][None, :] <= slack_t + 1e-9)
                    & (db[gain][:, None] + db[pays][None, :] <= slack_b)
                    & (linear[gain][:, None] != linear[pays][None, :]))
            both = np.where(fits, both, np.inf)
            k = int(both.argmin())
            if both.flat[k] < change:
                move, change = (int(gain[k // pays.size]), int(pays[k % pays.size])), float(both.flat[k])
        if move is None:
            break
        for option in move:
            at[linear[option]] = option
    return {n: pairs[at[i]][1] for i, n in enumerate(names)}
