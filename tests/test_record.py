"""`agentd record` keeps what it recorded: the output path is checked before sampling, rows
are appended as they are gathered, and a full disk, SIGTERM or SIGKILL leave a file that
`agentd diagnose --recording` reads. Real disks: a small tmpfs (as root), or skipped."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from agentd.diagnose.sources.recording import split_chunks
from conftest import agentd_cmd

RECORD = ["record", "--simulate", "input-cpu", "--flush-interval", "1s"]


def run(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(agentd_cmd(*args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs of the given size (and options) under tmp_path; unmounted afterwards."""
    mounted = []

    def mount(size: str, *options: str) -> str:
        path = tmp_path / f"fs{len(mounted)}"
        path.mkdir()
        opts = ",".join((f"size={size}", *options))
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(path)
        return str(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def assert_readable(path: str) -> subprocess.CompletedProcess:
    """The recording diagnoses (0: no finding, 1: findings), not 3 (unreadable)."""
    r = run("diagnose", "--recording", path, "--json")
    assert r.returncode in (0, 1), r.stderr
    return r


def chunks_in(path: str) -> tuple[int, bool]:
    with open(path, "rb") as f:
        chunks, complete = split_chunks(f.read())
    return len(chunks), complete


def test_missing_directory_fails_before_recording(tmp_path):
    t0 = time.monotonic()
    r = run(*RECORD, "--duration", "1h", "--out", str(tmp_path / "no" / "r.rec"), timeout=60)
    assert r.returncode == 4 and "does not exist" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 60  # not after the hour: the run() timeout would fire


def test_read_only_filesystem_fails_before_recording(tmpfs):
    ro = tmpfs("1m", "ro")
    r = run(*RECORD, "--duration", "1h", "--out", os.path.join(ro, "r.rec"), timeout=60)
    assert r.returncode == 4 and "Read-only file system" in r.stderr, r.stderr
    assert os.listdir(ro) == []


def test_unreachable_daemon_leaves_no_file(tmp_path):
    out = tmp_path / "r.rec"
    r = run("record", "--daemon", "http://127.0.0.1:9", "--duration", "5s", "--out", str(out))
    assert r.returncode == 3, r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_full_disk_keeps_what_was_recorded(tmpfs):
    disk = tmpfs("120k")
    out = os.path.join(disk, "r.rec")
    r = run(*RECORD, "--duration", "5m", "--out", out, timeout=240)
    assert r.returncode == 4, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "the disk is full" in last and "rows recorded before are kept" in last, last
    assert os.listdir(disk) == ["r.rec"]  # no temporary file left behind
    n, complete = chunks_in(out)
    assert n >= 3 and complete  # the partial chunk was cut off
    assert_readable(out)


@pytest.mark.slow
def test_full_disk_before_the_first_row_leaves_no_file(tmpfs):
    disk = tmpfs("4k")
    with open(os.path.join(disk, "filler"), "wb", buffering=0) as f:  # fill it up
        with pytest.raises(OSError):
            while True:
                f.write(b"x" * 1024)
    out = os.path.join(disk, "r.rec")
    r = run(*RECORD, "--duration", "1m", "--out", out, timeout=120)
    assert r.returncode == 4, r.stderr
    assert "the disk is full" in r.stderr
    assert not os.path.exists(out)


def _record_until(out: str, chunks: int, spawn) -> object:
    proc = spawn(agentd_cmd(*RECORD, "--duration", "10m", "--out", out))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if os.path.exists(out) and chunks_in(out)[0] >= chunks:
            return proc
        assert proc.p.poll() is None, proc.output()
        time.sleep(0.3)
    raise AssertionError(f"fewer than {chunks} chunks after 120 s: {proc.output()}")


@pytest.mark.slow
def test_sigterm_keeps_the_recording(tmp_path, spawn):
    out = str(tmp_path / "r.rec")
    proc = _record_until(out, 12, spawn)
    proc.p.send_signal(signal.SIGTERM)
    assert proc.p.wait(30) == 0, proc.output()
    assert "chunks written to" in proc.output()
    n, complete = chunks_in(out)
    assert n >= 12 and complete
    doc = assert_readable(out)
    assert '"findings"' in doc.stdout


@pytest.mark.slow
def test_sigkill_leaves_a_readable_file(tmp_path, spawn):
    out = str(tmp_path / "r.rec")
    proc = _record_until(out, 12, spawn)
    proc.p.send_signal(signal.SIGKILL)
    proc.p.wait(10)
    assert chunks_in(out)[0] >= 12
    assert_readable(out)
