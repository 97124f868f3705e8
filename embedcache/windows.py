"""Cropping, overlapping windows, and stitching window outputs back to one row per token.

Nothing here truncates on its own: a crop happens only when the caller passes one, and the
plan says how many tokens it removed so the store can record it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CROPS = ("left", "right", "center")


@dataclass(frozen=True, slots=True)
class SequencePlan:
    keep_start: int  # first kept token of the tokenised sequence (after an explicit crop)
    keep_end: int  # one past the last kept token
    windows: tuple[tuple[int, int], ...]  # (start, end) of each model call, relative to keep_start
    n_input_tokens: int  # tokens of the whole sequence before any crop

    @property
    def n_tokens(self) -> int:
        return self.keep_end - self.keep_start

    @property
    def n_cropped(self) -> int:
        return self.n_input_tokens - self.n_tokens


def crop_range(n: int, max_length: int, crop: str) -> tuple[int, int]:
    """The kept [start, end) of n tokens cropped to max_length. 'left' removes from the left (keeps the 3' end)."""
    if n <= max_length:
        return 0, n
    if crop == "left":
        return n - max_length, n
    if crop == "right":
        return 0, max_length
    if crop == "center":
        start = (n - max_length) // 2
        return start, start + max_length
    raise ValueError(f"unknown crop {crop!r}; expected one of {CROPS}")


def window_starts(n: int, window: int, overlap: int) -> list[int]:
    """Starts of windows of `window` tokens covering n tokens, consecutive windows sharing >= `overlap`.

    The last window is aligned to the end, so every window is full-length (full context, equal shapes).
    """
    if n <= window:
        return [0]
    if not 0 <= overlap < window:
        raise ValueError(f"overlap {overlap} must be in 0..{window - 1} (window {window})")
    stride = window - overlap
    starts = list(range(0, n - window, stride))
    return starts + [n - window]


def plan_sequence(
    n_input_tokens: int, *, window: int, overlap: int, crop: str | None, max_length: int | None, fixed_window: bool
) -> SequencePlan:
    """Decide the crop and the windows of one tokenised sequence.

    Raises ValueError (the caller adds the record name) when a fixed-window encoder gets a
    sequence longer than its window and no crop was asked for.
    """
    start, end = 0, n_input_tokens
    if crop is not None:
        start, end = crop_range(n_input_tokens, max_length or window, crop)
    n = end - start
    if fixed_window:
        if n > window:
            raise ValueError(
                f"{n} tokens is longer than the encoder's fixed window of {window}; pass --crop left|right|center "
                f"to crop it (the crop is recorded in the store)"
            )
        return SequencePlan(start, end, ((0, n),), n_input_tokens)
    windows = tuple((s, min(s + window, n)) for s in window_starts(n, window, overlap))
    return SequencePlan(start, end, windows, n_input_tokens)


def stitch(windows: tuple[tuple[int, int], ...], outputs: list[torch.Tensor]) -> torch.Tensor:
    """Join per-window outputs (each (end - start, ...): rows first) into (n, ...).

    Where windows overlap, each token is taken from the window in which it sits further from the
    edge: the boundary between consecutive windows is the middle of their overlap.
    """
    if len(windows) == 1:
        return outputs[0]
    pieces = []
    prev_cut = 0
    for i, ((s, e), out) in enumerate(zip(windows, outputs)):
        next_cut = e if i == len(windows) - 1 else (windows[i + 1][0] + e) // 2
        pieces.append(out[prev_cut - s : next_cut - s])
        prev_cut = next_cut
    return torch.cat(pieces)  # (n, ...)


def central(x: torch.Tensor, k: int | None) -> torch.Tensor:
    """The central k rows of x (all rows when k is None or >= len(x)); odd leftovers go to the right."""
    if k is None or k >= len(x):
        return x
    start = (len(x) - k) // 2
    return x[start : start + k]
