"""The nine benchmarks: bundled samples, the local layout, hub field mapping, prompts, bad input."""

import json
import shutil

import pytest

from luq.errors import LuqError
from luq.eval import datasets as ds
from luq.eval.datasets import TASKS, load_samples, read_hub

SHORT = "\nAnswer the question using a single word or phrase."
EXPECTED_QUESTIONS = {"mme": 14, "mmbench": 6, "textvqa": 5, "vqav2": 6, "gqa": 6, "pope": 8, "chartqa": 6,
                      "docvqa": 6, "mathvista": 6}


@pytest.mark.parametrize("task", list(TASKS))
def test_bundled_sample_loads(task):
    samples = load_samples(task)
    groups = {s.fields.get("group", s.id) for s in samples}
    assert len(groups) == EXPECTED_QUESTIONS[task]
    for s in samples:
        assert s.image.is_file() and s.answers and s.prompt
        img = s.load_image()
        assert img.mode == "RGB" and max(img.size) <= 336
    if task in ("vqav2", "textvqa"):
        assert all(len(s.answers) == 10 for s in samples)


def test_prompts_follow_lmms_eval_defaults():
    mme = load_samples("mme")[0]
    assert mme.question.endswith(" Please answer yes or no.")
    assert mme.prompt == "Is there a flag in this image?" + SHORT
    assert load_samples("textvqa")[0].prompt == "What is the title of the page?" + SHORT  # capitalized
    assert load_samples("chartqa")[0].prompt.endswith("\nAnswer the question with a single word.")
    for task in ("vqav2", "gqa", "pope", "docvqa"):
        sample = load_samples(task)[0]
        assert sample.prompt == sample.question + SHORT
    flower = [s for s in load_samples("mmbench") if s.id == "6"][0]
    assert flower.prompt == ("The photo was taken in a garden. What is in the center of the image? "
                             "There are several options:\nA. A flower\nB. A bird\nC. A car\n\n"
                             "Answer with the option's letter from the given choices directly.")
    slope, shape = load_samples("mathvista")[2], load_samples("mathvista")[4]
    assert slope.prompt == ("What is the slope of the line?\nAnswer the question using a single floating-point "
                            "number with one decimal place.")
    assert shape.prompt.splitlines()[1:] == ["A. circle", "B. square", "C. triangle", "D. star",
                                             "Answer with the option's letter from the given choices directly."]


def test_mmbench_expands_rotations_and_moves_the_answer():
    cat = [s for s in load_samples("mmbench") if s.fields["group"] == "1"]
    assert [s.fields["circular_index"] for s in cat] == [0, 1, 2, 3]
    for s in cat:
        assert s.fields["options"][s.answers[0]] == "Cat"
    assert [s.answers[0] for s in cat] == ["B", "A", "D", "C"]
    limited = load_samples("mmbench", limit=2)
    assert {s.fields["group"] for s in limited} == {"1", "2"} and len(limited) == 8


def test_limit_counts_questions():
    assert len(load_samples("pope", limit=3)) == 3
    with pytest.raises(LuqError, match="--limit"):
        load_samples("pope", limit=0)


def _copy_task(tmp_path, task="pope"):
    target = tmp_path / task
    shutil.copytree(ds.bundled_dir(task), target)
    (tmp_path / "images").symlink_to(ds.bundled_dir(task).parent / "images")
    return target


def test_local_directory_and_relative_images(tmp_path):
    target = _copy_task(tmp_path)
    assert [s.id for s in load_samples("pope", target)] == [str(i) for i in range(1, 9)]
    assert len(load_samples("pope", target / "samples.jsonl")) == 8


def test_missing_image_is_one_line_with_its_line_number(tmp_path):
    target = _copy_task(tmp_path)
    lines = (target / "samples.jsonl").read_text().splitlines()
    record = json.loads(lines[2])
    record["image"] = "../images/nowhere.jpg"
    lines[2] = json.dumps(record)
    (target / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(LuqError) as err:
        load_samples("pope", target)
    message = str(err.value)
    assert "samples.jsonl:3" in message and "image not found" in message and "nowhere.jpg" in message
    assert "\n" not in message


def test_malformed_jsonl_line_names_its_line(tmp_path):
    target = _copy_task(tmp_path)
    with (target / "samples.jsonl").open("a") as f:
        f.write("\n")  # a blank line is skipped, but counted
        f.write('{"id": 99, "image": "../images/coffee.jpg", "question": "Is there a cup?" "answer": "yes"}\n')
    with pytest.raises(LuqError) as err:
        load_samples("pope", target)
    assert "samples.jsonl:10: malformed JSON" in str(err.value) and "\n" not in str(err.value)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(LuqError) as err:
        load_samples("mmmu")
    message = str(err.value)
    assert "unknown task 'mmmu'" in message
    assert all(name in message for name in list(TASKS) + ["perplexity"])


@pytest.mark.parametrize("line, expected", [
    ('{"id": 1, "image": "../images/coffee.jpg", "question": "Cup?"}', "missing 'answer'"),
    ('{"id": 1, "image": "../images/coffee.jpg", "answer": "yes"}', "missing 'question'"),
    ('{"id": 1, "question": "Cup?", "answer": "yes"}', "missing 'image'"),
    ('{"id": 1, "image": "../images/coffee.jpg", "question": "Cup?", "answer": "maybe"}', "yes or no"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_records(tmp_path, line, expected):
    target = _copy_task(tmp_path)
    (target / "samples.jsonl").write_text(line + "\n")
    with pytest.raises(LuqError, match=expected):
        load_samples("pope", target)


def test_missing_data_and_hub_failure_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(LuqError, match="data not found"):
        load_samples("gqa", "./no/such/dir")
    with pytest.raises(LuqError, match="no samples.jsonl"):
        load_samples("gqa", tmp_path)

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LuqError) as err:
        load_samples("textvqa", "hub")
    assert "lmms-lab/textvqa" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- hub rows -> samples


def _fake_hub(monkeypatch, tables):
    """datasets.load_dataset answering from in-memory tables keyed by (path, config)."""
    import datasets

    def load_dataset(path, name=None, split=None):
        return datasets.Dataset.from_list(tables[(path, name)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_hub_rows_map_onto_samples(monkeypatch):
    from PIL import Image

    red = Image.new("RGB", (8, 8), "red")
    tables = {
        ("lmms-lab/MME", None): [
            {"question_id": "code/0001.png", "image": red, "question": "Is it red? Please answer yes or no.",
             "answer": "Yes", "category": "color"}],
        ("lmms-lab/MMBench", "en"): [
            {"index": 7, "question": "Q?", "hint": None, "A": "x", "B": "y", "C": None, "D": None, "answer": "B",
             "category": "c", "image": red},
            {"index": 1_000_007, "question": "Q?", "hint": None, "A": "y", "B": "x", "C": None, "D": None,
             "answer": "A", "category": "c", "image": red}],
        ("lmms-lab/VQAv2", None): [
            {"question_id": 5, "question": "What?", "image": red,
             "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": i} for i in range(10)]}],
        ("lmms-lab/GQA", "testdev_balanced_instructions"): [
            {"id": "g1", "imageId": "n1", "question": "Color?", "answer": "red"}],
        ("lmms-lab/GQA", "testdev_balanced_images"): [{"id": "n0", "image": red}, {"id": "n1", "image": red}],
        ("lmms-lab/DocVQA", "DocVQA"): [
            {"questionId": "9", "question": "Title?", "answers": ["A", "a"], "image": red}],
        ("AI4Math/MathVista", None): [
            {"pid": "1", "question": "How many?", "answer": "3", "question_type": "free_form",
             "answer_type": "integer", "choices": None, "precision": None, "unit": "", "decoded_image": red,
             "image": "images/1.jpg"}],
    }
    _fake_hub(monkeypatch, tables)
    mme = read_hub("mme")[0]
    assert mme.fields["image_key"] == "code/0001.png" and mme.prompt == "Is it red?" + SHORT
    rotations = read_hub("mmbench")
    assert [s.fields["group"] for s in rotations] == ["7", "7"]
    assert [s.fields["circular_index"] for s in rotations] == [0, 1]
    assert read_hub("vqav2")[0].answers == ["red"] * 10
    gqa = read_hub("gqa")[0]
    assert gqa.answers == ["red"] and gqa.load_image().size == (8, 8)
    assert read_hub("docvqa")[0].answers == ["A", "a"]
    assert read_hub("mathvista")[0].prompt == "How many?\nAnswer the question using a single integer number."
    assert len(load_samples("mme", "lmms-lab/MME")) == 1  # any hub id with the same columns
