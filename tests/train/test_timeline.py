"""The Horovod timeline parser: exact figures on a hand-made trace, sane ones on a captured 2-rank trace."""
import json
from pathlib import Path

import pytest

from cellavie_hpc.errors import DataError
from cellavie_hpc.report import timeline as tl

#: Captured from `horovodrun -np 2 --gloo cellavie train` (U-Net tiny, patch 32, 4 steps, per-tensor
#: allreduce), with the set-up broadcasts removed to keep the file small.
CAPTURED = Path(__file__).parent / "data" / "horovod_timeline_2ranks.json"


def _tensor(pid, name, steps):
    """Events of one tensor: per step (submit_us, start_us, end_us) -> a negotiation and an allreduce phase."""
    events = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}]
    for submit, start, end in steps:
        events += [{"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": submit, "pid": pid},
                   {"ph": "X", "name": "0", "ts": submit, "pid": pid, "dur": 0},
                   {"ph": "E", "ts": start, "pid": pid},
                   {"ph": "B", "name": "ALLREDUCE", "ts": start, "pid": pid},
                   {"ph": "E", "ts": end, "pid": pid, "args": {"shape": "[8]"}}]
    return events


def hand_made():
    # Step 0 (skipped) and step 1. In step 1 tensor a is submitted at 1000 and reduced 1100-1300 while
    # the backward pass goes on until b's submission at 1500; b and c are fused (1600-2000, 1601-2001).
    return (_tensor(1, "a", [(0, 10, 20), (1000, 1100, 1300)])
            + _tensor(2, "b", [(5, 30, 40), (1500, 1600, 2000)])
            + _tensor(3, "c", [(6, 31, 41), (1400, 1601, 2001)])
            + _tensor(4, "barrier", [(3000, 3000, 3100)]))


def test_overlap_fusion_and_allreduce_time_of_a_hand_made_trace():
    summary = tl.summarize(tl.exchanges(hand_made()), skip_steps=1)
    assert summary.steps == 1 and summary.tensors_per_step == 3 and summary.messages_per_step == 2
    assert summary.allreduce_s_per_step == pytest.approx((200 + 401) * 1e-6)
    assert summary.compute_window_s_per_step == pytest.approx(500e-6)
    assert summary.overlap_share == pytest.approx(200 / 601)


def test_a_trace_cut_short_is_read_up_to_its_last_complete_event(tmp_path):
    text = json.dumps(hand_made())
    path = tmp_path / "t.json"
    path.write_text(text[:-1] + ',\n{"ph": "B", "na')  # no closing bracket, half an event
    assert len(tl.read_events(path)) == len(hand_made())
    path.write_text("not a trace")
    with pytest.raises(DataError, match="not a Chrome trace"):
        tl.read_events(path)


def test_too_few_steps_say_so():
    with pytest.raises(DataError, match="train longer"):
        tl.summarize(tl.exchanges(hand_made()), skip_steps=2)


def test_captured_two_rank_trace():
    summary = tl.summarize(tl.exchanges(tl.read_events(CAPTURED)), skip_steps=1)
    assert summary.steps == 3  # 4 steps, the first skipped
    assert summary.tensors_per_step == 38  # 37 gradients and the loss
    assert 1 <= summary.messages_per_step < summary.tensors_per_step  # Horovod fused tensors
    assert 0 < summary.allreduce_s_per_step < 1 and 0 <= summary.overlap_share <= 1
