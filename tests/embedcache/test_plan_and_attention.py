"""`--dry-run` plans from the tokenizer and config alone (no weights), and `--attn-implementation`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli.embedcache_cli import main
from embedcache import open_store
from embedcache.build import build
from embedcache.config import BuildConfig
from embedcache.encoders import load_encoder
from embedcache.errors import EncoderError
from embedcache.encoders.base import WEIGHT_SUFFIXES
from embedcache.encoders.enformer import enformer_available

from .conftest import write_fasta
from .test_parity import random_seqs

AA = "ACDEFGHIKLMNPQRSTVWY"
REPO = Path(__file__).resolve().parents[2]

CASES = {  # models fixture name -> (encoder, alphabet, build options)
    "esm2": ("esm2", AA, {}),
    "nucleotide-transformer": ("nucleotide-transformer", "ACGT", {}),
    "gpt2": ("hf", AA, {}),
    "bert": ("hf", AA, {"layers": (1,)}),
    "hyena": ("hf", "ACGT", {"trust_remote_code": True}),
    "nodepth": ("hf", AA, {"trust_remote_code": True, "layers": (-2,)}),
    "enformer": ("enformer", "ACGT", {"window": 1024}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dry_run_plans_without_weights_and_agrees_with_the_build(tmp_path, models, name):
    encoder, letters, options = CASES[name]
    fasta = write_fasta(tmp_path / "in.fa", random_seqs(letters, [10, 30, 300], seed=1))
    config = BuildConfig.create(encoder, str(models[name]), **options)
    planning = load_encoder(encoder, config.encoder_settings(), weights=False)
    assert planning.planning_only and not any(p.device.type != "meta" for p in planning.model.parameters())
    with pytest.raises(EncoderError, match="without weights"):
        planning.encode_windows([planning.tokenize(letters[:5])])
    dry = build(config, [fasta], tmp_path / "s.zarr", dry_run=True, progress=False, log=lambda s: None)
    assert not (tmp_path / "s.zarr").exists()
    real = build(config, [fasta], tmp_path / "s.zarr", progress=False, log=lambda s: None)
    assert dry.plan.fingerprint == real.plan.fingerprint
    assert (dry.plan.n_tokens, dry.plan.n_windows, dry.plan.estimated_bytes) == (real.plan.n_tokens, real.plan.n_windows, real.plan.estimated_bytes)


def fake_hub_cache_without_weights(cache: Path, model_dir: Path, repo_id: str) -> None:
    """The Hugging Face cache after `hf download` of everything but the weights (config and tokenizer)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES:
            shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def offline_build_args(tmp_path: Path, models) -> tuple[list[str], dict]:
    cache = tmp_path / "hub"
    fake_hub_cache_without_weights(cache, Path(models["esm2"]), "someone/tiny-esm2")
    fasta = write_fasta(tmp_path / "in.fa", {"p1": "MKTAYIAKQR", "p2": "MKT"})
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = [sys.executable, "-m", "cli.embedcache_cli", "build", str(fasta), "-o", str(tmp_path / "s.zarr"),
            "--encoder", "esm2", "--model", "someone/tiny-esm2", "--no-progress"]  # fmt: skip
    return args, env


def test_dry_run_offline_with_config_and_tokenizer_only(tmp_path, models):
    """A hub id whose weights were never downloaded, offline (a fresh process, so the cache location holds)."""
    args, env = offline_build_args(tmp_path, models)
    dry = subprocess.run([*args, "--dry-run"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert "to embed: 2 sequences, 13 tokens in 2 model windows" in dry.stdout
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.slow
def test_build_offline_without_weights_says_what_is_missing(tmp_path, models):
    args, env = offline_build_args(tmp_path, models)
    real = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert real.returncode == 2 and "Traceback" not in real.stderr
    assert "weights of 'someone/tiny-esm2' are not in the local Hugging Face cache" in real.stderr
    assert not (tmp_path / "s.zarr").exists()


# -- attention backend


def test_attention_implementation_is_recorded_and_changes_the_fingerprint(tmp_path, models):
    fasta = write_fasta(tmp_path / "in.fa", random_seqs(AA, [12, 40], seed=2))
    stores = {}
    for impl in (None, "sdpa", "eager"):
        extra = [] if impl is None else ["--attn-implementation", impl]
        out = tmp_path / f"{impl}.zarr"
        assert main(["build", str(fasta), "-o", str(out), "--encoder", "esm2", "--model", str(models["esm2"]), "--no-progress", *extra]) == 0
        stores[impl] = open_store(out)
    assert stores[None].attrs["provenance"]["attn_implementation"] == "sdpa"  # the default
    assert stores[None].fingerprint == stores["sdpa"].fingerprint
    assert stores["eager"].attrs["provenance"]["attn_implementation"] == "eager"
    assert stores["eager"].attrs["config"]["attn_implementation"] == "eager"
    assert stores["eager"].fingerprint != stores["sdpa"].fingerprint
    for rid in stores["sdpa"].ids:  # the same numbers, up to kernel noise
        assert abs(stores["eager"].tokens(rid).astype(float) - stores["sdpa"].tokens(rid).astype(float)).max() < 2e-3


def test_unsupported_attention_implementation_is_a_clear_error(tmp_path, models, capsys):
    fasta = write_fasta(tmp_path / "in.fa", {"p1": "MKTAYIAK"})
    base = ["build", str(fasta), "-o", str(tmp_path / "s.zarr"), "--no-progress"]
    # flash-attn is not installed here (and needs CUDA): said in one line, nothing written.
    assert main([*base, "--encoder", "esm2", "--model", str(models["esm2"]), "--attn-implementation", "flash_attention_2"]) == 2
    err = capsys.readouterr().err
    assert "--attn-implementation flash_attention_2" in err and str(models["esm2"]) in err and "Traceback" not in err
    # A remote-code model with no SDPA support (it declares none).
    assert main([*base, "--encoder", "hf", "--model", str(models["remote"]), "--trust-remote-code", "--attn-implementation", "sdpa"]) == 2
    err = capsys.readouterr().err
    assert "--attn-implementation sdpa" in err and "cannot use it" in err
    assert not (tmp_path / "s.zarr").exists()


def test_enformer_refuses_an_attention_implementation(models):
    settings = BuildConfig.create("enformer", str(models["enformer"]), window=1024, attn_implementation="eager").encoder_settings()
    with pytest.raises(EncoderError, match="enformer encoder has its own attention"):
        load_encoder("enformer", settings)


@pytest.mark.skipif(enformer_available(), reason="the enformer extra is installed here")
def test_enformer_without_its_extra_says_which_to_install(tmp_path, capsys):
    fasta = write_fasta(tmp_path / "g.fa", {"g1": "ACGT" * 10})
    code = main(["build", str(fasta), "-o", str(tmp_path / "s.zarr"), "--encoder", "enformer", "--model", str(tmp_path / "enf"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'embedcache[enformer]'" in err and "Traceback" not in err
    assert main(["make-tiny-model", "enformer", str(tmp_path / "enf")]) == 2
    assert "pip install 'embedcache[enformer]'" in capsys.readouterr().err


def test_a_second_build_plans_with_the_same_encoder_until_its_weights_change(tmp_path, models, monkeypatch):
    """The tokenizer and config are loaded once per process for a config (a notebook's second build starts
    at once), and again when the model directory's weights changed (the fingerprint must see them)."""
    import numpy as np

    import embedcache.build as build_module
    from embedcache.tiny_models import make_tiny_esm2

    model = make_tiny_esm2(tmp_path / "m", seed=1)
    config = BuildConfig.create("esm2", str(model))
    fasta = write_fasta(tmp_path / "a.fa", random_seqs("ACDEFGHIKLMNPQRSTVWY", [30, 40], seed=3))
    loads = []
    real = build_module.load_encoder
    monkeypatch.setattr(build_module, "load_encoder", lambda *a, **kw: loads.append(kw) or real(*a, **kw))
    first = build(config, [fasta], tmp_path / "a.zarr", progress=False, log=lambda _: None)
    second = build(config, [fasta], tmp_path / "b.zarr", progress=False, log=lambda _: None)
    assert loads == [{"weights": False}] and first.plan.fingerprint == second.plan.fingerprint
    make_tiny_esm2(tmp_path / "m", seed=2)  # other weights in the same directory
    third = build(config, [fasta], tmp_path / "c.zarr", progress=False, log=lambda _: None)
    assert len(loads) == 2 and third.plan.fingerprint != first.plan.fingerprint
    before, after = open_store(tmp_path / "a.zarr"), open_store(tmp_path / "c.zarr")  # computed with the new weights too
    assert not np.allclose(before.pooled(before.ids), after.pooled(before.ids))
