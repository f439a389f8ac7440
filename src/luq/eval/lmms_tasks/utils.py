"""The code behind luq's lmms-eval task YAMLs: docs in lmms-eval's own shape, and the scorers
lmms-eval cannot run offline.

Each ``luq_<task>.yaml`` reads a luq ``samples.jsonl`` (``dataset_path: json``); its
``process_docs`` (below) turns every line into the rows of the benchmark's hub copy that
lmms-eval's own task code reads (``question_id``, ``answers`` as VQAv2's dicts, MMBench's
``A``..``E`` columns and rotation ``index``, MathVista's ``decoded_image`` and ``metadata``, ...)
with the image as a ``datasets.Image`` column. The lines are read by luq's own reader
(``luq.eval.datasets``), so both see the same samples: the same validation, the same MMBench
rotations. ``luq_id`` keeps luq's sample id on every row.

Prompts, images and scores then come from lmms-eval's own task functions, named in the YAMLs,
except where lmms-eval's scorer needs something absent here:

* TextVQA, VQAv2: lmms-eval's ``process_results``, with only the ``exact_match`` key kept
  (the submission files are for the test server);
* MathVista: lmms-eval's extraction, normalisation and comparison, with the LLM judge it
  calls when its rules find nothing answered by "" (what a run without the judge's API gets,
  without the minutes of retries);
* MMBench: lmms-eval's own judge-free scorer (``mmbench_en_dev_static``'s).

Image paths in a line are relative to luq's bundled sample of the task (or absolute).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from luq.errors import LuqError
from luq.eval.datasets import CIRCULAR_STEP, EvalSample, _record_to_samples, bundled_dir

LUQ_ID = "luq_id"


# --------------------------------------------------------------------------- docs


def _samples(task: str, dataset) -> list[EvalSample]:
    """luq's samples of the lines in ``dataset`` (rows of a luq samples.jsonl)."""
    base = bundled_dir(task)
    samples: list[EvalSample] = []
    for number, row in enumerate(dataset, start=1):
        record = {key: value for key, value in row.items() if value is not None}  # json's union of columns
        record.setdefault("id", number)
        where = f"{task} sample line {number}"
        image = Path(str(record.get("image", ""))).expanduser()
        image = image if image.is_absolute() else (base / image).resolve()
        if not image.is_file():
            raise LuqError(f"{where}: image not found: {image}")
        samples.extend(_record_to_samples(task, record, image, where))
    return samples


def _rows_to_dataset(rows: list[dict], image_column: str = "image"):
    import datasets

    return datasets.Dataset.from_list(rows).cast_column(image_column, datasets.Image())


def _docs(task: str, to_row: Callable[[EvalSample], dict], image_column: str = "image"):
    def process_docs(dataset):
        rows = [dict(to_row(s), **{LUQ_ID: s.id, image_column: str(s.image)}) for s in _samples(task, dataset)]
        return _rows_to_dataset(rows, image_column)

    process_docs.__name__ = f"{task}_process_docs"
    return process_docs


textvqa_process_docs = _docs("textvqa", lambda s: {
    "question_id": s.id, "question": s.question, "answers": list(s.answers)})
vqav2_process_docs = _docs("vqav2", lambda s: {
    "question_id": s.id, "question": s.question,
    "answers": [{"answer": a, "answer_id": i, "answer_confidence": "yes"} for i, a in enumerate(s.answers, 1)]})
gqa_process_docs = _docs("gqa", lambda s: {"id": s.id, "question": s.question, "answer": s.answers[0]})
docvqa_process_docs = _docs("docvqa", lambda s: {"questionId": s.id, "question": s.question, "answers": list(s.answers)})
chartqa_process_docs = _docs("chartqa", lambda s: {
    "question": s.question, "answer": s.answers[0], "type": s.fields.get("type") or "human_test"})
pope_process_docs = _docs("pope", lambda s: {
    "question_id": s.id, "question": s.question, "answer": s.answers[0], "category": s.fields.get("category")})
mme_process_docs = _docs("mme", lambda s: {
    "question_id": s.fields["image_key"], "question": s.question, "answer": s.answers[0],
    "category": s.fields["category"]})
mathvista_process_docs = _docs("mathvista", lambda s: {
    "pid": s.id, "question": s.question, "query": s.prompt, "question_type": s.fields["question_type"],
    "answer_type": s.fields["answer_type"], "choices": s.fields.get("choices"),
    "precision": s.fields.get("precision"), "unit": s.fields.get("unit"), "answer": s.answers[0],
    "metadata": {"split": "testmini", "language": "english", "source": "luq", "category": "luq",
                 "task": "luq", "context": "luq", "grade": "luq", "skills": ["luq"]}}, image_column="decoded_image")


def mmbench_process_docs(dataset):
    """MMBench rows as lmms-lab/MMBench holds them: one row per rotation, ``index`` =
    question number + rotation * 1,000,000 (how lmms-eval groups CircularEval)."""
    numbers: dict[str, int] = {}
    rows = []
    for s in _samples("mmbench", dataset):
        number = numbers.setdefault(s.fields["group"], len(numbers) + 1)
        options = s.fields["options"]
        rows.append({"index": number + s.fields["circular_index"] * CIRCULAR_STEP, "question": s.question,
                     "hint": s.fields.get("hint"), **{letter: options.get(letter) for letter in "ABCDE"},
                     "answer": s.answers[0], "category": s.fields.get("category") or "luq", "L2-category": "luq",
                     "source": "luq", "split": "dev", LUQ_ID: s.id, "image": str(s.image)})
    return _rows_to_dataset(rows)


# --------------------------------------------------------------------------- scores


def textvqa_process_results(doc, results):
    from lmms_eval.tasks.textvqa.utils import textvqa_process_results as score

    return {"exact_match": score(dict(doc, answers=list(doc["answers"])), results)["exact_match"]}


def vqav2_process_results(doc, results):
    from lmms_eval.tasks.vqav2.utils import vqav2_process_results as score

    return {"exact_match": score(dict(doc, answers=[dict(a) for a in doc["answers"]]), results)["exact_match"]}


def _offline_mathvista():
    from lmms_eval.tasks.mathvista.mathvista_evals import MathVistaEvaluator

    class OfflineMathVista(MathVistaEvaluator):
        def get_chat_response(self, *args, **kwargs) -> str:
            return ""  # no LLM judge: lmms-eval's answer when its judge cannot be reached

    return OfflineMathVista(quick_extract=False)


def mathvista_process_results(doc, results):
    """lmms-eval's ``mathvista_process_results`` with the judge answered by "" (its config:
    ``quick_extract: false``)."""
    evaluator = _offline_mathvista()
    prediction = results[0].strip()
    problem = {key: doc.get(key) for key in ("question_type", "answer_type", "query", "choices", "answer")}
    problem["precision"] = doc.get("precision") or 0
    extraction = evaluator.extract_answer(prediction, problem, False)
    normalized = evaluator.normalize_extracted_answer(extraction, problem["choices"], problem["question_type"],
                                                      problem["answer_type"], problem["precision"])
    result = {"question_id": doc["pid"], "query": doc["query"], "choices": doc["choices"], "answer": doc["answer"],
              "extraction": extraction, "prediction": normalized,
              "true_false": evaluator.safe_equal(normalized, problem["answer"]),
              "question_type": doc["question_type"], "answer_type": doc["answer_type"],
              "precision": problem["precision"], "metadata": dict(doc["metadata"])}
    return {"mathvista_accuracy": result}


def mathvista_aggregate_results(results, args=None):
    """lmms-eval's ``mathvista_aggregate_results`` (accuracy in percent), except that a score of
    zero is reported as 0.0 rather than None."""
    from lmms_eval.tasks.mathvista.utils import mathvista_aggregate_results as aggregate

    score = aggregate([dict(r, metadata=dict(r["metadata"])) for r in results], args)
    return 0.0 if score is None else score


def mmbench_process_results(doc, results):
    """lmms-eval's ``mmbench_process_results`` record (the one its scorers read)."""
    from lmms_eval.tasks.mmbench.en_utils import mmbench_process_results as record

    return {"circular_accuracy": record(doc, results)["gpt_eval_score"]}


def mmbench_aggregate_results(results, args=None):
    """lmms-eval's judge-free MMBench scorer (circular: a question counts when every rotation is
    right), in percent, without the result files it writes beside the run."""
    from lmms_eval.tasks.mmbench.en_utils import mmbench_evaluator

    overall, _, _ = mmbench_evaluator.eval_result(results, eval_method="static")
    return overall * 100
