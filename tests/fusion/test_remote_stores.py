"""fusion train, evaluate and finetune from stores in S3 (moto's server on 127.0.0.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.fusion_cli import main as fusion_main
from embedcache.build import build
from embedcache.config import BuildConfig
from tests.conftest import unique_name

pytestmark = pytest.mark.storage

FAST = ["--epochs", "2", "--d-model", "16", "--head-hidden", "16", "--no-progress"]


@pytest.fixture(scope="module")
def s3_stores(demo_data, s3_endpoint) -> dict[str, str]:
    """The demo's protein and RNA stores, built straight into S3."""
    stores = {}
    for modality in ("protein", "rna"):
        encoder, model_dir, extra = demo_data["models"][modality]
        url = f"s3://embedcache-test/{unique_name(modality)}.zarr"
        build(BuildConfig.create(encoder, str(model_dir), **extra), [Path(demo_data["prep"]) / f"{modality}.fa"], url,
              storage_options={"endpoint_url": s3_endpoint}, progress=False, log=lambda s: None)  # fmt: skip
        stores[modality] = url
    return stores


def _store_args(stores: dict[str, str], endpoint: str) -> list[str]:
    return [*(a for m, p in stores.items() for a in ("--store", f"{m}={p}")), "--storage-option", f"endpoint_url={endpoint}"]


def test_train_evaluate_from_s3(demo_data, s3_stores, s3_endpoint, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--manifest", demo_data["prep"], *_store_args(s3_stores, s3_endpoint), "--features", "tokens", "--out", str(run), *FAST]
    assert fusion_main(args) == 0
    data = json.loads((run / "run.json").read_text())["data"]
    assert data["stores"] == s3_stores  # URLs kept as given, not turned into local paths
    assert fusion_main(["evaluate", str(run), "--out", str(tmp_path / "eval")]) == 0  # options come from run.json


def test_finetune_from_s3(demo_data, s3_stores, s3_endpoint, tmp_path):
    run = tmp_path / "ft"
    stores = {"protein": s3_stores["protein"]}  # one small live encoder keeps the test short
    args = ["finetune", "--manifest", demo_data["prep"], *_store_args(stores, s3_endpoint), "--features", "pooled",
            "--batch-size", "16", "--out", str(run), *FAST]  # fmt: skip
    assert fusion_main(args) == 0
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


def test_max_tokens_reduces_s3_stores_once_into_a_local_directory(demo_data, s3_stores, s3_endpoint, tmp_path):
    run, reduced = tmp_path / "run", tmp_path / "reduced"
    args = ["train", "--manifest", demo_data["prep"], *_store_args(s3_stores, s3_endpoint), "--max-tokens", "4",
            "--reduced-dir", str(reduced), "--out", str(run), *FAST]  # fmt: skip
    assert fusion_main(args) == 0
    arrays = sorted(p.name for p in reduced.glob("*.zarr"))
    assert len(arrays) == 2  # one per S3 store
    loading = json.loads((run / "run.json").read_text())["loading"]
    assert all("reduced to 4 rows" in v for v in loading.values()), loading
    assert fusion_main(["evaluate", str(run), "--out", str(tmp_path / "eval")]) == 0  # reuses them: nothing new made
    assert sorted(p.name for p in reduced.glob("*")) == arrays
