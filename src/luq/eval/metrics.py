"""Benchmark scorers: plain functions of predictions and references.

Each function follows the rule of its benchmark's official scorer; where the
official scripts disagree with each other (or with the paper) the choice made is
stated in the docstring. Pure Python: standard library only, no model, no files,
no API-based answer extraction.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "levenshtein",
    "normalize_vqa_answer",
    "vqa_accuracy",
    "anls",
    "relaxed_accuracy",
    "gqa_accuracy",
    "pope_metrics",
    "mme_scores",
    "extract_choice",
    "mmbench_circular_accuracy",
    "mathvista_extract",
    "mathvista_accuracy",
    "perplexity",
]


# ---------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Character-level edit distance (insert / delete / substitute, unit costs)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _as_list(answers: str | Iterable[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    return [str(a) for a in answers]


# ---------------------------------------------------------------------------
# VQAv2 / TextVQA
# ---------------------------------------------------------------------------

# Punctuation the official VQA scorer deletes (or turns into a space).  Note that
# "'" (kept for contractions), ":" , "." (handled separately), "*", "%", "&",
# "#", "$" are not in the official list and therefore survive.
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_",
              "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"\d,\d")
# A period not followed by a digit ("dog." -> "dog", "3.5" kept).
_LONE_PERIOD = re.compile(r"\.(?!\d)")

_VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_VQA_ARTICLES = frozenset({"a", "an", "the"})

# Contracted forms; every spelling with some or all apostrophes dropped maps to
# the form listed here ("dont" -> "don't", "couldnt've" / "couldntve" ->
# "couldn't've").  Contractions whose apostrophe-less spelling is an ordinary
# word (she'd/shed, we'd/wed, we'll/well, we're/were, it's/its, let's/lets,
# he'll/hell, she'll/shell, I'll/ill, who're/whore) are left out, as in the
# official table; the official "I..." entries are capitalised keys that never
# match lower-cased text, so they are left out too.
_VQA_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't
hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've
it'll ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock
oughtn't shan't she'd've she's should've shouldn't shouldn't've somebody'd
somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're
there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've
weren't what'd what'll what're what's what've when's where'd where's where've
who'd who'd've who'll who's who've why'd why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're
you've
""".split()
_VQA_REAL_WORDS = frozenset(
    {"its", "ill", "well", "were", "wed", "shed", "hell", "shell", "lets", "id", "whore"}
)


def _build_contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for form in _VQA_CONTRACTED:
        marks = [i for i, ch in enumerate(form) if ch == "'"]
        for r in range(1, len(marks) + 1):
            for dropped in itertools.combinations(marks, r):
                key = "".join(ch for i, ch in enumerate(form) if i not in dropped)
                if key not in _VQA_REAL_WORDS:
                    table.setdefault(key, form)
    return table


_VQA_CONTRACTIONS = _build_contractions()


def _vqa_punctuation(text: str) -> str:
    # Official processPunctuation: each listed mark is deleted when it touches a
    # space somewhere in the (original) answer, or when the answer contains a
    # digit,digit group ("1,000" -> "1000"); otherwise it becomes a space
    # ("red-white" -> "red white").  Then periods not followed by a digit go.
    glue_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        if glue_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _LONE_PERIOD.sub("", out)


def normalize_vqa_answer(text: str) -> str:
    """VQAv2/TextVQA answer normalization (official ``processPunctuation`` then
    ``processDigitArticle``): newline/tab -> space, strip, punctuation rule,
    lowercase, number words none/zero..ten -> digits, drop a/an/the, expand
    apostrophe-less contractions ("dont" -> "don't"), single-space join."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    text = _vqa_punctuation(text)
    words = []
    for word in text.lower().split():
        word = _VQA_NUMBER_WORDS.get(word, word)
        if word in _VQA_ARTICLES:
            continue
        words.append(_VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(pred: str, answers: str | Sequence[str]) -> float:
    """VQAv2/TextVQA accuracy: mean over the leave-one-out subsets of the human
    answers of min(1, #matches/3).  Prediction and every answer are normalized
    with :func:`normalize_vqa_answer`.  With a single answer: exact match.
    Empty answer list -> 0.0."""
    gts = [normalize_vqa_answer(a) for a in _as_list(answers)]
    if not gts:
        return 0.0
    p = normalize_vqa_answer(pred)
    if len(gts) == 1:
        return float(gts[0] == p)
    hits = sum(g == p for g in gts)
    total = 0.0
    for g in gts:
        total += min(1.0, (hits - (g == p)) / 3.0)
    return total / len(gts)


# ---------------------------------------------------------------------------
# DocVQA / InfographicVQA
# ---------------------------------------------------------------------------


def _anls_norm(s: str) -> str:
    return " ".join(str(s).lower().split())


def anls(pred: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA ANLS for one question: max over answers of 1 - NL, where
    NL = Levenshtein / max(len) on lowercased strings with whitespace stripped
    and runs of whitespace collapsed; an answer with NL >= threshold scores 0
    (paper definition).  Empty answer list -> 0.0."""
    p = _anls_norm(pred)
    best = 0.0
    for a in _as_list(answers):
        g = _anls_norm(a)
        length = max(len(g), len(p))
        nl = 0.0 if length == 0 else levenshtein(g, p) / length
        if nl < threshold:
            best = max(best, 1.0 - nl)
    return best


# ---------------------------------------------------------------------------
# ChartQA
# ---------------------------------------------------------------------------


def _chartqa_float(text: str) -> float | None:
    # Official _to_float: float(), with a trailing "%" meaning "divide by 100".
    # No thousands-separator handling ("1,000" is not a number here).
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(pred: str, target: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (official ``relaxed_correctness``): when both
    strings parse as numbers and the target is non-zero, correct iff
    |pred - target| / |target| <= tolerance; otherwise (non-numeric, or target
    0) case-insensitive exact match.  Both sides are whitespace-stripped."""
    p, t = str(pred).strip(), str(target).strip()
    pf, tf = _chartqa_float(p), _chartqa_float(t)
    if pf is not None and tf:
        return float(abs(pf - tf) / abs(tf) <= tolerance)
    return float(p.lower() == t.lower())


# ---------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------


def _gqa_norm(s: str) -> str:
    return str(s).strip().lower().rstrip(".").strip()


def gqa_accuracy(pred: str, answer: str) -> float:
    """GQA accuracy: exact match after lowercasing, stripping whitespace and
    trailing periods."""
    return float(_gqa_norm(pred) == _gqa_norm(answer))


# ---------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------


def _pope_yes_no(text: str) -> str:
    # Official POPE evaluation: keep the first sentence (text before the first
    # "."), drop commas, and answer "no" iff one of the words is exactly
    # "No", "not" or "no"; everything else counts as "yes".
    text = str(text)
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split()
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE: predictions mapped to yes/no with the official rule, "yes" is the
    positive class.  Returns accuracy, precision, recall, f1, yes_ratio (share of
    predictions mapped to "yes") and the tp/fp/tn/fn counts; any 0/0 is 0.0."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    tp = fp = tn = fn = 0
    for pred, label in zip(preds, labels):
        gold = str(label).strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"POPE label must be yes/no, got {label!r}")
        said_yes = _pope_yes_no(pred) == "yes"
        if gold == "yes":
            tp, fn = (tp + 1, fn) if said_yes else (tp, fn + 1)
        else:
            fp, tn = (fp + 1, tn) if said_yes else (fp, tn + 1)
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


# ---------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity",
                  "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")
_MME_PERCEPTION_KEYS = frozenset(c.lower() for c in MME_PERCEPTION)
_MME_COGNITION_KEYS = frozenset(c.lower() for c in MME_COGNITION)


def _mme_yes_no(pred: str) -> str:
    # Official MME calculation: lowercase; "yes"/"no" as is; otherwise look at
    # the first four characters: "yes" in them -> yes, else "no" in them -> no,
    # else "other" (always wrong).
    p = str(pred).strip().lower()
    if p in ("yes", "no"):
        return p
    head = p[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(records: Iterable[Mapping]) -> dict:
    """MME scores.  Each record: ``category``, ``pred``, ``answer`` (Yes/No) and
    the image key ``question_id`` (the MME/LLaVA convention: the image path) or,
    when that is absent, ``image``.  Per subtask: acc = % questions right,
    acc_plus = % images with all (both) questions right, score = acc + acc_plus.
    perception / cognition sum the scores of the official subtasks present
    (names matched case-insensitively); other subtasks are only listed."""
    by_cat: dict[str, dict[object, list[bool]]] = {}
    for rec in records:
        img = rec.get("question_id")
        if img is None:
            img = rec.get("image")
        if img is None:
            raise KeyError("MME record needs 'question_id' or 'image' to identify the image")
        gold = str(rec["answer"]).strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"MME answer must be Yes/No, got {rec['answer']!r}")
        ok = _mme_yes_no(rec["pred"]) == gold
        by_cat.setdefault(str(rec["category"]), {}).setdefault(img, []).append(ok)

    subtasks: dict[str, dict[str, float]] = {}
    perception = cognition = 0.0
    for cat, images in by_cat.items():
        flags = [f for per_img in images.values() for f in per_img]
        acc = 100.0 * sum(flags) / len(flags)
        acc_plus = 100.0 * sum(all(v) for v in images.values()) / len(images)
        score = acc + acc_plus
        subtasks[cat] = {"acc": acc, "acc_plus": acc_plus, "score": score}
        key = cat.strip().lower().replace(" ", "_")
        if key in _MME_PERCEPTION_KEYS:
            perception += score
        elif key in _MME_COGNITION_KEYS:
            cognition += score
    return {"perception": perception, "cognition": cognition, "subtasks": subtasks}


# ---------------------------------------------------------------------------
# Multiple-choice answer extraction (MMBench, MathVista)
# ---------------------------------------------------------------------------

_ANSWER_WORDS = r"(?i:\b(?:final\s+answer|answer|option|choice)\b)"
_ANSWER_VERBS = r"(?:\s*(?i:is|would\s+be|should\s+be))?"


def _choice_norm(s: str) -> str:
    return " ".join(str(s).lower().strip().rstrip(".").split())


def _letter_in_text(text: str, letters: Sequence[str], bare: bool) -> str | None:
    """A choice letter stated in ``text``: leading "B", "B.", "(B)", "B)";
    the last "Answer: B" / "the answer is (B)"; a lone "(B)" anywhere; and, when ``bare``,
    a lone capital letter token anywhere (an article "A word" excluded).  Only
    capital letters count; ambiguous text (two different letters) gives None."""
    if not letters:
        return None
    cls = "[" + "".join(sorted(set(letters))) + "]"
    m = re.match(rf"[\(\[]?({cls})(?:[\)\]\.:,;!?]|\s*$|\s*\n)", text)
    if m:
        return m.group(1)
    stated = re.findall(
        rf"{_ANSWER_WORDS}{_ANSWER_VERBS}\s*[:：]?\s*[\(\[]?({cls})(?![A-Za-z0-9])", text
    )
    if stated:
        return stated[-1]  # the last statement is the final answer
    found = set(re.findall(rf"\(({cls})\)", text))
    if len(found) == 1:
        return found.pop()
    if bare and not found:
        for mm in re.finditer(rf"(?<![A-Za-z0-9'])({cls})(?![A-Za-z0-9'])", text):
            if mm.group(1) == "A" and re.match(r"\s+[a-z]", text[mm.end():]):
                continue  # the article "A", as in "A dog"
            found.add(mm.group(1))
        if len(found) == 1:
            return found.pop()
    return None


def _texts_in(text: str, candidates: Mapping[str, str]) -> list[str]:
    """Keys whose (normalized) text occurs in ``text`` as a whole-word substring,
    dropping any whose text is contained in another match's text."""
    low = _choice_norm(text)
    hits = []
    for key, val in candidates.items():
        v = _choice_norm(val)
        if v and re.search(r"(?<!\w)" + re.escape(v) + r"(?!\w)", low):
            hits.append(key)
    if len(hits) > 1:
        norm = {k: _choice_norm(candidates[k]) for k in hits}
        hits = [k for k in hits
                if not any(k != o and norm[k] != norm[o] and norm[k] in norm[o] for o in hits)]
    return hits


def extract_choice(pred: str, options: Mapping[str, str]) -> str | None:
    """MMBench offline answer extraction (no LLM judge): returns the option letter
    stated by ``pred`` or None.  Order: a leading letter ("B", "B.", "(B)");
    "Answer: B"-style phrases; the whole prediction equal to an option's text;
    a single "(B)" anywhere; a single bare capital letter token; the text of
    exactly one option occurring in the prediction."""
    texts: dict[str, str] = {}
    for key, val in options.items():
        k = str(key).strip().upper()
        if len(k) != 1 or not k.isalpha() or val is None:
            continue
        v = str(val).strip()
        if v and v.lower() != "nan":  # pandas-style missing options
            texts[k] = v
    text = str(pred).strip()
    if not text or not texts:
        return None
    letter = _letter_in_text(text, list(texts), bare=False)
    if letter:
        return letter
    exact = [k for k, v in texts.items() if _choice_norm(v) == _choice_norm(text)]
    if len(exact) == 1:
        return exact[0]
    letter = _letter_in_text(text, list(texts), bare=True)
    if letter:
        return letter
    hits = _texts_in(text, texts)
    return hits[0] if len(hits) == 1 else None


def mmbench_circular_accuracy(records: Iterable[Mapping]) -> float:
    """MMBench CircularEval: each record is one rotation of a question, with
    ``index`` (question id shared by its rotations), ``circular_index``,
    ``pred``, ``options`` (letter -> text for that rotation) and ``answer``
    (correct letter for that rotation).  A question counts only if every one of
    its rotations is answered correctly (answers extracted with
    :func:`extract_choice`).  Returns the fraction of questions, 0.0 if none."""
    per_question: dict[object, bool] = {}
    for rec in records:
        choice = extract_choice(str(rec["pred"]), rec["options"])
        ok = choice is not None and choice == str(rec["answer"]).strip().upper()
        key = rec["index"]
        per_question[key] = per_question.get(key, True) and ok
    if not per_question:
        return 0.0
    return sum(per_question.values()) / len(per_question)


# ---------------------------------------------------------------------------
# MathVista
# ---------------------------------------------------------------------------

# A number: optional sign (not a hyphen between words/digits), digits with
# optional thousands commas, optional decimals.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def _round_str(x: float, precision: int | float | None) -> str:
    if precision is None:
        return str(float(x))
    return str(round(float(x), int(precision)))


def mathvista_extract(pred: str, question_type: str, answer_type: str,
                      choices: Sequence[str] | None, precision: int | float | None) -> str:
    """MathVista rule-based answer extraction + official normalization (no
    GPT extractor).  multi_choice: a response equal to a choice; else a stated
    letter ("(B)", leading "B", "Answer: B") mapped to its choice; else the
    choice whose text occurs in the response (the latest-occurring one if
    several); else the choice with the smallest edit distance to the response.
    integer: the last number, as str(int(float(x))).  float: the last number,
    str(round(x, precision)).  list: the last "[...]" in the response.  Other
    types: the stripped response.  No number found -> ""."""
    response = str(pred).strip()
    if question_type == "multi_choice" and choices:
        choices = [str(c) for c in choices]
        if response in choices:
            return response
        if not response:
            return ""
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        letter = _letter_in_text(response, letters, bare=False)
        if letter:
            return choices[letters.index(letter)]
        hits = _texts_in(response, dict(zip(letters, choices)))
        if hits:
            low = _choice_norm(response)

            def last_pos(k: str) -> tuple[int, int]:
                v = _choice_norm(choices[letters.index(k)])
                return low.rfind(v), len(v)

            return choices[letters.index(max(hits, key=last_pos))]
        dists = [levenshtein(response, c) for c in choices]
        return choices[dists.index(min(dists))]
    if not response:
        return ""
    if answer_type == "integer":
        num = _last_number(response)
        return str(int(float(num))) if num is not None else ""
    if answer_type == "float":
        num = _last_number(response)
        return _round_str(float(num), precision) if num is not None else ""
    if answer_type == "list":
        found = re.findall(r"\[[^\[\]]*\]", response)
        return found[-1] if found else response
    return response


def _to_float(s: str) -> float | None:
    try:
        return float(str(s).strip())
    except ValueError:
        return None


def mathvista_accuracy(pred: str, answer: str, question_type: str, answer_type: str,
                       choices: Sequence[str] | None = None,
                       precision: int | float | None = None) -> float:
    """MathVista accuracy for one problem: :func:`mathvista_extract` then exact
    comparison with the answer: choice text for multi_choice; numerically for
    integer, and for float after rounding both to ``precision``; whitespace
    removed for lists; stripped strings otherwise."""
    ext = mathvista_extract(pred, question_type, answer_type, choices, precision)
    ans = str(answer).strip()
    if question_type == "multi_choice" and choices:
        return float(ext.strip() == ans)
    if answer_type in ("integer", "float"):
        e, a = _to_float(ext), _to_float(ans)
        if e is None or a is None:
            return float(ext.strip() == ans)
        if answer_type == "float" and precision is not None:
            return float(round(e, int(precision)) == round(a, int(precision)))
        return float(e == a)
    if answer_type == "list":
        return float("".join(ext.split()) == "".join(ans.split()))
    return float(ext.strip() == ans)


# ---------------------------------------------------------------------------
# language modelling
# ---------------------------------------------------------------------------


def perplexity(nlls_sum: float, n_tokens: int) -> float:
    """Perplexity = exp(sum of token negative log-likelihoods (nats) / tokens)."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    try:
        return math.exp(nlls_sum / n_tokens)
    except OverflowError:
        return math.inf
