"""lmms-eval tasks on luq's bundled offline samples: ``luq_textvqa``, ``luq_vqav2``, ``luq_gqa``,
``luq_docvqa``, ``luq_chartqa``, ``luq_pope``, ``luq_mme``, ``luq_mmbench``, ``luq_mathvista``
(tag ``luq_samples``: all nine).

Each is lmms-eval's own task (its prompt, image handling and scorer, named in the YAML) on
the same samples ``luq eval --task NAME`` reads, with luq's generation settings::

    lmms-eval --model luq --model_args path=DIR --include_path "$(python -m luq.eval.lmms_tasks)" \\
        --tasks luq_textvqa,luq_pope,luq_mme

``python -m luq.eval.lmms_tasks`` prints this folder. Where lmms-eval's scorer differs from
luq's (``luq.eval.metrics``) is listed in ``SCORER_DIFFERENCES`` and shown by the tests.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
TAG = "luq_samples"


def lmms_task(task: str) -> str:
    """The lmms-eval task name of a luq task ("textvqa" -> "luq_textvqa")."""
    return f"luq_{task}"


def task_yaml(task: str) -> Path:
    """The YAML file of a luq task's lmms-eval definition."""
    return TASKS_DIR / f"{lmms_task(task)}.yaml"


# Where lmms-eval's scorer and luq's give a different score to the same answer (each one is
# demonstrated by a test in tests/test_eval_lmms_plugin.py).
SCORER_DIFFERENCES = {
    "gqa": "lmms-eval deletes every punctuation mark before comparing; luq only a trailing period",
    "docvqa": "lmms-eval divides the edit distance by the length of the raw strings (luq: of the "
              "normalised ones) and keeps a similarity of exactly 0.5 (luq: scores it 0)",
    "pope": "lmms-eval counts only an answer that is exactly yes/no (after lowercasing and stripping); "
            "luq applies POPE's own rule (no/not in the first sentence means no, anything else yes); "
            "lmms-eval's yes_ratio is the share of yes labels, luq's the share of yes answers",
    "mme": "lmms-eval also drops periods and reads a lone y/n as yes/no",
    "mmbench": "both extract the letter without a judge, by different rules (lmms-eval: letter tokens, "
               "then a single option text contained in the answer, then its MCQ regexes; luq: "
               "luq.eval.metrics.extract_choice)",
    "mathvista": "without its LLM judge lmms-eval accepts only an answer that is a choice or parses whole "
                 "as a number, and maps anything else to the nearest choice by edit distance; luq "
                 "extracts the last number, a stated letter or a choice text",
}
