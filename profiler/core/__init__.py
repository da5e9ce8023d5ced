"""The profiler's core: capture a model once, align names, compare, measure.

Capture (:mod:`.capture`), name alignment (:mod:`.alignment`), running a model without
changing it (:mod:`.running`), the metric registry (:mod:`.metrics`), featuremap similarity
(:mod:`.similarity`), statistics (:mod:`.statistics`), weights (:mod:`.weights`), dumps
(:mod:`.dumps`) and how every table is written (:mod:`.tables`).  The core imports only qatkit
and itself; the report (:mod:`qatkit.profiler.report`) and the causal tools
(:mod:`qatkit.profiler.causal`) build on it.
"""
