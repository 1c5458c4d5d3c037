"""Per-job series (agentd/jobs.py): who a process belongs to, and the process and GPU
samplers' series summed per job instead of per pid (pids churn with every job)."""

from __future__ import annotations

import os

import pytest

from agentd.jobs import JOB_LABELS, Attribution, JobResolver, job_labels, parse_container_logs
from agentd.paths import Paths
from agentd.samplers.base import Context
from agentd.samplers.gpu import GpuSampler
from agentd.samplers.process import JOB_RETENTION, ProcessSampler

POD_UID = "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901"
CONTAINER = "b" * 64
K8S_CGROUP = ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
              + POD_UID.replace("-", "_") + ".slice/cri-containerd-" + CONTAINER + ".scope\n")


def labels(**kw) -> tuple[str, ...]:
    return tuple(kw.get(k, "") for k in JOB_LABELS)


@pytest.mark.parametrize("attribution, k8s, expected", [
    (Attribution(systemd_unit="slurmstepd.scope", slurm_job_id="48213"), None,
     labels(slurm_job_id="48213")),
    (Attribution(container_id=CONTAINER, pod_uid=POD_UID), ("ml", "trainer-0", "main"),
     labels(namespace="ml", pod="trainer-0", container="main")),
    (Attribution(container_id=CONTAINER, pod_uid=POD_UID), None, labels(pod_uid=POD_UID)),
    (Attribution(container_id=CONTAINER), None, labels(container_id="b" * 12)),
    (Attribution(systemd_unit="train.service"), None, labels(systemd_unit="train.service")),
    (Attribution(), None, labels(comm="python3")),
])
def test_the_first_identity_that_applies_names_the_job(attribution, k8s, expected):
    assert job_labels(attribution, "python3", k8s) == expected


def test_container_log_names():
    found = parse_container_logs([
        f"trainer-0_ml_main-{CONTAINER}.log", "not-a-log", f"x_y_z-{'c' * 63}.log",
        f"web-7d9f_default_nginx-sidecar-{'d' * 64}.log"])
    assert found == {CONTAINER: ("ml", "trainer-0", "main"),
                     "d" * 64: ("default", "web-7d9f", "nginx-sidecar")}


def write_proc(root, pid: int, comm: str, ppid: int, cpu_ticks: int, cgroup: str,
               children: list[int] = (), read_bytes: int = 0) -> None:
    d = os.path.join(root, str(pid))
    os.makedirs(os.path.join(d, "task", str(pid)), exist_ok=True)
    files = {
        "stat": f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 0 0 0 0 {cpu_ticks} 0 0 0 "
                f"20 0 4 0 {pid} 4000000000 2500 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 "
                f"17 0 0 0\n",
        "io": f"rchar: {read_bytes}\nwchar: 0\nsyscr: 0\nsyscw: 0\nread_bytes: {read_bytes}\n"
              f"write_bytes: 0\ncancelled_write_bytes: 0\n",
        "cgroup": cgroup, "comm": comm + "\n",
        f"task/{pid}/children": " ".join(map(str, children)),
    }
    for name, text in files.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)


def test_kubernetes_names_from_the_kubelets_log_links(tmp_path):
    proc, varlog = tmp_path / "proc", tmp_path / "log"
    write_proc(proc, 100, "python3", 1, 0, K8S_CGROUP)
    r = JobResolver(Paths(str(proc), "/sys", str(varlog)))
    assert r.labels(100) == labels(pod_uid=POD_UID)  # no kubelet logs here: the UID only
    (varlog / "pods" / f"ml_trainer-0_{POD_UID}").mkdir(parents=True)
    r = JobResolver(Paths(str(proc), "/sys", str(varlog)))
    assert r.labels(100) == labels(namespace="ml", pod="trainer-0")
    (varlog / "containers").mkdir()
    (varlog / "containers" / f"trainer-0_ml_main-{CONTAINER}.log").symlink_to("/nonexistent")
    r = JobResolver(Paths(str(proc), "/sys", str(varlog)))
    assert r.labels(100) == labels(namespace="ml", pod="trainer-0", container="main")


def test_trees_of_one_job_are_summed_and_its_counters_survive_a_tree(tmp_path):
    """Two trainers of one Slurm job (each with a data-loader worker): one series per job,
    and per GPU the job's tree there (one rank's loader apart from the others'); when a
    trainer ends, the job's counters and its GPU's keep what it counted (no false reset)."""
    proc = str(tmp_path)
    slurm = "0::/system.slice/slurmstepd.scope/job_48213/step_0/user/task_0\n"
    for trainer, worker in ((100, 101), (200, 201)):
        write_proc(proc, trainer, "python3", 1, 0, slurm, [worker])
        write_proc(proc, worker, "pt_data_worker", trainer, 0, slurm)
    ctx = Context(Paths(proc, "/sys"), 0.1, 1.0)
    ctx.shared.gpu_processes = {100: (0,), 200: (1,)}
    ctx.shared.gpu_uuids = {0: "GPU-a", 1: "GPU-b"}
    s = ProcessSampler(ctx)
    s.open()
    s.sample(1000.0, True)
    for trainer, worker, ticks in ((100, 101, 300), (200, 201, 500)):  # 3 s and 5 s of CPU
        write_proc(proc, worker, "pt_data_worker", trainer, ticks, slurm, read_bytes=5000)
    s.sample(1001.0, True)
    job = labels(slurm_job_id="48213")
    on0, on1 = ("0", "GPU-a") + job, ("1", "GPU-b") + job
    got = {(n, lab): v for n, lab, v in s.series()}
    assert {lab for _, lab in got} == {job, on0, on1}
    assert got[("agentd_gpu_process_cpu_seconds_total", on0)] == pytest.approx(3.0)
    assert got[("agentd_gpu_process_cpu_seconds_total", on1)] == pytest.approx(5.0)
    assert got[("agentd_gpu_process_members", on1)] == 2
    assert got[("agentd_gpu_process_root_cpu_seconds_total", on1)] == pytest.approx(0.0)
    assert got[("agentd_process_trees", job)] == 2
    assert got[("agentd_process_members", job)] == 4
    assert got[("agentd_process_cpu_seconds_total", job)] == pytest.approx(8.0)
    assert got[("agentd_process_read_bytes_total", job)] == 10000
    # The trainers themselves used no CPU: all of it was their workers'.
    assert got[("agentd_process_root_cpu_seconds_total", job)] == pytest.approx(0.0)
    ctx.shared.gpu_processes = {200: (1,)}  # trainer 100 ended
    s.sample(1002.0, True)
    got = {(n, lab): v for n, lab, v in s.series()}
    assert got[("agentd_process_trees", job)] == 1
    assert got[("agentd_process_cpu_seconds_total", job)] == pytest.approx(8.0)
    assert got[("agentd_gpu_process_cpu_seconds_total", on0)] == pytest.approx(3.0)
    assert ("agentd_gpu_process_members", on0) not in got
    ctx.shared.gpu_processes = {}  # the whole job ended: counters kept for a while, then gone
    s.sample(1003.0, True)
    assert {n for n, _, _ in s.series()} == {
        "agentd_process_cpu_seconds_total", "agentd_process_root_cpu_seconds_total",
        "agentd_process_read_bytes_total",
        "agentd_process_read_chars_total", "agentd_process_written_bytes_total",
        "agentd_gpu_process_cpu_seconds_total", "agentd_gpu_process_root_cpu_seconds_total"}
    s.sample(1003.0 + JOB_RETENTION + 1, True)
    assert s.series() == []


def test_gpu_memory_per_job_not_per_pid(tmp_path, fake_gpus, clock):
    proc = str(tmp_path)
    write_proc(proc, 777, "python3", 1, 0, "0::/system.slice/train.service\n")
    write_proc(proc, 778, "python3", 777, 0, "0::/system.slice/train.service\n")
    write_proc(proc, 900, "jupyter", 1, 0, "0::/user.slice/user-1000.slice/session-3.scope\n")
    fake_gpus({"gpus": [{"count": 1, "processes": [
        {"pid": 777, "memory_bytes": 2e9, "sm_util": 0.5},
        {"pid": 778, "memory_bytes": 1e9, "sm_util": 0.25},
        {"pid": 900, "memory_bytes": 4e9, "sm_util": 0.0}]}]}, clock=clock)
    s = GpuSampler(Context(Paths(proc, "/sys"), 0.1, 1.0), {})
    s.open()
    s.backend.clock = clock
    clock.advance(0.1)
    s.sample(clock.t, True)
    uuid = s.gpus[0].uuid
    mem = {lab: v for n, lab, v in s.series() if n == "agentd_gpu_process_memory_used_bytes"}
    assert mem == {("0", uuid) + labels(systemd_unit="train.service"): 3e9,
                   ("0", uuid) + labels(systemd_unit="session-3.scope"): 4e9}
    sm = {lab: v for n, lab, v in s.series() if n == "agentd_gpu_process_sm_utilization_ratio"}
    assert sm[("0", uuid) + labels(systemd_unit="train.service")] == pytest.approx(0.75)
    # The process sampler still learns which pids hold which GPU.
    assert s.ctx.shared.gpu_processes == {777: (0,), 778: (0,), 900: (0,)}
