"""Calibration data: N sequences of L tokens, text and image+question mixed at ratio alpha.

Paper Eq. 9: D_cal = Sample(T, (1 - alpha) N) U Sample(M, alpha N). This module holds
the settings and the text side (sources, tokenized windows); the image+question side
goes through each model's own processor and chat template.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from luq.capture import TEXT
from luq.errors import LuqError

# hub text sources by short name: (dataset, config, split, column)
HUB_TEXT = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text")}


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
        from luq.assets import wikipedia_text
        return wikipedia_text()
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


def text_windows(token_ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """n non-overlapping windows of seq_len tokens at seeded random places: [n, seq_len]."""
    slots = token_ids.numel() // seq_len
    if slots < n:
        raise LuqError(f"the calibration text has {token_ids.numel():,} tokens, fewer than the "
                       f"{n} x {seq_len} = {n * seq_len:,} needed; give more text or lower --samples/--seq-len")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(slots, generator=g)[:n].sort().values
    return torch.stack([token_ids[s * seq_len:(s + 1) * seq_len] for s in chosen.tolist()])


def validation_windows(token_ids: torch.Tensor, n: int, seq_len: int, seed: int, n_calibration: int) -> torch.Tensor:
    """n windows disjoint from the `n_calibration` ones `text_windows` draws with the same
    seed (the next slots of the same permutation): held-out text for the threshold search."""
    slots = token_ids.numel() // seq_len
    if slots < n_calibration + n:
        raise LuqError(f"the text has {token_ids.numel():,} tokens, fewer than the {n_calibration} calibration + "
                       f"{n} validation windows of {seq_len} tokens need; give more text or fewer samples")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(slots, generator=g)[n_calibration:n_calibration + n].sort().values
    return torch.stack([token_ids[s * seq_len:(s + 1) * seq_len] for s in chosen.tolist()])


def text_token_ids(tokenizer, source: str | None) -> torch.Tensor:
    """The whole text source, tokenized without special tokens."""
    from luq.assets import cache_root
    from luq.store import atomic_write

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


def calibration_batches(processor, adapter, config: CalibrationConfig, batch_size: int = 8) -> list[tuple[dict, torch.Tensor]]:
    """The whole calibration set for a model: text windows, plus image+question sequences
    when alpha > 0 (the model must take images)."""
    if config.n_multimodal or config.images:
        if not adapter.multimodal:
            raise LuqError(f"{adapter.family} models take no images: drop --calib-images and use --alpha 0")
        raise LuqError("multimodal calibration is not implemented yet; use --alpha 0")
    return text_batches(processor, config, batch_size)
