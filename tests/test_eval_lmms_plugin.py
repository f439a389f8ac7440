"""The lmms-eval model (luq.eval.lmms_plugin) and luq's lmms-eval tasks (luq.eval.lmms_tasks).

Without lmms-eval (the ``lmms`` extra) only the first two tests run: the plugin driven the way
lmms-eval drives a simple model. With it, lmms-eval itself runs the luq_* tasks through the
plugin, in process and through its command line, and every answer is compared with luq's
runner on the same samples; where lmms-eval's scorer and luq's disagree, the disagreement is
one named in ``luq.eval.lmms_tasks.SCORER_DIFFERENCES`` and shown here on a concrete answer.
"""

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from luq.eval.datasets import known_tasks, load_samples, task_spec
from luq.eval.lmms_plugin import LuqLMM
from luq.eval.lmms_tasks import SCORER_DIFFERENCES, TASKS_DIR, lmms_task
from luq.eval.runner import AnswerGenerator, EvalConfig, evaluate, load_for_eval, score_predictions
from test_eval_support import tiny_llava_dir


@dataclass
class Request:  # lmms-eval's Instance, as far as a simple model reads it
    args: tuple


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model, processor, _ = load_for_eval(str(tiny_llava_dir()), "cpu", torch.float32)
    return model, processor


def test_generate_until_answers_in_request_order(tiny):
    model, processor = tiny
    lmm = LuqLMM(model=model, processor=processor, batch_size=2, max_new_tokens=4)
    samples = load_samples("gqa", limit=3)
    docs = [{"image": s.load_image(), "question": s.question} for s in samples]
    lmm.task_dict = {"gqa": {"testdev": docs}}
    to_visual = lambda doc: [doc["image"]]  # noqa: E731
    requests = [Request((s.prompt, {"max_new_tokens": 4, "until": ["\n\n"]} if i != 1 else {"max_new_tokens": 2},
                         to_visual, i, "gqa", "testdev")) for i, s in enumerate(samples)]
    answers = lmm.generate_until(requests)
    expected = AnswerGenerator(model, processor, 4)(samples)  # the runner's own answers
    assert answers[0] == expected[0].split("\n\n")[0].strip() and answers[2] == expected[2].split("\n\n")[0].strip()
    assert len(answers[1].split()) <= 2 and lmm.rank == 0 and lmm.world_size == 1
    with pytest.raises(NotImplementedError):
        lmm.loglikelihood(requests)


def test_sampling_or_beam_search_is_refused(tiny):
    model, processor = tiny
    lmm = LuqLMM(model=model, processor=processor)
    lmm.task_dict = {"gqa": {"testdev": [{"question": "?"}]}}
    for settings in ({"do_sample": True}, {"temperature": 0.7}, {"num_beams": 3}):
        with pytest.raises(NotImplementedError, match="greedily"):
            lmm.generate_until([Request(("?", settings, None, 0, "gqa", "testdev"))])


# --------------------------------------------------------------------------- with lmms-eval


@pytest.fixture(scope="module")
def lmms_eval():
    import lmms_eval.evaluator   # make test installs it: missing is a failure, not a skip

    return lmms_eval.evaluator


@pytest.fixture(scope="module")
def luq_tasks(lmms_eval):
    """The nine luq_* tasks as lmms-eval builds them: {luq task: lmms-eval task object}."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager("WARNING", include_path=str(TASKS_DIR), include_defaults=False, model_name="luq")
    tasks = get_task_dict([lmms_task(t) for t in known_tasks()], manager)
    return {t: tasks[lmms_task(t)] for t in known_tasks()}


def test_lmms_eval_finds_the_luq_model_when_installed(lmms_eval):
    import lmms_eval.models as registry
    from importlib.metadata import entry_points

    if not any(ep.name == "luq" for ep in entry_points(group="lmms_eval.models")):
        pytest.fail("luq's entry points are not installed (pip install -e . to refresh them)")
    assert registry.get_model("luq") is LuqLMM


# lmms-eval's own task each luq_* task follows (its prompt settings and task functions)
OFFICIAL = {"textvqa": "textvqa/textvqa_val.yaml", "vqav2": "vqav2/vqav2_val.yaml", "gqa": "gqa/gqa.yaml",
            "docvqa": "docvqa/docvqa_val.yaml", "chartqa": "chartqa/chartqa.yaml", "pope": "pope/pope.yaml",
            "mme": "mme/mme.yaml", "mmbench": "mmbench/mmbench_en_dev.yaml",
            "mathvista": "mathvista/mathvista_testmini_format.yaml"}


def _function_id(fn):
    return fn.__name__, Path(fn.__code__.co_filename).resolve()


def test_local_tasks_are_lmms_evals_tasks_on_luqs_samples(luq_tasks):
    """Same samples, same prompts, same pixels as luq's runner; lmms-eval's own prompt and image
    functions and prompt settings; luq's generation caps."""
    from lmms_eval import utils
    from lmms_eval.tasks import __file__ as tasks_init

    for task, obj in luq_tasks.items():
        docs, samples = list(obj.test_docs()), load_samples(task)
        assert [d["luq_id"] for d in docs] == [s.id for s in samples], task
        for doc, sample in zip(docs, samples):
            assert obj.doc_to_text(doc) == sample.prompt, task
            (image,) = obj.doc_to_visual(doc)
            assert np.array_equal(np.asarray(image), np.asarray(sample.load_image())), task
        config = obj.config
        assert config.generation_kwargs["max_new_tokens"] == task_spec(task).max_new_tokens
        assert config.generation_kwargs["until"] == [] and not config.generation_kwargs["do_sample"]
        official = utils.load_yaml_config(str(Path(tasks_init).parent / OFFICIAL[task]), mode="full")
        default = official["lmms_eval_specific_kwargs"]["default"]
        assert {key: obj.lmms_eval_specific_kwargs.get(key) for key in default} == default, task
        assert _function_id(config.doc_to_text) == _function_id(official["doc_to_text"]), task
        assert _function_id(config.doc_to_visual) == _function_id(official["doc_to_visual"]), task


# --------------------------------------------------------------------------- scorers


def _lmms_scores(obj, task: str, docs: list[dict], predictions: list[str]) -> list[float]:
    """lmms-eval's per-question scores (MMBench: per question over its rotations, each row
    carrying the question's score), through the task's own process_results and aggregation."""
    from luq.eval.lmms_tasks.parity import lmms_sample_score
    from luq.eval.lmms_tasks.utils import mmbench_aggregate_results

    results = [obj.process_results(copy.deepcopy(d), [p]) for d, p in zip(docs, predictions)]
    if task != "mmbench":
        return [lmms_sample_score(task, r) for r in results]
    by_question: dict[int, list[dict]] = {}
    for r in results:
        by_question.setdefault(r["circular_accuracy"]["index"] % 1_000_000, []).append(r["circular_accuracy"])
    score = {q: mmbench_aggregate_results(records) / 100 for q, records in by_question.items()}
    return [score[r["circular_accuracy"]["index"] % 1_000_000] for r in results]


def _luq_scores(task: str, samples, predictions: list[str]) -> list[float]:
    scores, per = score_predictions(task, samples, predictions)
    if task != "mmbench":
        return per
    groups: dict[str, bool] = {}
    for s, v in zip(samples, per):
        groups[s.fields["group"]] = groups.get(s.fields["group"], True) and v == 1.0
    return [float(groups[s.fields["group"]]) for s in samples]


def _variants(sample) -> list[str]:
    """Answers a model might give to one sample: each reference as is and reworded."""
    out = []
    refs = sample.answers
    if sample.task == "mmbench":
        refs = [sample.answers[0], sample.fields["options"][sample.answers[0]]]
    elif sample.fields.get("choices"):
        refs = list(sample.answers) + ["A", "B"]
    for ref in dict.fromkeys(refs):
        out += [ref, ref.upper(), f"{ref}.", f"the {ref}", f" {ref.lower()} ", "two", "wrong"]
    return out


def test_scorers_agree_except_where_the_difference_is_named(luq_tasks):
    """Over every sample and a spread of answers (each reference, upper case, a trailing period,
    an article, ...), lmms-eval's scorer and luq's give the same score on exactly the tasks
    without a named difference."""
    differing = set()
    for task, obj in luq_tasks.items():
        docs, samples = list(obj.test_docs()), load_samples(task)
        n_variants = len(_variants(samples[0]))
        for k in range(n_variants):
            predictions = [(_variants(s) + ["wrong"] * n_variants)[k] for s in samples]
            # approx: lmms-eval averages with statistics.mean (exact), luq with sum / n (last-bit rounding)
            if _lmms_scores(obj, task, docs, predictions) != pytest.approx(_luq_scores(task, samples, predictions)):
                differing.add(task)
    assert differing <= set(SCORER_DIFFERENCES)
    for task in ("textvqa", "vqav2", "chartqa"):
        assert task not in SCORER_DIFFERENCES  # the same scorer on these (shown above on every variant)


def _score_both(luq_tasks, task: str, index: int, prediction: str) -> tuple[float, float]:
    obj = luq_tasks[task]
    doc, sample = list(obj.test_docs())[index], load_samples(task)[index]
    return _lmms_scores(obj, task, [doc], [prediction])[0], _luq_scores(task, [sample], [prediction])[0]


def test_each_named_scorer_difference_on_an_answer(luq_tasks):
    # GQA "saucer": lmms-eval deletes all punctuation, luq only a trailing period
    assert _score_both(luq_tasks, "gqa", 0, "saucer!") == (1.0, 0.0)
    # DocVQA "All Staff": raw vs normalised lengths in the normalised edit distance
    lmms, ours = _score_both(luq_tasks, "docvqa", 3, "Al   Staff")
    assert lmms == pytest.approx(1 - 1 / 10) and ours == pytest.approx(1 - 1 / 9)
    # POPE "yes": lmms-eval wants exactly yes/no, luq reads POPE's rule
    assert _score_both(luq_tasks, "pope", 0, "Yes, there is.") == (0.0, 1.0)
    # MME "Yes": lmms-eval reads a lone "y" as yes
    assert _score_both(luq_tasks, "mme", 0, "y") == (1.0, 0.0)
    # MathVista 5: without the judge lmms-eval needs a bare number
    assert _score_both(luq_tasks, "mathvista", 0, "The answer is 5") == (0.0, 1.0)
    # POPE yes_ratio: lmms-eval's is the share of yes labels, luq's the share of yes answers
    from lmms_eval.tasks.pope.utils import pope_aggregate_yes_ratio

    obj, samples = luq_tasks["pope"], load_samples("pope")
    records = [obj.process_results(d, ["no"])["pope_yes_ratio"] for d in obj.test_docs()]
    assert pope_aggregate_yes_ratio(records) == 0.5 and score_predictions("pope", samples, ["no"] * 8)[0]["yes_ratio"] == 0
    # MMBench (cat, option B): "A cat" is read as the letter A by lmms-eval, as the option text by luq
    obj, samples = luq_tasks["mmbench"], load_samples("mmbench", limit=1)
    docs = list(obj.test_docs())[:len(samples)]
    lmms = _lmms_scores(obj, "mmbench", docs, ["A cat"] * len(samples))
    assert set(lmms) == {0.0} and set(_luq_scores("mmbench", samples, ["A cat"] * len(samples))) == {1.0}


# --------------------------------------------------------------------------- end to end


def _compare_with_runner(model, processor, task: str, lmms_records: list[dict], limit: int | None) -> None:
    """Every lmms-eval answer equals the runner's; every per-sample score too, except on answers
    where the task's named scorer difference shows."""
    from luq.eval.lmms_tasks.parity import lmms_answer, lmms_sample_score

    ours = evaluate(model, processor, EvalConfig(task=task, limit=limit, batch_size=4)).samples
    records = sorted(lmms_records, key=lambda r: r["doc_id"])
    assert [lmms_answer(r) for r in records] == [s["prediction"] for s in ours], task
    for record, sample in zip(records, ours):
        theirs = lmms_sample_score(task, record)
        if theirs is not None and theirs != pytest.approx(sample["score"]):
            assert task in SCORER_DIFFERENCES, (task, sample["prediction"], theirs, sample["score"])


@pytest.mark.slow
def test_lmms_eval_runs_the_real_tiny_vlm_like_luqs_runner(lmms_eval):
    """lmms-eval's evaluator, in process, on the real dense tiny-vlm: four tasks, first 4 samples."""
    from lmms_eval.tasks import TaskManager

    torch.set_num_threads(2)
    tasks, limit = ("gqa", "pope", "mme", "chartqa"), 4
    manager = TaskManager("WARNING", include_path=str(TASKS_DIR), include_defaults=False, model_name="luq")
    result = lmms_eval.simple_evaluate(model="luq", model_args="path=tiny-vlm", tasks=[lmms_task(t) for t in tasks],
                                       batch_size=4, limit=limit, task_manager=manager, log_samples=True,
                                       verbosity="WARNING")
    model, processor, _ = load_for_eval("tiny-vlm", "cpu", torch.float32)
    for task in tasks:
        _compare_with_runner(model, processor, task, result["samples"][lmms_task(task)], limit)
    pope = result["results"][lmms_task("pope")]
    assert 0 <= pope["pope_accuracy,none"] <= 1 and result["results"][lmms_task("mme")]["mme_perception_score,none"] >= 0


@pytest.mark.slow
def test_lmms_eval_command_on_a_quantized_artifact_offline(lmms_eval, tmp_path):
    """``lmms-eval --model luq --model_args path=DIR`` (the console script, hub access switched
    off) on a luq artifact of the tiny LLaVA, three tasks, answers compared with the runner's."""
    import luq
    from luq.calibration import CalibrationConfig

    config = luq.LUQConfig(calibration=CalibrationConfig(samples=4, seq_len=64), n_low_layers=1, validation_samples=2,
                           allocate="entropy")
    luq.quantize(str(tiny_llava_dir()), tmp_path / "q", config, cache_dir=tmp_path / "cache", progress=False,
                 log=lambda line: None)
    tasks, limit = ("textvqa", "docvqa", "mathvista"), 3
    command = [str(Path(sys.executable).with_name("lmms-eval")), "--model", "luq", "--model_args",
               f"path={tmp_path / 'q'}", "--include_path", str(TASKS_DIR), "--tasks",
               ",".join(lmms_task(t) for t in tasks), "--batch_size", "4", "--limit", str(limit),
               "--log_samples", "--output_path", str(tmp_path / "out"), "--verbosity", "WARNING"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "luq_textvqa" in done.stdout and "exact_match" in done.stdout  # lmms-eval's results table
    model, processor, _ = luq.load(tmp_path / "q", dtype=torch.float32)
    for task in tasks:
        (log,) = (tmp_path / "out").rglob(f"*_samples_{lmms_task(task)}.jsonl")
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        assert len(records) == limit
        _compare_with_runner(model, processor, task, records, limit)
