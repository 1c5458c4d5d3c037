"""Logs: journald's format only on journald's own stream, zoned timestamps elsewhere, and what
the rolling analysis logs as findings come, change and go."""

from __future__ import annotations

import datetime
import logging
import os
import re

import pytest

from agentd import logs
from agentd.analysis.findings import Finding


@pytest.fixture(autouse=True)
def keep_logging():
    """logs.setup() replaces the agentd logger's handlers: put them back afterwards."""
    root = logging.getLogger("agentd")
    saved = root.handlers[:], root.level, root.propagate
    yield
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def _emit(stream, env_value: str | None, monkeypatch) -> str:
    if env_value is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", env_value)
    logs.setup("info", stream)
    logging.getLogger("agentd").warning("disk on fire")
    stream.flush()
    stream.seek(0)
    return stream.read()


def test_journal_format_only_on_the_journal_stream(tmp_path, monkeypatch):
    with open(tmp_path / "a.log", "w+") as a, open(tmp_path / "b.log", "w+") as b:
        st = os.fstat(a.fileno())
        ours = f"{st.st_dev}:{st.st_ino}"
        assert logs.is_journal_stream(a, {"JOURNAL_STREAM": ours})
        assert not logs.is_journal_stream(b, {"JOURNAL_STREAM": ours})
        assert not logs.is_journal_stream(a, {"JOURNAL_STREAM": "8:1"})
        assert not logs.is_journal_stream(a, {"JOURNAL_STREAM": "garbage"})
        assert not logs.is_journal_stream(a, {})
        assert _emit(a, ours, monkeypatch) == "<4>agentd: disk on fire\n"
        # JOURNAL_STREAM inherited, but stderr redirected elsewhere: a plain log line.
        assert not _emit(b, ours, monkeypatch).startswith("<")


def test_journal_stream_on_a_stream_without_a_file(monkeypatch):
    import io

    assert not logs.is_journal_stream(io.StringIO(), {"JOURNAL_STREAM": "8:1"})


def test_timestamps_carry_their_zone(tmp_path, monkeypatch):
    with open(tmp_path / "a.log", "w+") as a:
        line = _emit(a, None, monkeypatch)
    stamp, level, rest = line.split(" ", 2)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", stamp), stamp
    t = datetime.datetime.fromisoformat(stamp)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - t).total_seconds()) < 60
    assert level == "WARNING" and rest == "agentd: disk on fire\n"


def _finding(kind: str, severity: str, gpus=(0, 1)) -> Finding:
    return Finding(kind=kind, subject={"node": "n1", "gpus": list(gpus)}, t0=0.0, t1=60.0,
                   confidence=0.9, severity=severity, summary="the data loader is slow",
                   gain={"busy_now": 0.5, "busy_after": 0.9, "speedup": 1.8})


def finding_log(state, findings):
    """The daemon's finding_log, fed as the analysis process feeds it: the findings as
    Report.to_json() has them, with their headlines."""
    from agentd.daemon.rolling import finding_log as log_of

    return log_of(state, [f.to_json() for f in findings], [f.headline() for f in findings])


def test_finding_log_appear_change_clear():
    W, I = logging.WARNING, logging.INFO
    state, lines = finding_log({}, [_finding("input_cpu", "warning")])
    assert state == {("input_cpu", (0, 1)): "warning"}
    assert [lvl for lvl, _ in lines] == [W] and "[warning] input_cpu on n1 GPU 0,1" in lines[0][1]
    # The same finding again: nothing to say.
    assert finding_log(state, [_finding("input_cpu", "warning")]) == (state, [])
    # Its severity changes: said at info, with the headline.
    state, lines = finding_log(state, [_finding("input_cpu", "critical")])
    assert lines == [(I, lines[0][1])] and "severity warning -> critical" in lines[0][1]
    assert "[critical] input_cpu" in lines[0][1]
    # Another finding appears on other GPUs while the first clears.
    state, lines = finding_log(state, [_finding("input_cpu", "critical", (2,)),
                                       _finding("throttled", "info", ())])
    assert state == {("input_cpu", (2,)): "critical", ("throttled", ()): "info"}
    assert [lvl for lvl, _ in lines] == [W, W, I]
    assert lines[2][1] == "cleared: input_cpu on GPU 0,1 (was critical)"
    state, lines = finding_log(state, [])
    assert state == {} and sorted(t for _, t in lines) == [
        "cleared: input_cpu on GPU 2 (was critical)", "cleared: throttled on node (was info)"]


def test_finding_log_same_finding_with_its_gpus_in_another_order():
    """The analysis may list a finding's GPUs in another order each run (and report one kind
    twice: over the whole window and as a recent onset): still one finding, logged once."""
    state, lines = finding_log({}, [_finding("comm_wait", "critical", (0, 1, 2, 10)),
                                    _finding("comm_wait", "critical", (2, 0, 10, 1))])
    assert len(lines) == 1 and state == {("comm_wait", (0, 1, 2, 10)): "critical"}
    assert finding_log(state, [_finding("comm_wait", "critical", (10, 2, 1, 0))]) == (state, [])
