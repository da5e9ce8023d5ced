"""The profiler's report: :func:`~.model_report.model_profiler` and what its page shows.

The report of two models (:mod:`.model_report`), the structural checks (:mod:`.checks`), the
qconfig check (:mod:`.qconfig_check`), the advisor (:mod:`.advisor`), the HTML page and its
verdict (:mod:`.html`, ``templates/``) and the mermaid graph (:mod:`.mermaid`).  It reads the
core (:mod:`qatkit.profiler.core`) and, for its optional sensitivity section, the causal tools
(:mod:`qatkit.profiler.causal`); neither imports the report.
"""

from __future__ import annotations

from qatkit._deprecation import deprecated_aliases

__all__: list[str] = []  # import from the modules; qatkit.profiler exports what users call

#: qatkit 0.1's module qatkit.profiler.report is model_report now: its names, for one release
__getattr__ = deprecated_aliases(__name__, {
    name: f"qatkit.profiler.report.model_report.{name}"
    for name in ("model_profiler", "ProfilerReport", "MODES", "model_kind", "TOOLS",
                 "SENSITIVITY_TOOLS", "SENSITIVITY_SWEEP")})
