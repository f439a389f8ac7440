"""The nine VQA benchmarks: where they come from, how a sample reads, how it is prompted.

Sources
-------
``load_samples(task, source)`` reads one benchmark from

* ``None``: the small offline sample bundled with luq (``luq/data/eval_samples/<task>``);
* a local directory in the layout below;
* ``"hub"``: the benchmark's copy on the Hugging Face hub (``TASKS[task].hub``: the
  lmms-lab copies lmms-eval reads, MathVista from AI4Math), or any other hub dataset id
  with the same columns (``"lmms-lab-encoder/MME"``), read with ``datasets``.

The local layout (one for all nine)
-----------------------------------
::

    DIR/
      samples.jsonl     one JSON object per line (blank lines are skipped)
      <images>          image files anywhere under or beside DIR

Every line holds

* ``id``        str or int, unique in the file (default: the line number);
* ``image``     path of the image, relative to DIR (or absolute);
* ``question``  the question as the benchmark states it (no prompt suffix);
* ``answer``    the reference answer (str), or ``answers``: a list of str (VQAv2 and
  TextVQA: the ten human answers; DocVQA: every accepted answer);

and, per benchmark,

* ``mme``:       ``category`` (an MME subtask: existence, count, position, color, OCR,
  commonsense_reasoning, ...); ``answer`` "Yes" or "No"; the two questions about one
  image share its ``image`` path (acc+ needs both right);
* ``pope``:      ``answer`` "yes" or "no"; optional ``category`` (random, popular,
  adversarial);
* ``mmbench``:   ``options`` {"A": text, "B": text, ...}; ``answer`` the correct letter;
  optional ``hint`` and ``category``. Each question is expanded into one rotation per
  option (CircularEval: option texts shifted, the correct letter moved with them) unless
  the line has a ``circular_index`` (then lines are taken as given and grouped by ``id``
  modulo 1,000,000, the official numbering of rotations);
* ``chartqa``:   optional ``type`` (human_test or augmented_test);
* ``mathvista``: ``question_type`` (multi_choice or free_form), ``answer_type`` (text,
  integer, float or list), ``choices`` (list of str, or null), optional ``precision``
  (decimal places of a float answer) and ``unit``;
* ``textvqa``, ``vqav2``, ``gqa``, ``docvqa``: nothing more.

Prompts follow lmms-eval's default for each task: the question, then a suffix such as
"\\nAnswer the question using a single word or phrase." (MMBench: hint, question and the
lettered options; MathVista: its "format-prompt" query). They are plain text; the model's
own chat template and image token are added by the runner.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from luq.errors import LuqError
from luq.store import read_jsonl

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MMBENCH_OPTIONS_HEADER = "There are several options:"
# lmms-eval joins the options and its post_prompt ("\nAnswer ...") with a newline: a blank line between
MMBENCH_SUFFIX = "\n\nAnswer with the option's letter from the given choices directly."
MME_YES_NO = " Please answer yes or no."  # lmms-eval drops it when it adds its own suffix
CIRCULAR_STEP = 1_000_000  # MMBench numbers the rotations of question i as i + k * 1e6
SAMPLES_FILE = "samples.jsonl"


@dataclass(frozen=True)
class HubSource:
    """Where a benchmark lives on the hub: dataset id, config, split (and GQA's image table)."""

    path: str
    name: str | None
    split: str
    images_name: str | None = None  # GQA keeps its images in a second config, keyed by imageId


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark: its hub copy, how generation is capped, and its headline score."""

    name: str
    title: str
    hub: HubSource
    max_new_tokens: int
    headline: str  # the key of `scores` that summarises the task


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("mme", "MME", HubSource("lmms-lab/MME", None, "test"), 16, "perception"),
        TaskSpec("mmbench", "MMBench-EN dev", HubSource("lmms-lab/MMBench", "en", "dev"), 32, "circular_accuracy"),
        TaskSpec("textvqa", "TextVQA val", HubSource("lmms-lab/textvqa", None, "validation"), 16, "accuracy"),
        TaskSpec("vqav2", "VQAv2 val", HubSource("lmms-lab/VQAv2", None, "validation"), 16, "accuracy"),
        TaskSpec("gqa", "GQA testdev-balanced",
                 HubSource("lmms-lab/GQA", "testdev_balanced_instructions", "testdev",
                           images_name="testdev_balanced_images"), 16, "accuracy"),
        TaskSpec("pope", "POPE", HubSource("lmms-lab/POPE", None, "test"), 16, "f1"),
        TaskSpec("chartqa", "ChartQA test", HubSource("lmms-lab/ChartQA", None, "test"), 16, "relaxed_accuracy"),
        TaskSpec("docvqa", "DocVQA val", HubSource("lmms-lab/DocVQA", "DocVQA", "validation"), 32, "anls"),
        TaskSpec("mathvista", "MathVista testmini", HubSource("AI4Math/MathVista", None, "testmini"), 64, "accuracy"),
    )
}
"""max_new_tokens: lmms-eval's caps where short answers are asked for (16; DocVQA 32). POPE
(128 there), MMBench (1024) and MathVista (16384, meant for reasoning variants) are capped
lower here because the prompts ask for one word, one letter or one number."""


def known_tasks() -> list[str]:
    return list(TASKS)


def task_spec(task: str) -> TaskSpec:
    try:
        return TASKS[task]
    except KeyError:
        raise LuqError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}, perplexity") from None


# --------------------------------------------------------------------------- samples


@dataclass
class EvalSample:
    """One question of one benchmark, ready to prompt and to score.

    image: a path (local data, opened when needed) or an already decoded PIL image (hub).
    answers: the reference answers (one for most benchmarks, ten for VQAv2/TextVQA).
    prompt: the text sent to the model (question plus the benchmark's instruction).
    fields: what scoring needs beyond the answers (category, options, answer type, ...).
    """

    task: str
    id: str
    question: str
    answers: list[str]
    image: Any
    prompt: str
    fields: dict = field(default_factory=dict)

    def load_image(self):
        """The image as an RGB PIL image."""
        from PIL import Image

        if isinstance(self.image, (str, Path)):
            try:
                with Image.open(self.image) as img:
                    return img.convert("RGB")
            except OSError as e:
                raise LuqError(f"cannot read image {self.image} of sample {self.id!r}: {e}") from None
        return self.image.convert("RGB")

    def to_json(self) -> dict:
        """The sample as JSON for the results file (the image as its path, or null)."""
        image = str(self.image) if isinstance(self.image, (str, Path)) else None
        return {"id": self.id, "image": image, "question": self.question, "answers": self.answers,
                "prompt": self.prompt, **self.fields}


# --------------------------------------------------------------------------- prompts


def mmbench_prompt(question: str, options: Mapping[str, str], hint: str | None) -> str:
    """lmms-eval's MMBench-EN query: "[hint ]question There are several options:\\nA. ..."."""
    lines = [MMBENCH_OPTIONS_HEADER] + [f"{key}. {options[key]}" for key in sorted(options)]
    body = f"{question} " + "\n".join(lines)
    if hint and str(hint).strip() and str(hint).lower() != "nan":
        body = f"{hint} {body}"
    return body + MMBENCH_SUFFIX


_PLACES = {1: "one decimal place", 2: "two decimal places", 3: "three decimal places"}


def mathvista_prompt(question: str, question_type: str, answer_type: str, choices: list[str] | None,
                     precision: int | None, unit: str | None) -> str:
    """MathVista's zero-shot "format-prompt" query (lmms-eval's mathvista_testmini_format):
    question (with its unit), lettered choices, then a one-line answer-format instruction."""
    if question_type == "multi_choice":
        hint = "Answer with the option's letter from the given choices directly."
    elif answer_type == "integer":
        hint = "Answer the question using a single integer number."
    elif answer_type == "float":
        places = _PLACES.get(int(precision or 1), f"{int(precision)} decimal places")
        hint = f"Answer the question using a single floating-point number with {places}."
    elif answer_type == "list":
        hint = "Answer the question using a Python list."
    else:
        hint = "Answer the question using a single word or phrase."
    text = question + (f" (Unit: {unit})" if unit else "")
    parts = [text]
    if choices:
        parts.append("\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices)))
    parts.append(hint)
    return "\n".join(parts)


def build_prompt(task: str, question: str, fields: Mapping) -> str:
    """The text prompt lmms-eval's default configuration gives for this task."""
    question = question.strip()
    if task == "mme":
        return question.replace(MME_YES_NO, "") + SHORT_ANSWER
    if task == "textvqa":
        return question.capitalize() + SHORT_ANSWER
    if task == "chartqa":
        return question + "\nAnswer the question with a single word."
    if task == "mmbench":
        return mmbench_prompt(question, fields["options"], fields.get("hint"))
    if task == "mathvista":
        return mathvista_prompt(question, fields["question_type"], fields["answer_type"], fields.get("choices"),
                                fields.get("precision"), fields.get("unit"))
    return question + SHORT_ANSWER  # vqav2, gqa, pope, docvqa


# --------------------------------------------------------------------------- records


_REQUIRED = {
    "mme": ("category",),
    "mmbench": ("options",),
    "mathvista": ("question_type", "answer_type"),
}
_YES_NO_TASKS = ("mme", "pope")


def _record_to_samples(task: str, record: dict, image: Any, where: str) -> list[EvalSample]:
    """Validate one record (local line or converted hub row) and make its sample(s)."""
    for key in ("question",) + _REQUIRED.get(task, ()):
        if record.get(key) in (None, ""):
            raise LuqError(f"{where}: missing {key!r} (a {task} sample needs it)")
    if "answers" in record:
        answers = record["answers"]
        if isinstance(answers, str) or not isinstance(answers, list) or not answers:
            raise LuqError(f"{where}: 'answers' must be a non-empty list of strings")
        answers = [str(a) for a in answers]
    elif record.get("answer") not in (None, ""):
        answers = [str(record["answer"])]
    else:
        raise LuqError(f"{where}: missing 'answer' (or 'answers')")
    if task in _YES_NO_TASKS and answers[0].strip().lower() not in ("yes", "no"):
        raise LuqError(f"{where}: a {task} answer must be yes or no, got {answers[0]!r}")

    sample_id = str(record["id"])
    question = str(record["question"])
    fields = {k: v for k, v in record.items() if k not in ("id", "image", "question", "answer", "answers")}
    if task == "mmbench":
        return _mmbench_samples(record, sample_id, question, answers[0], image, fields, where)
    if task == "mathvista":
        fields["choices"] = [str(c) for c in fields["choices"]] if fields.get("choices") else None
        if fields["question_type"] == "multi_choice" and not fields["choices"]:
            raise LuqError(f"{where}: a multi_choice MathVista sample needs 'choices'")
    if task == "mme":
        # the image identifies the question pair (MME's question_id is the image path)
        fields.setdefault("image_key", str(record.get("image_key") or record.get("image") or sample_id))
    return [EvalSample(task, sample_id, question, answers, image, build_prompt(task, question, fields), fields)]


def _mmbench_samples(record: dict, sample_id: str, question: str, answer: str, image: Any, fields: dict,
                     where: str) -> list[EvalSample]:
    options = record["options"]
    if not isinstance(options, dict) or len(options) < 2:
        raise LuqError(f"{where}: 'options' must map at least two letters to texts")
    options = {str(k).strip().upper(): str(v) for k, v in options.items()
               if v is not None and str(v).strip() and str(v).lower() != "nan"}
    letters = sorted(options)
    answer = answer.strip().upper()
    if answer not in options:
        raise LuqError(f"{where}: answer {answer!r} is not one of the options {', '.join(letters)}")

    if "circular_index" in record:  # a given rotation: group by the official numbering
        try:
            group = str(int(sample_id) % CIRCULAR_STEP)
        except ValueError:
            group = sample_id
        fields.update(options=options, group=group, circular_index=int(record["circular_index"]))
        return [EvalSample("mmbench", sample_id, question, [answer], image,
                           mmbench_prompt(question, options, fields.get("hint")), fields)]
    samples = []
    texts = [options[k] for k in letters]
    for shift in range(len(letters)):
        rotated = dict(zip(letters, texts[shift:] + texts[:shift]))
        moved = letters[(letters.index(answer) - shift) % len(letters)]
        rotation_fields = dict(fields, options=rotated, group=sample_id, circular_index=shift)
        samples.append(EvalSample("mmbench", f"{sample_id}" if shift == 0 else f"{sample_id}~{shift}", question,
                                  [moved], image, mmbench_prompt(question, rotated, fields.get("hint")),
                                  rotation_fields))
    return samples


# --------------------------------------------------------------------------- local directories


def bundled_dir(task: str) -> Path:
    """The directory of the small offline sample of ``task`` shipped with luq."""
    task_spec(task)
    return Path(str(resources.files("luq") / "data" / "eval_samples" / task))


def read_local(task: str, directory: str | Path) -> list[EvalSample]:
    """The samples of ``task`` in a local directory (layout in the module docstring)."""
    task_spec(task)
    directory = Path(directory).expanduser()
    jsonl = directory / SAMPLES_FILE if directory.is_dir() else directory
    if not jsonl.is_file():
        raise LuqError(f"no {SAMPLES_FILE} in {directory}" if directory.is_dir() else f"data not found: {directory}")
    base = jsonl.parent
    samples: list[EvalSample] = []
    seen: set[str] = set()
    for number, where, record in read_jsonl(jsonl):
        record.setdefault("id", number)
        if str(record["id"]) in seen:
            raise LuqError(f"{where}: duplicate id {record['id']!r}")
        seen.add(str(record["id"]))
        if not record.get("image"):
            raise LuqError(f"{where}: missing 'image'")
        image = Path(record["image"]).expanduser()
        image = image if image.is_absolute() else (base / image).resolve()
        if not image.is_file():
            raise LuqError(f"{where}: image not found: {image}")
        samples.extend(_record_to_samples(task, record, image, where))
    if not samples:
        raise LuqError(f"{jsonl} holds no samples")
    return samples


# --------------------------------------------------------------------------- the hub


def _hub_row_mme(row: dict) -> dict:
    return {"id": row["question_id"] + "|" + row["question"], "question": row["question"], "answer": row["answer"],
            "category": row["category"], "image_key": row["question_id"]}


def _hub_row_mmbench(row: dict) -> dict:
    options = {k: row[k] for k in "ABCDE" if k in row and row[k] is not None}
    return {"id": int(row["index"]), "question": row["question"], "answer": row["answer"], "options": options,
            "hint": row.get("hint"), "category": row.get("category"),
            "circular_index": int(row["index"]) // CIRCULAR_STEP}


def _hub_row_vqa(row: dict) -> dict:
    answers = [a["answer"] if isinstance(a, dict) else a for a in row["answers"]]
    return {"id": row["question_id"], "question": row["question"], "answers": answers}


def _hub_row_gqa(row: dict) -> dict:
    return {"id": row["id"], "question": row["question"], "answer": row["answer"], "image_id": row["imageId"]}


def _hub_row_pope(row: dict) -> dict:
    return {"id": row["question_id"], "question": row["question"], "answer": row["answer"],
            "category": row.get("category")}


def _hub_row_chartqa(row: dict, index: int) -> dict:
    return {"id": index, "question": row["question"], "answer": row["answer"], "type": row.get("type")}


def _hub_row_docvqa(row: dict) -> dict:
    return {"id": row["questionId"], "question": row["question"], "answers": list(row["answers"])}


def _hub_row_mathvista(row: dict) -> dict:
    return {"id": row["pid"], "question": row["question"], "answer": row["answer"],
            "question_type": row["question_type"], "answer_type": row["answer_type"], "choices": row["choices"],
            "precision": row.get("precision"), "unit": row.get("unit")}


_HUB_ROWS: dict[str, Callable[[dict, int], dict]] = {
    "mme": lambda row, i: _hub_row_mme(row),
    "mmbench": lambda row, i: _hub_row_mmbench(row),
    "textvqa": lambda row, i: _hub_row_vqa(row),
    "vqav2": lambda row, i: _hub_row_vqa(row),
    "gqa": lambda row, i: _hub_row_gqa(row),
    "pope": lambda row, i: _hub_row_pope(row),
    "chartqa": _hub_row_chartqa,
    "docvqa": lambda row, i: _hub_row_docvqa(row),
    "mathvista": lambda row, i: _hub_row_mathvista(row),
}
_HUB_IMAGE_COLUMN = {"mathvista": "decoded_image"}


def read_hub(task: str, path: str | None = None, limit: int | None = None) -> list[EvalSample]:
    """The samples of ``task`` from its hub copy (or from dataset ``path`` with the same
    columns), the first ``limit`` rows when given."""
    spec = task_spec(task)
    hub = spec.hub if path is None else HubSource(path, spec.hub.name, spec.hub.split, spec.hub.images_name)
    try:
        import datasets

        rows = datasets.load_dataset(hub.path, hub.name, split=hub.split)
        if limit is not None and task != "mmbench":  # MMBench rotations lie far apart: keep all rows
            rows = rows.select(range(min(limit, len(rows))))
        gqa_images = None
        if hub.images_name:
            table = datasets.load_dataset(hub.path, hub.images_name, split=hub.split)
            row_of_image = {image_id: i for i, image_id in enumerate(table["id"])}
            gqa_images = {image_id: table[row_of_image[image_id]]["image"] for image_id in set(rows["imageId"])}
    except Exception as e:  # no network, no such dataset, gated, ...
        raise LuqError(f"could not load {spec.title} from the hub ({hub.path}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); give a local directory with --data") from None
    samples: list[EvalSample] = []
    image_column = _HUB_IMAGE_COLUMN.get(task, "image")
    for index, row in enumerate(rows):
        record = _HUB_ROWS[task](row, index)
        image = gqa_images[record.pop("image_id")] if gqa_images is not None else row[image_column]
        samples.extend(_record_to_samples(task, record, image, f"{hub.path} row {index}"))
    return samples


# --------------------------------------------------------------------------- entry point


def load_samples(task: str, source: str | Path | None = None, limit: int | None = None) -> list[EvalSample]:
    """The samples of ``task`` from ``source`` (None: the bundled offline sample; a local
    directory or samples.jsonl; "hub" or a hub dataset id), at most ``limit`` questions
    (an MMBench question counts with all its rotations)."""
    task_spec(task)
    if limit is not None and limit < 1:
        raise LuqError(f"--limit must be at least 1, got {limit}")
    if source is None:
        samples = read_local(task, bundled_dir(task))
    else:
        text = str(source)
        path = Path(text).expanduser()
        if path.exists():
            samples = read_local(task, path)
        elif text == "hub" or (text.count("/") == 1 and not text.startswith((".", "/", "~"))):
            samples = read_hub(task, None if text == "hub" else text, limit)
        else:
            raise LuqError(f"data not found: {source} (give a directory with {SAMPLES_FILE}, 'hub', or a hub id)")
    return limit_questions(samples, limit)


def limit_questions(samples: list[EvalSample], limit: int | None) -> list[EvalSample]:
    """The first ``limit`` questions; the rotations of an MMBench question stay together."""
    if limit is None:
        return samples
    kept, groups = [], set()
    for sample in samples:
        group = sample.fields.get("group", sample.id)
        if group not in groups:
            if len(groups) == limit:
                continue
            groups.add(group)
        kept.append(sample)
    return kept
