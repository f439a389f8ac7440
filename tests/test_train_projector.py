"""examples/train_projector.py: its data pieces, and a two-step run end to end."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from luq.zoo import tinyvlm

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_projector.py"


@pytest.fixture(scope="module")
def train_projector():
    spec = importlib.util.spec_from_file_location("train_projector", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_scenes_record_what_they_draw(train_projector):
    scenes = tinyvlm.make_scenes(3, seed=4)
    drawn = train_projector.words_drawn(scenes)
    for scene, row in zip(scenes, drawn):
        expected = {word for thing in scene.objects for word in thing}
        assert {w for w, hit in zip(train_projector.ALIGNED_WORDS, row.tolist()) if hit} == expected
        one_shape = {k: a for k, _, a in scene.questions if k in ("colour", "shape")}
        if one_shape:  # the one-shape scene's answers name what it drew
            assert scene.objects == ((one_shape["shape"], one_shape["colour"]),)
    assert train_projector.describe((("circle", "red"), ("square", "orange"))) == \
        "The image shows a red circle and an orange square."


def test_presence_questions_are_true_of_the_objects():
    rng = np.random.default_rng(0)
    objects = [("circle", "red"), ("square", "blue")]
    answers = []
    for _ in range(200):
        question, answer = tinyvlm.presence_question(rng, objects)
        thing = question.removeprefix("Is there ").removesuffix(" in the image?").removesuffix("?").split(" ", 1)[1]
        present = thing in {"red shape", "blue shape", "circle", "square"}
        assert answer == ("yes" if present else "no"), question
        answers.append(answer)
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_two_steps_end_to_end(train_projector, tmp_path):
    """Every stage runs (alignment, answers, words, evaluation, export, the final scoring) and
    what it saves loads into tiny-vlm; the numbers of so short a run mean nothing."""
    train_projector.main(["--out", str(tmp_path), "--steps", "2", "--alignment-steps", "3",
                          "--train-per-kind", "3", "--heldout-per-kind", "1", "--eval-per-kind", "1",
                          "--batch-size", "2", "--log-every", "1", "--eval-every", "2", "--threads", "1"])
    events = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] != "generated"][:3] == ["features", "train", "train"]
    for record in (e for e in events if e["event"] == "train"):
        assert all(np.isfinite(record[k]) for k in ("loss", "alignment", "text_presence"))
    accuracy = json.loads((tmp_path / "accuracy.json").read_text())
    assert set(accuracy["accuracy"]) == set(tinyvlm.QUESTION_KINDS)
    with safe_open(str(tmp_path / tinyvlm.WEIGHTS_FILE), framework="pt") as f:
        names = set(f.keys())
    assert "model.multi_modal_projector.linear_1.weight" in names
    assert any(name.endswith(".lora_B") for name in names)
