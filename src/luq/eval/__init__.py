"""Evaluation utilities for luq.

``luq.eval.metrics`` holds the benchmark scorers (VQAv2/TextVQA accuracy, DocVQA
ANLS, ChartQA relaxed accuracy, GQA, POPE, MME, MMBench circular, MathVista,
perplexity): plain functions of predictions and references, pure Python.
"""

from luq.eval import metrics

__all__ = ["metrics"]
