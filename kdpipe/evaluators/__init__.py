"""Evaluators, registered by name (`evaluate.task` in the spec): one file each, like losses.

An evaluator splits its metrics into per-batch sums (run where the rows are) and a `finish` step
on the driver (`kdpipe.evaluators.base.Evaluator`); `kdpipe.evaluate` runs every contender through
the chosen one.
"""

from kdpipe.registry import Registry, import_submodules

EVALUATORS: Registry = Registry("evaluator")

from kdpipe.evaluators.base import Evaluator  # noqa: E402

import_submodules(__name__)

__all__ = ["EVALUATORS", "Evaluator"]
