"""The tests' shared JSONL reader (tests/records.py) is strict where the project's reader is lenient."""

import json

import pytest

from tests.records import evals, metrics_path, records

RECS = [{"kind": "train", "step": 2, "loss": 3.0, "tokens_per_s": 10.0},
        {"kind": "eval", "step": 2, "val_loss": float("nan")},
        {"kind": "diverged", "step": 2, "reason": "nan"}]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def lines(recs):
    return "".join(json.dumps(r) + "\n" for r in recs)


def test_reads_a_run_directory_or_a_jsonl_file(tmp_path):
    f = write(tmp_path / "run" / "metrics.jsonl", lines(RECS))
    other = write(tmp_path / "seed.jsonl", lines(RECS[:1]))
    assert metrics_path(tmp_path / "run") == f and metrics_path(str(other)) == other
    got = records(tmp_path / "run")
    assert [r["kind"] for r in got] == ["train", "eval", "diverged"] and got[1]["val_loss"] != got[1]["val_loss"]
    assert records(other) == RECS[:1] and records(str(tmp_path / "run"), "diverged") == RECS[2:]
    assert [r["step"] for r in evals(f)] == [2] and records(f, "train", drop=("tokens_per_s",)) == [
        {"kind": "train", "step": 2, "loss": 3.0}]


@pytest.mark.parametrize("text", [
    lines(RECS) + "{not json\n",  # a line that does not parse
    lines(RECS[:1]) + '{"kind": "eval", "step": 4, "val_lo',  # cut at the end
    lines(RECS[:1]) + "[1, 2]\n" + lines(RECS[1:]),  # not an object
    lines(RECS[:1]) + '{"kind": "eval"}\n',  # no step
    lines(RECS[:1]) + "\n" + lines(RECS[1:]),  # a blank line
])
def test_a_line_that_is_not_a_record_fails(tmp_path, text):
    write(tmp_path / "metrics.jsonl", text)
    with pytest.raises(AssertionError, match="metrics.jsonl"):
        records(tmp_path)


def test_missing_file_bad_bytes_and_missing_kind_fail(tmp_path):
    with pytest.raises(AssertionError, match="no such file"):
        records(tmp_path / "nothing")
    (tmp_path / "metrics.jsonl").write_bytes(b'{"kind": "eval", "step": 0, "note": "\xff"}\n')
    with pytest.raises(UnicodeDecodeError):
        records(tmp_path)
    write(tmp_path / "metrics.jsonl", '{"step": 0}\n')
    assert records(tmp_path) == [{"step": 0}]  # read whole, it is a record
    with pytest.raises(KeyError):
        records(tmp_path, "eval")  # filtered by kind, a record without one is an error


def test_a_cut_last_line_is_left_out_only_when_asked(tmp_path):
    """A test that polls a running run may see the writer's last line half written; nothing else."""
    write(tmp_path / "metrics.jsonl", lines(RECS[:2]) + '{"kind": "eval", "step": 4, "val_lo')
    assert [(r["kind"], r["step"]) for r in evals(tmp_path, cut_end_ok=True)] == [("eval", 2)]
    with pytest.raises(AssertionError, match=r"lines \[3\]"):
        evals(tmp_path)
    write(tmp_path / "metrics.jsonl", "{oops\n" + lines(RECS[:2]) + '{"kind": "eval", "step": 4, "val_lo')
    with pytest.raises(AssertionError, match=r"lines \[1, 4\]"):
        evals(tmp_path, cut_end_ok=True)
