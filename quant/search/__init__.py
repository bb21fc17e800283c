"""`quant search`: measured per-unit sensitivity and speed, and a greedy mixed-precision search to a task-metric
budget (quant.search.core), with the callables for one graph of any model spec (quant.search.models)."""

from quant.search.budget import TaskBudget, parse_budget
from quant.search.core import Problem, SearchOptions, SearchResult, run_search
from quant.search.output import write_outputs
from quant.search.units import Unit, find_units

__all__ = ["Problem", "SearchOptions", "SearchResult", "TaskBudget", "Unit", "find_units", "parse_budget",
           "run_search", "write_outputs"]
