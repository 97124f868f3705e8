"""The embedcache CLI's messages for inputs that used to pass silently or end in a traceback."""

from __future__ import annotations

import gzip

import pytest

from cli.embedcache_cli import create_parser

from .conftest import write_fasta
from .test_bad_input import assert_no_complete_store, build_args, cli


@pytest.mark.parametrize(("flag", "value"), [("--shard-mb", "0"), ("--shard-mb", "-1"), ("--shard-mb", "nan"), ("--token-bins", "0"), ("--token-bins", "-2")])
def test_sizes_that_would_store_nothing_or_one_row_shards_are_refused(tmp_path, models, capsys, flag, value):
    write_fasta(tmp_path / "in.fa", {"p1": "MKTAYIAK"})
    code, err = cli(capsys, *build_args(models, tmp_path / "in.fa", tmp_path / "s.zarr", flag, value))
    assert code == 2 and flag in err and value in err and "Traceback" not in err
    assert not (tmp_path / "s.zarr").exists()


def test_iupac_dna_is_told_to_use_n_not_esm2(tmp_path, models, capsys):
    write_fasta(tmp_path / "iupac.fa", {"g1": "ACGTRYKMACGT"})
    code, err = cli(capsys, *build_args(models, tmp_path / "iupac.fa", tmp_path / "s.zarr", encoder="nucleotide-transformer"))
    assert code == 2 and "record 'g1'" in err and "character 'R' at position 5" in err
    assert "IUPAC ambiguity codes (KMRY)" in err and "replace them with N" in err and "protein" not in err


def test_rna_given_to_a_protein_encoder_is_refused(tmp_path, models, capsys):
    write_fasta(tmp_path / "rna.fa", {f"t{i}": "ACGUACGGAUCCAUGGCAUACGUAGCUAGCUAGGCAUCG" for i in range(4)})
    code, err = cli(capsys, *build_args(models, tmp_path / "rna.fa", tmp_path / "s.zarr"))
    assert code == 2 and "rna.fa" in err and "look like nucleotide sequences" in err and "'esm2'" in err
    assert_no_complete_store(tmp_path / "s.zarr")


def test_a_few_proteins_rich_in_acgt_letters_still_build(tmp_path, models, capsys):
    write_fasta(tmp_path / "p.fa", {"gly": "GAGAGACTGAGA"})  # short: too little evidence to refuse
    code, err = cli(capsys, *build_args(models, tmp_path / "p.fa", tmp_path / "s.zarr"))
    assert code == 0, err


def test_truncated_gzip_and_non_utf8_input_name_the_file(tmp_path, models, capsys):
    full = gzip.compress(b"".join(b">r%d\nMKTAYIAKQRQISFVKSHFSRQ\n" % i for i in range(200)))
    (tmp_path / "cut.fa.gz").write_bytes(full[: len(full) // 2])
    code, err = cli(capsys, *build_args(models, tmp_path / "cut.fa.gz", tmp_path / "s.zarr"))
    assert code == 2 and "cut.fa.gz" in err and "truncated or corrupt" in err and "Traceback" not in err
    (tmp_path / "latin1.fa").write_bytes(">r1 caf\xe9\nMKTAYIAK\n".encode("latin-1"))
    code, err = cli(capsys, *build_args(models, tmp_path / "latin1.fa", tmp_path / "s.zarr"))
    assert code == 2 and "latin1.fa" in err and "not UTF-8" in err
    assert not (tmp_path / "s.zarr").exists()


def test_truncated_store_metadata_names_the_file(tmp_path, models, capsys):
    write_fasta(tmp_path / "in.fa", {"p1": "MKTAYIAK"})
    assert cli(capsys, *build_args(models, tmp_path / "in.fa", tmp_path / "s.zarr"))[0] == 0
    meta = tmp_path / "s.zarr" / "zarr.json"
    meta.write_text(meta.read_text()[:100])
    code, err = cli(capsys, "info", tmp_path / "s.zarr")
    assert code == 2 and str(tmp_path / "s.zarr") in err and "zarr.json is not valid JSON" in err and "Traceback" not in err


def test_switches_do_not_claim_to_be_on(capsys):
    build_parser = create_parser()._subparsers._group_actions[0].choices["build"]
    helps = {a.option_strings[0]: build_parser.formatter_class("x")._get_help_string(a) for a in build_parser._actions if a.option_strings}
    assert "(default: True)" not in helps["--no-tokens"] and "per-token embeddings are stored" in helps["--no-tokens"]
    assert "(default: True)" not in helps["--no-progress"]
