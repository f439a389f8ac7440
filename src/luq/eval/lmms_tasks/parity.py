"""Reading an lmms-eval run of the luq_* tasks side by side with luq's runner on the same samples.

``lmms_answer`` and ``lmms_sample_score`` read one record of lmms-eval's logged samples
(``--log_samples``, or ``simple_evaluate(..., log_samples=True)["samples"][task]``);
``HEADLINES`` pairs each luq headline score with lmms-eval's metric of the same thing and the
factor between their scales.
"""

from __future__ import annotations

from collections.abc import Mapping

# luq task -> (luq score key, lmms-eval metric key, lmms-eval value / luq value)
HEADLINES: dict[str, tuple[str, str, float]] = {
    "textvqa": ("accuracy", "exact_match", 1.0),
    "vqav2": ("accuracy", "exact_match", 1.0),
    "gqa": ("accuracy", "exact_match", 1.0),
    "docvqa": ("anls", "anls", 1.0),
    "chartqa": ("relaxed_accuracy", "relaxed_overall", 1.0),
    "pope": ("f1", "pope_f1_score", 1.0),
    "mme": ("perception", "mme_perception_score", 1.0),
    "mmbench": ("circular_accuracy", "circular_accuracy", 100.0),
    "mathvista": ("accuracy", "mathvista_accuracy", 100.0),
}


def lmms_answer(record: Mapping) -> str:
    """The model's answer in one logged lmms-eval sample (after the task's filters)."""
    answer = record["filtered_resps"]  # a list in memory, the string itself in the logged file
    while not isinstance(answer, str):
        answer = answer[0]
    return answer


def lmms_sample_score(task: str, record: Mapping) -> float | None:
    """lmms-eval's score of one logged sample, on luq's per-sample scale (0..1 per question;
    None for MMBench, which lmms-eval scores per question over all its rotations)."""
    if task in ("textvqa", "vqav2", "gqa"):
        return float(record["exact_match"])
    if task == "docvqa":
        return float(record["anls"])
    if task == "chartqa":
        return float(record["relaxed_overall"])
    if task == "pope":
        return float(record["pope_accuracy"]["score"])
    if task == "mme":
        return float((record.get("mme_perception_score") or record["mme_cognition_score"])["score"])
    if task == "mathvista":
        return float(bool(record["mathvista_accuracy"]["true_false"]))
    if task == "mmbench":
        return None
    raise KeyError(f"no lmms-eval task for {task!r}")


def lmms_headline(task: str, results: Mapping) -> float | None:
    """lmms-eval's headline of a task from its ``results[task_name]`` dict, on luq's scale."""
    _, metric, scale = HEADLINES[task]
    value = results.get(f"{metric},none")
    return None if value is None else float(value) / scale
