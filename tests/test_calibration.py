"""Calibration settings and the text side, on the real SmolLM2 tokenizer and Wikipedia text."""

import pytest
import torch

from luq import LuqError
from luq.calibration import CalibrationConfig, load_text, text_batches, text_windows
from luq.capture import TEXT


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=1.5), "--alpha must be in"), (dict(alpha=-0.1), "--alpha must be in"),
    (dict(samples=0), "must be positive"), (dict(seq_len=-4), "must be positive"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(LuqError, match=message):
        CalibrationConfig(**kwargs)


def test_alpha_splits_sequences():
    c = CalibrationConfig(alpha=0.25, samples=128)
    assert (c.n_multimodal, c.n_text) == (32, 96)


def test_windows_are_seeded_and_disjoint():
    ids = torch.arange(10_000)
    a = text_windows(ids, 8, 100, seed=3)
    assert torch.equal(a, text_windows(ids, 8, 100, seed=3))
    assert not torch.equal(a, text_windows(ids, 8, 100, seed=4))
    assert len(set(a.flatten().tolist())) == 800  # no token used twice


def test_short_text_says_how_many_tokens():
    with pytest.raises(LuqError, match=r"has 1,000 tokens, fewer than the 4 x 256 = 1,024 needed"):
        text_windows(torch.arange(1000), 4, 256, seed=0)


def test_missing_local_source_is_one_clear_error(tmp_path):
    with pytest.raises(LuqError, match="calibration text not found"):
        load_text(str(tmp_path / "nope.txt"))
    with pytest.raises(LuqError, match="no .txt files"):
        load_text(str(tmp_path))


def test_local_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert load_text(str(tmp_path)) == "first\n\nsecond"
    assert load_text(str(tmp_path / "a.txt")) == "first"


def test_text_batches_on_real_tokenizer():
    from luq.zoo import smollm2

    _, tokenizer = smollm2.load_smollm2()
    config = CalibrationConfig(samples=10, seq_len=64, seed=1)
    batches = text_batches(tokenizer, config, batch_size=4)
    assert [b[0]["input_ids"].shape for b in batches] == [(4, 64), (4, 64), (2, 64)]
    assert all((kind == TEXT).all() for _, kind in batches)
    again = text_batches(tokenizer, config, batch_size=4)
    assert all(torch.equal(x[0]["input_ids"], y[0]["input_ids"]) for x, y in zip(batches, again))
