"""A hub id's fingerprint holds the commit its weights came from, so two revisions never share a store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from embedcache.tiny_models import make_tiny_esm2

from .conftest import write_fasta

ROOT = Path(__file__).resolve().parents[2]


def plant(cache: Path, repo_id: str, commit: str, seed: int) -> None:
    """A tiny model as the hub cache lays out `repo_id`'s main revision at `commit`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    make_tiny_esm2(repo / "snapshots" / commit, seed=seed)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def build(tmp_path: Path, cache: Path, out: Path) -> dict:
    fasta = write_fasta(tmp_path / "in.fa", {"p1": "MKTAYIAKQRQ"})
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "cli.embedcache_cli", "build", str(fasta), "-o", str(out), "--encoder", "esm2",
                           "--model", "org/tiny-esm2", "--no-progress"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads((out / "zarr.json").read_text())["attributes"]["embedcache"]


def test_the_fingerprint_names_the_hub_commit(tmp_path):
    first, second = "1" * 40, "2" * 40
    plant(tmp_path / "hub", "org/tiny-esm2", first, seed=0)
    a = build(tmp_path, tmp_path / "hub", tmp_path / "a.zarr")
    assert a["provenance"]["weights"] == {"source": "hub", "hub_id": "org/tiny-esm2", "revision": first}
    plant(tmp_path / "hub", "org/tiny-esm2", second, seed=1)  # main moved on
    b = build(tmp_path, tmp_path / "hub", tmp_path / "b.zarr")
    assert b["provenance"]["weights"]["revision"] == second and a["fingerprint"] != b["fingerprint"]


def test_a_local_directory_is_hashed_once_while_its_weights_stay_the_same(tmp_path, monkeypatch):
    """A build loads its encoder twice (to plan, to embed): the second load reuses the hash of unchanged
    files; a weight file rewritten in place (same path and size, new bytes) is hashed again."""
    import hashlib

    from embedcache.encoders.base import weights_identity

    model = make_tiny_esm2(tmp_path / "m", seed=0)
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    first = weights_identity(str(model), None, None)
    assert weights_identity(str(model), None, None) == first and len(hashed) == 1
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1000))  # a new mtime, as a rewrite gives
    assert weights_identity(str(model), None, None) != first and len(hashed) == 2
