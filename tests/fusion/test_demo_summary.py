"""fusion.demo's acceptance summary: every learned aggregator against the probe, and what adding a modality did."""

import pandas as pd
import pytest

pytest.importorskip("enformer_pytorch", reason="fusion.demo builds its DNA store with Enformer (the enformer extra)")

from fusion.demo import learned_vs_probe, modality_additions  # noqa: E402


def table() -> pd.DataFrame:
    rows = [  # modalities, aggregator, mean, std over seeds
        ("rna", "ridge probe", 0.20, float("nan")),
        ("dna", "ridge probe", 0.15, float("nan")),
        ("dna+rna", "ridge probe", 0.40, float("nan")),
        ("rna", "mean-concat", 0.22, 0.01),
        ("dna", "mean-concat", 0.14, 0.01),
        ("dna+rna", "mean-concat", 0.41, 0.01),
        ("dna+rna", "cross-attention", 0.18, 0.02),  # below the probe, and below rna alone beyond the spread
    ]
    return pd.DataFrame(rows, columns=["modalities", "aggregator", "test_mean_r2_mean", "test_mean_r2_std"])


def test_every_aggregator_is_set_beside_the_probe():
    got = learned_vs_probe(table())
    assert got["dna+rna"] == {"probe": 0.40, "learned": {"mean-concat": 0.41, "cross-attention": 0.18}}
    assert got["dna"] == {"probe": 0.15, "learned": {"mean-concat": 0.14}}


def test_modality_additions_use_the_single_runs_for_every_aggregator():
    got = modality_additions(table())
    cross = {(r["from"], r["to"]): r for r in got["cross-attention"]}
    assert set(cross) == {("dna", "dna+rna"), ("rna", "dna+rna")}
    assert cross[("rna", "dna+rna")]["change"] == pytest.approx(-0.04) and cross[("rna", "dna+rna")]["spread"] == 0.02
    assert all(r["change"] > 0 for r in got["mean-concat"])


def test_one_seed_has_no_spread_so_any_drop_counts():
    one_seed = table().assign(test_mean_r2_std=float("nan"))
    cross = {(r["from"], r["to"]): r for r in modality_additions(one_seed)["cross-attention"]}
    assert cross[("rna", "dna+rna")]["spread"] == 0.0 and cross[("rna", "dna+rna")]["change"] < 0


def test_an_unexpected_error_in_the_demo_is_one_line_with_the_traceback_file(tmp_path, monkeypatch, capsys):
    import cli.demo

    def fails(out, config):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli.demo, "run_demo", fails)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert cli.demo.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unexpected error" in err[0] and "RuntimeError: boom" in err[0], err
    traceback_file = err[0].split("full traceback in ")[1].split(" (rerun")[0]
    assert "second line" in open(traceback_file).read()
