"""The runner, perplexity and `luq eval` (run_eval) on a tiny real-processor LLaVA and SmolLM2."""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from luq.errors import LuqError
from luq.eval.command import add_eval_arguments, run_eval
from luq.eval.datasets import TASKS, load_samples
from luq.eval.perplexity import PerplexityConfig, evaluate_perplexity, windows
from luq.eval.runner import EvalConfig, chat_text, evaluate, load_for_eval, score_predictions
from test_eval_support import tiny_llava_dir


@pytest.fixture(scope="module")
def tiny_dir():
    torch.set_num_threads(1)
    return tiny_llava_dir()


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, processor, adapter = load_for_eval(str(tiny_dir), "cpu", torch.float32)
    return model, processor


def eval_args(*argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


# --------------------------------------------------------------------------- scoring


def _perfect(sample):
    if sample.task == "mathvista" and sample.fields["question_type"] == "multi_choice":
        return f"({'ABCDEFG'[sample.fields['choices'].index(sample.answers[0])]})"
    return sample.answers[0]


@pytest.mark.parametrize("task", list(TASKS))
def test_right_answers_score_full_marks_and_wrong_ones_nothing(task):
    samples = load_samples(task)
    scores, per_sample = score_predictions(task, samples, [_perfect(s) for s in samples])
    best = {"mme": 1200.0}.get(task, 1.0)  # six perception subtasks x (100 acc + 100 acc+)
    assert scores[TASKS[task].headline] == pytest.approx(best)
    assert all(v == pytest.approx(1.0) for v in per_sample)
    if task == "mme":
        assert scores["cognition"] == 200.0 and scores["total"] == 1400.0
    wrong = score_predictions(task, samples, ["zzz qqq"] * len(samples))[0]
    if task == "pope":  # "zzz" counts as yes: every "no" question is wrong
        assert wrong["accuracy"] == 0.5 and wrong["yes_ratio"] == 1.0
    elif task == "mme":  # unparseable answers are always wrong
        assert wrong["perception"] == wrong["cognition"] == 0.0
    elif task != "mathvista":  # MathVista falls back to the closest choice
        assert wrong[TASKS[task].headline] == 0.0


def test_mme_acc_plus_needs_both_questions_of_an_image():
    samples = load_samples("mme")[:4]  # astronaut yes/no, coins yes/no
    scores, _ = score_predictions("mme", samples, ["Yes", "Yes", "Yes", "No"])
    assert scores["existence"] == 50.0 and scores["count"] == 200.0


def test_mmbench_circular_needs_every_rotation():
    samples = load_samples("mmbench", limit=1)  # the cat, four rotations: B, A, D, C
    assert score_predictions("mmbench", samples, ["B", "A", "D", "C"])[0]["circular_accuracy"] == 1.0
    scores = score_predictions("mmbench", samples, ["B", "A", "D", "A"])[0]
    assert scores["circular_accuracy"] == 0.0 and scores["single_pass_accuracy"] == 1.0


# --------------------------------------------------------------------------- generation


def test_chat_template_places_the_image_first(tiny):
    _, processor = tiny
    assert chat_text(processor, "What is it?") == "USER: <image>\nWhat is it? ASSISTANT:"


def test_every_task_runs_on_the_tiny_llava(tiny):
    model, processor = tiny
    for task in TASKS:
        result = evaluate(model, processor, EvalConfig(task=task, batch_size=4, max_new_tokens=3))
        assert len(result.samples) == len(load_samples(task))
        assert all(isinstance(r["prediction"], str) for r in result.samples)
        assert 0.0 <= result.score <= (1400.0 if task == "mme" else 1.0)


def test_batching_does_not_change_answers(tiny):
    model, processor = tiny
    samples = load_samples("vqav2")
    one = evaluate(model, processor, EvalConfig(task="vqav2", batch_size=1, max_new_tokens=4), samples=samples)
    four = evaluate(model, processor, EvalConfig(task="vqav2", batch_size=4, max_new_tokens=4), samples=samples)
    assert [r["prediction"] for r in one.samples] == [r["prediction"] for r in four.samples]


def test_run_eval_writes_scores_and_per_sample_outputs(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pope.json"
    assert run_eval(eval_args(tiny_dir, "--task", "pope", "--limit", "5", "--max-new-tokens", "3",
                              "--batch-size", "2", "--out", out)) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "pope" and result["n_samples"] == 5 and result["headline"] == "f1"
    assert set(result["scores"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    first = result["samples"][0]
    assert first["prompt"].endswith("Answer the question using a single word or phrase.")
    assert {"id", "image", "question", "answers", "prediction", "score"} <= set(first)
    printed = capsys.readouterr().out
    assert "f1" in printed and "<- headline" in printed and str(out) in printed


def test_run_eval_bad_input_fails_before_loading(tmp_path):
    with pytest.raises(LuqError, match="unknown task 'vqa'"):
        run_eval(eval_args("/no/such/model", "--task", "vqa"))
    with pytest.raises(LuqError, match="data not found"):
        run_eval(eval_args("/no/such/model", "--task", "gqa", "--data", tmp_path / "missing"))


def test_text_only_model_is_told_to_use_perplexity():
    with pytest.raises(LuqError, match="--task perplexity"):
        run_eval(eval_args("smollm2", "--task", "gqa", "--limit", "1"))


def test_a_quantized_directory_opens_with_luq_load(tmp_path, monkeypatch, tiny):
    import luq.artifact   # luq.load's home

    calls = []

    def fake_load(path, device, dtype, log=None):
        calls.append((str(path), str(device), dtype))
        return (*tiny, None)

    monkeypatch.setattr(luq.artifact, "load", fake_load)
    (tmp_path / "luq_report.json").write_text("{}")
    run_eval(eval_args(tmp_path, "--task", "gqa", "--limit", "1", "--max-new-tokens", "2",
                       "--out", tmp_path / "gqa.json"))
    assert calls == [(str(tmp_path), "cpu", torch.float32)]


def test_luq_eval_on_a_real_quantized_artifact(tiny_dir, tmp_path):
    import luq
    from luq.calibration import CalibrationConfig

    config = luq.LUQConfig(calibration=CalibrationConfig(samples=4, seq_len=64), n_low_layers=1, validation_samples=2,
                           allocate="entropy")
    luq.quantize(str(tiny_dir), tmp_path / "q", config, cache_dir=tmp_path / "cache", progress=False,
                 log=lambda line: None)
    out = tmp_path / "pope.json"
    run_eval(eval_args(tmp_path / "q", "--task", "pope", "--limit", "2", "--max-new-tokens", "2", "--out", out))
    assert json.loads(out.read_text())["n_samples"] == 2


# --------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("n_tokens, seq_len, stride", [(10, 4, 4), (10, 4, 2), (11, 5, 3), (5, 8, 8), (9, 3, 1)])
def test_windows_score_each_token_once(n_tokens, seq_len, stride):
    chosen = windows(n_tokens, seq_len, stride)
    scored = [t for w in chosen for t in range(w.first_target, w.end)]
    if stride < seq_len:  # every token after the first, with context
        assert scored == list(range(1, n_tokens))
    else:  # disjoint windows: each window's first token is context only
        assert scored == [t for t in range(n_tokens) if t % seq_len]
    assert all(w.end - w.begin <= seq_len and w.first_target > w.begin for w in chosen)


def test_perplexity_matches_a_direct_computation(tiny):
    model, processor = tiny
    text = "The quick brown fox jumps over the lazy dog. " * 12
    ids = torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    seq_len = 32
    with torch.no_grad():
        nll, count = 0.0, 0
        for begin in range(0, len(ids) - 1, seq_len):
            window = ids[begin:begin + seq_len]
            if len(window) < 2:
                continue
            logits = model(input_ids=window[None]).logits[0]
            nll += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
            count += len(window) - 1
    result = evaluate_perplexity(model, processor, PerplexityConfig(seq_len=seq_len, batch_size=2), text=text)
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    overlapping = evaluate_perplexity(model, processor, PerplexityConfig(seq_len=seq_len, stride=8), text=text)
    assert overlapping["tokens"] == len(ids) - 1


def test_perplexity_of_smollm2_on_wikipedia(tmp_path):
    out = tmp_path / "ppl.json"
    corpus = tmp_path / "corpus.txt"
    from luq.zoo.smollm2 import wikipedia_text

    corpus.write_text(wikipedia_text(max_chars=6000))
    run_eval(eval_args("smollm2", "--task", "perplexity", "--data", corpus, "--seq-len", "256", "--limit", "2",
                       "--out", out))
    result = json.loads(out.read_text())
    assert result["windows"] == 2 and result["tokens"] == 2 * 255
    assert 5 < result["perplexity"] < 60  # real English prose under a real 135M LM


def test_perplexity_bad_settings():
    with pytest.raises(LuqError, match="--stride"):
        PerplexityConfig(seq_len=16, stride=32)
    with pytest.raises(LuqError, match="--seq-len"):
        PerplexityConfig(seq_len=1)
