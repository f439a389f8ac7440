"""BiLLM's closed-form searches (luq.quant.binsearch) against binarizing every candidate, in
both forms: the compiled one (luq.quant.native) and the torch one it falls back to."""

import pytest
import torch

from luq.quant import binsearch
from luq.quant.billm import binarize
from luq.quant.packing import pack_bits, pack_bool


def loop_error(w, masks, order):
    """Squared error of binarizing each masked group of w per row (order 1 or 2), summed."""
    total = 0.0
    for mask in masks:
        approx = binarize(w, mask, order)[0]
        total += float(((w - approx) ** 2 * mask).double().sum())
    return total


def rows_with_lopsided_tails(rows=40, cols=70, seed=0):
    """Student-t rows, some shifted so that their sparse group sits mostly in one tail (the
    sparse mean then falls inside a tail, the searches' slow path)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((rows, cols)) * 0.02
    w[: rows // 4] += 0.05 * torch.rand(rows // 4, 1, generator=g)
    return w


@pytest.fixture(params=["native", "torch"])
def search_form(request, monkeypatch):
    if request.param == "native" and binsearch.native.compiler() is None:
        pytest.skip("no C compiler: the torch form serves")
    if request.param == "native":   # a compile error fails, quoting the compiler
        assert binsearch.native.build_error("binsearch") is None, binsearch.native.build_error("binsearch")
    monkeypatch.setattr(binsearch, "use_native", lambda x: request.param == "native")
    return request.param


@pytest.mark.parametrize("row_chunk", [7, 256])
def test_split_errors_match_binarizing_each_break_point(row_chunk, search_form, monkeypatch):
    monkeypatch.setattr(binsearch, "ROW_CHUNK", row_chunk)
    w = rows_with_lopsided_tails()
    splits = w.abs().flatten().sort().values[torch.linspace(100, w.numel() - 100, 15).long()]
    fast = binsearch.split_errors(w, splits)
    slow = [loop_error(w, [w.abs() < t, w.abs() >= t], 1) for t in splits]
    torch.testing.assert_close(fast, torch.tensor(slow, dtype=torch.float64), rtol=1e-5, atol=1e-9)
    per_row = splits[None, :].expand(w.shape[0], -1).clone()   # one break point per row and candidate
    torch.testing.assert_close(binsearch.split_errors(w, per_row), fast, rtol=1e-5, atol=1e-9)
    per_row[::2, 3] = float("inf")   # no sparse group on those rows
    whole = torch.ones_like(w, dtype=torch.bool)
    expected = loop_error(w[::2], [whole[::2]], 1) + loop_error(w[1::2], [w[1::2].abs() < splits[3],
                                                                         w[1::2].abs() >= splits[3]], 1)
    assert binsearch.split_errors(w, per_row)[3].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("row_chunk", [7, 256])
def test_leading_split_errors_match_binarizing_each_count(row_chunk, search_form, monkeypatch):
    monkeypatch.setattr(binsearch, "ROW_CHUNK", row_chunk)
    w = rows_with_lopsided_tails(seed=1)
    counts = torch.tensor([1, 2, 5, 9, 20, 33])
    fast = binsearch.leading_split_errors(w, counts)
    lead = torch.arange(w.shape[1])[None, :]
    slow = [loop_error(w, [(lead < n).expand_as(w), (lead >= n).expand_as(w)], 2) for n in counts.tolist()]
    torch.testing.assert_close(fast, torch.tensor(slow, dtype=torch.float64), rtol=1e-5, atol=1e-9)
    # a subset of counts, in any order, gives the same errors
    torch.testing.assert_close(binsearch.leading_split_errors(w, counts[[4, 1]]), fast[[4, 1]])


def test_sort_rows_and_pack_bool_match_torch():
    x = torch.randn(33, 49)
    values, order = binsearch.sort_rows(x, indices=True)
    assert torch.equal(values, x.sort(-1).values) and torch.equal(x.gather(-1, order), values)
    assert torch.equal(binsearch.sort_rows(x), values)
    for mask in (torch.rand(7, 45) > 0.5, torch.rand(3, 8) > 0.5, (torch.rand(9, 40) > 0.5)[:, ::2]):
        assert torch.equal(pack_bool(mask), pack_bits(mask.to(torch.int64), 1))
