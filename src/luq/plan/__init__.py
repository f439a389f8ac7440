"""Planning: from the size and cost tables to a plan (linear name -> format name).

- `sizes`: the plan itself and the exact bytes of any plan (SizeTable).
- `measured`: the default allocation: a multiple-choice knapsack on measured costs under
  the exact bytes of a budget; the threshold rule as a search over budgets.
- `entropy`: the paper's allocation: entropy-ordered layers, k low-bit layers by budget
  (Eq. 7), threshold (Eq. 8) or count.
"""

from luq.plan.entropy import (HIGH, LOW, SearchStep, assignment, entropy_plan, layer_order, smallest_fitting_k,
                              threshold_search)
from luq.plan.measured import (BudgetStep, KnapsackResult, knapsack, lagrangian_bound, plan_cost,
                               smallest_budget_within)
from luq.plan.sizes import KEEP, LinearSizes, Plan, SizeTable, layer_plan, uniform_plan

__all__ = ["HIGH", "LOW", "SearchStep", "assignment", "entropy_plan", "layer_order", "smallest_fitting_k",
           "threshold_search", "BudgetStep", "KnapsackResult", "knapsack", "lagrangian_bound", "plan_cost",
           "smallest_budget_within", "KEEP", "LinearSizes", "Plan", "SizeTable", "layer_plan", "uniform_plan"]
