"""systemd/agentd.service: verifies clean and stays hardened (exposure <= 2.5)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import need

ROOT = os.path.join(os.path.dirname(__file__), "..")
UNIT = os.path.join(ROOT, "systemd", "agentd.service")
INSTALLED = "/opt/agentd/venv/bin/agentd"  # where docs/daemon.md installs agentd


@pytest.fixture
def unit(tmp_path) -> str:
    """The unit with ExecStart pointing at this installation's agentd (verify checks that
    the binary exists)."""
    exe = shutil.which("agentd") or os.path.join(os.path.dirname(sys.executable), "agentd")
    if not os.path.exists(exe):
        pytest.skip("agentd is not installed as a command")
    with open(UNIT) as f:
        text = f.read().replace(INSTALLED, exe)
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


def test_exec_start_runs_the_documented_install():
    """ExecStart is the agentd of the virtual environment docs/daemon.md installs into."""
    with open(UNIT) as f:
        exec_start = re.search(r"^ExecStart=(\S+)", f.read(), re.M).group(1)
    assert exec_start == INSTALLED
    with open(os.path.join(ROOT, "docs", "daemon.md")) as f:
        doc = f.read()
    venv = os.path.dirname(os.path.dirname(INSTALLED))
    assert f"python3 -m venv {venv}\n" in doc
    assert f"{venv}/bin/pip install /path/to/agentd-checkout" in doc
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert ".venv/bin/agentd" in readme  # make run/test do not put agentd on PATH


def test_no_advice_to_install_the_unrelated_pypi_agentd():
    """PyPI's `agentd` is another project: nothing may tell users to install it from there."""
    bad = re.compile(r"pip install\s+['\"]?agentd(\[|['\"\s]|$)", re.M)
    hits = []
    for top in ("README.md", "docs", "agentd", "systemd", "Makefile"):
        path = os.path.join(ROOT, top)
        files = [path] if os.path.isfile(path) else [
            os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns
            if n.endswith((".md", ".py", ".service", ".toml"))]
        for name in files:
            with open(name, errors="replace") as f:
                for i, line in enumerate(f, 1):
                    if bad.search(line):
                        hits.append(f"{os.path.relpath(name, ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
