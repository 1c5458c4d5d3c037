"""bench/workloads/run.py, the real-workload harness: its contract, and a CI-sized subset
run for real. What is asserted holds whatever the analysis concludes (the scores are the
benchmark's business): the harness runs, each trainer's own stall measurement is what its
case was built for, agentd's recording holds the trainer's process tree, and the fake GPU's
busy time matches what the trainer published."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

RUN = os.path.join(os.path.dirname(__file__), "..", "bench", "workloads", "run.py")
SUBSET = {  # case: (stall the trainer must measure, loader processes)
    "healthy": ((0.0, 0.05), 2),
    "input_cpu": ((0.15, 1.0), 1),
    "io_h2d_serialized": ((0.15, 1.0), 0),
    "input_storage": ((0.15, 1.0), 4),
}


def harness(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True,
                          timeout=timeout)


def test_list_and_usage():
    r = harness("--list")
    assert r.returncode == 0
    names = r.stdout.split()
    assert {"healthy", "input_storage", "input_cpu", "io_h2d_serialized", "memory_pressure",
            "healthy_checkpoint"} <= set(names)
    r = harness("no_such_case")
    assert r.returncode == 2 and "unknown case 'no_such_case'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture
def data_dir():
    """Datasets of this run's own, on a disk (tmp_path may be tmpfs): other runs of the suite
    on the machine evict and warm theirs."""
    d = os.path.join(os.environ.get("AGENTD_TEST_DISK_DIR", "/var/tmp"),
                     f"agentd-test-workloads-{os.getpid()}")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_ci_subset(data_dir):
    # Without the harness's probes (tests/test_probe.py measures inside a limited cgroup).
    r = harness(*SUBSET, "--seconds", "10", "--json", "--no-probe", "--data-dir", data_dir,
                timeout=900)
    assert r.returncode in (0, 1), r.stderr
    results = {d["case"]: d for d in map(json.loads, r.stdout.splitlines())}
    assert set(results) == set(SUBSET)
    ran = 0
    for name, ((lo, hi), workers) in SUBSET.items():
        d = results[name]
        if d.get("skipped"):
            assert name == "input_storage" and os.geteuid() != 0, d["skipped"]
            continue
        ran += 1
        assert {"case", "expected", "measured_stall_fraction", "agentd", "pass"} <= set(d)
        assert isinstance(d["agentd"]["kinds"], list) and isinstance(d["pass"], bool)
        assert 0 <= d["agentd"]["stall_fraction"] <= 1
        assert lo <= d["measured_stall_fraction"] <= hi, (name, d["trainer"])
        rec = d["recording"]
        assert rec["trainer_tree_seen"], name
        assert rec["trainer_tree_members"] == workers + 1, (name, rec)
        assert rec["gpu_busy_fraction"] == pytest.approx(d["trainer"]["busy_fraction"],
                                                         abs=0.03), name
    assert ran >= 3
