"""Benchmark scorers in luq.eval.metrics against hand-computed values."""

import math

import pytest

from luq.eval.metrics import (
    anls,
    extract_choice,
    gqa_accuracy,
    levenshtein,
    mathvista_accuracy,
    mathvista_extract,
    mme_scores,
    mmbench_circular_accuracy,
    normalize_vqa_answer,
    perplexity,
    pope_metrics,
    relaxed_accuracy,
    vqa_accuracy,
)

# --------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("two", "2"),
        ("None", "0"),
        ("ten", "10"),
        ("the dog", "dog"),
        ("A dog", "dog"),
        ("an apple", "apple"),
        ("Dog.", "dog"),
        ("dont", "don't"),
        ("don't", "don't"),
        ("isnt", "isn't"),
        ("couldnt've", "couldn't've"),
        ("couldntve", "couldn't've"),
        ("Yes!", "yes"),
        ("  Red\tand\nwhite ", "red and white"),
        ("red-white", "red white"),  # mark touching no space -> space
        ("yes, it is", "yes it is"),  # mark touching a space -> deleted
        ("3.5", "3.5"),  # period before a digit kept
        ("1,000", "1000"),  # digit,digit: all marks deleted
        ("well", "well"),  # real words are not "contractions"
        ("shed", "shed"),
        ("lets", "lets"),
        ("it's", "it's"),
        ("", ""),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_corner_case_matches():
    assert vqa_accuracy("two", ["2"]) == 1.0
    assert vqa_accuracy("the dog", ["dog"]) == 1.0
    assert vqa_accuracy("Dog.", ["dog"]) == 1.0
    assert vqa_accuracy("dont", ["don't"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    assert vqa_accuracy("dog", []) == 0.0


def _ten(n_match, match="dog", other="cat"):
    return [match] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize(
    "n_match, expected",
    [
        (0, 0.0),
        (1, 9 * (1 / 3) / 10),  # 9 subsets keep the match, 1 drops it
        (2, (8 * 2 / 3 + 2 * 1 / 3) / 10),  # = 0.6
        (3, (7 * 1 + 3 * 2 / 3) / 10),  # = 0.9
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_leave_one_out(n_match, expected):
    assert vqa_accuracy("dog", _ten(n_match)) == pytest.approx(expected)


def test_vqa_hand_values():
    assert vqa_accuracy("dog", _ten(2)) == pytest.approx(0.6)
    assert vqa_accuracy("dog", _ten(3)) == pytest.approx(0.9)
    # answers normalized too: "Two" / "2" / "two." are the same answer
    assert vqa_accuracy("2", ["Two", "2", "two."] + ["3"] * 7) == pytest.approx(0.9)
    # fewer than 10 answers: leave-one-out over the 4 given
    assert vqa_accuracy("dog", ["dog", "dog", "cat", "cat"]) == pytest.approx(
        (2 * 1 / 3 + 2 * 2 / 3) / 4
    )


# --------------------------------------------------------------------------- ANLS


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


def test_anls():
    assert anls("Hello World", ["hello world "]) == 1.0
    assert anls("hello  world", ["hello world"]) == 1.0  # inner whitespace collapsed
    # 1 edit over 5 chars: NL = 0.2 -> 0.8
    assert anls("hallo", ["hello"]) == pytest.approx(0.8)
    # best answer wins
    assert anls("hallo", ["xyz", "hello"]) == pytest.approx(0.8)
    # NL = 3/5 = 0.6 >= 0.5 -> 0
    assert anls("abcde", ["abxyz"]) == 0.0
    # NL exactly 0.5 -> 0 (NL >= threshold scores 0)
    assert anls("ab", ["ax"]) == 0.0
    # NL = 2/5 = 0.4 -> 0.6
    assert anls("abcxy", ["abcde"]) == pytest.approx(0.6)
    assert anls("", [""]) == 1.0
    assert anls("x", []) == 0.0


# --------------------------------------------------------------------------- ChartQA


def test_relaxed_accuracy_numbers():
    assert relaxed_accuracy("12.4", "12") == 1.0  # 3.3 % off
    assert relaxed_accuracy("12.7", "12") == 0.0  # 5.8 % off
    assert relaxed_accuracy("105", "100") == 1.0  # exactly 5 %: inclusive
    assert relaxed_accuracy("95", "100") == 1.0
    assert relaxed_accuracy("105.01", "100") == 0.0
    assert relaxed_accuracy("94.99", "100") == 0.0
    assert relaxed_accuracy("-10.4", "-10") == 1.0
    assert relaxed_accuracy("10", "-10") == 0.0


def test_relaxed_accuracy_percent_and_text():
    assert relaxed_accuracy("45%", "0.45") == 1.0  # trailing % divides by 100
    assert relaxed_accuracy("45%", "45%") == 1.0
    assert relaxed_accuracy("46%", "45%") == 1.0  # 2.2 % relative
    assert relaxed_accuracy("45%", "45") == 0.0
    assert relaxed_accuracy(" Yes ", "yes") == 1.0
    assert relaxed_accuracy("Germany", "France") == 0.0
    # target 0: no relative tolerance, string exact match
    assert relaxed_accuracy("0", "0") == 1.0
    assert relaxed_accuracy("0.0", "0") == 0.0
    assert relaxed_accuracy("0.001", "0") == 0.0
    # no thousands-separator parsing in the official rule
    assert relaxed_accuracy("1,000", "1000") == 0.0


# --------------------------------------------------------------------------- GQA


def test_gqa_accuracy():
    assert gqa_accuracy("Yes.", "yes") == 1.0
    assert gqa_accuracy(" Left ", "left") == 1.0
    assert gqa_accuracy("the left", "left") == 0.0


# --------------------------------------------------------------------------- POPE


def test_pope_metrics():
    preds = [
        "Yes, there is a dog in the image.",  # yes  / gold yes -> TP
        "No, there is no dog.",  # no   / gold yes -> FN
        "There is not a cat.",  # no   / gold no  -> TN
        "Yes. No other animals.",  # first sentence only -> yes / gold no -> FP
        "yes",  # yes  / gold yes -> TP
        "NO",  # not one of No/not/no -> yes / gold no -> FP
    ]
    labels = ["yes", "yes", "no", "no", "yes", "no"]
    m = pope_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["yes_ratio"] == pytest.approx(4 / 6)


def test_pope_zero_division():
    m = pope_metrics(["No.", "no"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["yes_ratio"] == 0.0 and m["accuracy"] == 0.5
    with pytest.raises(ValueError):
        pope_metrics(["yes"], [])


# --------------------------------------------------------------------------- MME


def _mme(cat, img, pred, answer):
    return {"category": cat, "question_id": img, "pred": pred, "answer": answer}


def test_mme_scores():
    records = [
        # existence: image 1 both right, image 2 one right -> acc 75, acc+ 50
        _mme("existence", "e1.jpg", "Yes", "Yes"),
        _mme("existence", "e1.jpg", "No, there is not.", "No"),
        _mme("existence", "e2.jpg", "Yes", "Yes"),
        _mme("existence", "e2.jpg", "Yes", "No"),
        # OCR: one image, both right -> 100 + 100
        _mme("OCR", "o1.jpg", "yes.", "Yes"),
        _mme("OCR", "o1.jpg", "no", "No"),
        # code_reasoning: unparsable answer is wrong -> acc 50, acc+ 0
        _mme("code_reasoning", "c1.png", "Maybe", "Yes"),
        _mme("code_reasoning", "c1.png", "No", "No"),
        # not an MME subtask: listed but not summed
        _mme("extra", "x.jpg", "Yes", "Yes"),
        _mme("extra", "x.jpg", "Yes", "Yes"),
    ]
    out = mme_scores(records)
    ex = out["subtasks"]["existence"]
    assert ex["acc"] == pytest.approx(75.0)
    assert ex["acc_plus"] == pytest.approx(50.0)
    assert ex["score"] == pytest.approx(125.0)
    assert out["subtasks"]["OCR"]["score"] == pytest.approx(200.0)
    cr = out["subtasks"]["code_reasoning"]
    assert (cr["acc"], cr["acc_plus"]) == (pytest.approx(50.0), 0.0)
    assert out["perception"] == pytest.approx(325.0)
    assert out["cognition"] == pytest.approx(50.0)
    assert out["subtasks"]["extra"]["score"] == pytest.approx(200.0)


def test_mme_image_key_and_parse():
    # "image" identifies the image when there is no question_id
    recs = [
        {"category": "color", "image": "a.jpg", "pred": " Yes, it is red", "answer": "Yes"},
        {"category": "color", "image": "a.jpg", "pred": "none", "answer": "No"},  # "no" in first 4
    ]
    out = mme_scores(recs)
    assert out["subtasks"]["color"]["score"] == pytest.approx(200.0)


# --------------------------------------------------------------------------- MMBench

OPTS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize(
    "pred, expected",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("B) dog", "B"),
        ("Answer: B", "B"),
        ("The answer is (C).", "C"),
        ("The correct option is D", "D"),
        ("Option (A) is wrong; the answer is C", "C"),  # last statement wins
        ("dog", "B"),
        ("Fish.", "D"),
        ("It is a bird sitting on a branch.", "C"),
        ("A dog is shown.", "B"),  # article "A" is not a letter
        ("A", "A"),
        ("I think it is B", "B"),
        ("cat or dog", None),  # two options' texts: ambiguous
        ("no idea", None),
        ("", None),
    ],
)
def test_extract_choice(pred, expected):
    assert extract_choice(pred, OPTS) == expected


def _rotations(index, preds, base=("cat", "dog", "bird", "fish"), correct="dog"):
    recs = []
    for r, pred in enumerate(preds):
        texts = list(base[r:]) + list(base[:r])
        options = dict(zip("ABCD", texts))
        answer = "ABCD"[texts.index(correct)]
        recs.append({"index": index, "circular_index": r, "pred": pred,
                     "options": options, "answer": answer})
    return recs


def test_mmbench_circular():
    # q1: correct in every rotation (letters move with the rotation)
    q1 = _rotations(1, ["B", "A", "D", "C"])
    # q2: one rotation wrong -> whole question wrong
    q2 = _rotations(2, ["B", "A", "D", "A"])
    # q3: answered with option text each time
    q3 = _rotations(3, ["dog"] * 4)
    assert mmbench_circular_accuracy(q1) == 1.0
    assert mmbench_circular_accuracy(q2) == 0.0
    assert mmbench_circular_accuracy(q1 + q2 + q3) == pytest.approx(2 / 3)
    assert mmbench_circular_accuracy([]) == 0.0


# --------------------------------------------------------------------------- MathVista

CH = ["3/11", "8/11", "6/11", "3/5"]


@pytest.mark.parametrize(
    "pred, expected",
    [
        ("8/11", "8/11"),
        ("(B)", "8/11"),
        ("B", "8/11"),
        ("The correct answer is (C) 6/11.", "6/11"),
        ("Answer: D", "3/5"),
        ("The blue part is 6/11 of the shape.", "6/11"),
        ("8/12", "8/11"),  # nearest choice by edit distance
    ],
)
def test_mathvista_extract_multi_choice(pred, expected):
    assert mathvista_extract(pred, "multi_choice", "text", CH, None) == expected


def test_mathvista_extract_free_form():
    ex = mathvista_extract
    assert ex("There are 3 cars and 5 bikes, so 8.", "free_form", "integer", None, None) == "8"
    assert ex("The total is 1,250 apples", "free_form", "integer", None, None) == "1250"
    assert mathvista_extract("x = -4", "free_form", "integer", None, None) == "-4"
    assert mathvista_extract("No number here", "free_form", "integer", None, None) == ""
    assert mathvista_extract("The value is about 3.14159.", "free_form", "float", None, 2) == "3.14"
    assert mathvista_extract("It is 1.5, not 2.456", "free_form", "float", None, 1.0) == "2.5"
    years = ex("So the years are [2007, 2008].", "free_form", "list", None, None)
    assert years == "[2007, 2008]"


def test_mathvista_accuracy():
    assert mathvista_accuracy("The answer is (B).", "8/11", "multi_choice", "text", CH, None) == 1.0
    assert mathvista_accuracy("The answer is (A).", "8/11", "multi_choice", "text", CH, None) == 0.0
    assert mathvista_accuracy("so 12 people", "12", "free_form", "integer") == 1.0
    assert mathvista_accuracy("so 13 people", "12", "free_form", "integer") == 0.0
    assert mathvista_accuracy("roughly 1.449", "1.45", "free_form", "float", None, 2) == 1.0
    assert mathvista_accuracy("roughly 1.46", "1.45", "free_form", "float", None, 2) == 0.0
    assert mathvista_accuracy("[1, 2,3]", "[1, 2, 3]", "free_form", "list") == 1.0


# --------------------------------------------------------------------------- perplexity


def test_perplexity():
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
