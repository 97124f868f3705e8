"""Every benchmark script runs end to end at a toy size and writes the figures it promises.

The figures themselves are not asserted (speed is measured in benchmarks, not tests); what is
checked is that each script still works against the library and that its cross-checks hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedcache.encoders.enformer import EXTRA, enformer_available
from fusion.demo import DemoConfig


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


# The fusion benchmarks embed DNA with Enformer (the `enformer` extra).
requires_enformer = pytest.mark.skipif(
    not enformer_available(), reason=f"embeds DNA with Enformer: needs pip install 'embedcache[{EXTRA}]'"
)


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, f"{name} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_bench_build_cross_checks_every_side(tmp_path: Path) -> None:
    out = tmp_path / "build.json"
    run_script("bench_build.py", "--n-sequences", "24", "--max-length", "200", "--hidden", "32", "--layers", "1",
               "--heads", "4", "--sides", "extract,embedcache,naive", "--repeats", "1", "--warmup-sequences", "2",
               "--threads", "1", "--unpadded-ab", "on", "--json", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert result["reference"] == "extract"
    assert set(result["cross_check"]) == {"embedcache"}  # the stores are checked against the reference loop
    assert result["cross_check"]["embedcache"]["pooled_ok"] and result["cross_check"]["embedcache"]["token_ok"]
    for side in ("extract", "embedcache", "naive"):
        s = result["sides"][side]
        assert s["residues"] == result["input"]["total_residues"]  # same work on every side
        assert 0 < s["padding_efficiency"] <= 1 and 0 < s["forward_share_of_best"] <= 1 and s["ratio_best"] > 0
    assert result["unpadded_ab"]["fp32"]["relative_l2_diff"] < 1e-5
    assert result["machine"]["cpu_cores"] >= 1


@pytest.mark.slow
def test_gpu_check_without_cuda_runs_the_cpu_parts(tmp_path: Path) -> None:
    proc = run_script("gpu_check.py", "--out", str(tmp_path), "--steps", "bench-build")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "NO CUDA" in proc.stdout and not report["cuda"]
    assert report["steps"]["bench-build"]["rc"] == 0 and "toy ESM2" in report["steps"]["bench-build"]["reduced_without_cuda"]
    assert report["steps"]["bench-fusion"] == {"skipped": "not in --steps"}
    assert (tmp_path / "gpu_check.log").read_text().count("== bench-build") >= 1


def test_bench_store_layout_reports_every_chunk_size(tmp_path: Path) -> None:
    out = tmp_path / "layout.json"
    run_script("bench_store_layout.py", "--n-sequences", "40", "--dim", "16", "--chunks-kb", "64,256", "--reads", "5",
               "--workdir", str(tmp_path / "stores"), "--json", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert [r["chunk_kb"] for r in result["results"]] == [64, 256]
    assert all(r["write_mb_s"] > 0 and r["read_all_mb_s"] > 0 for r in result["results"])


def test_bench_fusion_data_runs_every_read_path(tmp_path: Path) -> None:
    out = tmp_path / "data.json"
    proc = run_script("bench_fusion_data.py", "--quick", "--n-genes", "2", "--token-scale", "0.02", "--batch-size", "4",
                      "--model-steps", "1", "--model-batch", "2", "--max-tokens", "8", "--workdir", str(tmp_path / "work"), "--json", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    expected = {"before", "stream", "stream-read", "stream-read-2-workers", "stream-default-malloc", "stream-lz4", "stream-2-workers", "stream-2-workers-default-malloc", "memmap", "memory", "stream-pooled", "stream-max-tokens", "stream-max-tokens-2-workers", "max-tokens-before", "recipe"} | ({"zarrs"} if result["machine"]["zarrs"] else set())
    expected -= set() if result["machine"]["keep_freed_memory"] else {"stream-default-malloc", "stream-2-workers-default-malloc"}  # glibc only
    assert set(result["loaders"]) == expected
    n_train = result["loaders"]["stream"]["cold"]["samples"]
    for way, r in result["loaders"].items():
        assert r["cold"]["samples"] == r["warm"]["samples"] == n_train, way  # every path delivers the whole epoch
        assert r["cold"]["mb_s"] > 0 and r["warm"]["mb_s"] > 0
    assert result["raw"]["cold"]["mb_s"] > 0 and 0 <= result["repeated_share"] < 1
    assert len(result["model"]) == 3
    for model in result["model"].values():  # full rows, rows pooled at build, rows up to --max-tokens
        assert model["samples_per_s"] > 0 and model["flops_per_sample"] > 0
    assert "| stream |" in proc.stdout


@requires_enformer
def test_bench_fusion_runs_both_demo_inputs_in_every_mode(tmp_path: Path) -> None:
    out = tmp_path / "fusion.json"
    proc = run_script("bench_fusion.py", "--n-genes", "10", "--batch-size", "4", "--steps", "1", "--warmup-steps", "1",
                      "--cached-epochs", "2", "--threads", "1", "--workdir", str(tmp_path / "work"), "--json", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    assert [(r["config"]["data"]["features"], r["config"]["data"]["max_tokens"]) for r in report["runs"]] == [("tokens", DemoConfig.max_tokens), ("pooled", None)]
    for run in report["runs"]:
        assert set(run["results"]) == {"cached", "frozen", "full"}
        errors = {m: (r["error"], r.get("log_tail")) for m, r in run["results"].items() if "error" in r}
        assert not errors, errors
        assert run["verdict"]["ratio"] > 0 and run["verdict"]["full_ratio"] > 0
        breakdown = run["results"]["frozen"]["breakdown"]
        assert breakdown["features"] >= sum(v for k, v in breakdown.items() if k.startswith("encoder:"))  # means add up
    assert "== summary" in proc.stdout


def test_bench_fusion_refuses_contradictory_inputs() -> None:
    flags = ["--features", "pooled", "--max-tokens", "4"]
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_fusion.py"), *flags], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--max-tokens 4 applies to --features tokens only" in proc.stderr


@pytest.mark.storage
def test_bench_store_remote_compares_local_and_s3(tmp_path: Path) -> None:
    pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    out = tmp_path / "remote.json"
    run_script("bench_store_remote.py", "--n-sequences", "12", "--dim", "16", "--shard-mb", "0.01", "--reads", "4",
               "--commit-sizes", "10,200", "--commit-repeats", "2", "--json", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["throughput"]) == {"local", "s3"}
    assert all(r["write_mb_s"] > 0 and r["random_reads_per_s"] > 0 for r in result["throughput"].values())
    assert [r["commits_before"] for r in result["commit_cost"]["s3"]] == [10, 200]


@requires_enformer  # its planted data is the demo's, whose DNA encoder is Enformer
def test_bench_fusion_sweep_compares_settings_with_the_probe(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    run_script("bench_fusion_sweep.py", "--seeds", "0", "--n-genes", "40", "--setting", "epochs=1", "--setting", "epochs=2 head=residual",
               "--data", str(tmp_path / "data"), "--json", str(out), timeout=600)  # fmt: skip
    result = json.loads(out.read_text())
    settings = {r["setting"] for r in result["runs"]}
    assert settings == {"ridge probe", "epochs=1", "epochs=2 head=residual"}
    assert len(result["runs"]) == 7 * 3  # every modality subset: the probe and both settings


def test_bench_scale_memory_and_coordinator_at_toy_size(tmp_path: Path) -> None:
    """Peak RSS of the real CLI in child processes, and the simulated-GPU build through a thread LocalCluster."""
    out = tmp_path / "scale.json"
    run_script("bench_scale.py", "--only", "memory,coordinator", "--plan-sizes", "50,100", "--build-sizes", "50",
               "--sim-workers", "2", "--sim-unit-mb", "2", "--sim-baseline-units", "2", "--workdir", str(tmp_path / "work"), "--json", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    runs = result["memory"]["runs"]
    assert [(r["kind"], r["records"]) for r in runs] == [("plan", 50), ("plan", 100), ("build", 50)]
    assert all(r["peak_rss_mb"] > 50 for r in runs)  # a Python process with torch loaded: rusage was read
    assert [t["kind"] for t in result["memory"]["targets"]] == ["plan"]
    baseline, sim = result["coordinator"]["runs"]
    assert (baseline["executor"], baseline["workers"], baseline["units"]) == ("in-process", 1, 2)
    assert (sim["executor"], sim["workers"], sim["units"]) == ("dask threads", 2, 4)  # 2 units per worker
    for run in (baseline, sim):
        assert 0 < run["fraction_end_to_end"] <= run["fraction_executor_phase"] <= 1
        assert run["commit_ms_per_unit"] > 0 and run["plan_us_per_sequence"] > 0
    assert sim["units_seen"] == 4  # every unit in Dask's task stream
    assert [p["gpus"] for p in result["coordinator"]["projection"]] == [8, 16, 64, 256]


@pytest.mark.slow
def test_bench_scale_executors_at_toy_size(tmp_path: Path) -> None:
    """In-process vs local:1 vs local:2 (starts two LocalClusters of worker processes: slow)."""
    out = tmp_path / "exec.json"
    run_script("bench_scale.py", "--only", "executors", "--exec-sequences", "20", "--exec-unit-mb", "0.05",
               "--workdir", str(tmp_path / "work"), "--json", str(out))  # fmt: skip
    runs = json.loads(out.read_text())["executors"]["runs"]
    assert [r["executor"] for r in runs] == ["in-process", "local:1", "local:2"]
    assert len({r["tokens"] for r in runs}) == 1 and all(r["tokens_per_s"] > 0 for r in runs)


def test_bench_layers_checks_every_layer_against_its_own_build(tmp_path: Path) -> None:
    out = tmp_path / "layers.json"
    run_script("bench_layers.py", "--n-sequences", "8", "--median-length", "40", "--hidden", "16", "--model-layers", "2",
               "--layers", "0,-1", "--repeats", "1", "--json", str(out))  # fmt: skip
    figures = json.loads(out.read_text())
    assert figures["layers"] == [0, 2] and figures["every_layer_equal"] and len(figures["one_build_per_layer_s"]) == 2


def test_bench_build_host_runs_every_case_through_the_stand_in(tmp_path: Path) -> None:
    """The real build() with a free or sleeping stand-in forward, or the real model's timed (the GPU check's form);
    every store is checked complete by the script."""
    out = tmp_path / "host.json"
    run_script("bench_build_host.py", "--quick", "--forms", "free,sleep,model", "--workdir", str(tmp_path / "work"), "--json", str(out))
    result = json.loads(out.read_text())
    forms = ("free", "sleep", "model")
    assert [r["case"] for r in result["rows"]] == [f"{o}-{w}-{f}" for o in ("tokens", "pooled") for w in (64, 128) for f in forms]
    for row in result["rows"]:
        assert all(run["tokens"] == result["input"]["total_residues"] for run in row["runs"])
        assert row["tokens_per_s"] > 0 and 0 <= row["stand_in_share"] <= 1
        assert (row["store_mb_s"] > 0 and row["share_of_raw_write"] > 0) if row["tokens"] else row["store_mb_s"] is None
        assert (row["slept_share"] > 0) == (row["rate"] is not None)
        assert (row["runs"][0]["model_flops"] or 0) > 0 if row["case"].endswith("model") else row["runs"][0]["model_flops"] is None
        assert row["mfu"] is None  # MFU on CUDA only
    assert result["raw_write"]["best_mb_s"] > 0 and result["raw_write"]["fsync"] and result["raw_write"]["best_direct_mb_s"] > 0


def test_bench_integrity_measures_open_and_epoch_checks(tmp_path: Path) -> None:
    out = tmp_path / "integrity.json"
    run_script("bench_integrity.py", "--records", "400", "--commits", "8", "--epoch-mb", "8", "--dim", "64", "--repeats", "1",
               "--json", str(out))  # fmt: skip
    figures = json.loads(out.read_text())
    assert figures["open"]["records"] == 400 and figures["open"]["commits"] >= 8 and figures["open"]["checks_s"] > 0
    assert figures["epoch"]["bytes"] > 0 and figures["epoch"]["first_over_unchecked"] > 0


def test_bench_fusion_pace_measures_every_way_against_the_limits(tmp_path: Path) -> None:
    out = tmp_path / "pace.json"
    proc = run_script("bench_fusion_pace.py", "--quick", "--n-genes", "4", "--batch-size", "4", "--model-batch", "2", "--json", str(out))
    result = json.loads(out.read_text())
    for shapes in ("demo", "recipe"):
        r = result[shapes]
        assert set(r["ways"]) == {"pooled", "pooled-host", "tokens-memory", "reduced-memory", "tokens-stream", "reduced-stream"}
        samples = {w["samples"] for w in r["ways"].values()}
        assert len(samples) == 1 and samples.pop() > 0  # every way delivers the whole train split
        assert r["ways"]["tokens-stream"]["of_raw"] > 0 and r["ways"]["reduced-memory"]["memcopy_gb_s"] > 0
        assert r["models"]["full"]["flops_per_sample"] > r["models"]["pooled"]["flops_per_sample"] > 0
        assert set(r["bound"]) == set(r["ways"]) and r["reduced_gb"] > 0
    assert "bound by" in proc.stdout
