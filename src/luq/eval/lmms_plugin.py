"""An lmms-eval model backed by luq: ``lmms-eval --model luq --model_args path=DIR --tasks mme``.

Install lmms-eval and the packages it imports (``pip install 'luq[lmms]'`` then
``pip install --no-deps lmms-eval==0.7.3``: its own requirements would move torch; ``make test``
does both). luq declares the entry point
``lmms_eval.models: luq = luq.eval.lmms_plugin:lmms_eval_manifest``, through which lmms-eval
(0.5 and later: the entry-point model registry) finds the model class ``LuqLMM`` without any
change to lmms-eval.

model_args: ``path`` (a quantized luq directory, a model directory, a hub id or a built-in
name such as ``tiny-vlm``), ``device`` (default cpu; "cuda" becomes each process's own GPU
under ``accelerate launch``), ``dtype`` (float32, bfloat16, float16), ``batch_size``
(default 1), ``max_new_tokens`` (default 32, when a task does not set it). Any other model_arg
is refused in one line (a misspelt one would otherwise change nothing without a word).

Generation is luq's own (``luq.eval.runner.AnswerGenerator``): greedy, the model's chat
template, the images of each request before its text; a task's ``max_new_tokens`` caps the
answer and its ``until`` strings cut it. A task (or ``--gen_kwargs``) asking for sampling or
beam search is refused. Log-likelihood requests are not supported (none of the nine VQA tasks
uses them).

luq's nine benchmarks as lmms-eval tasks on its bundled offline samples are in
``luq.eval.lmms_tasks`` (``--include_path "$(python -m luq.eval.lmms_tasks)" --tasks luq_mme``).

The class derives from lmms-eval's ``lmms`` when lmms-eval is installed; without it the same
class exists on a plain base (for luq's own tests), and only lmms-eval can drive it.
"""

from __future__ import annotations

from typing import Any

from luq.errors import LuqError

try:  # lmms-eval is an optional extra
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # pragma: no cover - depends on the environment
    _LmmsBase = object

MODEL_ID = "luq"
DEFAULT_MAX_NEW_TOKENS = 32


def lmms_eval_manifest():
    """The entry point lmms-eval's model registry loads: model id ``luq`` -> ``LuqLMM``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LuqLMM")


def _check_greedy(gen_kwargs: dict) -> None:
    """Refuse generation settings other than greedy decoding (lmms-eval's HF models sample when
    ``temperature`` > 0)."""
    sampling = gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0
    if sampling or int(gen_kwargs.get("num_beams") or 1) > 1:
        settings = {k: gen_kwargs.get(k) for k in ("do_sample", "temperature", "num_beams") if k in gen_kwargs}
        raise NotImplementedError(f"the luq lmms-eval model decodes greedily only; this task asks for {settings}")


def _int_arg(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args {name} must be an integer, got {value!r}") from None


class LuqLMM(_LmmsBase):
    """lmms-eval's "simple" model interface over a model luq can load."""

    is_simple = True

    def __init__(self, path: str | None = None, device: str = "cpu", dtype: str = "float32", batch_size: int = 1,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, model=None, processor=None,
                 max_batch_size: int | None = None, **unknown: Any) -> None:
        if unknown:   # a misspelt model_arg would otherwise be dropped without a word
            raise LuqError(f"unknown luq model_args {', '.join(sorted(unknown))}; known: path, device, dtype, "
                           "batch_size, max_new_tokens")
        if _LmmsBase is not object:
            super().__init__()
        from luq.eval.distributed import data_parallel_from_env
        from luq.eval.runner import AnswerGenerator, load_for_eval
        from luq.models.loading import parse_dtype

        self.task_dict: dict = {}
        self.parallel = data_parallel_from_env(device)
        self._rank, self._world_size = self.parallel.rank, self.parallel.world_size
        if model is None:  # model/processor may be handed in directly (in-process use, tests)
            model, processor, _ = load_for_eval(path, self.parallel.device(device), parse_dtype(dtype))
        self.batch_size_per_device = _int_arg(batch_size, "batch_size")
        self.generator = AnswerGenerator(model, processor, _int_arg(max_new_tokens, "max_new_tokens"))
        self.max_batch_size = max_batch_size   # lmms-eval passes it to every model; luq's batches are fixed

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _images(self, request) -> list:
        """The request's images, as RGB PIL images."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        images = [v.convert("RGB") for v in (visuals or []) if hasattr(v, "convert")]
        if len(images) != len(visuals or []):
            raise NotImplementedError("the luq model answers about images only (no video or audio)")
        return images

    def _batch_key(self, request) -> tuple:
        """Requests that may share a batch: one task's, with the same settings and image count. In
        request order these are the batches luq's runner makes of the same samples at the same
        batch size (same padding, so the same answers)."""
        _, gen_kwargs, _, _, task, _ = request.args
        _check_greedy(dict(gen_kwargs or {}))
        return task, len(self._images(request)), repr(sorted((gen_kwargs or {}).items(), key=lambda kv: kv[0]))

    def generate_until(self, requests) -> list[str]:
        """Greedy answers, in request order, batched among one task's requests with the same settings
        (images are decoded one batch at a time)."""
        from tqdm import tqdm

        answers: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(self._batch_key(request), []).append(index)
        chunks = [indices[start:start + self.batch_size_per_device]
                  for indices in groups.values() for start in range(0, len(indices), self.batch_size_per_device)]
        for chunk in tqdm(chunks, desc="luq generate", unit="batch", disable=self.rank != 0):
            gen_kwargs = dict(requests[chunk[0]].args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new_tokens = gen_kwargs.get("max_new_tokens")
            outputs = self.generator.answer([self._images(requests[i]) for i in chunk],
                                            [requests[i].args[0] for i in chunk],
                                            max_new_tokens=None if max_new_tokens is None
                                            else _int_arg(max_new_tokens, "max_new_tokens"))
            for i, text in zip(chunk, outputs):
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                answers[i] = text.strip()
        return answers  # type: ignore[return-value]

    def loglikelihood(self, requests):
        raise NotImplementedError("the luq lmms-eval model generates answers only (generate_until tasks)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the luq lmms-eval model answers single-round requests only")
