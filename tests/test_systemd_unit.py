"""systemd/agentd.service: verifies clean and stays hardened (exposure <= 2.5)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import need

UNIT = os.path.join(os.path.dirname(__file__), "..", "systemd", "agentd.service")


@pytest.fixture
def unit(tmp_path) -> str:
    """The unit with ExecStart pointing at this installation's agentd (verify checks that
    the binary exists)."""
    exe = shutil.which("agentd") or os.path.join(os.path.dirname(sys.executable), "agentd")
    if not os.path.exists(exe):
        pytest.skip("agentd is not installed as a command")
    with open(UNIT) as f:
        text = f.read().replace("/usr/local/bin/agentd", exe)
    path = tmp_path / "agentd.service"
    path.write_text(text)
    return str(path)


def test_verify_prints_nothing(unit):
    tool = need("systemd-analyze")
    r = subprocess.run([tool, "verify", unit], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_exposure_at_most_2_5(unit):
    tool = need("systemd-analyze")
    r = subprocess.run([tool, "security", "--offline=yes", "--threshold=25", unit],
                       capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.5
    assert r.returncode == 0


def test_watchdog_and_notify():
    with open(UNIT) as f:
        text = f.read()
    assert "Type=notify" in text and re.search(r"^WatchdogSec=\d+", text, re.M)
    assert "AmbientCapabilities=CAP_SYS_PTRACE" in text
    assert "DynamicUser=yes" in text
