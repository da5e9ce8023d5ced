"""The profiler's causal tools: switch quantizers and watch the output.

Sensitivity ranking (:mod:`.sensitivity`), the cumulative error curve and partial
un-quantization (:mod:`.acc_error`), value distributions (:mod:`.distribution`), bad cases
(:mod:`.bad_cases`), the mixed-precision search (:mod:`.mixed_precision`), with the switchable
quantizers of a model (:mod:`.switches`), the incremental runner (:mod:`.incremental`) and
their private helpers.  They import the core (:mod:`qatkit.profiler.core`), never the report.
"""
