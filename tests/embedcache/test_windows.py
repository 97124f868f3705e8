"""Exact expectations for crops, windows and stitching."""

import pytest
import torch

from embedcache.embed import make_batches
from embedcache.windows import central, crop_range, plan_sequence, stitch, window_starts


def test_crop_ranges():
    assert crop_range(10, 4, "left") == (6, 10)  # keeps the 3' end
    assert crop_range(10, 4, "right") == (0, 4)
    assert crop_range(10, 4, "center") == (3, 7)
    assert crop_range(3, 4, "left") == (0, 3)


def test_window_starts_cover_everything_with_full_windows():
    assert window_starts(5, 10, 2) == [0]
    assert window_starts(25, 10, 2) == [0, 8, 15]
    for n in range(11, 200):
        starts = window_starts(n, 10, 3)
        assert starts[0] == 0 and starts[-1] + 10 == n
        assert all(b - a <= 7 for a, b in zip(starts, starts[1:]))  # overlap >= 3


def test_stitch_takes_each_token_from_the_window_where_it_is_most_central():
    n, window = 25, 10
    windows = tuple((s, s + window) for s in window_starts(n, window, 2))
    # each window's output row = (window index, absolute position)
    outs = [torch.tensor([[i, s + j] for j in range(window)], dtype=torch.float) for i, (s, _) in enumerate(windows)]
    got = stitch(windows, outs)
    assert got[:, 1].tolist() == list(range(n))
    assert got[:, 0].tolist() == [0] * 9 + [1] * 7 + [2] * 9  # cuts at (8+10)//2=9 and (15+18)//2=16


def test_plan_records_crops_and_refuses_silent_truncation():
    p = plan_sequence(100, window=30, overlap=5, crop="left", max_length=40, fixed_window=False)
    assert (p.keep_start, p.keep_end, p.n_cropped, len(p.windows)) == (60, 100, 60, 2)
    with pytest.raises(ValueError, match="--crop"):
        plan_sequence(100, window=30, overlap=0, crop=None, max_length=None, fixed_window=True)
    p = plan_sequence(100, window=30, overlap=0, crop="center", max_length=None, fixed_window=True)
    assert (p.keep_start, p.n_tokens, p.windows) == (35, 30, ((0, 30),))


def test_central_rows():
    x = torch.arange(10)
    assert central(x, 4).tolist() == [3, 4, 5, 6]
    assert central(x, None).tolist() == list(range(10))


def test_batches_respect_the_budget_and_equal_lengths():
    items = [(n + 2, n, i) for i, n in enumerate([5, 50, 7, 50, 5, 300])]
    batches = make_batches(items, max_tokens=110, equal_lengths=False)
    assert batches[0] == [5]  # longer than the budget: alone
    assert sorted(sum(batches, [])) == list(range(6))
    for b in batches[1:]:
        assert len(b) * max(items[i][0] for i in b) <= 110
    same = make_batches(items, max_tokens=10_000, equal_lengths=True)
    assert all(len({items[i][1] for i in b}) == 1 for b in same)
