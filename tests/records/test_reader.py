"""The record reader: fast path equals the line-by-line reference; damage is tolerated and counted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "report"))
import records_factory as rf  # noqa: E402

from cellavie_hpc.errors import DataError  # noqa: E402
from cellavie_hpc.records import reader  # noqa: E402
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


def _step_line(step_no, **over):
    fields = {"kind": "step", "step": step_no, "epoch": 0, "t_unix": 1.7e9 + step_no, "wall_s": 0.125,
              "input_wait_s": 0.01, "compute_s": 0.1, "exchange_s": None, "samples": 8, "loss": 0.5,
              "mem_peak_bytes": 3 << 30, "mem_source": "device"} | over
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False) + "\n"


def _lines(*records):
    return "".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in records)


_HEAD = _lines(rf.header("r", 0, 1))
_STEPS = "".join(_step_line(s) for s in range(4))
_END = _lines(rf.final(4, 32, 0.5))
#: name -> (file text, whether the fast path must keep it: False where only the reference can decide).
TRICKY = {
    "canonical": (_HEAD + _STEPS + _END, True),
    "partial last line": (_HEAD + _STEPS + '{"kind":"step","step":4,"ep', True),
    "complete last line without newline": (_HEAD + _STEPS + _END.rstrip("\n"), False),
    "requeue: partial line before header, duplicates": (
        _HEAD + _STEPS + '{"kind":"step","st\n' + _lines(rf.header("r", 0, 1, attempt=1))
        + "".join(_step_line(s, wall_s=0.25) for s in range(2, 6)) + _END, True),
    "requeue: blank line before header": (_HEAD + _STEPS + "\n" + _lines(rf.header("r", 0, 1, attempt=1))
                                          + _step_line(3, wall_s=9.0), True),
    "NaN literal": (_HEAD + _step_line(0).replace('"loss":0.5', '"loss":NaN') + _END, True),
    "Infinity and -Infinity": (_HEAD + _step_line(0).replace('"loss":0.5', '"loss":-Infinity')
                               + _step_line(1).replace('"wall_s":0.125', '"wall_s":Infinity'), False),
    "Inf and -NaN (Arrow takes them, json.loads does not)": (
        _HEAD + _step_line(0).replace('"loss":0.5', '"loss":Inf') + _step_line(1).replace('"loss":0.5', '"loss":-NaN')
        + _step_line(2), False),
    "nulls everywhere": (_HEAD + _step_line(0, loss=None, mem_peak_bytes=None, epoch=None, t_unix=None), True),
    "unicode": (_lines(rf.header("r-é", 0, 1, node="nœud-雪")) + _step_line(0, mem_source="périphérique", note="ü")
                + _step_line(1, note="\u2603\\u00e9") + _END, True),
    "escaped unicode key": (_HEAD + _step_line(0).replace('"samples"', '"\\u0073amples"'), True),
    "huge step numbers": (_HEAD + _step_line(10**15) + _step_line(2**62) + _step_line(-3) + _END, True),
    "step number beyond int64": (_HEAD + _step_line(0) + _step_line(2**63) + _step_line(1), False),
    "float beyond double": (_HEAD + _step_line(0).replace('"wall_s":0.125', '"wall_s":1e400'), False),
    "big integer in a float field": (_HEAD + _step_line(0, t_unix=2**64 + 1), True),
    "integer field written as float": (_HEAD + _step_line(0, samples=8.0), False),
    "number as string": (_HEAD + _step_line(0, wall_s="0.5"), False),
    "extra unknown fields": (_HEAD + _step_line(0, extra={"a": [1, {"b": None}], "kind2": "x"}, z=1.5e300), True),
    "tag inside a step's nested object": (_HEAD + _step_line(0, meta={"kind": "epoch"}) + _step_line(1), False),
    "duplicate key": (_HEAD + _step_line(0).replace('"samples":8', '"samples":8,"samples":9'), False),
    "step without kind": (_HEAD + _step_line(0) + _step_line(1).replace('"kind":"step",', ''), False),
    "unknown kind": (_HEAD + _step_line(0) + '{"kind":"metrics","x":1}\n' + _step_line(1), False),
    "blank line in the middle": (_HEAD + _step_line(0) + "\n  \n" + _step_line(1), False),
    "not an object": (_HEAD + _step_line(0) + "[1, 2]\n" + _step_line(1), False),
    "leading zero (invalid JSON)": (_HEAD + _step_line(0) + _step_line(1).replace('"samples":8', '"samples":08'), False),
    "first step without mem_source": (_HEAD + _step_line(0, mem_source=None) + _step_line(1, mem_source="rss"), False),
    "CRLF line ends": (_HEAD.replace("\n", "\r\n") + _STEPS.replace("\n", "\r\n") + _END, True),
    "pretty spacing": (_HEAD + _STEPS.replace('":', '": ').replace(',"', ', "') + _END, True),
    "epoch and final records only": (_HEAD + _lines({"kind": "epoch", "epoch": 0, "steps": 0, "samples": 0,
                                                     "wall_s": 0.0, "metrics": {}}) + _END, True),
    "empty file": ("", True),
}


def _identical(fast, slow):
    """Everything the reader returns, bit for bit (NaN positions included)."""
    assert (fast.rank, fast.partial_lines, fast.duplicate_steps, fast.mem_source) == \
        (slow.rank, slow.partial_lines, slow.duplicate_steps, slow.mem_source)
    assert (fast.headers, fast.epochs, fast.final, fast.problems) == (slow.headers, slow.epochs, slow.final, slow.problems)
    np.testing.assert_array_equal(fast.attempt, slow.attempt)
    assert fast.steps.keys() == slow.steps.keys()
    for key in slow.steps:
        assert fast.steps[key].dtype == slow.steps[key].dtype, key
        np.testing.assert_array_equal(fast.steps[key], slow.steps[key], err_msg=key)


@pytest.mark.parametrize("name", list(TRICKY))
def test_fast_path_equals_reference_on_tricky_input(tmp_path, monkeypatch, name):
    text, fast_keeps_it = TRICKY[name]
    path = rf.append_raw(tmp_path, 0, text)
    reference = read_rank_file_slow(path)
    fallbacks = []
    monkeypatch.setattr(reader, "read_rank_file_slow", lambda p: fallbacks.append(p) or read_rank_file_slow(p))
    _identical(read_rank_file(path), reference)
    assert fallbacks == ([] if fast_keeps_it else [path])


def test_tricky_files_in_one_batch_do_not_disturb_each_other(tmp_path):
    """A file that fails the Arrow parse is re-read alone; its batch neighbours keep their own rows."""
    paths = [rf.append_raw(tmp_path, i, text) for i, (text, _) in enumerate(TRICKY.values())]
    for batch_bytes in (1, 1 << 20):
        for fast, path in zip(read_rank_files(paths, batch_bytes=batch_bytes), paths, strict=True):
            _identical(fast, read_rank_file_slow(path))


def test_tricky_values_read_as_the_reference_reads_them(tmp_path):
    """Spot checks of the reference itself: requeue keeps attempt 1; a step beyond int64 is named and skipped."""
    path = rf.append_raw(tmp_path, 0, TRICKY["requeue: partial line before header, duplicates"][0])
    rec = read_rank_file(path)
    assert rec.partial_lines == 1 and rec.duplicate_steps == 2 and rec.steps["step"].tolist() == [0, 1, 2, 3, 4, 5]
    assert rec.steps["wall_s"].tolist() == [0.125, 0.125, 0.25, 0.25, 0.25, 0.25]
    path = rf.append_raw(tmp_path, 1, TRICKY["step number beyond int64"][0])
    rec = read_rank_file(path)
    assert rec.steps["step"].tolist() == [0, 1]
    assert any(p.startswith(f"{path}:3: step record field 'step'") for p in rec.problems)
    path = rf.append_raw(tmp_path, 2, TRICKY["huge step numbers"][0])
    assert read_rank_file(path).steps["step"].tolist() == [-3, 10**15, 2**62]
