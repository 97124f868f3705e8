"""What leaves the device after each forward: only what the store keeps, in the dtype it keeps it.

A sequence in one window (most proteins and transcripts) is reduced where its output was computed: its
stored rows (the central `--token-bins`, `--token-pool` means) cast to the stored dtype, and its pooled
vector in float32, by `embedcache.embed.assemble` from the same float32 values, so the rows are bit for
bit those the host would make and the pooled vectors equal within float32 rounding (with the default
reductions, the batch's sequences are averaged together by one segment reduction). A windowed
sequence's windows leave as float32 outputs: the host stage stitches them once all have run.

On a CUDA device the batch's pieces are copied into pinned host buffers, reused batch after batch, with
an asynchronous copy: the forward thread queues the next batch's work without waiting for the copy,
and the host stage waits for the copy's event before it reads them. Should the device run out of
memory for the reduction, that batch's outputs go to the host stage as they are. On the CPU there is
nothing to copy: the outputs are handed over as they are and the host stage reduces them on its own
thread (`on_host`), casting rows straight into the shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from embedcache.config import BuildConfig
from embedcache.embed import STORED_DTYPES, assemble
from embedcache.encoders import WindowOutput
from embedcache.windows import SequencePlan


def reduces_on_device(device: torch.device) -> bool:
    """Whether batches are reduced where they were computed (DeviceStage) rather than on the host stage:
    on CUDA, whose copies into pinned memory an event tells the end of."""
    return device.type == "cuda"


@dataclass
class HostBatch:
    """One batch's outputs on the host, per item (sequence, window): `rows` (stored rows) and `pooled`
    ((k, d) float32, None when not pooling) for one-window sequences, `window` (float32) for the others.
    Rows are in the stored dtype, or float32 where they are still to be cast (on the CPU)."""

    items: list[tuple[int, int]]
    rows: list[torch.Tensor | None]
    pooled: list[torch.Tensor | None]
    window: list[WindowOutput | None]
    ready: torch.cuda.Event | None = None  # set when the copies into pinned buffers are done
    borrowed: bool = False  # views of a buffer DeviceStage reuses a few batches on

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    def keep(self, at: int) -> "HostBatch":
        """Item `at` alone, copied out of the reused buffer: for a sequence that waits for earlier ones."""
        window = self.window[at]
        return HostBatch([self.items[at]], [_clone(self.rows[at])], [_clone(self.pooled[at])],
                         [None if window is None else WindowOutput(window.hidden.clone(), _clone(window.cls))])  # fmt: skip


def on_host(items: list[tuple[int, int]], outs: Sequence[WindowOutput], plans: list[SequencePlan], config: BuildConfig) -> HostBatch:
    """The CPU's way: float32 CPU outputs, reduced on the host stage's thread; rows stay float32 views, cast
    into the shard buffer by the writer (no array of their own, whose fresh pages cost more than the cast)."""
    rows, pooled, window = _reduce(items, [_to_host(o) for o in outs], plans, config, on_device=False)
    return HostBatch(items, rows, pooled, window)


ALIGN = 16  # bytes: where each piece of a batch starts in its host buffer


class DeviceStage:
    """Reduces each batch on its device and copies the results into one of SLOTS pinned host buffers.

    A slot is reused SLOTS batches later. The host stage takes batches in order from a queue of at most
    `queued` and is done with a batch before it takes the next (it copies what it keeps), so SLOTS =
    queued + 2 (the batches queued, the one it works on, the one being filled) never overwrites a batch
    still in use."""

    def __init__(self, plans: list[SequencePlan], config: BuildConfig, device: torch.device, queued: int):
        self.plans, self.config, self.device = plans, config, device
        self.slots: list[torch.Tensor | None] = [None] * (queued + 2)
        self.n = 0

    def __call__(self, items: list[tuple[int, int]], outs: Sequence[WindowOutput]) -> HostBatch | Sequence[WindowOutput]:
        """The batch's HostBatch, or, when the device has no memory left for the reduction, its outputs as they
        are (the host stage then reduces them on the CPU, as it does for a CPU build)."""
        try:
            with torch.inference_mode(), nullcontext() if self.device.type != "cuda" else torch.cuda.device(self.device):
                return self._reduce_and_copy(items, outs)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return outs

    def _reduce_and_copy(self, items: list[tuple[int, int]], outs: Sequence[WindowOutput]) -> HostBatch:
        rows, pooled, window = _reduce(items, outs, self.plans, self.config, on_device=True)
        pieces = [t for t in rows if t is not None] + [t for t in pooled if t is not None]
        pieces += [t for w in window if w is not None for t in (w.hidden, w.cls) if t is not None]
        if not pieces:
            return HostBatch(items, rows, pooled, window)
        # Every piece as bytes, back to back in one device buffer (each from a multiple of ALIGN, so that any
        # dtype can be viewed there), then one copy into the slot.
        parts = []
        for p in pieces:
            parts.append(p.contiguous().reshape(-1).view(torch.uint8))
            if len(parts[-1]) % ALIGN:
                parts.append(torch.zeros(ALIGN - len(parts[-1]) % ALIGN, dtype=torch.uint8, device=p.device))
        flat = torch.cat(parts)
        slot = self._slot(len(flat))
        host = slot[: len(flat)]
        host.copy_(flat, non_blocking=True)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))  # the stream the copy was queued on
        at = 0

        def back(p: torch.Tensor) -> torch.Tensor:
            nonlocal at
            n = p.numel() * p.element_size()
            out = host[at : at + n].view(p.dtype).reshape(p.shape)
            at += -(-n // ALIGN) * ALIGN
            return out

        rows = [None if t is None else back(t) for t in rows]
        pooled = [None if t is None else back(t) for t in pooled]
        window = [None if w is None else WindowOutput(back(w.hidden), None if w.cls is None else back(w.cls)) for w in window]
        return HostBatch(items, rows, pooled, window, ready, borrowed=True)

    def _slot(self, nbytes: int) -> torch.Tensor:
        i = self.n % len(self.slots)
        self.n += 1
        slot = self.slots[i]
        if slot is None or len(slot) < nbytes:
            pinned = self.device.type == "cuda"
            slot = torch.empty(max(nbytes, 2 * len(slot) if slot is not None else nbytes), dtype=torch.uint8, pin_memory=pinned)
            self.slots[i] = slot
        return slot


def _reduce(items: list[tuple[int, int]], outs: Sequence[WindowOutput], plans: list[SequencePlan], config: BuildConfig,
            on_device: bool) -> tuple[list, list, list]:  # fmt: skip
    """Per item: (stored rows, pooled) of a one-window sequence, else its float32 window output.

    On the device, rows are cast to the stored dtype, and with the default reductions (every row, mean or no
    pooling) the batch's one-window sequences are reduced together: a few kernels a batch, not a few a sequence."""
    n = len(items)
    rows: list[torch.Tensor | None] = [None] * n
    pooled: list[torch.Tensor | None] = [None] * n
    window: list[WindowOutput | None] = [None] * n
    dtype = STORED_DTYPES[config.dtype]
    one = [k for k, (i, _) in enumerate(items) if len(plans[i].windows) == 1]
    together = on_device and one and config.token_bins is None and (config.token_pool or 1) == 1 and config.pooling in ("mean", "none")
    if together:
        hidden = torch.cat([outs[k].hidden for k in one]).float()  # (R, k, d): the one-window sequences back to back
        lengths = [len(outs[k].hidden) for k in one]
        if config.tokens:
            for k, r in zip(one, hidden.to(dtype).split(lengths)):
                rows[k] = r
        if config.pooling == "mean":
            # lengths queued, not waited for (a blocking copy would wait for the forward); unsafe: no checks that read them back
            counts = torch.tensor(lengths).to(hidden.device, non_blocking=True)
            means = torch.segment_reduce(hidden.flatten(1), "mean", lengths=counts, unsafe=True)
            for k, m in zip(one, means.view(len(one), *hidden.shape[1:])):
                pooled[k] = m
    for k, ((i, _), out) in enumerate(zip(items, outs)):
        if len(plans[i].windows) > 1:
            window[k] = _as_float(out)
        elif not together:
            kept, pooled[k] = assemble(plans[i], [_as_float(out)], config)  # as the host path has them
            if config.tokens:
                rows[k] = kept.to(dtype) if on_device else kept
    return rows, pooled, window


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def _as_float(out: WindowOutput) -> WindowOutput:
    return WindowOutput(out.hidden.float(), None if out.cls is None else out.cls.float())


def _to_host(out: WindowOutput) -> WindowOutput:
    """A window's output on the CPU: copied first, converted there (after an out-of-memory error on the device,
    nothing more is allocated on it)."""
    if out.hidden.device.type == "cpu":
        return out
    return WindowOutput(out.hidden.cpu().float(), None if out.cls is None else out.cls.cpu().float())
