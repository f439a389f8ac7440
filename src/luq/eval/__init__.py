"""Evaluation: the nine VQA benchmarks, perplexity, data-parallel runs, lmms-eval.

* ``luq.eval.metrics``: the benchmark scorers (VQAv2/TextVQA accuracy, DocVQA ANLS, ChartQA
  relaxed accuracy, GQA, POPE, MME, MMBench circular, MathVista, perplexity): plain
  functions of predictions and references, pure Python.
* ``luq.eval.datasets``: MME, MMBench, TextVQA, VQAv2, GQA, POPE, ChartQA, DocVQA and
  MathVista from the hub or from a local ``samples.jsonl`` + images directory (the layout
  is in its docstring); a small offline sample of each ships with luq.
* ``luq.eval.runner``: ``evaluate(model, processor, EvalConfig(task=...))``, batched greedy
  answers through the model's chat template, scored; ``load_for_eval`` opens a model or a
  quantized luq directory.
* ``luq.eval.perplexity``: ``evaluate_perplexity`` over a corpus with a stride.
* ``luq.eval.distributed``: sharding by whole batches under ``accelerate launch``.
* ``luq.eval.command``: ``luq eval MODEL_OR_DIR --task NAME``.
* ``luq.eval.lmms_plugin``: ``lmms-eval --model luq --model_args path=DIR``.

Only ``metrics`` is imported here; the others load torch and transformers when imported.
"""

from luq.eval import metrics

__all__ = ["metrics"]
