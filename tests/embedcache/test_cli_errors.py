"""The embedcache CLI's messages for inputs that used to pass silently or end in a traceback."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from cli.embedcache_cli import create_parser
from embedcache import open_store

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


def _interrupt_before_records(store) -> int:
    """Leave `store` as a build killed after committing its units but before its records: the head
    counts only the unit commits (no records), status incomplete. Returns the records dropped."""
    import zarr

    from embedcache.commits import log_digest

    group = zarr.open_group(store / "_commits", mode="r+", zarr_format=3)
    head = dict(group.attrs["head"])
    ranges = group["ranges"][: head["n"]]
    units = int(np.flatnonzero(ranges[:, 1] > ranges[:, 0])[0])  # record commits come after every unit
    # The head that build wrote after its unit commits: its log_crc covers those rows only.
    digest = log_digest(ranges[:units], group["crc"][:units])
    group.attrs["head"] = {**head, "n": units, "records": 0, "status": "incomplete", "log_crc": digest}
    return head["records"]


def test_resumed_build_counts_resumed_records_not_new_ids(tmp_path, models, capsys):
    records = {"p1": "MKTAYIAKQRQISFVKSHFSRQ", "p2": "MKVLAAGIKWWWW", "p1_alias": "MKTAYIAKQRQISFVKSHFSRQ"}
    fasta, store = write_fasta(tmp_path / "in.fa", records), tmp_path / "s.zarr"
    assert cli(capsys, *build_args(models, fasta, store))[0] == 0
    assert _interrupt_before_records(store) == 3 and not open_store(store).complete
    code, out = cli(capsys, *build_args(models, fasta, store, "--dry-run"))
    assert code == 0 and "reusing stored sequences for 0 new records; 3 records resumed from an interrupted build" in out, out
    code, out = cli(capsys, *build_args(models, fasta, store))  # the same command again
    assert code == 0, out
    assert "0 new, 0 already stored (0 of them under new ids), 3 resumed from an interrupted build, 0 shared" in out, out
    s = open_store(store)
    assert s.complete and sorted(s.ids) == sorted(records) and s.verify() == []
    assert s.builds[-1]["resumed_records"] == 3 and s.builds[-1]["reused_sequences"] == 0
    # A record under a new id for a sequence committed records use is still counted as one.
    write_fasta(tmp_path / "more.fa", {**records, "renamed": records["p2"]})
    code, out = cli(capsys, *build_args(models, tmp_path / "more.fa", store))
    assert code == 0 and "0 new, 4 already stored (1 of them under new ids), 0 shared" in out, out


def test_no_progress_hides_transformers_bars_and_puts_them_back(tmp_path, models, capsys):
    from transformers.utils import logging as hf_logging

    fasta = write_fasta(tmp_path / "in.fa", {"p1": "MKTAYIAK"})
    before = hf_logging.is_progress_bar_enabled()
    # A --max-tokens of its own: a config this process has not loaded the model for, so its weights load here.
    code, out = cli(capsys, *build_args(models, fasta, tmp_path / "quiet.zarr", "--max-tokens", "1111"))
    assert code == 0 and "Loading weights" not in out and "it/s" not in out and "seq/s" not in out, out
    assert hf_logging.is_progress_bar_enabled() == before  # the process-wide switch is as it was
    if before:  # the control: with bars on, the weight-loading bar is there
        args = [a for a in build_args(models, fasta, tmp_path / "loud.zarr", "--max-tokens", "1112") if a != "--no-progress"]
        code, out = cli(capsys, *args)
        assert code == 0 and "Loading weights" in out, out


def test_a_missing_input_is_named_before_the_model_is_looked_for(tmp_path, capsys):
    """An uncached hub id offline would fail too: the input's fault is the one named, without loading anything."""
    code, out = cli(capsys, "build", tmp_path / "nope.fa", "-o", tmp_path / "s.zarr", "--encoder", "esm2", "--model", "org/not-cached")
    assert code == 2 and out.strip().splitlines() == [f"embedcache: error: input file {str(tmp_path / 'nope.fa')!r} does not exist"], out


def test_a_library_message_of_several_lines_is_printed_as_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # transformers' own offline message spans three lines
    fasta = write_fasta(tmp_path / "in.fa", {"p1": "MKTAYIAK"})
    code, out = cli(capsys, "build", fasta, "-o", tmp_path / "s.zarr", "--encoder", "esm2", "--model", "org/not-cached", "--no-progress")
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "org/not-cached" in lines[0], out
