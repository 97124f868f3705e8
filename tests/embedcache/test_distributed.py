"""Builds on a real dask.distributed LocalCluster with worker processes: the same store as in-process,
a worker killed mid-build, the client killed and the command run again, and into S3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed", reason="dask.distributed is a test dependency")

from embedcache import open_store  # noqa: E402
from embedcache.build import build  # noqa: E402
from embedcache.config import BuildConfig  # noqa: E402
from tests.conftest import S3_ENV, unique_name  # noqa: E402

from .conftest import write_fasta  # noqa: E402
from .test_parity import AA, random_seqs  # noqa: E402

pytestmark = pytest.mark.storage

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "cli.embedcache_cli"]


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes declaring one GPU slot each, as `--scheduler local:2` starts."""
    os.environ.update(S3_ENV)  # workers inherit the environment: credentials for the moto S3 tests
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources={"GPU": 1},
                                  dashboard_address=":0", env={"OMP_NUM_THREADS": "1"}) as c:  # fmt: skip
        yield c


def config(models, encoder: str, **kw) -> BuildConfig:
    kw.setdefault("shard_mb", 0.01)
    kw.setdefault("unit_mb", 0.01)  # many small units: both workers get work
    return BuildConfig.create(encoder, str(models[encoder]), **kw)


def inputs(tmp_path: Path, encoder: str) -> Path:
    if encoder == "esm2":
        records = random_seqs(AA, [40 + (i * 53) % 260 for i in range(40)], seed=7)  # several longer than the window
        records["dup"] = records["s0_40"]
    else:
        records = random_seqs("ACGT", [30 + (i * 71) % 700 for i in range(30)], seed=8)
        records["dup"] = records["s1_101"]
    return write_fasta(tmp_path / f"{encoder}.fa", records)


def assert_same_store(a, b, exact: bool = True) -> None:
    """Same ids, content and embeddings: bit for bit when the same units ran (`exact`), else to fp rounding."""
    assert a.complete and b.complete and a.verify() == [] and b.verify() == []
    assert a.ids == b.ids
    for rid in b.ids:
        assert a.record_info(rid)["content_key"] == b.record_info(rid)["content_key"]
        if exact:
            np.testing.assert_array_equal(a.tokens(rid), b.tokens(rid))
            np.testing.assert_array_equal(a.pooled([rid]), b.pooled([rid]))
        else:
            np.testing.assert_allclose(a.tokens(rid), b.tokens(rid), rtol=1e-3, atol=1e-3)  # fp16 rows: one rounding step
            np.testing.assert_allclose(a.pooled([rid]), b.pooled([rid]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder", ["esm2", "nucleotide-transformer"])
def test_cluster_build_equals_in_process_build(encoder, cluster, tmp_path, models):
    fasta = inputs(tmp_path, encoder)
    cfg = config(models, encoder, window=64 if encoder == "esm2" else 32)  # windowed long sequences
    report = build(cfg, [fasta], tmp_path / "local.zarr", progress=False, log=lambda s: None)
    assert len(report.plan.units) > 2
    build(cfg, [fasta], tmp_path / "dask.zarr", scheduler=cluster.scheduler_address, progress=False, log=lambda s: None)
    assert_same_store(open_store(tmp_path / "dask.zarr"), open_store(tmp_path / "local.zarr"))
    assert open_store(tmp_path / "dask.zarr").builds[-1]["executor"].startswith("dask")


def test_worker_killed_mid_build_is_replaced(cluster, tmp_path, models):
    fasta = inputs(tmp_path, "esm2")
    cfg = config(models, "esm2", window=64)
    build(cfg, [fasta], tmp_path / "ref.zarr", progress=False, log=lambda s: None)
    client = distributed.Client(cluster)
    pids = list(client.run(os.getpid).values())
    commits = []

    def kill_one_worker_after_first_commit() -> None:
        deadline = time.time() + 60
        while not commits and time.time() < deadline:
            time.sleep(0.01)
        os.kill(pids[0], signal.SIGKILL)  # its nanny starts a new one; its unit reruns elsewhere

    killer = threading.Thread(target=kill_one_worker_after_first_commit)
    killer.start()
    build(cfg, [fasta], tmp_path / "dask.zarr", scheduler=cluster.scheduler_address, progress=False,
          log=lambda s: commits.append(s))  # fmt: skip
    killer.join()
    client.close()
    assert_same_store(open_store(tmp_path / "dask.zarr"), open_store(tmp_path / "ref.zarr"))


def test_client_killed_then_rerun_completes(cluster, tmp_path, models):
    fasta = inputs(tmp_path, "esm2")
    cfg = config(models, "esm2", window=64)
    build(cfg, [fasta], tmp_path / "ref.zarr", progress=False, log=lambda s: None)
    store = tmp_path / "dask.zarr"
    args = [*CLI, "build", str(fasta), "-o", str(store), "--encoder", "esm2", "--model", str(models["esm2"]), "--window", "64",
            "--shard-mb", "0.01", "--unit-mb", "0.01", "--no-progress", "--scheduler", cluster.scheduler_address]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        try:
            if open_store(store).n_commits >= 2:
                break
        except Exception:  # not created yet
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed; make the input larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # The sequences left after the kill form other units, so other batches: equal up to fp rounding.
    assert_same_store(open_store(store), open_store(tmp_path / "ref.zarr"), exact=False)


def test_cluster_build_into_s3(cluster, s3_endpoint, tmp_path, models):
    fasta = inputs(tmp_path, "esm2")
    cfg = config(models, "esm2", window=64)
    build(cfg, [fasta], tmp_path / "ref.zarr", progress=False, log=lambda s: None)
    url = f"s3://embedcache-test/{unique_name('dask')}.zarr"
    options = {"endpoint_url": s3_endpoint}
    build(cfg, [fasta], url, storage_options=options, scheduler=cluster.scheduler_address, progress=False, log=lambda s: None)
    assert_same_store(open_store(url, options), open_store(tmp_path / "ref.zarr"))


def test_local_scheduler_flag_starts_its_own_cluster(tmp_path, models):
    fasta = write_fasta(tmp_path / "a.fa", random_seqs(AA, [30, 60, 90, 120], seed=3))
    logs: list[str] = []
    build(config(models, "esm2"), [fasta], tmp_path / "s.zarr", scheduler="local:2", progress=False, log=logs.append)
    assert any(m.startswith("dask: 2 workers at tcp://") for m in logs), logs
    assert open_store(tmp_path / "s.zarr").verify() == []
