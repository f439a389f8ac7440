"""Run a VQA benchmark on a model: batched greedy answers, scored with ``luq.eval.metrics``.

Works with every model ``luq.models.loading.load_model`` returns that takes images (the
LLaVA family, Qwen2.5-VL) and with a quantized luq artifact directory (one holding
``luq_report.json``, opened with ``luq.load``). Each prompt goes through the model's own
chat template as one user turn ``[image, text]``; processors without a chat template get
LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:``. Generation is greedy (``do_sample=False``,
one beam), batched with left padding, capped at the task's ``max_new_tokens``.

``evaluate`` is the in-process evaluator (the threshold search calls it with a model
already in memory); ``luq eval`` wraps it (``luq.eval.command``).

Scores (``EvalResult.scores``) are fractions in [0, 1], except MME, which keeps its own
scale (per subtask acc + acc+ in points, summed into perception and cognition).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from luq.errors import LuqError
from luq.eval import metrics
from luq.eval.datasets import EvalSample, load_samples, task_spec
from luq.eval.distributed import DataParallel, batched, run_sharded


# --------------------------------------------------------------------------- loading


def is_luq_artifact(path: str | Path | None) -> bool:
    from luq.artifact import is_artifact

    return is_artifact(path)


def load_for_eval(model: str | None, device: str | torch.device, dtype: torch.dtype):
    """(model, processor or tokenizer, adapter) for MODEL_OR_DIR: a quantized luq artifact
    through ``luq.load``, anything else through ``load_model``."""
    if is_luq_artifact(model):
        from luq.artifact import load

        return load(model, device=device, dtype=dtype, log=lambda line: print(f"luq: {line}", file=sys.stderr))
    from luq.models.loading import load_model

    return load_model(model, device, dtype)


# --------------------------------------------------------------------------- generation


def chat_text(processor, prompt: str, n_images: int = 1) -> str:
    """The prompt as one user turn (its images first, then the text) through the processor's
    chat template; LLaVA-1.5's plain format where the processor has none."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    image_token = getattr(processor, "image_token", None) or "<image>"
    return "USER: " + f"{image_token}\n" * n_images + f"{prompt} ASSISTANT:"


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return floating[0] if floating else torch.float32


@dataclass
class AnswerGenerator:
    """Greedy answers of a vision-language model to prompts about images, in batches."""

    model: torch.nn.Module
    processor: object
    max_new_tokens: int

    def __post_init__(self) -> None:
        if not hasattr(self.processor, "image_processor"):
            raise LuqError(f"{type(self.model).__name__} takes no images (its preprocessor is "
                           f"{type(self.processor).__name__}); evaluate it with --task perplexity")
        tokenizer = self.processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, samples: Sequence[EvalSample]) -> list[str]:
        """One answer per benchmark sample (one image each)."""
        return self.answer([[s.load_image()] for s in samples], [s.prompt for s in samples])

    @torch.inference_mode()
    def answer(self, images: Sequence[Sequence], prompts: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        """One answer per prompt; ``images[i]`` holds the PIL images of prompt i (same count for
        every prompt of a batch; none for a text-only batch)."""
        counts = {len(imgs) for imgs in images}
        if len(counts) != 1:
            raise ValueError("every prompt of a batch must come with the same number of images")
        texts = [chat_text(self.processor, p, len(imgs)) for p, imgs in zip(prompts, images)]
        flat_images = [img for imgs in images for img in imgs] or None
        inputs = self.processor(images=flat_images, text=texts, padding=True, padding_side="left",
                                return_tensors="pt")
        device, dtype = _model_device(self.model), _model_dtype(self.model)
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        output = self.model.generate(**inputs, do_sample=False, num_beams=1,
                                     max_new_tokens=max_new_tokens or self.max_new_tokens,
                                     pad_token_id=self.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


# --------------------------------------------------------------------------- scoring


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def score_predictions(task: str, samples: Sequence[EvalSample],
                      predictions: Sequence[str]) -> tuple[dict, list[float | None]]:
    """(scores of the task, one score per sample or None where only the whole set scores)."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    pairs = list(zip(samples, predictions))
    if task in ("vqav2", "textvqa"):
        per = [metrics.vqa_accuracy(p, s.answers) for s, p in pairs]
        return {"accuracy": _mean(per)}, per
    if task == "gqa":
        per = [metrics.gqa_accuracy(p, s.answers[0]) for s, p in pairs]
        return {"accuracy": _mean(per)}, per
    if task == "docvqa":
        per = [metrics.anls(p, s.answers) for s, p in pairs]
        return {"anls": _mean(per)}, per
    if task == "chartqa":
        per = [metrics.relaxed_accuracy(p, s.answers[0]) for s, p in pairs]
        scores = {"relaxed_accuracy": _mean(per)}
        for split in ("human_test", "augmented_test"):
            part = [v for (s, _), v in zip(pairs, per) if s.fields.get("type") == split]
            if part:
                scores[f"relaxed_{split.split('_')[0]}"] = _mean(part)
        return scores, per
    if task == "pope":
        per = [metrics.pope_metrics([p], [s.answers[0]])["accuracy"] for s, p in pairs]
        scores = metrics.pope_metrics(list(predictions), [s.answers[0] for s in samples])
        return {k: scores[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}, per
    if task == "mme":
        records = [{"category": s.fields["category"], "pred": p, "answer": s.answers[0],
                    "question_id": s.fields["image_key"]} for s, p in pairs]
        per = [metrics.mme_scores([r])["subtasks"][r["category"]]["acc"] / 100 for r in records]
        result = metrics.mme_scores(records)
        scores = {"perception": result["perception"], "cognition": result["cognition"],
                  "total": result["perception"] + result["cognition"]}
        scores.update({f"{name}": sub["score"] for name, sub in sorted(result["subtasks"].items())})
        return scores, per
    if task == "mmbench":
        records = [{"index": s.fields["group"], "circular_index": s.fields["circular_index"], "pred": p,
                    "options": s.fields["options"], "answer": s.answers[0]} for s, p in pairs]
        per = [float(metrics.extract_choice(r["pred"], r["options"]) == r["answer"]) for r in records]
        single_pass = [v for r, v in zip(records, per) if r["circular_index"] == 0]
        return {"circular_accuracy": metrics.mmbench_circular_accuracy(records),
                "single_pass_accuracy": _mean(single_pass)}, per
    if task == "mathvista":
        per = [metrics.mathvista_accuracy(p, s.answers[0], s.fields["question_type"], s.fields["answer_type"],
                                          s.fields.get("choices"), s.fields.get("precision")) for s, p in pairs]
        return {"accuracy": _mean(per)}, per
    raise LuqError(f"no scorer for task {task!r}")


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate: the task, where its data comes from (None: the bundled sample),
    how many questions (None: all), batch size, generation cap (None: the task's)."""

    task: str
    data: str | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        task_spec(self.task)
        if self.batch_size < 1:
            raise LuqError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise LuqError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")


@dataclass
class EvalResult:
    """Scores of one task and what produced them, one record per sample."""

    task: str
    headline: str
    scores: dict
    samples: list[dict]
    config: dict
    seconds: float
    world_size: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def score(self) -> float:
        return self.scores[self.headline]

    def to_json(self) -> dict:
        return {"task": self.task, "headline": self.headline, "score": self.score, "scores": self.scores,
                "n_samples": len(self.samples), "seconds": round(self.seconds, 3), "world_size": self.world_size,
                "config": self.config, **self.extra, "samples": self.samples}


def evaluate(model: torch.nn.Module, processor, config: EvalConfig, samples: Sequence[EvalSample] | None = None,
             parallel: DataParallel | None = None,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Answer and score ``config.task`` with a model already in memory.

    samples: given, or read from ``config.data`` (``load_samples``), ``config.limit`` applied.
    parallel: this process's share of a data-parallel run (None: alone); every process gets
    the full result. progress: called with (batches done here, batches here)."""
    spec = task_spec(config.task)
    parallel = parallel or DataParallel()
    start = time.perf_counter()
    if samples is None:
        samples = load_samples(config.task, config.data, config.limit)
    generator = AnswerGenerator(model, processor, config.max_new_tokens or spec.max_new_tokens)
    batches = batched(list(samples), config.batch_size)
    done = [0]
    n_mine = len(parallel.my_batches(len(batches)))

    def answer(batch: list[EvalSample]) -> list[str]:
        out = generator(batch)
        done[0] += 1
        if progress:
            progress(done[0], n_mine)
        return out

    predictions = run_sharded(batches, answer, parallel)
    scores, per_sample = score_predictions(config.task, samples, predictions)
    records = [dict(s.to_json(), prediction=p, score=v) for s, p, v in zip(samples, predictions, per_sample)]
    return EvalResult(task=config.task, headline=spec.headline, scores=scores, samples=records,
                      config=asdict(config) | {"max_new_tokens": generator.max_new_tokens},
                      seconds=time.perf_counter() - start, world_size=parallel.world_size)
