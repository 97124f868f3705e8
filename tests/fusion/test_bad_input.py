"""Bad input to the fusion side, through the real CLI: one line naming the file, key or value; a
non-zero exit; nothing written that looks complete. Also the run directory's promises (portable,
evaluate keeps the run's own report, finetune runs evaluate like any run) and the CLI's handling of
errors that are not the user's (a bug, Ctrl-C, a closed pipe)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import fusion.experiment as fusion_experiment
import fusion.run as fusion_run
from cli.fusion_cli import main as fusion_main
from embedcache.build import build
from embedcache.config import BuildConfig
from fusion.prepare.manifest import load_prepared
from tests.embedcache.conftest import make_remote_code_model

FAST = ["--epochs", "1", "--d-model", "16", "--head-hidden", "16", "--no-progress"]
REPO = Path(__file__).resolve().parents[2]


def store_args(stores: dict[str, str]) -> list[str]:
    return [a for m, p in stores.items() for a in ("--store", f"{m}={p}")]


def run_fusion(capsys, *args) -> tuple[int, str]:
    """Exit code and stderr of `fusion ARGS`; the error must be one line."""
    code = fusion_main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("fusion:")]
    assert len(lines) == 1 and lines[0].startswith("fusion: error: "), err
    assert "Traceback" not in err, err
    for text in expected:
        assert text in err, f"{text!r} not in: {err}"


def looks_complete(run: Path) -> bool:
    """What a user (or `fusion evaluate`) takes for a finished run."""
    if not (run / "run.json").exists():
        return False
    return json.loads((run / "run.json").read_text()).get("status") == "complete" or (run / "report.md").exists()


@pytest.fixture(scope="module")
def trained_run(demo_data, tmp_path_factory) -> Path:
    """One finished pooled run, shared by the evaluate / predict cases (which must not change it)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    code = fusion_main(["train", "--manifest", demo_data["prep"], *store_args(demo_data["stores"]), "--features", "pooled", "--out", str(run), *FAST])
    assert code == 0
    return run


def copy_prep(demo_data, tmp_path: Path) -> Path:
    prep = tmp_path / "prep"
    shutil.copytree(demo_data["prep"], prep)
    return prep


def train_args(demo_data, manifest, out: Path, *extra) -> list:
    return ["train", "--manifest", manifest, *store_args(demo_data["stores"]), "--features", "pooled", "--out", out, *FAST, *extra]


# -- stores in the wrong slot -------------------------------------------------------------------------


def test_store_of_another_modality_is_refused_naming_both(demo_data, tmp_path, capsys):
    out = tmp_path / "r"
    stores = {**demo_data["stores"], "protein": demo_data["stores"]["rna"]}
    code, err = run_fusion(capsys, "train", "--manifest", demo_data["prep"], *store_args(stores), "--out", out, *FAST)
    one_line_error(code, err, "'protein'", demo_data["stores"]["rna"], "dna alphabet", "nucleotide-transformer")
    assert not looks_complete(out)


def test_protein_store_as_rna_is_refused(demo_data, tmp_path, capsys):
    stores = {"rna": demo_data["stores"]["protein"]}
    code, err = run_fusion(capsys, "train", "--manifest", demo_data["prep"], *store_args(stores), "--out", tmp_path / "r", *FAST)
    one_line_error(code, err, "'rna'", "protein sequences", "esm2")


# -- manifests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "-inf", "1e39", "abc"])
def test_target_that_is_not_a_finite_float32_names_file_row_and_value(demo_data, tmp_path, capsys, value):
    prep = copy_prep(demo_data, tmp_path)
    frame = pd.read_csv(prep / "manifest.csv", dtype=str, keep_default_na=False)
    tissue = json.loads((prep / "prepare.json").read_text())["targets"][2]
    frame.loc[4, tissue] = value
    frame.to_csv(prep / "manifest.csv", index=False)
    out = tmp_path / "r"
    code, err = run_fusion(capsys, *train_args(demo_data, prep, out))
    one_line_error(code, err, "manifest.csv", repr(tissue), "row 6", repr(value))
    assert not looks_complete(out)


def test_na_is_an_id_not_a_missing_value(demo_data, tmp_path, capsys):
    """The build keeps `NA` as a record id; the manifest must too, not read it as "no protein"."""
    prep = copy_prep(demo_data, tmp_path)
    frame = pd.read_csv(prep / "manifest.csv", dtype=str, keep_default_na=False)
    coding = frame.index[frame["protein_id"] != ""][0]
    frame.loc[coding, "protein_id"] = "NA"
    frame.to_csv(prep / "manifest.csv", index=False)
    manifest = load_prepared(prep)
    assert "NA" in manifest.keys("protein")
    code, err = run_fusion(capsys, *train_args(demo_data, prep, tmp_path / "r"))
    one_line_error(code, err, "protein keys", "['NA']")


def test_empty_and_na_targets_are_missing(demo_data, tmp_path):
    prep = copy_prep(demo_data, tmp_path)
    frame = pd.read_csv(prep / "manifest.csv", dtype=str, keep_default_na=False)
    tissue = json.loads((prep / "prepare.json").read_text())["targets"][0]
    frame.loc[0, tissue], frame.loc[1, tissue] = "NA", ""
    frame.to_csv(prep / "manifest.csv", index=False)
    targets = load_prepared(prep).frame[tissue]
    assert targets.iloc[:2].isna().all() and targets.iloc[2:].notna().any()


@pytest.mark.parametrize("name", ["nope", "nope.csv"])
def test_missing_manifest_is_said_to_be_missing_and_leaves_no_out_dir(demo_data, tmp_path, capsys, name):
    out = tmp_path / "runs" / "r"
    code, err = run_fusion(capsys, *train_args(demo_data, tmp_path / name, out))
    one_line_error(code, err, f"manifest {str(tmp_path / name)!r} does not exist", "give a prepared directory")
    assert "no prepare.json" not in err
    assert not (tmp_path / "runs").exists()


def test_failed_run_removes_only_the_empty_directories_it_made(demo_data, tmp_path, capsys):
    wrong = store_args({**demo_data["stores"], "protein": demo_data["stores"]["rna"]})  # refused once the stores open

    def train_into(out: Path) -> tuple[int, str]:
        return run_fusion(capsys, "train", "--manifest", demo_data["prep"], *wrong, "--out", out, *FAST)

    one_line_error(*train_into(tmp_path / "new" / "deeper" / "run"), "'protein'")
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    one_line_error(*train_into(mine / "run"), "'protein'")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(*train_into(empty), "'protein'")
    assert empty.is_dir()  # it was there before: not the run's to remove


# -- config files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("epochs = 1.7\n", "epochs = 1.7: expected an integer"),
        ("batch_size = true\n", "batch_size = true: expected an integer"),
        ("lr = \"fast\"\n", 'lr = "fast": expected a number'),
        ("features = \"kmers\"\n", "features = \"kmers\": expected one of ['tokens', 'pooled']"),
        ("epochs = \n", "not valid TOML"),
        ("epoch = 3\n", "unknown option(s) ['epoch']"),
        ("warmup_fraction = 1.5\n", "training options: warmup_fraction must be in [0, 1), got 1.5"),
    ],
)
def test_config_file_values_are_checked(demo_data, tmp_path, capsys, text, expected):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    out = tmp_path / "r"
    code, err = run_fusion(capsys, *train_args(demo_data, demo_data["prep"], out, "--config", config))
    one_line_error(code, err, expected)
    assert "training options" in expected or str(config) in err
    assert not looks_complete(out)


def test_missing_config_file(demo_data, tmp_path, capsys):
    code, err = run_fusion(capsys, *train_args(demo_data, demo_data["prep"], tmp_path / "r", "--config", tmp_path / "nope.toml"))
    one_line_error(code, err, "nope.toml", "no such file")


@pytest.mark.parametrize(("flags", "expected"), [(["--amp", "fp16", "--device", "cpu"], "needs a CUDA device"), (["--device", "gpu7"], "'gpu7'")])
def test_device_options_are_named(demo_data, tmp_path, capsys, flags, expected):
    out = tmp_path / "r"
    one_line_error(*run_fusion(capsys, *train_args(demo_data, demo_data["prep"], out, *flags)), "training options", expected)
    assert not out.exists()


def test_split_without_any_target_value(demo_data, tmp_path, capsys):
    prep = copy_prep(demo_data, tmp_path)
    frame = pd.read_csv(prep / "manifest.csv", dtype=str, keep_default_na=False)
    targets = json.loads((prep / "prepare.json").read_text())["targets"]
    frame.loc[frame["split"] == "validation", targets] = ""
    frame.to_csv(prep / "manifest.csv", index=False)
    out = tmp_path / "r"
    one_line_error(*run_fusion(capsys, *train_args(demo_data, prep, out)), "manifest.csv", "every target of the 'validation' split is missing")
    assert not looks_complete(out)


def test_bad_model_options_are_named(demo_data, tmp_path, capsys):
    code, err = run_fusion(capsys, *train_args(demo_data, demo_data["prep"], tmp_path / "r", "--n-heads", "3"))
    one_line_error(code, err, "model options", "d_model (16) is not a multiple of n_heads (3)")


# -- run directories: evaluate and predict --------------------------------------------------------------


def test_evaluate_missing_run_dir_and_missing_checkpoint(trained_run, tmp_path, capsys):
    one_line_error(*run_fusion(capsys, "evaluate", tmp_path / "nope"), "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(*run_fusion(capsys, "evaluate", tmp_path / "empty"), "no run.json")
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    (broken / "checkpoint.pt").unlink()
    one_line_error(*run_fusion(capsys, "predict", broken, "--out", tmp_path / "p.csv"), "no checkpoint file", "checkpoint.pt")
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    one_line_error(*run_fusion(capsys, "evaluate", broken), "checkpoint.pt", "cannot read the checkpoint")
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("damage", ["extra field", "not json", "foreign checkpoint"])
def test_damaged_run_json_is_named(trained_run, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    manifest = json.loads((run / "run.json").read_text())
    if damage == "extra field":
        manifest["learning_rate"] = 1
        (run / "run.json").write_text(json.dumps(manifest))
        expected = ["run.json", "unknown field(s) ['learning_rate']"]
    elif damage == "not json":
        (run / "run.json").write_text('{"format": "fusion-run", ')
        expected = ["run.json", "not valid JSON"]
    else:
        manifest["run_id"] = "0" * 32
        (run / "run.json").write_text(json.dumps(manifest))
        expected = ["mixes two runs"]
    one_line_error(*run_fusion(capsys, "evaluate", run), *expected)


def test_predict_out_is_a_directory_or_in_a_missing_folder(trained_run, tmp_path, capsys):
    one_line_error(*run_fusion(capsys, "predict", trained_run, "--out", tmp_path), "is a directory", str(tmp_path))
    target = tmp_path / "new" / "folder" / "pred.csv"
    assert fusion_main(["predict", str(trained_run), "--out", str(target)]) == 0
    assert len(pd.read_csv(target)) > 0


def test_evaluate_keeps_the_runs_own_report_and_works_from_anywhere(trained_run, tmp_path, monkeypatch, capsys):
    own = {name: (trained_run / name).read_bytes() for name in ("report.md", "metrics.json", "predictions.csv")}
    monkeypatch.chdir(tmp_path)  # run.json's paths do not depend on where the command runs
    assert fusion_main(["evaluate", str(trained_run)]) == 0
    assert {name: (trained_run / name).read_bytes() for name in own} == own
    written = sorted(trained_run.glob("evaluate-*"))
    assert written and (written[-1] / "metrics.json").exists() and (written[-1] / "report.md").exists()
    new = json.loads((written[-1] / "metrics.json").read_text())["splits"]["test"]
    assert new == json.loads(own["metrics.json"])["splits"]["test"]
    capsys.readouterr()
    one_line_error(*run_fusion(capsys, "evaluate", trained_run, "--out", trained_run), "would overwrite the run's own")
    shutil.rmtree(written[-1])


def test_run_started_with_relative_paths_is_portable(demo_data, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rel = {m: os.path.relpath(p, work) for m, p in demo_data["stores"].items()}
    assert fusion_main(["train", "--manifest", os.path.relpath(demo_data["prep"], work), *store_args(rel), "--features", "pooled", "--out", "run", *FAST]) == 0
    moved = tmp_path / "moved_run"
    shutil.move(work / "run", moved)
    monkeypatch.chdir(tmp_path)
    run_json = json.loads((moved / "run.json").read_text())
    assert os.path.isabs(run_json["data"]["manifest"]) and all(os.path.isabs(p) for p in run_json["data"]["stores"].values())
    assert fusion_main(["predict", str(moved), "--out", "p.csv"]) == 0


def test_interrupted_run_says_the_truth_and_is_not_taken_for_finished(demo_data, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fusion_run, "train", interrupted)
    out = tmp_path / "r"
    code = fusion_main([str(a) for a in train_args(demo_data, demo_data["prep"], out)])
    err = capsys.readouterr().err
    assert code == 130 and "do not resume" in err and "work done so far is kept" not in err
    assert json.loads((out / "run.json").read_text())["status"] == "training" and not looks_complete(out)
    monkeypatch.undo()
    one_line_error(*run_fusion(capsys, "evaluate", out), "did not finish", "train it again")


# -- finetune runs ----------------------------------------------------------------------------------------


def test_evaluate_and_predict_a_finetune_run(demo_data, tmp_path, capsys):
    run = tmp_path / "ft"
    stores = {"protein": demo_data["stores"]["protein"]}  # one small live encoder keeps the test short
    args = ["finetune", "--manifest", demo_data["prep"], *store_args(stores), "--features", "pooled", "--batch-size", "16", "--out", str(run), *FAST]
    assert fusion_main(args) == 0
    assert "Loading weights" not in capsys.readouterr().err  # --no-progress: transformers' bars too
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["mode"] == "finetune" and manifest["status"] == "complete"
    assert fusion_main(["evaluate", str(run), "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    own = json.loads((run / "metrics.json").read_text())["splits"]["test"]["mean_r2"]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())["splits"]["test"]["mean_r2"]
    assert again == pytest.approx(own, abs=1e-5)
    assert fusion_main(["predict", str(run), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == len(load_prepared(demo_data["prep"]))


def test_a_store_never_turns_on_remote_code(demo_data, tmp_path, capsys):
    """A store built with --trust-remote-code names a model directory with its own code: finetune must not
    import that code unless the user passes --trust-remote-code, and says which model and files."""
    model = make_remote_code_model(tmp_path / "remote")
    store = tmp_path / "protein_remote.zarr"
    build(BuildConfig.create("hf", str(model), trust_remote_code=True, alphabet="protein"), [Path(demo_data["prep"]) / "protein.fa"],
          store, progress=False, log=lambda s: None)  # fmt: skip
    marker = tmp_path / "the store's code ran"
    code_file = model / "modeling_toyconv.py"
    code_file.write_text(code_file.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")
    out = tmp_path / "ft"
    args = ["finetune", "--manifest", demo_data["prep"], "--store", f"protein={store}", "--features", "pooled", "--out", str(out), *FAST]
    code, err = run_fusion(capsys, *args)
    one_line_error(code, err, str(model), "modeling_toyconv.py", "--trust-remote-code", "does not count")
    assert not marker.exists() and not looks_complete(out)

    # The user's own flag allows it, and the log says which code from where; the finished run keeps
    # no permission either: evaluating it asks for the flag again. (The build above imported the
    # model's code in this process before the marker line was added; forget that import, as a new
    # process would not have it.)
    for name in [n for n in sys.modules if n.endswith("modeling_toyconv") or n.endswith("configuration_toyconv")]:
        del sys.modules[name]
    assert fusion_main([*args, "--trust-remote-code"]) == 0
    printed = capsys.readouterr().out
    assert marker.exists() and f"running the model's own code configuration_toyconv.py, modeling_toyconv.py from {model}" in printed
    one_line_error(*run_fusion(capsys, "evaluate", out), "modeling_toyconv.py", "--trust-remote-code")
    assert fusion_main(["evaluate", str(out), "--trust-remote-code", "--out", str(tmp_path / "eval")]) == 0


# -- the CLI's own handling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [KeyError("data"), ZeroDivisionError("division by zero")])
def test_a_bug_is_reported_as_one_with_its_traceback_in_a_file(trained_run, tmp_path, monkeypatch, capsys, error):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(fusion_experiment, "run_predict", broken)
    code = fusion_main(["predict", str(trained_run), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "unexpected error (a bug" in err and type(error).__name__ in err
    path = Path(err.split("full traceback in ")[1].split(" ")[0])
    assert "Traceback" in path.read_text() and "broken" in path.read_text()
    path.unlink()
    code = fusion_main(["predict", str(trained_run), "--out", str(tmp_path / "p.csv"), "--debug"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "in broken" in err


def test_a_closed_pipe_ends_quietly(demo_data):
    """`embedcache info STORE | head`: the reader went away; no BrokenPipeError traceback."""
    cmd = [sys.executable, "-m", "cli.embedcache_cli", "info", demo_data["stores"]["protein"], "--json"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command writes: its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


# -- preparing the IsoFormer table -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gtex(tmp_path_factory):
    from fusion.prepare.synthetic import SyntheticConfig, generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("gtex"), SyntheticConfig(n_genes=10, seed=1))


@pytest.mark.parametrize("damage", ["latin-1", "inf target", "huge target without log1p"])
def test_prepare_isoformer_names_the_file_line_and_value(gtex, tmp_path, capsys, damage):
    text = gtex.csv_path.read_text()
    lines = text.splitlines()
    header = lines[0].split(",")
    tissue = header[-1]
    extra = []
    if damage == "latin-1":
        (tmp_path / "gtex.csv").write_bytes(text.replace(tissue, tissue + "_\u00e9", 1).encode("latin-1"))
        expected = ["gtex.csv", "UTF-8"]
    else:
        cells = lines[3].split(",")
        cells[-1] = "inf" if damage == "inf target" else "1e39"
        lines[3] = ",".join(cells)
        (tmp_path / "gtex.csv").write_text("\n".join(lines) + "\n")
        expected = ["gtex.csv", "line 4", repr(tissue)]
        if damage != "inf target":
            extra = ["--target-transform", "none"]
            expected.append("float32")
    out = tmp_path / "prep"
    code, err = run_fusion(capsys, "prepare", "isoformer", "--csv", tmp_path / "gtex.csv", "--genome", gtex.genome_path, "--out", out,
                           "--dna-window", gtex.dna_window, *extra)  # fmt: skip
    one_line_error(code, err, *expected)
    assert not (out / "prepare.json").exists()  # the mark of a complete prepared directory
