"""The record reader: fast path equals the line-by-line reference; damage is tolerated and counted."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "report"))
import records_factory as rf  # noqa: E402

from cellavie_hpc.errors import DataError  # noqa: E402
from cellavie_hpc.records.reader import (  # noqa: E402
    SchemaVersionError, find_run_dirs, rank_files, read_rank_file, read_rank_file_slow, read_rank_files,
)
from cellavie_hpc.records.schema import rank_file_name  # noqa: E402


def _same(a, b):
    assert a.rank == b.rank and a.partial_lines == b.partial_lines and a.duplicate_steps == b.duplicate_steps
    assert len(a.headers) == len(b.headers) and len(a.epochs) == len(b.epochs) and a.final == b.final
    assert a.mem_source == b.mem_source
    np.testing.assert_array_equal(a.attempt, b.attempt)
    for key in b.steps:
        np.testing.assert_array_equal(a.steps[key], b.steps[key], err_msg=key)


def test_fast_path_equals_json_loads_reference(tmp_path):
    run = rf.write_run(tmp_path / "run", world_size=3, steps=12, epoch_every=4, step_time_s=lambda r, s: 0.1 + 0.01 * r)
    files = rank_files(run)
    fast = list(read_rank_files(files, batch_bytes=1500))  # several Arrow batches
    assert [r.rank for r in fast] == [0, 1, 2]
    for rec, path in zip(fast, files):
        _same(rec, read_rank_file_slow(path))
        assert rec.n_steps == 12 and len(rec.epochs) == 3 and rec.final["status"] == "completed"
        np.testing.assert_allclose(rec.steps["wall_s"][2:], 0.1 + 0.01 * rec.rank)
        assert rec.steps["samples"].tolist() == [8] * 12


def test_partial_last_line_is_counted_not_fatal(tmp_path):
    run = rf.write_run(tmp_path / "run", world_size=1, steps=5, stop_at={0: 5})
    path = rf.append_raw(run, 0, '{"kind":"step","step":5,"epoch":0,"t_unix":17')
    rec = read_rank_file(path)
    assert rec.partial_lines == 1 and rec.n_steps == 5 and rec.final is None
    assert any("1 partial line" in p and str(path) in p for p in rec.problems)
    _same(rec, read_rank_file_slow(path))


def test_requeue_duplicates_keep_latest_attempt(tmp_path):
    """Attempt 0 writes steps 0-5 then dies mid-line; attempt 1 restarts from step 4 with other timings."""
    def steps(lo, hi, wall):
        return [rf.step(s, wall_s=wall, input_wait_s=0.0, compute_s=wall, exchange_s=None, samples=4,
                        t_unix=rf.T0_UNIX + s) for s in range(lo, hi)]
    path = rf.append_records(tmp_path, 0, [rf.header("r", 0, 1, attempt=0)] + steps(0, 6, 0.5))
    rf.append_raw(tmp_path, 0, '{"kind":"step","st\n')  # the writer terminates a partial line on resume
    rf.append_records(tmp_path, 0, [rf.header("r", 0, 1, attempt=1)] + steps(4, 10, 0.25) + [rf.final(10, 40, 2.0)])
    rec = read_rank_file(path)
    assert rec.partial_lines == 1 and rec.duplicate_steps == 2 and len(rec.headers) == 2
    assert rec.steps["step"].tolist() == list(range(10))
    assert rec.attempt.tolist() == [0] * 4 + [1] * 6
    np.testing.assert_allclose(rec.steps["wall_s"], [0.5] * 4 + [0.25] * 6)
    assert np.isnan(rec.steps["exchange_s"]).all()
    _same(rec, read_rank_file_slow(path))


def test_nan_literals_fall_back_to_reference_reader(tmp_path):
    line = ('{"kind":"step","step":0,"epoch":0,"t_unix":1.0,"wall_s":0.1,"input_wait_s":0.0,"compute_s":0.1,'
            '"exchange_s":0.0,"samples":2,"loss":NaN,"mem_peak_bytes":5,"mem_source":"rss"}\n')
    path = rf.append_records(tmp_path, 0, [rf.header("r", 0, 1)])
    rf.append_raw(tmp_path, 0, line)
    rec = read_rank_file(path)
    assert rec.n_steps == 1 and np.isnan(rec.steps["loss"][0]) and rec.mem_source == "rss"


def test_wrong_schema_version_is_refused_naming_the_file(tmp_path):
    path = rf.append_records(tmp_path, 3, [rf.header("r", 3, 4) | {"schema_version": 2}])
    for reader in (read_rank_file, read_rank_file_slow):
        with pytest.raises(SchemaVersionError, match=rf"rank-00003\.jsonl:1: schema_version 2.*version 1"):
            reader(path)


def test_find_run_dirs_at_any_depth_and_bad_names(tmp_path):
    rf.write_run(tmp_path / "a" / "deep" / "run1", world_size=1, steps=1)
    rf.write_run(tmp_path / "run0", world_size=1, steps=1)
    (tmp_path / "empty" / "records").mkdir(parents=True)
    assert find_run_dirs(tmp_path) == [tmp_path / "a" / "deep" / "run1", tmp_path / "run0"]
    assert rank_file_name(12) == "rank-00012.jsonl"
    with pytest.raises(DataError, match="no such sweep directory"):
        find_run_dirs(tmp_path / "nope")
    with pytest.raises(DataError, match="not a rank record file"):
        read_rank_file(tmp_path / "rank-x.jsonl")


def test_pretty_printed_records_take_the_reference_path(tmp_path):
    """`"kind": "header"` with a space is not found by the byte search; the Arrow check sends the file back."""
    import json
    records = [rf.header("r", 0, 1)] + [rf.step(s, wall_s=0.1, input_wait_s=0.0, compute_s=0.1, exchange_s=0.0,
                                                 samples=2, t_unix=1.0 + s) for s in range(3)] + [rf.final(3, 6, 0.3)]
    path = rf.append_raw(tmp_path, 0, "".join(json.dumps(r) + "\n" for r in records))
    rec = read_rank_file(path)
    assert len(rec.headers) == 1 and rec.final["steps"] == 3 and rec.steps["step"].tolist() == [0, 1, 2]
