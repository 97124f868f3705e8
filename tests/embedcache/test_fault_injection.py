"""Fault injection: no input byte or file name changes what is committed, every read path refuses what
`verify` refuses, and every "run the same command again" is true where it is said.

Each test injects one real fault (a file name with a tab, an id with a NUL, a directory where the
store must write a file, a file-size limit, Ctrl-C, a symlink in a store) through the CLI or the
library, and checks the exit code, the one-line message, and the store the rerun leaves.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from zarr.storage import LocalStore

import embedcache.spool as spool_module
from cli.embedcache_cli import main
from embedcache import open_store
from embedcache.build import build
from embedcache.config import BuildConfig
from embedcache.errors import EncoderError, SpoolError, StoreError
from embedcache.location import Location
from embedcache.partition import UnitError, UnitTask, run_unit, what_next
from embedcache.plan import Unit
from embedcache.spool import SpoolWriter, iter_entries, read_entries
from tests.conftest import unique_name

from .conftest import write_fasta
from .test_parity import AA, random_seqs
from .test_store import esm2_config, run_build

REPO = Path(__file__).resolve().parents[2]
AGAIN = "run the same command again"


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    """The CLI's error: exactly one line on stderr, the program's own."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("embedcache: error: "), err
    return lines[0]


def build_args(models, inputs: list, store, *extra) -> list:
    return ["build", *inputs, "-o", store, "--encoder", "esm2", "--model", models["esm2"], "--no-progress", *extra]


def small_units(shard_mb: float = 0.005) -> list[str]:
    """One shard per unit: many units (and commits) from a few short sequences."""
    return ["--shard-mb", str(shard_mb), "--unit-mb", str(shard_mb)]


def assert_holds(store_path, records: dict[str, str], storage_options=None) -> None:
    """The store holds exactly `records` (ids, residues, content keys), verifies, and is complete."""
    import hashlib

    store = open_store(store_path, storage_options)
    assert store.complete and store.verify() == []
    assert sorted(store.ids) == sorted(records)
    for rid, seq in records.items():
        assert store.sequence(rid) == seq, (rid, store.sequence(rid), seq)
        key = store.record_info(rid)["content_key"]
        assert key == hashlib.sha256(seq.encode()).hexdigest()


# -- 1. the spool and the inputs: no byte of an id, a file name or a sequence moves a field -------------


ODD_ENTRIES = [
    ("tab\there", "dir/tab\tname.fa:1", "NDNW\tMKT"),
    ("new\nline", "new\nline.fa:3", "MK\nT"),
    ("nul\0byte", "bad\udcff.fa:5", "M\0K"),  # a file name that is not UTF-8 reaches Python as lone surrogates
    ("", "", ""),
    ("cr\r\nlf é", "x.csv: row 2", "A" * 300),
]


def test_spool_round_trips_every_byte_across_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "PART_BYTES", 100)  # several parts from a few entries
    store = LocalStore(tmp_path / "spool")
    writer = SpoolWriter(store)
    locators = np.array([writer.append(*e) for e in ODD_ENTRIES], np.int64)
    writer.flush()
    assert writer.part >= 3
    expected = [spool_module.SpoolEntry(*e) for e in ODD_ENTRIES]
    assert read_entries(store, locators) == expected
    assert list(iter_entries(store, writer.part)) == expected


def test_spool_reads_nearby_entries_together_in_any_order(tmp_path, monkeypatch):
    """A unit asks for its entries length-sorted, scattered over the spool: entries within GAP of each other
    in one part come in one request, far ones in their own, and each comes back in the order asked."""
    monkeypatch.setattr(spool_module, "PART_BYTES", 400)
    monkeypatch.setattr(spool_module, "GAP", 150)
    store = LocalStore(tmp_path / "spool")
    writer = SpoolWriter(store)
    entries = [(f"r{i}", "a.fa", "MK" * (5 + 20 * (i % 3))) for i in range(12)]  # 27- to 107-letter entries
    locators = np.array([writer.append(*e) for e in entries], np.int64)
    writer.flush()
    assert writer.part >= 3
    asked = [7, 0, 11, 3, 4, 9, 1]
    requests = []
    real_get = LocalStore.get

    async def counting(self, key, prototype, byte_range=None):
        requests.append((key, byte_range))
        return await real_get(self, key, prototype, byte_range)

    monkeypatch.setattr(LocalStore, "get", counting)
    assert read_entries(store, locators[asked]) == [spool_module.SpoolEntry(*entries[i]) for i in asked]
    parts = {int(locators[i, 0]) for i in asked}
    assert len(parts) <= len(requests) < len(asked)  # nearby entries shared a request; no request spans two parts
    assert read_entries(store, locators[:0]) == []


def test_a_damaged_spool_is_named_never_read_shifted(tmp_path):
    store = LocalStore(tmp_path / "spool")
    writer = SpoolWriter(store)
    locators = np.array([writer.append(*e) for e in ODD_ENTRIES[:2]], np.int64)
    writer.flush()
    part = tmp_path / "spool" / "_spool" / "part-000000"
    intact = part.read_bytes()
    data = bytearray(intact)
    data[locators[0, 2] - 1] ^= 0x01  # the last residue byte of the first entry
    part.write_bytes(bytes(data))
    with pytest.raises(SpoolError, match=r"_spool/part-000000 bytes 0\.\.\d+: entry at byte 0 does not match its crc32"):
        read_entries(store, locators[:1])
    part.write_bytes(intact[: locators[1, 1] + 10])  # cut inside the second entry's header
    entries = iter_entries(store, 1)
    assert next(entries).id == ODD_ENTRIES[0][0]
    with pytest.raises(SpoolError, match=f"entry at byte {locators[1, 1]} is cut short"):
        next(entries)
    part.write_bytes(intact[:-1])  # the last entry one byte short
    with pytest.raises(SpoolError, match=f"entry at byte {locators[1, 1]} claims"):
        list(iter_entries(store, 1))
    part.unlink()
    with pytest.raises(SpoolError, match="spool part _spool/part-000000 is missing: every worker must see the store"):
        read_entries(store, locators[:1])


@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "no-tokens"])
def test_file_names_with_a_tab_a_newline_or_non_utf8_bytes_build_the_right_store(tmp_path, models, capsys, tokens):
    seqs = random_seqs(AA, [80, 70, 50], seed=1)
    names = ["tab\tname.fa", "new\nline.fa", os.fsdecode(b"bad\xffname.fa")]
    inputs = [write_fasta(tmp_path / name, {rid: seq}) for name, (rid, seq) in zip(names, seqs.items())]
    extra = [] if tokens else ["--no-tokens"]
    store = tmp_path / "s.zarr"
    code, out, err = cli(capsys, *build_args(models, inputs, store, *extra))
    assert code == 0, err
    assert_holds(store, seqs)
    # The same sequences from a plainly named file embed to the same values.
    reference = tmp_path / "ref.zarr"
    assert cli(capsys, *build_args(models, [write_fasta(tmp_path / "plain.fa", seqs)], reference, *extra))[0] == 0
    ours, ref = open_store(store), open_store(reference)
    np.testing.assert_array_equal(ours.pooled(list(seqs)), ref.pooled(list(seqs)))
    if tokens:
        for rid, seq in seqs.items():
            assert ours.tokens(rid).shape[0] == len(seq)
            np.testing.assert_array_equal(ours.tokens(rid), ref.tokens(rid))
    code, out, err = cli(capsys, *build_args(models, inputs, store, *extra))  # the same command again: nothing new
    assert code == 0 and "0 new, 3 already stored" in out, out + err


def test_ids_with_tabs_newlines_and_nuls_are_stored_exactly(tmp_path, models, capsys):
    seqs = iter(random_seqs(AA, [30 + 7 * i for i in range(8)], seed=2).values())
    parquet = {"tab\tin id": next(seqs), "new\nline": next(seqs), "nul\0byte": next(seqs), "cr\rlf": next(seqs)}
    csv = {"csv\ttab": next(seqs), "csv\nnewline": next(seqs)}
    pd.DataFrame({"id": list(parquet), "sequence": list(parquet.values())}).to_parquet(tmp_path / "ids.parquet")
    pd.DataFrame({"id": list(csv), "sequence": list(csv.values())}).to_csv(tmp_path / "ids.csv", index=False)
    fasta_seq, other = next(seqs), next(seqs)
    # A FASTA id ends at the first whitespace (a tab is legal there, and starts the description); a NUL is not whitespace.
    (tmp_path / "ids.fa").write_text(f">nul\0id\tdescription with\ttabs\n{fasta_seq}\n>plain desc\n{other}\n")
    expected = {**parquet, **csv, "nul\0id": fasta_seq, "plain": other}
    store = tmp_path / "s.zarr"
    code, out, err = cli(capsys, *build_args(models, [tmp_path / "ids.parquet", tmp_path / "ids.csv", tmp_path / "ids.fa"], store))
    assert code == 0, err
    assert_holds(store, expected)
    code, out, err = cli(capsys, *build_args(models, [tmp_path / "ids.parquet", tmp_path / "ids.csv", tmp_path / "ids.fa"], store))
    assert code == 0 and f"0 new, {len(expected)} already stored" in out, out + err


def test_an_unprintable_file_name_stays_one_line_in_errors(tmp_path, models, capsys):
    bad = write_fasta(tmp_path / "new\nline.fa", {"ok": "MKTAYIAK", "bad": "MKTA*YIAK"})
    code, out, err = cli(capsys, *build_args(models, [bad], tmp_path / "s.zarr"))
    line = one_line(err)
    assert code == 2 and repr(str(bad)) + ":3: record 'bad': character '*' at position 5" in line, line
    assert not (tmp_path / "s.zarr").exists()


# -- 2. memory:// stores, and every "run the same command again" ---------------------------------------


def test_a_memory_store_build_warns_once_that_it_lives_in_this_process(tmp_path, models, capsys, caplog):
    url = f"memory://{unique_name('mem')}/s.zarr"
    fasta = write_fasta(tmp_path / "a.fa", random_seqs(AA, [30, 40], seed=3))
    with caplog.at_level(logging.WARNING, logger="embedcache"):
        assert cli(capsys, *build_args(models, [fasta], url, "--dry-run"))[0] == 0
        assert [r for r in caplog.records if r.name == "embedcache"] == []  # a dry run stores nothing
        code, out, err = cli(capsys, *build_args(models, [fasta], url))
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.name == "embedcache"]
    assert warnings == [f"embedcache: warning: store {url!r} lives only in this process's memory: it is gone when the process exits"]
    assert open_store(url).complete  # ... and is there while the process lives


@pytest.mark.parametrize("flag", ["--scheduler", "--scheduler-file"])
def test_a_memory_store_with_dask_workers_is_refused_naming_the_url(tmp_path, models, capsys, flag):
    url = f"memory://{unique_name('mem')}/s.zarr"
    fasta = write_fasta(tmp_path / "a.fa", random_seqs(AA, [30, 40], seed=3))
    value = "local:2" if flag == "--scheduler" else tmp_path / "scheduler.json"
    started = time.time()
    code, out, err = cli(capsys, *build_args(models, [fasta], url, flag, value))
    line = one_line(err)
    assert code == 2 and url in line and f"{flag} {value}" in line and "cannot reach" in line and "again" not in line, line
    assert time.time() - started < 10  # refused before any model, cluster or store
    with pytest.raises(StoreError, match="memory://"):
        build(BuildConfig.create("esm2", str(models["esm2"])), [fasta], url, scheduler="local:2", progress=False, log=lambda s: None)
    with pytest.raises(StoreError, match="no embedcache store"):
        open_store(url)


def _shard_key(store: Path, shard: int) -> Path:
    return store / "tokens" / "c" / str(shard) / "0" / "0"


def test_a_unit_that_cannot_write_its_shard_resumes_when_run_again(tmp_path, models, capsys):
    """partition.run_unit: an I/O failure of the store says "run the same command again", and it works."""
    seqs = random_seqs(AA, [60, 55, 50, 45], seed=4)  # each under one shard (81 rows): one unit each
    fasta = write_fasta(tmp_path / "a.fa", seqs)
    store = tmp_path / "s.zarr"
    _shard_key(store, 2).mkdir(parents=True)  # a directory where the third unit's shard file must go
    args = build_args(models, [fasta], store, *small_units())
    code, out, err = cli(capsys, *args)
    line = one_line(err)
    assert code == 2 and "unit 2 (records 's2_50') failed" in line and "IsADirectoryError" in line, line
    assert line.endswith(f"committed units are kept: {AGAIN} to resume"), line
    assert open_store(store).committed.content == 2  # units 0 and 1 were committed before it
    _shard_key(store, 2).rmdir()  # the fault clears
    code, out, err = cli(capsys, *args)
    assert code == 0 and out.startswith("2 new"), out + err
    assert_holds(store, seqs)


def test_a_unit_failure_a_rerun_cannot_fix_does_not_offer_one(tmp_path, models):
    """A worker that does not see the build's spool (a store path local to another machine) fails the same
    way on every rerun: the message says what to change instead."""
    config = BuildConfig.create("esm2", str(models["esm2"]))
    store = tmp_path / "s.zarr"
    cli_build = build(config, [write_fasta(tmp_path / "a.fa", {"p": "MKTAYIAK"})], store, progress=False, log=lambda s: None)
    assert cli_build.plan.n_new == 1
    unit = Unit(0, np.array([[0, 0, 40]], np.int64), np.array([8], np.int64), 8, 0, 8)  # the spool is gone after a build
    with pytest.raises(UnitError) as e:
        run_unit(UnitTask(unit, config, Location.of(store)), log=lambda s: None)
    message = str(e.value)
    assert "spool part _spool/part-000000 is missing: every worker must see the store" in message and AGAIN not in message
    assert AGAIN in what_next(OSError(28, "No space left on device"))
    assert AGAIN not in what_next(AssertionError("planned rows [80] but got [83]")) and "a bug" in what_next(AssertionError())
    assert AGAIN not in what_next(RuntimeError("CUDA error: device-side assert triggered"))


@pytest.mark.parametrize("key, kept, rerun", [
    ("pooled/c/0/0/0", 0, "3 new"),  # the first unit's commit (StoreWriter.commit_units)
    # the last unit's commit, which takes the records along: both fail, the first two units are kept
    ("sequence/c/0", 2, "1 new, 0 already stored (0 of them under new ids), 2 resumed from an interrupted build"),
], ids=["unit-commit", "last-commit-with-records"])  # fmt: skip
def test_a_failed_commit_keeps_what_was_committed_and_resumes(tmp_path, models, capsys, key, kept, rerun):
    """store.StoreWriter: a commit that cannot be written says "run the same command again to resume", and it does."""
    seqs = random_seqs(AA, [60, 55, 50], seed=5)
    fasta = write_fasta(tmp_path / "a.fa", seqs)
    store = tmp_path / "s.zarr"
    (store / key).mkdir(parents=True)  # a directory where the commit must write that chunk
    args = build_args(models, [fasta], store, *small_units())
    code, out, err = cli(capsys, *args)
    line = one_line(err)
    assert code == 2 and "writing to store" in line and "IsADirectoryError" in line, line
    assert line.endswith(f"everything committed before it is kept: {AGAIN} to resume"), line
    interrupted = open_store(store)
    assert not interrupted.complete and interrupted.committed.content == kept and len(interrupted) == 0
    (store / key).rmdir()  # the fault clears
    code, out, err = cli(capsys, *args)
    assert code == 0 and out.startswith(rerun), out + err  # what was committed is not embedded again
    assert_holds(store, seqs)


def _consolidated(store: Path) -> bool:
    return "consolidated_metadata" in json.loads((store / "zarr.json").read_text())


def test_failed_consolidation_is_written_by_the_same_command_again(tmp_path, models, capsys):
    """store.consolidate: a full disk (here: a file-size limit) while writing the consolidated metadata."""
    seqs = random_seqs(AA, [30, 40], seed=6)
    fasta = write_fasta(tmp_path / "a.fa", seqs)
    args = build_args(models, [fasta], tmp_path / "probe.zarr", "--no-tokens")
    assert cli(capsys, *args)[0] == 0
    probe = tmp_path / "probe.zarr"
    root = json.loads((probe / "zarr.json").read_text())
    consolidated = (probe / "zarr.json").stat().st_size
    before = len(json.dumps({k: v for k, v in root.items() if k != "consolidated_metadata"}, indent=2).encode())
    largest = max([before, *(p.stat().st_size for p in probe.rglob("*") if p.is_file() and p != probe / "zarr.json")])
    assert largest < consolidated // 2, "the consolidated metadata must be by far the largest file for this fault"
    store = tmp_path / "s.zarr"
    args[3] = str(store)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, ((largest + consolidated) // 2, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        code, out, err = cli(capsys, *args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    line = one_line(err)
    assert code == 2 and "File too large" in line and line.endswith(f"{AGAIN} to write it"), line
    assert open_store(store).complete and not _consolidated(store)
    code, out, err = cli(capsys, *args)
    assert code == 0 and "0 new, 2 already stored" in out, out + err
    assert _consolidated(store)
    assert_holds(store, seqs)


@pytest.mark.parametrize("damage", ["no-head", "no-log"])
def test_a_store_killed_while_created_is_created_by_the_build_again(tmp_path, models, capsys, damage):
    """commits.py: "was not completely created ...: run the build again"."""
    seqs = random_seqs(AA, [30, 40], seed=7)
    fasta = write_fasta(tmp_path / "a.fa", seqs)
    store = tmp_path / "s.zarr"
    args = build_args(models, [fasta], store)
    assert cli(capsys, *args)[0] == 0
    meta = store / "_commits" / "zarr.json"
    if damage == "no-head":  # as create_store leaves it before its last write
        doc = json.loads(meta.read_text())
        del doc["attributes"]["head"]
        meta.write_text(json.dumps(doc))
    else:
        shutil.rmtree(store / "_commits")
    code, out, err = cli(capsys, "verify", store)
    line = one_line(err)
    assert code == 2 and "was not completely created" in line and line.endswith("run the build again"), line
    code, out, err = cli(capsys, *args)
    assert code == 0 and "creating it again" in out and "2 new" in out, out + err
    assert_holds(store, seqs)


def _committed(store: Path) -> int:
    try:
        return json.loads((store / "_commits" / "zarr.json").read_text())["attributes"]["head"]["n"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_keeps_the_commits_and_the_same_command_finishes(tmp_path, models, capsys, sig):
    """The build's interrupted message (what it kept) and verify's "an interrupted build: run it again",
    with a real SIGINT, and with SIGTERM, which the CLI takes as Ctrl-C."""
    seqs = random_seqs(AA, [40 + (i * 37) % 120 for i in range(40)], seed=8)
    fasta = write_fasta(tmp_path / "a.fa", seqs)
    store = tmp_path / "s.zarr"
    args = build_args(models, [fasta], store, *small_units(0.01), "--max-tokens", "200")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "cli.embedcache_cli", *map(str, args)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _committed(store) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before it could be interrupted; make the input larger"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    said = re.fullmatch(rf"embedcache: interrupted; (\d+) of 40 new sequences were committed to {re.escape(str(store))} and are kept, "
                        rf"with everything it held before; the records are committed last: {AGAIN} to finish the build",
                        err.strip().splitlines()[-1])  # fmt: skip
    assert said, err
    interrupted = open_store(store)
    assert int(said[1]) == interrupted.committed.content
    assert not interrupted.complete and interrupted.committed.content > 0
    faults = interrupted.verify()
    assert faults == [f"{store}: status is 'incomplete', not 'complete' (an interrupted build: run it again)"], faults
    code, out, err = cli(capsys, *args)  # the same command again (in this process: it starts faster)
    assert code == 0 and out.startswith(f"{len(seqs) - interrupted.committed.content} new, "), out + err  # only what was not committed
    assert_holds(store, seqs)


def test_ctrl_c_inside_a_unit_commits_the_sequences_it_finished(tmp_path, models, monkeypatch):
    """One unit of 30 sequences in many batches, interrupted at its 5th batch: the sequences the host
    stage finished are committed (a smaller unit of their own), the build says how many, and the same
    command embeds only the rest, into the same store as an uninterrupted build."""
    from embedcache import partition
    from embedcache.errors import Interrupted

    seqs = random_seqs(AA, [30 + i for i in range(30)], seed=5)
    fasta = write_fasta(tmp_path / "a.fa", seqs)
    config = esm2_config(models, max_tokens=100)  # a few sequences per batch; one unit (the default --unit-mb)
    real_guard = partition.guard_for

    class InterruptedAtBatch5:
        """The real guard (and model), with Ctrl-C arriving as the 5th batch starts."""

        def __init__(self, guard):
            self.guard, self.calls = guard, 0
            self.max_tokens = guard.max_tokens

        def __call__(self, windows, records, to_host=True, packed=None):
            self.calls += 1
            if self.calls == 5:
                raise KeyboardInterrupt
            return self.guard(windows, records, to_host, packed)

    monkeypatch.setattr(partition, "guard_for", lambda *a: InterruptedAtBatch5(real_guard(*a)))
    store = tmp_path / "s.zarr"
    with pytest.raises(Interrupted, match=r"(\d+) of 30 new sequences were committed") as stopped:
        run_build(config, [fasta], store)
    kept = open_store(store)
    assert kept.committed.content > 0 and kept.n_commits == 1 and not kept.complete  # part of the one unit
    assert f"{kept.committed.content} of 30" in str(stopped.value)
    monkeypatch.setattr(partition, "guard_for", real_guard)
    report = run_build(config, [fasta], store)
    assert report.plan.n_new == 30 - kept.committed.content
    assert_holds(store, seqs)
    reference = tmp_path / "ref.zarr"
    run_build(config, [fasta], reference)
    a, b = open_store(store), open_store(reference)
    for rid in seqs:
        np.testing.assert_array_equal(a.tokens(rid), b.tokens(rid))


def test_a_build_with_nothing_new_loads_no_weights(tmp_path, models, monkeypatch):
    from embedcache import partition

    fasta = write_fasta(tmp_path / "a.fa", random_seqs(AA, [30, 40], seed=6))
    run_build(esm2_config(models), [fasta], tmp_path / "s.zarr")
    loads = []
    real = partition.load_encoder
    monkeypatch.setattr(partition, "_ENCODERS", {})  # as a new process: nothing loaded yet
    monkeypatch.setattr(partition, "load_encoder", lambda *a, **kw: loads.append(kw) or real(*a, **kw))
    assert run_build(esm2_config(models), [fasta], tmp_path / "s.zarr").plan.n_new == 0
    assert loads == []


def test_progress_moves_within_a_unit(tmp_path, models, monkeypatch):
    """A unit's forward tells each batch's finished sequences, so a progress bar moves before the unit ends."""
    import embedcache.executors as executors
    from embedcache import partition

    seqs = random_seqs(AA, [30 + i for i in range(20)], seed=7)
    config = esm2_config(models, max_tokens=100)
    store = tmp_path / "s.zarr"
    told = []
    real_forward_unit = partition.forward_unit

    def counting(prepared, encoder, log, on_sequences, *rest):
        return real_forward_unit(prepared, encoder, log, lambda n: (told.append(n), on_sequences and on_sequences(n)), *rest)

    monkeypatch.setattr(executors, "forward_unit", counting)
    run_build(config, [write_fasta(tmp_path / "a.fa", seqs)], store)
    assert len(told) > 3 and sum(told) == 20  # one unit, told batch by batch


# -- 3. a local store holds only regular files: verify and every reader refuse the rest, once ---------


def _many_commit_store(tmp_path, models, capsys) -> tuple[Path, dict[str, str]]:
    seqs = random_seqs(AA, [60, 55, 50, 45, 40, 35], seed=9)
    store = tmp_path / "s.zarr"
    code, out, err = cli(capsys, *build_args(models, [write_fasta(tmp_path / "a.fa", seqs)], store, *small_units()))
    assert code == 0, err
    assert open_store(store).n_commits > 5
    return store, seqs


def test_a_symlinked_shard_is_refused_once_by_verify_and_every_reader(tmp_path, models, capsys):
    store, seqs = _many_commit_store(tmp_path, models, capsys)
    (tmp_path / "link.zarr").symlink_to(store)  # the store's own path may be a symlink (a data disk mounted elsewhere)
    through_link = open_store(tmp_path / "link.zarr")
    assert through_link.verify() == [] and all(len(through_link.tokens(rid)) == len(seq) for rid, seq in seqs.items())
    opened = open_store(store)  # before the damage: its mapped reads must refuse it too
    shard = _shard_key(store, 0)
    outside = tmp_path / "outside-copy"
    shutil.copyfile(shard, outside)  # the same bytes: only the symlink is wrong
    shard.unlink()
    shard.symlink_to(outside)

    code, out, err = cli(capsys, "verify", store)
    line = one_line(err)
    assert code == 2 and f"1 symlink in the store: tokens/c/0/0/0 -> {outside}" in line, line
    assert line.count("tokens/c/0/0/0") == 1 and "a local store may hold only regular files" in line
    for args in (["info", store], build_args(models, [tmp_path / "a.fa"], store, *small_units())):
        code, out, err = cli(capsys, *args)
        assert code == 2 and "1 symlink in the store: tokens/c/0/0/0" in one_line(err), err
    with pytest.raises(StoreError, match="1 symlink in the store: tokens/c/0/0/0"):
        open_store(store)
    first = next(rid for rid in seqs if opened.token_span(rid)[0] == 0)
    with pytest.raises(StoreError, match=r"tokens/c/0/0/0 is a symlink \(-> .*outside-copy\)"):
        opened.tokens(first)
    assert opened.verify() == [f"{store}: 1 symlink in the store: tokens/c/0/0/0 -> {outside}"]


def test_symlinks_and_a_fifo_are_each_counted_in_one_line(tmp_path, models, capsys):
    store, _ = _many_commit_store(tmp_path, models, capsys)
    outside = tmp_path / "outside"
    outside.mkdir()
    for shard in (1, 2, 3):
        path = _shard_key(store, shard)
        shutil.copyfile(path, outside / f"shard{shard}")
        path.unlink()
        path.symlink_to(outside / f"shard{shard}")
    shutil.copytree(store / "content", outside / "content")
    shutil.rmtree(store / "content")
    (store / "content").symlink_to(outside / "content")  # a symlinked directory: named, not descended into
    os.mkfifo(store / "residues" / "c" / "1")
    code, out, err = cli(capsys, "verify", store)  # returns at once: the FIFO is never opened
    line = one_line(err)
    assert code == 2 and "4 symlinks in the store: content -> " in line and "tokens/c/3/0/0 -> " in line, line
    assert "1 file that is not a regular file in the store: residues/c/1 (a FIFO)" in line, line
    with pytest.raises(StoreError, match="4 symlinks in the store"):
        open_store(store)


def test_a_bad_chunk_shared_by_many_commits_is_named_once(tmp_path, models, capsys):
    store, _ = _many_commit_store(tmp_path, models, capsys)
    n_commits = open_store(store).n_commits
    chunk = store / "residues" / "c" / "0"  # 256 sequences per chunk: every unit commit has rows in it
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    faults = open_store(store).verify()
    bad = [f for f in faults if "'residues' chunk 0" in f]
    assert len(bad) == 1 and "cannot be read" in bad[0] and f"(rows of {n_commits - 1} commits: 0-{n_commits - 2})" in bad[0], faults


# -- the fusion CLIs' "run ... again" (cli/fusion_cli.py, cli/demo.py) -----------------------------------


def test_an_interrupted_fusion_run_is_trained_by_the_same_command_again(tmp_path, models, capsys, monkeypatch):
    """cli.fusion_cli.INTERRUPTED: "run the same command again to train from the start"."""
    import fusion.run as fusion_run
    from cli.fusion_cli import INTERRUPTED, main as fusion_main
    from fusion.prepare.isoformer import IsoformerPrepareConfig, prepare_isoformer
    from fusion.prepare.synthetic import SyntheticConfig, generate_synthetic

    info = generate_synthetic(tmp_path / "syn", SyntheticConfig(n_genes=24, seed=3))
    prepared = prepare_isoformer(info.csv_path, info.genome_path, tmp_path / "prep", IsoformerPrepareConfig(dna_window=info.dna_window))
    store = tmp_path / "protein.zarr"
    build(BuildConfig.create("esm2", str(models["esm2"])), [prepared.out_dir / "protein.fa"], store, progress=False, log=lambda s: None)
    run = tmp_path / "run"
    args = ["train", "--manifest", prepared.out_dir, "--store", f"protein={store}", "--features", "pooled", "--out", run,
            "--epochs", "1", "--d-model", "16", "--head-hidden", "16", "--no-progress"]  # fmt: skip

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fusion_run, "train", ctrl_c)  # Ctrl-C in the middle of training
    code = fusion_main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 130 and err.strip().splitlines()[-1] == f"fusion: interrupted; {INTERRUPTED}", err
    assert json.loads((run / "run.json").read_text())["status"] == "training"
    monkeypatch.undo()
    code = fusion_main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


@pytest.mark.slow  # the whole demo twice, about a minute on 2 cores
def test_an_interrupted_demo_runs_again_in_the_same_out(tmp_path):
    """cli.demo.INTERRUPTED: "run it again (it starts over in --out)", with a real SIGINT while it builds its stores."""
    from cli.demo import INTERRUPTED

    out = tmp_path / "demo"
    command = [sys.executable, "-m", "cli.demo", "--out", str(out), "--n-genes", "24", "--epochs", "1", "--seeds", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and not any(_committed(s) for s in (out / "stores").glob("*.zarr")) and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the demo finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and f"python -m cli.demo: interrupted; {INTERRUPTED}\n" in err, err[-2000:]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "run" / "run.json").read_text())["status"] == "complete"


def test_a_commit_that_fails_beside_the_next_units_forward_stops_the_build_cleanly(tmp_path, models, monkeypatch):
    """In this process a unit is committed on a thread of its own while the next unit's forward runs: its
    failure stops the build with the store's one-line error, no unit's threads are left running, the units
    committed before it are kept, and the same command finishes the store."""
    import threading

    from embedcache.store import StoreWriter

    seqs = random_seqs(AA, [60, 55, 50, 45, 40, 35], seed=12)
    fasta = write_fasta(tmp_path / "a.fa", seqs)
    config = esm2_config(models, shard_mb=0.005)  # one shard per unit: six units
    store = tmp_path / "s.zarr"
    real_commit = StoreWriter._commit_units
    calls = []

    def failing_third(self, results, records):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_commit(self, results, records)

    monkeypatch.setattr(StoreWriter, "_commit_units", failing_third)
    with pytest.raises(StoreError, match=f"writing to store .* failed: OSError: .*No space left on device.*{AGAIN} to resume"):
        run_build(config, [fasta], store)
    assert all(name.startswith("embedcache-commit") for name in calls)
    assert open_store(store).committed.content == 2
    leftover = [t.name for t in threading.enumerate() if t.name.startswith(("embedcache-host-stage", "embedcache-shard-write",
                                                                              "embedcache-prepare", "embedcache-commit"))]  # fmt: skip
    assert leftover == []
    monkeypatch.setattr(StoreWriter, "_commit_units", real_commit)
    assert run_build(config, [fasta], store).plan.n_new == 4
    assert_holds(store, seqs)


def _first_forward_beside_creation(monkeypatch, wait: float = 30) -> tuple[dict, "threading.Event"]:
    """Wraps the build's store creation and the executor's forward: `seen` tells whether the first forward
    started while the store was being created (creation waits up to `wait` s for it), and whether the store
    existed when it did."""
    import threading

    import embedcache.build as build_module
    import embedcache.executors as executors
    from embedcache.store import store_state

    forwarded, seen = threading.Event(), {}
    real_create, real_forward = build_module.create_store, executors.forward_unit

    def create_store(location, **kw):
        seen["beside"] = forwarded.wait(timeout=wait)
        return real_create(location, **kw)

    def forward_unit(prepared, *rest):
        if not forwarded.is_set():
            seen["existed"] = store_state(prepared.task.location) == "created"
            forwarded.set()
        return real_forward(prepared, *rest)

    monkeypatch.setattr(build_module, "create_store", create_store)
    monkeypatch.setattr(executors, "forward_unit", forward_unit)
    return seen, forwarded


@pytest.mark.parametrize("tokens", [False, True], ids=["pooled-only", "per-token"])
def test_a_new_pooled_only_store_is_created_beside_the_first_forward(tmp_path, models, monkeypatch, tokens):
    """The model does not wait for a new store's creation where units first need it at their commit
    (pooled only); units that write token shards find it created."""
    seqs = random_seqs(AA, [30 + i for i in range(12)], seed=21)
    seen, _ = _first_forward_beside_creation(monkeypatch, wait=30 if not tokens else 0.5)  # per-token: no forward to wait for
    store = tmp_path / "s.zarr"
    run_build(esm2_config(models, tokens=tokens), [write_fasta(tmp_path / "a.fa", seqs)], store)
    assert seen == ({"beside": True, "existed": False} if not tokens else {"beside": False, "existed": True})
    assert_holds(store, seqs)


def test_a_store_that_cannot_be_created_beside_the_first_forward_fails_the_build_with_its_error(tmp_path, models, monkeypatch):
    import threading

    import embedcache.build as build_module

    def create_store(location, **kw):
        raise StoreError(f"store {location.url!r}: permission denied")

    monkeypatch.setattr(build_module, "create_store", create_store)
    store = tmp_path / "s.zarr"
    with pytest.raises(StoreError, match="permission denied"):
        run_build(esm2_config(models, tokens=False), [write_fasta(tmp_path / "a.fa", random_seqs(AA, [30, 40], seed=22))], store)
    assert not any(t.name.startswith(("embedcache-create", "embedcache-prepare", "embedcache-commit")) for t in threading.enumerate())
    with pytest.raises(StoreError, match="no embedcache store"):
        open_store(store)


def test_ctrl_c_while_the_store_is_created_beside_the_first_forward_says_what_is_kept(tmp_path, models, monkeypatch):
    """Ctrl-C in the first unit's forward, its store still being created: the build waits for the creation,
    then says truly that nothing was committed, and the same command builds the store."""
    from embedcache import partition
    from embedcache.errors import Interrupted

    seqs = random_seqs(AA, [30 + i for i in range(12)], seed=23)
    fasta = write_fasta(tmp_path / "a.fa", seqs)
    seen, forwarded = _first_forward_beside_creation(monkeypatch)
    real_guard = partition.guard_for

    class Interrupting:
        max_tokens = 10**6

        def __call__(self, windows, records, to_host=True, packed=None):
            raise KeyboardInterrupt

    monkeypatch.setattr(partition, "guard_for", lambda *a: Interrupting())
    store = tmp_path / "s.zarr"
    with pytest.raises(Interrupted, match=f"0 of 12 new sequences were committed to {re.escape(str(store))} and are kept"):
        run_build(esm2_config(models, tokens=False), [fasta], store)
    assert seen["beside"] and not open_store(store).complete
    monkeypatch.setattr(partition, "guard_for", real_guard)
    assert run_build(esm2_config(models, tokens=False), [fasta], store).plan.n_new == 12
    assert_holds(store, seqs)


def test_a_unit_refuses_weights_other_than_those_the_build_planned_with(tmp_path, models, monkeypatch):
    """A model directory rewritten during a build (a trainer saving into it): a process that holds the planned
    weights keeps computing with them (what the store's fingerprint names); one that would load the new
    ones (a new Dask worker) fails instead, naming both."""
    from embedcache import partition
    from embedcache.partition import encoder_for
    from embedcache.tiny_models import make_tiny_esm2

    model = make_tiny_esm2(tmp_path / "m", seed=1)
    config = BuildConfig.create("esm2", str(model))
    planned = encoder_for(config).provenance()["weights"]
    assert encoder_for(config, planned).provenance()["weights"] == planned
    make_tiny_esm2(tmp_path / "m", seed=2)
    assert encoder_for(config, planned).provenance()["weights"] == planned
    monkeypatch.setattr(partition, "_ENCODERS", {})  # as a new process: nothing loaded yet
    with pytest.raises(EncoderError, match=r"are not those this build planned with .* the model changed during the build"):
        encoder_for(config, planned)


# -- 5. a pooled-only build in this process begins its first unit while it plans the rest ---------------


def _head_start_of(monkeypatch, sequences: int) -> dict:
    """Head starts of `sequences` sequences. `seen` gets the unit each one began with, whether its forward ran
    before the planning returned (the planner waits up to 30 s for it to start, after handing it over), and
    the units whose forward the executor ran itself."""
    import threading

    import embedcache.build as build_module
    import embedcache.executors as executors
    import embedcache.head_start as head_start
    from embedcache.plan import plan_build

    seen: dict = {"units": [], "forward_while_planning": [], "executor_forwards": []}
    forwarded, planned = threading.Event(), threading.Event()
    real_begin, real_forward, executor_forward = head_start.HeadStartRun.begin, head_start.forward_unit, executors.forward_unit

    def begin(self, unit):
        seen["units"].append(unit)
        real_begin(self, unit)
        forwarded.wait(timeout=30)

    def forward_unit(prepared, *rest):
        seen["forward_while_planning"].append(not planned.is_set())
        forwarded.set()
        return real_forward(prepared, *rest)

    def forward_in_executor(prepared, *rest):
        seen["executor_forwards"].append(prepared.task.unit.index)
        return executor_forward(prepared, *rest)

    def planning(*args, **kw):
        planned.clear()
        forwarded.clear()
        try:
            return plan_build(*args, **kw)
        finally:
            planned.set()

    monkeypatch.setattr(build_module, "HEAD_START_SEQUENCES", sequences)
    monkeypatch.setattr(head_start.HeadStartRun, "begin", begin)
    monkeypatch.setattr(head_start, "forward_unit", forward_unit)
    monkeypatch.setattr(executors, "forward_unit", forward_in_executor)
    monkeypatch.setattr(build_module, "plan_build", planning)
    return seen


def _no_build_threads() -> bool:
    import threading

    names = ("embedcache-head-start", "embedcache-host-stage", "embedcache-prepare", "embedcache-commit", "embedcache-create")
    return not any(t.name.startswith(names) for t in threading.enumerate())


def test_a_pooled_only_build_begins_its_first_unit_while_it_plans_and_stores_the_same(tmp_path, models, monkeypatch):
    """Unit 0 is the first new sequences read (a repeat and a stored sequence skipped), longest first; its
    forward runs before the plan is complete, and the executor takes it over (it runs the other units'
    forwards only); the store equals one built without a head start."""
    stored = random_seqs(AA, [33], seed=30)
    seqs = {**random_seqs(AA, [30 + (7 * i) % 23 for i in range(14)], seed=31), **stored}
    order = list(seqs.items())
    inputs = dict(order[:2] + [("stored-again", stored[next(iter(stored))]), ("repeat", order[0][1])] + order[2:])
    fasta = write_fasta(tmp_path / "a.fa", inputs)
    config = esm2_config(models, tokens=False, max_tokens=120)
    reference = tmp_path / "ref.zarr"
    run_build(config, [fasta], reference)  # no head start: fewer new sequences than it needs

    store = tmp_path / "s.zarr"
    run_build(config, [write_fasta(tmp_path / "stored.fa", stored)], store)
    seen = _head_start_of(monkeypatch, sequences=4)
    report = run_build(config, [fasta], store)
    (unit,) = seen["units"]
    assert seen["forward_while_planning"] == [True]
    assert report.plan.units[0] is unit and [u.index for u in report.plan.units] == list(range(len(report.plan.units)))
    assert seen["executor_forwards"] == [u.index for u in report.plan.units[1:]]
    first_four = [s for rid, s in order[:4]]  # the stored sequence comes last, the repeat is order[0]'s
    assert unit.n_rows.tolist() == sorted((len(s) for s in first_four), reverse=True)  # one row per residue here
    assert unit.n_tokens == sum(len(s) for s in first_four)
    assert report.plan.n_new == len(seqs) - 1 and sum(u.n_sequences for u in report.plan.units) == report.plan.n_new
    assert _no_build_threads()
    assert_holds(store, inputs)
    a, b = open_store(store), open_store(reference)
    for rid in inputs:
        np.testing.assert_allclose(a.pooled([rid])[0], b.pooled([rid])[0], rtol=1e-5, atol=1e-6)


def test_bad_input_after_the_head_start_stops_the_build_with_nothing_written(tmp_path, models, monkeypatch):
    """A bad record read after unit 0 began: the build fails naming it, its forward is dropped, no store is
    left (it did not exist), and nothing keeps running."""
    from embedcache.errors import InputError

    seqs = random_seqs(AA, [30 + i for i in range(8)], seed=32)
    fasta = write_fasta(tmp_path / "a.fa", {**seqs, "bad": "MKTZ1QL"})
    seen = _head_start_of(monkeypatch, sequences=4)
    store = tmp_path / "s.zarr"
    with pytest.raises(InputError, match=r"record 'bad'"):
        run_build(esm2_config(models, tokens=False), [fasta], store)
    assert len(seen["units"]) == 1 and seen["forward_while_planning"] == [True] and seen["executor_forwards"] == []
    assert not store.exists() and _no_build_threads()


@pytest.mark.parametrize("where", ["planning", "reading unit 0"])
def test_ctrl_c_while_planning_with_a_head_start_writes_nothing(tmp_path, models, monkeypatch, where):
    """Ctrl-C while the rest of the input is planned (unit 0's forward under way), or while unit 0 is read on the
    planning thread: the build says nothing was written, drops the forward, leaves no store and no thread;
    the same command builds it."""
    import embedcache.head_start as head_start
    import embedcache.plan as plan_module
    from embedcache.errors import Interrupted

    seqs = random_seqs(AA, [30 + i for i in range(8)], seed=33)
    fasta = write_fasta(tmp_path / "a.fa", seqs)
    seen = _head_start_of(monkeypatch, sequences=4)
    real_check, checked = plan_module.check_sequence, []

    def interrupted_at_record_7(seq, *a, **kw):
        checked.append(seq)
        if len(checked) == 7:
            raise KeyboardInterrupt
        return real_check(seq, *a, **kw)

    def interrupted(*a):
        raise KeyboardInterrupt

    if where == "planning":
        monkeypatch.setattr(plan_module, "check_sequence", interrupted_at_record_7)
    else:
        monkeypatch.setattr(head_start, "prepare_unit", interrupted)
    store = tmp_path / "s.zarr"
    with pytest.raises(Interrupted, match="while planning, before anything was written: no store was created"):
        run_build(esm2_config(models, tokens=False), [fasta], store)
    assert len(seen["units"]) == 1 and not store.exists() and _no_build_threads()
    monkeypatch.undo()
    run_build(esm2_config(models, tokens=False), [fasta], store)
    assert_holds(store, seqs)


def test_ctrl_c_while_the_build_waits_for_the_head_start_says_what_is_kept(tmp_path, models, monkeypatch, request):
    """A real SIGINT while the build, its plan done, waits for unit 0's forward: the forward stops, its work is
    dropped (at most one head start is computed again), the message says truly that nothing was committed,
    no thread is left, and the same command finishes the store."""
    import threading

    import embedcache.build as build_module
    import embedcache.head_start as head_start
    from embedcache.errors import Interrupted

    seqs = random_seqs(AA, [30 + i for i in range(8)], seed=34)
    fasta = write_fasta(tmp_path / "a.fa", seqs)
    monkeypatch.setattr(build_module, "HEAD_START_SEQUENCES", 4)
    waiting = threading.Event()
    real_running, real_forward = head_start.HeadStartRun.running, head_start.forward_unit

    def running(self):
        waiting.set()
        return real_running(self)

    def forward_unit(*args):
        if waiting.wait(timeout=30):  # the build waits for this forward: Ctrl-C now
            os.kill(os.getpid(), signal.SIGINT)
        return real_forward(*args)

    monkeypatch.setattr(head_start.HeadStartRun, "running", running)
    monkeypatch.setattr(head_start, "forward_unit", forward_unit)
    # Ctrl-C as in a terminal: a suite started as a shell's background job begins with SIGINT ignored
    request.addfinalizer(lambda previous=signal.signal(signal.SIGINT, signal.default_int_handler): signal.signal(signal.SIGINT, previous))
    store = tmp_path / "s.zarr"
    with pytest.raises(Interrupted, match=f"0 of 8 new sequences were committed to {re.escape(str(store))} and are kept"):
        run_build(esm2_config(models, tokens=False), [fasta], store)
    assert waiting.is_set() and not open_store(store).complete and _no_build_threads()
    monkeypatch.undo()
    assert run_build(esm2_config(models, tokens=False), [fasta], store).plan.n_new == 8
    assert_holds(store, seqs)
