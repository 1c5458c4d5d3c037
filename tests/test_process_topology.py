"""Process trees of GPU processes (real processes here) and the PCIe topology (fixtures)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from agentd.jobs import JOB_LABELS, JobResolver, parse_cgroup
from agentd.paths import Paths
from agentd.samplers.base import Context
from agentd.samplers.process import (JOB_RETENTION, ProcessSampler, parse_proc_io,
                                     parse_proc_stat)
from agentd.pcie import sysfs_capacity as link_capacity
from agentd.samplers.topology import TopologySampler

TRAINER = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time

    def worker(path):
        data = b""
        end = time.time() + 60
        while time.time() < end:
            with open(path, "rb") as f:   # cached re-reads: rchar grows, read_bytes does not
                data = f.read()

    if __name__ == "__main__":
        path = sys.argv[1]
        procs = [mp.Process(target=worker, args=(path,)) for _ in range(2)]
        for p in procs:
            p.start()
        print("ready", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def trainer(tmp_path):
    data = tmp_path / "shard.bin"
    data.write_bytes(os.urandom(1 << 20))
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    exe = tmp_path / "mytrainer"  # the process name (comm) comes from the name executed
    exe.symlink_to(sys.executable)
    p = subprocess.Popen([str(exe), str(script), str(data)], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    assert p.stdout.readline().strip() == "ready"
    yield p
    os.killpg(p.pid, signal.SIGKILL)  # the workers too, or they outlive the test as orphans
    p.wait()
    deadline = time.time() + 5
    while time.time() < deadline and subprocess.run(["pgrep", "-g", str(p.pid)],
                                                     capture_output=True).returncode == 0:
        time.sleep(0.05)


def test_parse_proc_stat_with_odd_comm():
    text = "4242 (my (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 " \
           "7 0 12345 1000000 2500 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 3 0 0\n"
    st = parse_proc_stat(text)
    assert st.comm == "my (weird) name"
    assert (st.state, st.ppid, st.cpu_ticks, st.threads, st.start_ticks) == ("S", 1, 300, 7, 12345)
    assert st.rss_bytes == 2500 * os.sysconf("SC_PAGE_SIZE")


def test_parse_proc_io():
    io = parse_proc_io("rchar: 100\nwchar: 5\nsyscr: 1\nsyscw: 1\nread_bytes: 40\n"
                       "write_bytes: 8\ncancelled_write_bytes: 0\n")
    assert io["rchar"] == 100 and io["read_bytes"] == 40 and io["write_bytes"] == 8


@pytest.mark.parametrize("text, expected", [
    ("0::/system.slice/train.service\n", {"systemd_unit": "train.service"}),
    ("0::/system.slice/docker-" + "a" * 64 + ".scope\n",
     {"container_id": "a" * 64}),
    ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_5f60_7182_93a4_"
     "b5c6d7e8f901.slice/cri-containerd-" + "b" * 64 + ".scope\n",
     {"pod_uid": "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901", "container_id": "b" * 64}),
    ("12:cpuset:/slurm/uid_1000/job_48213/step_0/task_0\n0::/\n",
     {"slurm_job_id": "48213"}),
    ("0::/user.slice/user-1000.slice/session-3.scope\n", {"systemd_unit": "session-3.scope"}),
])
def test_parse_cgroup(text, expected):
    got = parse_cgroup(text)
    for k, v in expected.items():
        assert getattr(got, k) == v
    for k in {"systemd_unit", "container_id", "pod_uid", "slurm_job_id"} - set(expected):
        if k != "systemd_unit":
            assert getattr(got, k) == ""


def test_trainer_tree_cpu_and_cached_reads(trainer):
    ctx = Context(Paths(), 0.1, 1.0)
    ctx.shared.gpu_processes = {trainer.pid: (0, 1)}
    s = ProcessSampler(ctx)
    s.open()
    s.sample(time.time(), True)
    tree = psutil.Process(trainer.pid)

    def tree_cpu() -> float:  # the kernel's own figure for the tree, as psutil reads it
        return sum(sum(p.cpu_times()[:2]) for p in [tree] + tree.children(recursive=True))

    before = tree_cpu()
    rows = []
    t_end = time.time() + 2.0
    i = 0
    while time.time() < t_end:
        time.sleep(0.1)
        i += 1
        rows.append(s.sample(time.time(), i % 10 == 0))
    after = tree_cpu()
    got = {(n, labels): v for n, labels, v in s.series()}
    # Series are per job (here: this test's cgroup, or the name when the cgroup says nothing),
    # and per GPU and job: a tree holding GPUs 0 and 1 counts under GPU 0.
    job = JobResolver(Paths()).labels(trainer.pid)
    assert {labels for n, labels in got} == {job, ("0", "") + job}
    assert got[("agentd_gpu_process_members", ("0", "") + job)] == 3
    assert got[("agentd_process_trees", job)] == 1
    assert got[("agentd_process_members", job)] == 3  # the trainer and its two workers
    cpu = got[("agentd_process_cpu_seconds_total", job)]
    # What the kernel says the trainer and its two busy workers used (however loaded the
    # machine is), to a tick per process and read.
    assert after - before > 0.2
    assert cpu == pytest.approx(after - before, abs=0.1 + 0.05 * (after - before))
    rchar = got[("agentd_process_read_chars_total", job)]
    read = got[("agentd_process_read_bytes_total", job)]
    assert rchar > 50 * 2**20  # the workers re-read their 1 MiB shard many times...
    assert read < rchar / 10  # ...from the page cache, not from storage
    # The window and the findings keep the tree, by pid.
    tree = s.meta()["processes"][str(trainer.pid)]
    assert tree["comm"] == "mytrainer" and tree["gpus"] == [0, 1]
    last = rows[-1]
    assert last[f"proc.members:{trainer.pid}"] == 3
    assert 0 < last[f"proc.max_member_cpu:{trainer.pid}"] <= 1.3


def test_comm_match_without_gpu(trainer):
    ctx = Context(Paths(), 0.1, 1.0)
    s = ProcessSampler(ctx, {"comm_match": "^mytrainer$"})
    s.open()
    s.sample(time.time(), True)
    # The trainer is the one root; its workers (same name) are members of its tree.
    assert set(s.meta()["processes"]) == {str(trainer.pid)}
    members = {labels: v for n, labels, v in s.series() if n == "agentd_process_members"}
    assert list(members.values()) == [3]


def test_exited_tree_disappears(trainer):
    ctx = Context(Paths(), 0.1, 1.0)
    ctx.shared.gpu_processes = {trainer.pid: (0,)}
    s = ProcessSampler(ctx)
    s.open()
    s.sample(time.time(), True)
    ctx.shared.gpu_processes = {}
    s.sample(time.time(), True)
    # The job's gauges go at once; its counters stay (a restarted trainer continues them).
    assert {n for n, _, _ in s.series()} == {
        "agentd_process_cpu_seconds_total", "agentd_process_root_cpu_seconds_total",
        "agentd_process_read_bytes_total",
        "agentd_process_read_chars_total", "agentd_process_written_bytes_total",
        "agentd_gpu_process_cpu_seconds_total", "agentd_gpu_process_root_cpu_seconds_total"}
    s.sample(time.time() + JOB_RETENTION + 1, True)
    assert not s.series()


# --- topology ----------------------------------------------------------------------------------


def test_link_capacity():
    assert link_capacity("32.0 GT/s PCIe\n", "16\n") == pytest.approx(63.0e9, rel=0.001)
    assert link_capacity("8.0 GT/s PCIe", "4") == pytest.approx(3.94e9, rel=0.001)
    assert link_capacity("2.5 GT/s PCIe", "1") == pytest.approx(250e6)
    assert link_capacity("Unknown", "0") is None


def test_topology_shared_switch(dgx_sysfs):
    s = TopologySampler(Context(Paths("/proc", dgx_sysfs), 0.1, 1.0))
    s.open()
    s.sample(0.0, True)
    got = {(n, labels): v for n, labels, v in s.series()}
    shared = [labels for (n, labels) in got if n == "agentd_pcie_shared_uplink"]
    # Each of the 4 switches carries 2 GPUs and 1 NVMe drive: 8 GPU/NVMe pairs.
    assert len(shared) == 8
    assert ("0000:18:00.0", "0000:19:00.0", "0000:16:00.0") in shared
    # The uplink's capacity is a value of its own series, not a label (no numbers in labels).
    uplinks = {labels: v for (n, labels), v in got.items()
               if n == "agentd_pcie_uplink_capacity_bytes_per_second"}
    assert len(uplinks) == 4
    assert uplinks[("0000:16:00.0",)] == pytest.approx(63.0e9, rel=0.001)
    info = {labels[0]: labels for (n, labels) in got if n == "agentd_pcie_device_info"}
    assert info["0000:19:00.0"][1:3] == ("nvme", "nvme0n1")
    # An adapter with a netdev and an RDMA device: one series each, no list in a label.
    nic = {labels[2] for (n, labels) in got
           if n == "agentd_pcie_device_info" and labels[0] == "0000:1a:00.0"}
    assert nic == {"ibp26s0", "mlx5_0"}
    assert info["0000:58:00.0"][5] == "1"  # NUMA node of the second socket
    assert got[("agentd_pcie_link_capacity_bytes_per_second", ("0000:19:00.0",))] == \
        pytest.approx(15.75e9, rel=0.001)  # Gen5 x4 NVMe


def test_topology_of_this_vm(vm_sysfs):
    s = TopologySampler(Context(Paths("/proc", vm_sysfs), 0.1, 1.0))
    s.open()
    s.sample(0.0, True)
    kinds = {labels[1] for n, labels, _ in s.series() if n == "agentd_pcie_device_info"}
    assert kinds == {"nic"}  # virtio: no GPU, no NVMe


def test_malformed_proc_stat_skips_that_process_only(tmp_path, caplog):
    """A copy of real /proc/PID/{stat,cgroup} files for a trainer and two workers, one
    worker's stat cut short: that worker is skipped (logged once), the tree is still read."""
    me = os.getpid()
    stat = open(f"/proc/{me}/stat").read()
    cgroup = open(f"/proc/{me}/cgroup").read()
    proc = tmp_path / "proc"
    pids = {100: 1, 101: 100, 102: 100}  # pid -> ppid

    def write(pid: int, ppid: int, ticks: int, text: str | None = None) -> None:
        d = proc / str(pid)
        (d / "task" / str(pid)).mkdir(parents=True, exist_ok=True)
        f = stat[stat.rindex(")") + 2:].split()
        f[1], f[11], f[12] = str(ppid), str(ticks), "0"
        (d / "stat").write_text(text if text is not None else
                                f"{pid} (worker) " + " ".join(f) + "\n")
        (d / "cgroup").write_text(cgroup)
        kids = [str(k) for k, p in pids.items() if p == pid]
        (d / "task" / str(pid) / "children").write_text(" ".join(kids) + (" " if kids else ""))

    for pid, ppid in pids.items():
        write(pid, ppid, 1000)
    ctx = Context(Paths(str(proc), str(tmp_path)), 0.1, 1.0)
    ctx.shared.gpu_processes = {100: (0,)}
    s = ProcessSampler(ctx)
    s.open()
    s.sample(10.0, True)
    write(101, 100, 1000 + 50)
    write(102, 100, 0, text="102 (worker) S 100 102 102 0 -1 42")  # truncated
    with caplog.at_level("WARNING", logger="agentd"):
        row = s.sample(11.0, True)  # every member is read on slow ticks
        s.sample(12.0, True)
    hz = os.sysconf("SC_CLK_TCK")
    assert row["proc.cpu:100"] == pytest.approx(50 / hz)  # 101's work; 102 skipped
    assert row["proc.members:100"] == 3.0  # 102 still exists
    assert len([r for r in caplog.records if "skipping process 102" in r.getMessage()]) == 1
    write(102, 100, 1000 + 20)  # readable again: only its new work counts, no burst
    assert s.sample(13.0, True)["proc.cpu:100"] == pytest.approx(20 / hz)


def test_workers_are_read_once_a_second_the_trainer_every_tick(tmp_path):
    """A node's 8 ranks with 12 workers each are ~100 processes: reading every one ten times
    a second cost ~2% of a core (bench/sampler_cost.py). Fast ticks read the trainer alone
    (proc.root_cpu); slow ticks read every member, and the tree's CPU, busiest member,
    members and blocked cover the second since the last such read, so no work is lost."""
    me = os.getpid()
    stat = open(f"/proc/{me}/stat").read()
    cgroup = open(f"/proc/{me}/cgroup").read()
    proc = tmp_path / "proc"
    pids = {100: 1, 101: 100, 102: 100}
    ticks = {100: 1000, 101: 1000, 102: 1000}

    def write(pid: int, state: str = "S") -> None:
        d = proc / str(pid)
        (d / "task" / str(pid)).mkdir(parents=True, exist_ok=True)
        f = stat[stat.rindex(")") + 2:].split()
        f[0], f[1], f[11], f[12] = state, str(pids[pid]), str(ticks[pid]), "0"
        (d / "stat").write_text(f"{pid} (worker) " + " ".join(f) + "\n")
        (d / "cgroup").write_text(cgroup)
        kids = [str(k) for k, p in pids.items() if p == pid]
        (d / "task" / str(pid) / "children").write_text(" ".join(kids) + (" " if kids else ""))

    for pid in pids:
        write(pid)
    ctx = Context(Paths(str(proc), str(tmp_path)), 0.1, 1.0)
    ctx.shared.gpu_processes = {100: (0,)}
    s = ProcessSampler(ctx)
    s.open()
    s.sample(10.0, True)
    hz = os.sysconf("SC_CLK_TCK")
    for k in range(1, 10):  # nine fast ticks: the trainer 1 tick each, a worker 8
        ticks[100] += 1
        ticks[101] += 8
        for pid in pids:
            write(pid, "D" if pid == 102 else "S")
        row = s.sample(10.0 + k / 10, False)
        assert row == {"proc.root_cpu:100": pytest.approx(1 / hz / 0.1)}, row
    ticks[100] += 1
    ticks[101] += 8
    for pid in pids:
        write(pid, "D" if pid == 102 else "S")
    row = s.sample(11.0, True)
    assert row["proc.root_cpu:100"] == pytest.approx(1 / hz / 0.1)
    assert row["proc.cpu:100"] == pytest.approx(90 / hz)  # 10 + 80 ticks over the second
    assert row["proc.max_member_cpu:100"] == pytest.approx(80 / hz)
    assert row["proc.members:100"] == 3.0 and row["proc.blocked:100"] == 1.0
    cpu = next(v for (n, _), v in (((n, lab), v) for n, lab, v in s.series())
               if n == "agentd_process_cpu_seconds_total")
    assert cpu == pytest.approx(90 / hz)
    # While its GPU waits (its kernels ran under 95% of the last second), the tree is read
    # whole every tick: loading that alternates with compute shows at 10 Hz.
    ctx.shared.gpus_waiting = frozenset({0})
    ticks[100] += 1
    ticks[101] += 8
    for pid in pids:
        write(pid)
    row = s.sample(11.1, False)
    assert row["proc.cpu:100"] == pytest.approx(9 / hz / 0.1)
    assert row["proc.members:100"] == 3.0
    ctx.shared.gpus_waiting = frozenset({3})  # another GPU waits: the trainer alone
    ticks[100] += 1
    for pid in pids:
        write(pid)
    assert s.sample(11.2, False) == {"proc.root_cpu:100": pytest.approx(1 / hz / 0.1)}
