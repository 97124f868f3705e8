"""Per-token loading: RAM and streamed features give the same batches; `group_mean` is the pooling."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from embedcache import open_store
from embedcache.store import ContentResult, create_store, open_writer
import torch.nn.functional as F

from fusion.data import InMemoryTokens, StreamedTokens, _pad, group_mean

DIM = 8
LENGTHS = {"a": 1, "b": 3, "c": 5, "d": 8, "e": 40}
ATTRS = {
    "format": "embedcache-store", "schema_version": 2, "fingerprint": "test", "embed_dim": DIM,
    "config": {"encoder": "test", "model": "synthetic", "pooling": "mean", "dtype": "float16"},
    "provenance": {}, "stored_dtype": {"tokens": "float16", "pooled": "float32"},
}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tokens.zarr"
    create_store(path, attrs=ATTRS, embed_dim=DIM, pooled=True, tokens=True, token_dtype="float16", shard_mb=1.0)
    writer = open_writer(path)
    rng = np.random.default_rng(0)
    results = []
    for key, n in LENGTHS.items():
        rows = rng.standard_normal((n, DIM)).astype(np.float16)
        results.append(ContentResult(key=f"k{key}", residues="A" * n, tokens=rows, pooled=rows.mean(0).astype(np.float32),
                                     n_input_tokens=n, n_cropped=0, n_windows=1))  # fmt: skip
    writer.commit(results, [(key, f"k{key}") for key in LENGTHS])
    writer.set_status("complete")
    return open_store(path)


def test_memory_and_stream_batches_are_identical(store):
    keys = list(LENGTHS)
    batch = ["e", None, "a", "d", "b", "e", "c"]  # an absent sample, a repeated record, every length
    memory = InMemoryTokens(store, keys).gather(batch)
    stream = StreamedTokens(store, keys).gather(batch)
    per_batch = _pad([None if k is None else torch.from_numpy(store.tokens(k)) for k in batch], DIM)  # the stored rows, padded
    for got in (memory, stream):
        assert torch.equal(got.x, per_batch.x) and torch.equal(got.mask, per_batch.mask)
        assert torch.equal(got.present, per_batch.present)
    assert memory.mask.sum(1).tolist() == [0 if k is None else LENGTHS[k] for k in batch]


def test_padding_live_rows_keeps_their_gradients():
    """Finetune pads its live encoders' outputs with the same `_pad`: gradients must reach them."""
    rows = [torch.randn(3, DIM, requires_grad=True), None, torch.randn(5, DIM, requires_grad=True)]
    batch = _pad(rows, DIM)
    assert batch.x.shape == (3, 5, DIM) and batch.mask.sum().item() == 8 and batch.present.tolist() == [True, False, True]
    (batch.x * 2).sum().backward()
    assert torch.equal(rows[0].grad, torch.full((3, DIM), 2.0)) and torch.equal(rows[2].grad, torch.full((5, DIM), 2.0))
    cached = _pad([r.detach().half() if r is not None else None for r in rows], DIM)  # the numpy path: equal values
    assert cached.x.dtype == torch.float16
    torch.testing.assert_close(cached.x.float(), batch.x.detach().half().float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n_rows, max_rows", [(513, 512), (2000, 512), (2048, 512), (1023, 300), (99, 17), (40, 3), (700, 2), (5000, 100), (50, 1)])
def test_group_mean_is_adaptive_average_pooling_bit_for_bit(n_rows, max_rows, dtype):
    """group_mean sums row gathers instead of calling the pooling; the numbers must not change by one bit
    (groups of 2..16 rows, overlapping or not; wider ones, 50 and 100 rows here, go through the pooling)."""
    x = (torch.randn(n_rows, 24, generator=torch.Generator().manual_seed(n_rows)) * 3 + 1).to(dtype)
    pooled = F.adaptive_avg_pool1d(x.float().T[None], max_rows)[0].T  # (max_rows, d)
    got = group_mean(x, max_rows)
    assert got.dtype == torch.float32 and torch.equal(got, pooled)


def test_group_mean_passes_gradients_to_every_row():
    x = torch.randn(700, 4, requires_grad=True)
    group_mean(x, 300).sum().backward()
    expected = torch.autograd.grad(F.adaptive_avg_pool1d(x.T[None], 300).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
    assert (x.grad > 0).all()


def test_batches_keep_the_stored_dtype(store):
    """fp16 rows travel as fp16: half the bytes to collate and queue."""
    for kind in (InMemoryTokens, StreamedTokens):
        assert kind(store, list(LENGTHS)).gather(["e", "a", None]).x.dtype == torch.float16


def test_the_model_sees_the_same_numbers_from_fp16_and_float32_batches(store):
    """The fp16 -> float32 cast happens in the model's standardisation, exactly: predictions are bit-equal."""
    from fusion.batch import ModalityBatch
    from fusion.models import FusionModel, FusionModelConfig

    half = StreamedTokens(store, list(LENGTHS)).gather(["e", "b", None, "c"])
    full = ModalityBatch(x=half.x.float(), mask=half.mask, present=half.present)
    torch.manual_seed(0)
    config = FusionModelConfig(modalities=("rna",), input_dims=(("rna", DIM),), n_targets=3, target_names=("a", "b", "c"),
                               aggregator="cross-attention", d_model=16, n_heads=2)
    model = FusionModel(config).eval()
    with torch.no_grad():
        assert torch.equal(model({"rna": half}), model({"rna": full}))


def _batch_memory(_):
    from fusion.data import _zeros

    tensor, array = _zeros((2, 3, 4), np.dtype("float16"))
    array[1, 2] = 7  # numpy writes, the tensor sees it
    return tensor.is_shared(), tensor.dtype, float(tensor.sum())


def test_batches_made_in_worker_processes_are_shared_memory_from_the_start():
    """What a worker returns in shared memory crosses to the training process without being copied again."""
    from torch.utils.data import DataLoader

    assert _batch_memory(0) == (False, torch.float16, 28.0)  # this process: plain memory
    in_worker = list(DataLoader(range(2), batch_size=None, num_workers=1, collate_fn=_batch_memory, multiprocessing_context="fork"))
    assert in_worker == [(True, torch.float16, 28.0)] * 2  # zeroed, then written through the numpy view


def test_batches_are_made_two_at_a_time_and_arrive_in_order_up_to_the_first_error():
    """One thread averages or pads a batch while the other's reads run; the consumer sees the epoch's order."""
    import threading
    import time

    from fusion.data import _prefetch

    lock, running, most, started = threading.Lock(), [0], [0], []

    def make(r: int) -> int:
        with lock:
            started.append(r)
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05 if r % 2 == 0 else 0.01)  # even batches finish after the odd one made beside them
        with lock:
            running[0] -= 1
        if r == 5:
            raise ValueError("bad record in batch 5")
        return r

    made = []
    with pytest.raises(ValueError, match="bad record in batch 5"):
        for b in _prefetch(make, list(range(8)), depth=2):
            made.append(b)
    assert made == [0, 1, 2, 3, 4] and most[0] == 2
    started.clear()
    epoch = _prefetch(make, list(range(100)), depth=2)
    assert next(epoch) == 0
    epoch.close()  # the consumer stopped: the batches not yet started are never made
    time.sleep(0.2)
    assert len(started) <= 3


def test_objects_older_than_an_epoch_are_frozen_while_it_is_read_and_only_then(demo_data):
    """gc.freeze() for the epoch (the collector's full passes skip the import-time heap), undone when it ends
    or is abandoned; a heap the caller froze stays frozen."""
    from fusion.data import DataConfig, open_batches
    from fusion.run import read_manifest

    batches = open_batches(DataConfig(manifest=demo_data["prep"], stores=demo_data["stores"], batch_size=8, loading="stream"),
                           read_manifest(demo_data["prep"]), log=lambda s: None)  # fmt: skip
    during = [gc.get_freeze_count() for _ in batches("train")]
    assert len(during) == batches.n_batches("train") and min(during) > 0 and gc.get_freeze_count() == 0
    epoch = batches("train")
    next(epoch)
    assert gc.get_freeze_count() > 0
    epoch.close()  # a loop left early (early stopping, an error): unfrozen when its iterator goes
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        assert len(list(batches("val"))) == batches.n_batches("val") and gc.get_freeze_count() > 0  # still the caller's
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("loading, max_tokens", [("memory", None), ("stream", None), ("stream", 5)])
def test_worker_processes_make_the_same_batches_in_the_same_order(demo_data, loading, max_tokens):
    """--workers N: DataLoader processes assemble the epoch (into shared memory); the batches, zero padding
    included, are the ones one thread makes."""
    from fusion.data import DataConfig, DataError, open_batches
    from fusion.run import read_manifest

    manifest = read_manifest(demo_data["prep"])
    opened = {w: open_batches(DataConfig(manifest=demo_data["prep"], stores=demo_data["stores"], batch_size=8, loading=loading, workers=w,
                                         max_tokens=max_tokens),
                              manifest, log=lambda s: None) for w in (0, 2)}  # fmt: skip
    thread, workers = (list(opened[w]("train", shuffle=True, epoch=1)) for w in (0, 2))
    assert gc.get_freeze_count() == 0  # frozen only while the epoch was read
    assert len(thread) == len(workers) == opened[0].n_batches("train")
    for a, b in zip(thread, workers):
        assert a.sample_ids == b.sample_ids and torch.equal(a.targets, b.targets) and torch.equal(a.target_mask, b.target_mask)
        for m in a.features:
            assert torch.equal(a.features[m].x, b.features[m].x) and torch.equal(a.features[m].mask, b.features[m].mask)
            assert torch.equal(a.features[m].present, b.features[m].present)
    with pytest.raises(DataError, match="workers must be a whole number >= 0"):
        DataConfig(manifest=demo_data["prep"], stores=demo_data["stores"], workers=-1)
