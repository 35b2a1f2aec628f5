"""The record writer: valid lines only, one line per record, crash-safe appends."""
import json

import pytest

from cellavie_hpc.records.schema import SCHEMA_VERSION, rank_file_name, validate
from cellavie_hpc.records.writer import RecordWriter

STEP = {
    "kind": "step", "step": 0, "epoch": 0, "t_unix": 1.0, "wall_s": 0.5, "input_wait_s": 0.01, "compute_s": 0.4,
    "exchange_s": None, "samples": 8, "loss": float("nan"), "mem_peak_bytes": 1024, "mem_source": "rss",
}


def test_rank_file_names_sort_by_rank():
    names = [rank_file_name(r) for r in (10, 2, 0)]
    assert names == ["rank-00010.jsonl", "rank-00002.jsonl", "rank-00000.jsonl"]
    assert sorted(names) == ["rank-00000.jsonl", "rank-00002.jsonl", "rank-00010.jsonl"]


def test_writes_one_standard_json_line_per_record(tmp_path):
    with RecordWriter(tmp_path, 3) as writer:
        writer.write(STEP)
        writer.write({**STEP, "step": 1, "loss": 0.25})
    lines = (tmp_path / "records" / "rank-00003.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]
    assert json.loads(lines[0])["loss"] is None  # NaN written as null, the line stays standard JSON


def test_invalid_records_are_refused(tmp_path):
    writer = RecordWriter(tmp_path, 0)
    with pytest.raises(ValueError, match="lacks 'samples'"):
        writer.write({k: v for k, v in STEP.items() if k != "samples"})
    assert validate({"kind": "header", "schema_version": SCHEMA_VERSION + 1})[-1].startswith("schema_version")
    assert validate({"kind": "final", "status": "done"})[-1].startswith("final status 'done'")


def test_partial_line_from_a_crash_is_closed_before_appending(tmp_path):
    path = tmp_path / "records" / "rank-00000.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(STEP) + "\n" + '{"kind": "st')
    with RecordWriter(tmp_path, 0) as writer:
        writer.write({**STEP, "step": 1})
    lines = path.read_text().splitlines()
    assert lines[1] == '{"kind": "st'
    assert json.loads(lines[2])["step"] == 1
