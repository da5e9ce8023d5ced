"""The profiler's report: :func:`~.model_report.model_profiler` and what its page shows.

The report of two models (:mod:`.model_report`), the structural checks (:mod:`.checks`), the
qconfig check (:mod:`.qconfig_check`), the advisor (:mod:`.advisor`), the HTML page and its
verdict (:mod:`.html`, ``templates/``) and the mermaid graph (:mod:`.mermaid`).  It reads the
core (:mod:`qatkit.profiler.core`) and, for its optional sensitivity section, the causal tools
(:mod:`qatkit.profiler.causal`); neither imports the report.
"""

from __future__ import annotations

from typing import Any

from .. import _deprecated


def __getattr__(name: str) -> Any:
    """``qatkit.profiler.report`` was model_profiler's module in qatkit 0.1: its names are read
    from :mod:`.model_report`, with a DeprecationWarning (until 0.2)."""
    return _deprecated.moved_name(__name__, name, _deprecated.MOVED_REPORT_NAMES)
