"""Every bad input: a clear message naming file, record and value; exit code 2; no store claiming completeness."""

from __future__ import annotations

import gzip
import random
import re

import pandas as pd
import pytest

from cli.embedcache_cli import create_parser, main
from embedcache import open_store
from embedcache import inputs
from embedcache.errors import InputError
from embedcache.inputs import read_records, unique_records

from .conftest import write_fasta


def cli(capsys, *args) -> tuple[int, str]:
    code = main(list(map(str, args)))
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def build_args(models, fasta, store, *extra, encoder="esm2"):
    return ["build", fasta, "-o", store, "--encoder", encoder, "--model", models["esm2"] if encoder == "esm2" else models[encoder], "--no-progress", *extra]


def assert_no_complete_store(store):
    assert not (store / "zarr.json").exists() or not open_store(store).complete


def test_missing_input_file(tmp_path, models, capsys):
    code, err = cli(capsys, *build_args(models, tmp_path / "nope.fa", tmp_path / "s.zarr"))
    assert code == 2 and "input file" in err and "nope.fa" in err and "does not exist" in err
    assert not (tmp_path / "s.zarr").exists()


def test_empty_input_file(tmp_path, models, capsys):
    (tmp_path / "empty.fa").write_text("")
    code, err = cli(capsys, *build_args(models, tmp_path / "empty.fa", tmp_path / "s.zarr"))
    assert code == 2 and "empty.fa" in err and "is empty" in err


def test_record_without_sequence(tmp_path, models, capsys):
    (tmp_path / "in.fa").write_text(">p1\nMKT\n>p2\n>p3\nMKV\n")
    code, err = cli(capsys, *build_args(models, tmp_path / "in.fa", tmp_path / "s.zarr"))
    assert code == 2 and "in.fa:3: record 'p2' has no sequence" in err
    assert not (tmp_path / "s.zarr").exists()


def test_same_id_two_sequences(tmp_path, models, capsys):
    (tmp_path / "in.fa").write_text(">p1\nMKT\n>p2\nMKV\n>p1\nMKTT\n")
    code, err = cli(capsys, *build_args(models, tmp_path / "in.fa", tmp_path / "s.zarr"))
    assert code == 2 and "'p1' appears twice with different sequences" in err
    assert "in.fa:1" in err and "in.fa:5" in err


def test_character_outside_alphabet(tmp_path, models, capsys):
    write_fasta(tmp_path / "in.fa", {"ok": "MKTAYIAK", "bad": "MKTA*YIAK"})
    code, err = cli(capsys, *build_args(models, tmp_path / "in.fa", tmp_path / "s.zarr"))
    assert code == 2
    assert "record 'bad'" in err and "character '*' at position 5" in err and "protein alphabet" in err
    assert_no_complete_store(tmp_path / "s.zarr")


def test_protein_file_given_to_a_dna_encoder(tmp_path, models, capsys):
    write_fasta(tmp_path / "prot.fa", {"P69905": "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSF"})
    code, err = cli(capsys, *build_args(models, tmp_path / "prot.fa", tmp_path / "s.zarr", encoder="nucleotide-transformer"))
    assert code == 2 and "record 'P69905'" in err and "character 'M' at position 1" in err
    assert "looks like a protein sequence" in err


def test_store_with_another_fingerprint(tmp_path, models, capsys):
    write_fasta(tmp_path / "in.fa", {"p1": "MKTAYIAK"})
    assert cli(capsys, *build_args(models, tmp_path / "in.fa", tmp_path / "s.zarr"))[0] == 0
    code, err = cli(capsys, *build_args(models, tmp_path / "in.fa", tmp_path / "s.zarr", "--layer", "1"))
    assert code == 2 and "has fingerprint" in err and "but this build has fingerprint" in err and "layer" in err
    assert open_store(tmp_path / "s.zarr").complete  # the existing store is untouched


def test_unknown_encoder(tmp_path, models, capsys):
    write_fasta(tmp_path / "in.fa", {"p1": "MKT"})
    code, err = cli(capsys, "build", tmp_path / "in.fa", "-o", tmp_path / "s.zarr", "--encoder", "esm3")
    assert code == 2 and "unknown encoder 'esm3'" in err and "esm2, nucleotide-transformer, enformer, hf" in err


def test_model_directory_that_does_not_exist(tmp_path, capsys):
    write_fasta(tmp_path / "in.fa", {"p1": "MKT"})
    code, err = cli(capsys, "build", tmp_path / "in.fa", "-o", tmp_path / "s.zarr", "--encoder", "esm2", "--model", tmp_path / "no_model")
    assert code == 2 and "model directory" in err and "no_model" in err and "does not exist" in err


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["build", "dry-run"])
def test_remote_code_needs_the_flag(tmp_path, models, capsys, dry_run):
    write_fasta(tmp_path / "in.fa", {"p1": "MKT"})
    code, err = cli(capsys, "build", tmp_path / "in.fa", "-o", tmp_path / "s.zarr", "--encoder", "hf", "--model", models["remote"], *dry_run)
    assert code == 2 and "--trust-remote-code" in err, err


def test_enformer_sequence_longer_than_window_needs_a_crop(tmp_path, models, capsys):
    # Two records too long: the longest is named, as the batches would reach it first.
    write_fasta(tmp_path / "g.fa", {"short": "ACGT" * 100, "gene6": "ACGT" * 275, "gene7": "ACGT" * 300})
    args = build_args(models, tmp_path / "g.fa", tmp_path / "s.zarr", "--window", "1024", encoder="enformer")
    code, err = cli(capsys, *args)
    assert code == 2 and "record 'gene7'" in err and "1200 tokens is longer than the encoder's fixed window of 1024" in err
    assert "--crop" in err
    code, _ = cli(capsys, *args, "--crop", "center")
    assert code == 0
    assert open_store(tmp_path / "s.zarr").record_info("gene7")["n_cropped"] == 176
    assert open_store(tmp_path / "s.zarr").record_info("gene6")["n_cropped"] == 76


def test_max_length_without_crop_is_refused(tmp_path, models, capsys):
    write_fasta(tmp_path / "in.fa", {"p1": "MKT"})
    code, err = cli(capsys, *build_args(models, tmp_path / "in.fa", tmp_path / "s.zarr", "--max-length", "10"))
    assert code == 2 and "--max-length 10 needs --crop" in err


def test_help_explains_every_flag(capsys):
    build_parser = create_parser()._subparsers._group_actions[0].choices["build"]
    for action in build_parser._actions:
        assert action.help, f"flag {action.option_strings or action.dest} has no help"


# -- readers --------------------------------------------------------------------------------------


def test_fasta_gzip_csv_tsv_parquet_read_the_same(tmp_path):
    records = {"a": "MKT", "b": "ACDEF"}
    write_fasta(tmp_path / "x.fa", records)
    with gzip.open(tmp_path / "x.fa.gz", "wt") as f:
        f.write(">a desc\nMK\nT\n>b\nACDEF\n")
    df = pd.DataFrame({"name": list(records), "seq": list(records.values())})
    df.to_csv(tmp_path / "x.csv", index=False)
    df.to_csv(tmp_path / "x.tsv", sep="\t", index=False)
    df.to_parquet(tmp_path / "x.parquet")
    for name, kw in [("x.fa", {}), ("x.fa.gz", {}), ("x.csv", dict(id_column="name", sequence_column="seq")),
                     ("x.tsv", dict(id_column="name", sequence_column="seq")), ("x.parquet", dict(id_column="name", sequence_column="seq"))]:  # fmt: skip
        got = {r.id: r.sequence for r in read_records(tmp_path / name, **kw)}
        assert got == records, name


# FASTA layouts, each read as a text-mode file's lines would be: (records as (id, sequence, line)) or an error.
FASTA_LAYOUTS = {
    "plain": (">a desc\nMKT\nAYI\n>b\nGGG\n", [("a", "MKTAYI", 1), ("b", "GGG", 4)]),
    "crlf": (">a desc\r\nMKT\r\nAYI\r\n>b\r\nGGG\r\n", [("a", "MKTAYI", 1), ("b", "GGG", 4)]),
    "lone CR": (">a\rMKT\rAYI\r>b\rGGG\r", [("a", "MKTAYI", 1), ("b", "GGG", 4)]),
    "a lone CR in one record": (">a\nMK\rTT\n>b\nGG\n>c\nM\n", [("a", "MKTT", 1), ("b", "GG", 4), ("c", "M", 6)]),
    "comments": (";c\n>a\nMK;x\n;comment\nTT\n>b\nG\n", [("a", "MK;xTT", 2), ("b", "G", 6)]),
    "indented header": (">a\nMK\n  >b\nGG\n", [("a", "MK", 1), ("b", "GG", 3)]),
    "blank lines, spaces": ("\n\n>a\n\nMK T\n\n>b\n G G\n", [("a", "MKT", 3), ("b", "GG", 7)]),
    "unicode spaces": (">a\nMK\u00a0T\u2003\n>b\nGG\n", [("a", "MKT", 1), ("b", "GG", 3)]),
    "ASCII separators": (">a\nMK\x1fT\n", [("a", "MKT", 1)]),
    "no final newline": (">a;b c\nMKT", [("a;b", "MKT", 1)]),
    "text before the first header": ("hello\n>a\nMK\n", "1: expected a FASTA header line starting with '>', got 'hello'"),
    "record without sequence": (">a\n>b\nMK\n", "1: record 'a' has no sequence"),
    "header without id": (">x\nM\n> \nMK\n", "3: FASTA header has no id"),
}


@pytest.mark.parametrize("layout", FASTA_LAYOUTS)
def test_fasta_layouts(tmp_path, layout):
    text, expected = FASTA_LAYOUTS[layout]
    (tmp_path / "in.fa").write_bytes(text.encode())
    if isinstance(expected, str):
        line, message = expected.split(": ", 1)
        with pytest.raises(InputError, match=re.escape(f"in.fa:{line}: {message}")):
            read_records(tmp_path / "in.fa")
    else:
        assert [(r.id, r.sequence, int(r.source.rsplit(":", 1)[1])) for r in read_records(tmp_path / "in.fa")] == expected


def test_a_character_split_by_a_line_break_is_not_utf8(tmp_path):
    """The bytes of one character split by a line break are two bad bytes, not the character (joining lines
    before decoding would make U+00A0, a space, out of them)."""
    (tmp_path / "in.fa").write_bytes(b">a\nMK\xc2\n\xa0TT\n")
    with pytest.raises(InputError, match=re.escape("in.fa: byte b'\\xc2' is not UTF-8 text")):
        read_records(tmp_path / "in.fa")


def test_fasta_reads_the_same_whatever_its_read_size(tmp_path, monkeypatch):
    """Records cut across reads (a header or a line split between two) come out whole, lines counted right."""
    rng = random.Random(0)
    text = "".join(f">r{i} x\n" + "".join("".join(rng.choice("ACDEFGHIK") for _ in range(rng.randint(1, 70))) + rng.choice(["\n", "\r\n"])
                                          for _ in range(rng.randint(1, 5))) for i in range(300))  # fmt: skip
    (tmp_path / "in.fa").write_text(text, newline="")
    expected = [(r.id, r.sequence, r.source) for r in read_records(tmp_path / "in.fa")]
    assert len(expected) == 300 and expected[-1][2].endswith(f":{text.count(chr(10)) - text.rsplit('>', 1)[1].count(chr(10)) + 1}")
    for size in (1, 2, 3, 7, 64, 1000):
        monkeypatch.setattr(inputs, "READ_BYTES", size)
        assert [(r.id, r.sequence, r.source) for r in read_records(tmp_path / "in.fa")] == expected, size


def test_table_errors_name_column_and_row(tmp_path):
    pd.DataFrame({"id": ["a", "b"], "sequence": ["MKT", ""]}).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(Exception, match=r"x\.csv: row 3: record 'b' has no sequence"):
        read_records(tmp_path / "x.csv")
    with pytest.raises(Exception, match=r"no column 'seq' \(set it with --sequence-column\)"):
        read_records(tmp_path / "x.csv", sequence_column="seq")


def test_exact_repeats_are_collapsed(tmp_path):
    (tmp_path / "in.fa").write_text(">a\nMKT\n>a\nmkt\n")
    assert [r.id for r in unique_records(read_records(tmp_path / "in.fa"))] == ["a"]


def test_a_letter_that_upper_cases_to_two_is_named_not_an_index_error():
    from embedcache.alphabets import PROTEIN, check_sequence
    from embedcache.errors import AlphabetError

    with pytest.raises(AlphabetError, match="character 'J' at position 4"):  # "ßAJ".upper() is "SSAJ"
        check_sequence("ßAJ", PROTEIN, record="r", source="in.fa:1", encoder="esm2")
