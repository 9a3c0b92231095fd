"""``scope-ray sweep``: one Ray job per model, tracked and resumable (docs/sweep.md).

spec.py: the sweep spec and its validation; plan.py: the skip rule and per-model sweep state;
table.py: the live table; runner.py: the Ray Jobs API shell.
"""

from scope_ray.sweep.runner import ClusterAccessError, run_sweep
from scope_ray.sweep.spec import SweepSpecError, load_sweep

__all__ = ["ClusterAccessError", "SweepSpecError", "load_sweep", "run_sweep"]
