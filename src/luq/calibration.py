"""Calibration data: N sequences of L tokens, text and image+question mixed at ratio alpha.

Paper Eq. 9: D_cal = Sample(T, (1 - alpha) N) U Sample(M, alpha N). This module holds
the settings and the text side (sources, tokenized windows); the image+question side
goes through each model's own processor and chat template.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import torch

from luq.capture import IMAGE, PAD, TEXT
from luq.errors import LuqError

# hub text sources by short name: (dataset, config, split, column)
HUB_TEXT = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text")}
# The offline default text, named as "module:function" and imported only when used (as the built-in
# models of luq.models.loading.BUILTIN), so that this room imports nothing from the zoo.
DEFAULT_TEXT = "luq.zoo.smollm2:wikipedia_text"


@dataclass(frozen=True)
class CalibrationConfig:
    """Every calibration knob, validated once here.

    text / images: a local path or a hub dataset name; None means the offline default
    (the gensim Wikipedia excerpt; the bundled photos). alpha: fraction of the calibration
    tokens that come from image+question samples (0 text only, 1 images only).
    samples, seq_len: N sequences of L tokens (the paper: 128 x 2048). seed: the one
    source of randomness.
    """

    text: str | None = None
    images: str | None = None
    alpha: float = 0.0
    samples: int = 128
    seq_len: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise LuqError(f"--alpha must be in [0, 1] (the fraction of multimodal tokens), got {self.alpha}")
        if self.samples <= 0 or self.seq_len <= 0:
            raise LuqError(f"--samples and --seq-len must be positive, got {self.samples} and {self.seq_len}")

    @property
    def n_multimodal(self) -> int:
        """Sequences filled with image+question samples: round(alpha * N)."""
        return round(self.alpha * self.samples)

    @property
    def n_text(self) -> int:
        return self.samples - self.n_multimodal


def load_text(source: str | None) -> str:
    """The text of a calibration source: None (offline Wikipedia excerpt), a local file, a
    local folder (its *.txt files in name order), or a hub dataset (`wikitext2` or a name
    `datasets.load_dataset` takes, read from its 'text' column)."""
    if source is None:
        module, _, function = DEFAULT_TEXT.partition(":")
        return getattr(import_module(module), function)()
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise LuqError(f"calibration text folder {path} has no .txt files")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    looks_local = source.startswith((".", "/", "~")) or bool(path.suffix) or source.count("/") > 1
    if looks_local:  # hub names are 'name' or 'owner/name'
        raise LuqError(f"calibration text not found: {source}")
    return _hub_text(source)


def _hub_text(name: str) -> str:
    dataset, config, split, column = HUB_TEXT.get(name, (name, None, "train", "text"))
    try:
        import datasets
        rows = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # no network, unknown name, ...
        raise LuqError(f"could not load calibration text {name!r} from the hub ({type(e).__name__}); "
                       "give a local text file or folder instead") from None
    if column not in rows.column_names:
        raise LuqError(f"hub dataset {name!r} has no {column!r} column (columns: {', '.join(rows.column_names)})")
    return "\n\n".join(t for t in rows[column] if t)


def _windows_at(token_ids: torch.Tensor, slots: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The windows of seq_len tokens at these slots of the text: [len(slots), seq_len]."""
    return torch.stack([token_ids[s * seq_len:(s + 1) * seq_len] for s in slots.tolist()])


def text_windows(token_ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """n non-overlapping windows of seq_len tokens at seeded random places: [n, seq_len]."""
    slots = token_ids.numel() // seq_len
    if slots < n:
        raise LuqError(f"the calibration text has {token_ids.numel():,} tokens, fewer than the "
                       f"{n} x {seq_len} = {n * seq_len:,} needed; give more text or lower --samples/--seq-len")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(slots, generator=g)[:n].sort().values
    return _windows_at(token_ids, chosen, seq_len)


def validation_windows(token_ids: torch.Tensor, n: int, seq_len: int, seed: int, n_calibration: int) -> torch.Tensor:
    """n windows disjoint from the `n_calibration` ones `text_windows` draws with the same
    seed (the next slots of the same permutation): held-out text for the threshold search."""
    slots = token_ids.numel() // seq_len
    if slots < n_calibration + n:
        raise LuqError(f"the text has {token_ids.numel():,} tokens, fewer than the {n_calibration} calibration + "
                       f"{n} validation windows of {seq_len} tokens need; give more text or fewer samples")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(slots, generator=g)[n_calibration:n_calibration + n].sort().values
    return _windows_at(token_ids, chosen, seq_len)


def sensitivity_windows(token_ids: torch.Tensor, n: int, seq_len: int, seed: int, reserved: int) -> torch.Tensor:
    """n windows from the far end of the permutation `text_windows` and `validation_windows`
    draw from with the same seed: disjoint from the calibration and validation windows as
    long as those take at most `reserved` slots (checked)."""
    slots = token_ids.numel() // seq_len
    if slots < reserved + n:
        raise LuqError(f"the text has {token_ids.numel():,} tokens, fewer than the {reserved} calibration/validation + "
                       f"{n} sensitivity windows of {seq_len} tokens need; give more text or fewer samples")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(slots, generator=g)[slots - n:].sort().values
    return _windows_at(token_ids, chosen, seq_len)


def tuning_windows(token_ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """n windows from the middle of the permutation `text_windows`, `validation_windows` and
    `sensitivity_windows` draw from with the same seed: disjoint from all three while they take
    fewer than half the text's windows from its start and its end (checked for n)."""
    slots = token_ids.numel() // seq_len
    if slots < 2 * n + 64:
        raise LuqError(f"the text has {token_ids.numel():,} tokens: {n} tuning windows of {seq_len} tokens need "
                       f"{(2 * n + 64) * seq_len:,} (half of it kept for the calibration and held-out windows); "
                       "give more text or fewer windows")
    g = torch.Generator().manual_seed(seed)
    middle = slots // 2 - n // 2
    chosen = torch.randperm(slots, generator=g)[middle:middle + n].sort().values
    return _windows_at(token_ids, chosen, seq_len)


def text_token_ids(tokenizer, source: str | None) -> torch.Tensor:
    """The whole text source, tokenized without special tokens."""
    from luq.store import atomic_write, cache_root

    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor carries one
    text = load_text(source)
    # tokenizing a few MB of text takes seconds; the ids are kept per (tokenizer, text)
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    digest = hashlib.sha256(f"{type(tokenizer).__name__}\0{vocab}\0{text}".encode()).hexdigest()[:24]
    path = cache_root() / "tokens" / f"{digest}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True).long()
        except Exception:  # unreadable: tokenize again
            pass
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(ids.int(), tmp))
    return ids


def text_batches(tokenizer, config: CalibrationConfig, batch_size: int = 8) -> list[tuple[dict, torch.Tensor]]:
    """The text part of the calibration set as (model inputs, token kinds) batches."""
    if config.n_text == 0:
        return []
    windows = text_windows(text_token_ids(tokenizer, config.text), config.n_text, config.seq_len, config.seed)
    return [({"input_ids": w, "attention_mask": torch.ones_like(w)}, torch.full(w.shape, TEXT, dtype=torch.int8))
            for w in windows.split(batch_size)]


# ---------------------------------------------------------------------------------
# the image+question side

# hub image+question sources by short name: (dataset, config, split)
HUB_IMAGES = {"textvqa": ("lmms-lab/textvqa", None, "train")}


@dataclass(frozen=True)
class ImageQuestion:
    """One multimodal calibration sample: an image (a path or a PIL image), a question,
    and, if known, a short answer (it then appears as the assistant's turn)."""

    image: Any
    question: str
    answer: str | None = None
    where: str = ""  # for error messages: 'file:line'


def bundled_images_path() -> Path:
    """The bundled real photos with hand-written questions (examples/make_calibration_photos.py)."""
    return Path(__file__).parent / "data" / "calibration" / "questions.jsonl"


def load_image_questions(source: str | None) -> list[ImageQuestion]:
    """Image+question samples from None (the bundled photos), a local JSONL of
    {"image": path relative to the file, "question": str[, "answer" or "answers"]}, or a
    hub dataset (`textvqa`, or any name with image and question columns)."""
    path = bundled_images_path() if source is None else Path(source).expanduser()
    if path.is_file():
        return _jsonl_image_questions(path)
    looks_local = source.startswith((".", "/", "~")) or bool(path.suffix) or source.count("/") > 1
    if looks_local:
        raise LuqError(f"calibration images not found: {source}")
    return _hub_image_questions(source)


def _jsonl_image_questions(path: Path) -> list[ImageQuestion]:
    from luq.store import read_jsonl

    samples = []
    for _, where, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("question"), str):
            raise LuqError(f"{where}: each line needs \"image\" (a path) and \"question\" (a string)")
        answer = row.get("answer")
        if answer is None and isinstance(row.get("answers"), list) and row["answers"]:
            answer = Counter(map(str, row["answers"])).most_common(1)[0][0]
        image = Path(row["image"]).expanduser()
        samples.append(ImageQuestion(image if image.is_absolute() else path.parent / image, row["question"],
                                     None if answer is None else str(answer), where))
    if not samples:
        raise LuqError(f"{path} has no image+question lines")
    return samples


def _hub_image_questions(name: str) -> list[ImageQuestion]:
    dataset, config, split = HUB_IMAGES.get(name, (name, None, "train"))
    try:
        import datasets
        rows = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:
        raise LuqError(f"could not load calibration images {name!r} from the hub ({type(e).__name__}); "
                       "give a local JSONL of {image, question} instead") from None
    missing = {"image", "question"} - set(rows.column_names)
    if missing:
        raise LuqError(f"hub dataset {name!r} has no {', '.join(sorted(missing))} column(s)")
    out = []
    for i, row in enumerate(rows):
        answers = row.get("answers") or ([row["answer"]] if row.get("answer") else [])
        answer = Counter(map(str, answers)).most_common(1)[0][0] if answers else None
        out.append(ImageQuestion(row["image"], row["question"], answer, f"{name}[{i}]"))
    return out


def open_image(sample: ImageQuestion):
    """The sample's image as an RGB PIL image; one clear error if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(sample.image, (str, Path)):
        return sample.image.convert("RGB")
    path = Path(sample.image)
    if not path.is_file():
        raise LuqError(f"{sample.where}: image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise LuqError(f"{sample.where}: cannot read image {path} ({type(e).__name__})") from None


def _image_token_id(processor) -> int:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int(token_id)


def encode_image_question(processor, sample: ImageQuestion) -> dict[str, torch.Tensor]:
    """One sample through the model's own chat template and processor (so its image tokens
    are the vision tower's real outputs): input_ids [1, T] plus the image tensors."""
    if not getattr(processor, "chat_template", None):
        raise LuqError("the model's processor has no chat template; multimodal calibration needs one")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
    if sample.answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": sample.answer}]})
    prompt = processor.apply_chat_template(messages, add_generation_prompt=sample.answer is None, tokenize=False)
    encoded = processor(text=[prompt], images=[open_image(sample)], return_tensors="pt")
    return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}


def multimodal_sequences(processor, samples: list[ImageQuestion], n: int, seq_len: int, seed: int,
                         ) -> list[tuple[dict, torch.Tensor]]:
    """n sequences of seq_len tokens, each packed with whole image+question samples (seeded
    order, cycling through the samples if there are too few) and right-padded; returns
    per sequence (its inputs, its token kinds: IMAGE for image tokens, TEXT, PAD)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(samples), generator=g).tolist()
    image_token = _image_token_id(processor)
    pad_id = processor.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    encoded: dict[int, dict] = {}
    sequences, cursor = [], 0
    for _ in range(n):
        parts, length = [], 0
        while True:
            index = order[cursor % len(order)]
            if index not in encoded:
                encoded[index] = encode_image_question(processor, samples[index])
            sample = encoded[index]
            size = sample["input_ids"].shape[1]
            if size > seq_len:
                raise LuqError(f"{samples[index].where}: one image+question takes {size} tokens, more than "
                               f"--seq-len {seq_len}")
            if length + size > seq_len:
                break
            parts.append(sample)
            length += size
            cursor += 1
        sequences.append(_pack(parts, seq_len, pad_id, image_token))
    return sequences


def _pack(parts: list[dict], seq_len: int, pad_id: int, image_token: int) -> tuple[dict, torch.Tensor]:
    """Concatenate encoded samples into one right-padded sequence of seq_len tokens."""
    ids = torch.cat([p["input_ids"] for p in parts], 1)
    pad = seq_len - ids.shape[1]
    inputs = {"input_ids": torch.nn.functional.pad(ids, (0, pad), value=pad_id),
              "attention_mask": torch.nn.functional.pad(torch.ones_like(ids), (0, pad), value=0)}
    for key in parts[0]:
        if key in inputs:
            continue
        values = [p[key] for p in parts]
        if values[0].dim() >= 2 and values[0].shape[:2] == parts[0]["input_ids"].shape:  # per token
            inputs[key] = torch.nn.functional.pad(torch.cat(values, 1), (0, pad) if values[0].dim() == 2 else
                                                  (0, 0, 0, pad), value=0)
        else:  # per image (pixel values, grid sizes): stacked in order
            inputs[key] = torch.cat(values, 0)
    kinds = torch.where(inputs["input_ids"] == image_token, IMAGE, TEXT).to(torch.int8)
    kinds[inputs["attention_mask"] == 0] = PAD
    return inputs, kinds


def _batch(sequences: list[tuple[dict, torch.Tensor]]) -> tuple[dict, torch.Tensor]:
    """Sequences of equal length into one batch: every tensor concatenated along dim 0
    (token tensors [1, L] stack into [B, L]; image tensors keep their order)."""
    inputs = {key: torch.cat([s[0][key] for s in sequences], 0) for key in sequences[0][0]}
    return inputs, torch.cat([s[1] for s in sequences], 0)


def multimodal_fraction(batches: list[tuple[dict, torch.Tensor]]) -> float:
    """The realized alpha: non-padding tokens of image+question sequences / all non-padding tokens."""
    counts = [(int((kinds != PAD).sum()), "pixel_values" in inputs) for inputs, kinds in batches]
    total = sum(c for c, _ in counts)
    return sum(c for c, mm in counts if mm) / total if total else 0.0


def calibration_batches(processor, adapter, config: CalibrationConfig, batch_size: int = 8) -> list[tuple[dict, torch.Tensor]]:
    """The whole calibration set for a model (paper Eq. 9): (1 - alpha) N text windows and
    alpha N sequences packed with image+question samples, each L tokens. Alpha counts
    sequences of L tokens; a packed sequence ends in padding where the next whole sample
    does not fit, so the realized token fraction (`multimodal_fraction`) is a little lower."""
    batches = text_batches(processor, config, batch_size) if config.n_text else []
    if config.n_multimodal == 0:
        if config.images is not None:
            raise LuqError("--calib-images given but --alpha is 0: set --alpha to the fraction of multimodal tokens")
        return batches
    if not adapter.multimodal:
        raise LuqError(f"{adapter.family} models take no images: drop --calib-images and use --alpha 0")
    samples = load_image_questions(config.images)
    sequences = multimodal_sequences(processor, samples, config.n_multimodal, config.seq_len, config.seed)
    batches += [_batch(sequences[i:i + batch_size]) for i in range(0, len(sequences), batch_size)]
    return batches


def sensitivity_batches(processor, adapter, config: CalibrationConfig, n: int, n_validation: int,
                        batch_size: int = 8) -> list[tuple[dict, torch.Tensor]]:
    """The windows the sensitivity of each (linear, format) is measured on: n sequences of L
    tokens in the calibration mix (alpha), held out from the calibration text windows and
    from the `n_validation` validation windows; the image+question part is drawn with
    another seed (the image pool is small, so images may repeat those of calibration)."""
    n_multimodal = round(config.alpha * n)
    batches = []
    if n - n_multimodal:
        windows = sensitivity_windows(text_token_ids(processor, config.text), n - n_multimodal, config.seq_len,
                                      config.seed, config.n_text + n_validation)
        batches += [({"input_ids": w, "attention_mask": torch.ones_like(w)},
                     torch.full(w.shape, TEXT, dtype=torch.int8)) for w in windows.split(batch_size)]
    if n_multimodal:
        samples = load_image_questions(config.images)
        sequences = multimodal_sequences(processor, samples, n_multimodal, config.seq_len, config.seed + 1)
        batches += [_batch(sequences[i:i + batch_size]) for i in range(0, len(sequences), batch_size)]
    return batches
