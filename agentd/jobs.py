"""Who a process belongs to: its job, from its cgroup, else its name.

agentd exports per-process figures per job, not per pid: pids churn with every job and every
restart (each a new series), jobs are what operators ask about, and a job identity keeps the
number of series bounded by what runs on the node. The window and the findings keep the
per-process detail (pids, process trees).

The job labels (JOB_LABELS) of a process: the first of these that applies fills its labels,
the others stay empty (and so are absent in Prometheus):

 1. slurm_job_id               a Slurm job (cgroup path .../job_N/...)
 2. namespace, pod, container  a Kubernetes container (pod UID and container id from the
                               cgroup; the names from the kubelet's log links,
                               /var/log/containers/POD_NAMESPACE_CONTAINER-ID.log, or the pod's
                               directory /var/log/pods/NAMESPACE_POD_UID), the names
                               dcgm-exporter gives the same pod
    pod_uid                    a Kubernetes pod whose names cannot be found
 3. container_id               a container outside Kubernetes (docker, podman, containerd):
                               its first 12 hex digits, as `docker ps` shows it
 4. systemd_unit               a systemd service or scope (a login session's scope included)
 5. comm                       the process name, when nothing else says who it is
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from agentd.paths import Paths, read_optional

JOB_LABELS = ("slurm_job_id", "namespace", "pod", "container", "pod_uid", "container_id",
              "systemd_unit", "comm")


@dataclass(frozen=True)
class Attribution:
    """What a process's cgroup says about it."""

    systemd_unit: str = ""
    container_id: str = ""
    pod_uid: str = ""
    slurm_job_id: str = ""


_CONTAINER = re.compile(r"(?:docker|cri-containerd|crio|libpod|containerd)[-/]([0-9a-f]{64})")
_BARE_ID = re.compile(r"/([0-9a-f]{64})(?:/|$)")
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_SLURM = re.compile(r"/job_(\d+)(?:/|$)")
_UNIT = re.compile(r"([^/]+\.(?:service|scope))(?:/|$)")


def parse_cgroup(text: str) -> Attribution:
    """Who a process belongs to, from /proc/PID/cgroup (v1 or v2 lines)."""
    paths = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths.append(parts[2])
    # Prefer the unified (v2) hierarchy's path, then the systemd and cpu v1 ones.
    paths.sort(key=lambda p: 0 if p != "/" else 1)
    joined = "\n".join(paths)
    container = _CONTAINER.search(joined) or _BARE_ID.search(joined)
    pod = _POD.search(joined)
    slurm = _SLURM.search(joined)
    unit = ""
    for p in paths:
        units = [u for u in _UNIT.findall(p) if not _CONTAINER.search(u)]
        if units:
            unit = units[-1]
            break
    return Attribution(
        systemd_unit=unit,
        container_id=container.group(1) if container else "",
        pod_uid=pod.group(1).replace("_", "-") if pod else "",
        slurm_job_id=slurm.group(1) if slurm else "",
    )


_CONTAINER_LOG = re.compile(r"^([^_]+)_([^_]+)_(.+)-([0-9a-f]{64})\.log$")
_POD_DIR = re.compile(r"^([^_]+)_([^_]+)_([0-9a-f-]{36})$")


def parse_container_logs(names: list[str]) -> dict[str, tuple[str, str, str]]:
    """container id -> (namespace, pod, container) from /var/log/containers entries
    (POD_NAMESPACE_CONTAINER-ID.log; Kubernetes names hold no '_')."""
    out = {}
    for n in names:
        m = _CONTAINER_LOG.match(n)
        if m:
            out[m.group(4)] = (m.group(2), m.group(1), m.group(3))
    return out


def parse_pod_dirs(names: list[str]) -> dict[str, tuple[str, str]]:
    """pod UID -> (namespace, pod) from /var/log/pods entries (NAMESPACE_POD_UID)."""
    out = {}
    for n in names:
        m = _POD_DIR.match(n)
        if m:
            out[m.group(3)] = (m.group(1), m.group(2))
    return out


def job_labels(a: Attribution, comm: str,
               k8s: tuple[str, str, str] | None = None) -> tuple[str, ...]:
    """The JOB_LABELS values of a process: its cgroup attribution, the Kubernetes names of
    its container (namespace, pod, container; "" where unknown) and its name."""
    j = dict.fromkeys(JOB_LABELS, "")
    if a.slurm_job_id:
        j["slurm_job_id"] = a.slurm_job_id
    elif a.pod_uid:
        if k8s and k8s[1]:
            j["namespace"], j["pod"], j["container"] = k8s
        else:
            j["pod_uid"] = a.pod_uid
    elif a.container_id:
        j["container_id"] = a.container_id[:12]
    elif a.systemd_unit:
        j["systemd_unit"] = a.systemd_unit
    else:
        j["comm"] = comm
    return tuple(j[k] for k in JOB_LABELS)


class JobResolver:
    """pid -> job labels, read once per process (its cgroup does not change) and forgotten
    when the process is no longer asked about."""

    def __init__(self, paths: Paths):
        self.paths = paths
        self._cache: dict[int, tuple[str, ...]] = {}
        self._attribution: dict[int, Attribution] = {}

    def attribution(self, pid: int) -> Attribution:
        a = self._attribution.get(pid)
        if a is None:
            a = parse_cgroup(read_optional(self.paths.proc(str(pid), "cgroup")) or "")
            self._attribution[pid] = a
        return a

    def labels(self, pid: int, comm: str | None = None) -> tuple[str, ...]:
        j = self._cache.get(pid)
        if j is None:
            a = self.attribution(pid)
            if comm is None:
                comm = (read_optional(self.paths.proc(str(pid), "comm")) or "").strip()
            j = job_labels(a, comm, self._kubernetes(a) if a.pod_uid else None)
            self._cache[pid] = j
        return j

    def _kubernetes(self, a: Attribution) -> tuple[str, str, str] | None:
        if a.container_id:
            found = parse_container_logs(_listdir(self.paths.varlog_dir("containers")))
            if a.container_id in found:
                return found[a.container_id]
        pod = parse_pod_dirs(_listdir(self.paths.varlog_dir("pods"))).get(a.pod_uid)
        return (pod[0], pod[1], "") if pod else None

    def retain(self, pids) -> None:
        """Forget every process but these (exited ones, or ones no longer watched)."""
        keep = set(pids)
        for cache in (self._cache, self._attribution):
            for pid in [p for p in cache if p not in keep]:
                del cache[pid]


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
