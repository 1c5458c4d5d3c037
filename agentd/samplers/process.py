"""Processes that use GPUs, with their process trees (data-loader workers are children of
the trainer): CPU, storage reads against all reads (read_bytes vs rchar: what the page cache
did not serve), processes in D state, and who they belong to (systemd unit, container,
Kubernetes pod, Slurm job) from their cgroup. Command lines are never read or exported.

Each tick reads the trees' roots (the trainers: proc.root_cpu); slow ticks read every member
(proc.cpu, max_member_cpu, members, blocked over the second since): a node's 8 ranks with
12 workers each are ~100 processes, each ~20 us a read. A tree on a GPU that waits (its
kernels ran under 95% of the last second, SharedState.gpus_waiting) is read whole every
tick: where GPUs starve, whether the workers load in the GPU's gaps is seen at 10 Hz.

The window keeps each tree (by root pid); /metrics sums the trees of each job
(agentd/jobs.py: Slurm job, Kubernetes container, container, systemd unit, else the root's
name), so series follow jobs, not pids. A job's counters never go back when one of its trees
ends: what the ended tree counted is kept until the job has had no tree for JOB_RETENTION.

Reading other users' /proc/PID/io needs CAP_SYS_PTRACE (the kernel checks ptrace read access);
without it the I/O figures of those processes are absent and the reason is logged once.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from agentd.jobs import JOB_LABELS, Attribution, JobResolver
from agentd.paths import ProcFile, read_optional
from agentd.samplers.base import Malformed, Option, regex, Row, Sampler, Series

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MAX_OPEN_STAT = 512  # /proc/PID/stat files kept open for the 10 Hz reads; more are opened per read
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
JOB_RETENTION = 300.0  # seconds a job's counters outlive its last tree (a restart keeps them)
_COUNTERS = ("cpu_seconds", "root_cpu_seconds", "read_bytes", "rchar", "write_bytes")


class ProcStat(NamedTuple):
    """One /proc/PID/stat. A NamedTuple, not a frozen dataclass: every member of every
    watched tree is parsed ten times a second, and a frozen dataclass' __init__ costs
    several times a tuple's."""

    comm: str
    state: str
    ppid: int
    cpu_ticks: int  # utime + stime
    threads: int
    start_ticks: int  # start time since boot, tells a reused pid from the original
    rss_bytes: int


def parse_proc_stat(text: str) -> ProcStat:
    """One /proc/PID/stat; Malformed when it is cut short or not in that format."""
    # comm is in parentheses and may itself contain spaces and parentheses.
    left = text.find("(")
    right = text.rfind(")")
    f = text[right + 2:].split()
    if left < 0 or right < left or len(f) < 22:
        raise Malformed(f"/proc/PID/stat: {len(f)} fields after the name, expected at least 22")
    try:
        # comm, state, ppid, cpu ticks (utime + stime), threads, start ticks, rss bytes
        return ProcStat(text[left + 1:right], f[0], int(f[1]), int(f[11]) + int(f[12]),
                        int(f[17]), int(f[19]), int(f[21]) * PAGE_SIZE)
    except ValueError:
        raise Malformed(f"/proc/PID/stat: not a number where one belongs: {text[:80]!r}") \
            from None


def parse_proc_io(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


@dataclass(slots=True)
class _Member:
    start_ticks: int
    cpu_ticks: int
    io: dict[str, int] | None


@dataclass
class _Tree:
    root: int
    comm: str
    gpus: tuple[int, ...]
    attribution: Attribution
    job: tuple[str, ...]  # agentd.jobs.JOB_LABELS values
    k8s: dict[str, str] = field(default_factory=dict)  # namespace, pod, container if known
    pids: list[int] = field(default_factory=list)
    members: dict[int, _Member] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    root_cpu_seconds: float = 0.0  # the trainer's own share of cpu_seconds
    read_bytes: int = 0
    rchar: int = 0
    write_bytes: int = 0
    blocked: int = 0
    rss_bytes: int = 0
    io_t: float = 0.0  # when /proc/PID/io was last read (slow ticks)
    full_t: float = 0.0  # when every member was last read (slow ticks)
    root_pending: int = 0  # the root's CPU ticks read since then (fast ticks)
    keys: tuple[str, ...] = ()  # its window channels, formatted once

    def __post_init__(self) -> None:
        self.keys = tuple(f"proc.{k}:{self.root}" for k in (
            "cpu", "max_member_cpu", "root_cpu", "members", "blocked", "read", "rchar"))


def _gpu_of(tree: _Tree) -> int:
    """The GPU a tree's per-GPU series are labelled with: its first (-1: none)."""
    return min(tree.gpus) if tree.gpus else -1


class ProcessSampler(Sampler):
    name = "process"
    help = "GPU processes and their trees: CPU, reads from storage vs cache, D state, cgroup"
    default_rate = "fast"
    options = {
        "comm_match": Option(str, "",
                             "also watch processes whose name (comm) matches this regular "
                             "expression, with or without a GPU (e.g. for CPU-only nodes)", check=regex),
        "max_trees": Option(int, 64, "most process trees watched at once", bounds=(1, 4096)),
    }

    def open(self) -> None:
        pattern = self.opts["comm_match"]
        try:
            self._comm_match = re.compile(pattern) if pattern else None
        except re.error as e:
            raise ValueError(f"collectors.process.comm_match: {e}") from None
        self._trees: dict[int, _Tree] = {}
        self._stat_files: dict[int, ProcFile] = {}
        self._matched: set[int] = set()
        self._last_t: float | None = None
        self._jobs = JobResolver(self.ctx.paths)
        # job -> (counters of its ended trees by GPU, when its last tree ended); replaced,
        # never mutated, so the scrape thread reads it without a lock.
        self._retired: dict[tuple, tuple[dict[int, dict[str, float]], float | None]] = {}

    def _stat(self, pid: int, keep_open: bool = False) -> ProcStat | None:
        """/proc/PID/stat parsed; None when the process has exited or its file is malformed
        (that process is skipped, logged once; the others are read)."""
        text = (self._read_stat(pid) if keep_open
                else read_optional(self.ctx.paths.proc(str(pid), "stat")))
        if text is None:
            return None
        try:
            return parse_proc_stat(text)
        except Malformed as e:
            self.log_once(logging.WARNING, "malformed_stat",
                          "skipping process %d: %s (further ones at debug level)", pid, e)
            return None

    # --- discovery (slow ticks) -------------------------------------------------------------------

    def _children(self, pid: int) -> list[int] | None:
        task_dir = self.ctx.paths.proc(str(pid), "task")
        try:
            tids = os.listdir(task_dir)
        except OSError:
            return []
        kids: list[int] = []
        for tid in tids:
            text = read_optional(os.path.join(task_dir, tid, "children"))
            if text is None:
                return None  # kernel without CONFIG_PROC_CHILDREN
            kids += [int(k) for k in text.split()]
        return kids

    def _all_parents(self) -> dict[int, list[int]]:
        """ppid -> children, from a scan of every process (the slow fallback)."""
        out: dict[int, list[int]] = {}
        for entry in os.listdir(self.ctx.paths.procfs):
            if entry.isdigit():
                st = self._stat(int(entry))
                if st is not None:
                    out.setdefault(st.ppid, []).append(int(entry))
        return out

    def _scan_comm(self) -> set[int]:
        found = set()
        for entry in os.listdir(self.ctx.paths.procfs):
            if entry.isdigit():
                comm = read_optional(self.ctx.paths.proc(entry, "comm"))
                if comm and self._comm_match.search(comm.strip()):
                    found.add(int(entry))
        return found

    def _discover(self, roots: dict[int, tuple[int, ...]], now: float) -> None:
        parents: dict[int, list[int]] | None = None
        retired = {job: ({g: dict(c) for g, c in by.items()}, t)
                   for job, (by, t) in self._retired.items()}
        for root in list(self._trees):
            if root not in roots:
                tree = self._trees.pop(root)
                by, _ = retired.get(tree.job, ({}, None))
                counters = by.setdefault(_gpu_of(tree), dict.fromkeys(_COUNTERS, 0.0))
                for k in _COUNTERS:
                    counters[k] += getattr(tree, k)
                retired[tree.job] = (by, now)
        for root in roots:
            if root not in self._trees:
                st = self._stat(root)
                if st is None:
                    continue
                comm = st.comm
                job = self._jobs.labels(root, comm)
                k8s = {k: v for k, v in zip(JOB_LABELS, job)
                       if k in ("namespace", "pod", "container") and v}
                self._trees[root] = _Tree(root, comm, roots[root],
                                          self._jobs.attribution(root), job, k8s)
        self._jobs.retain(self._trees)
        live = {t.job for t in self._trees.values()}
        self._retired = {
            job: (c, None if job in live else t) for job, (c, t) in retired.items()
            if job in live or t is None or now - t < JOB_RETENTION}
        for root in roots:
            if root not in self._trees:
                continue
            tree = self._trees[root]
            tree.gpus = roots[root]
            pids, stack = [], [root]
            while stack:
                pid = stack.pop()
                pids.append(pid)
                kids = self._children(pid)
                if kids is None:
                    if parents is None:
                        parents = self._all_parents()
                    kids = parents.get(pid, [])
                # Another watched root's subtree belongs to that root, not to this one.
                stack += [k for k in kids if k not in roots]
            tree.pids = pids
        watched = {pid for t in self._trees.values() for pid in t.pids}
        for pid in [p for p in self._stat_files if p not in watched]:
            self._stat_files.pop(pid).close()

    def _read_stat(self, pid: int) -> str | None:
        f = self._stat_files.get(pid)
        if f is None:
            path = self.ctx.paths.proc(str(pid), "stat")
            if len(self._stat_files) >= MAX_OPEN_STAT:
                return read_optional(path)
            f = self._stat_files[pid] = ProcFile(path, 1024)
        return f.read_optional()

    def close(self) -> None:
        for f in self._stat_files.values():
            f.close()
        self._stat_files.clear()

    # --- reading (every tick) ---------------------------------------------------------------------

    def sample(self, now: float, slow: bool) -> Row:
        if slow or self._last_t is None:
            roots = dict(self.ctx.shared.gpu_processes)
            if self._comm_match is not None:
                self._matched = self._scan_comm()
                # A matched process whose parent also matched is a worker, not a root.
                for pid in self._matched:
                    st = self._stat(pid)
                    if st is not None and st.ppid not in self._matched:
                        roots.setdefault(pid, ())
            if len(roots) > self.opts["max_trees"]:
                self.log_once(30, "max_trees", "watching %d of %d process trees (max_trees)",
                              self.opts["max_trees"], len(roots))
                roots = dict(sorted(roots.items())[: self.opts["max_trees"]])
            self._discover(roots, now)
        dt = now - self._last_t if self._last_t is not None else 0.0
        self._last_t = now
        row: Row = {}
        waiting = self.ctx.shared.gpus_waiting
        for tree in self._trees.values():
            if slow or not tree.members or len(tree.pids) == 1 or \
                    (waiting and not waiting.isdisjoint(tree.gpus)):
                row.update(self._read_tree(tree, dt, with_io=slow))
            else:
                row.update(self._read_root(tree, dt))
        return row

    def _read_root(self, tree: _Tree, dt: float) -> Row:
        """A fast tick of a tree with workers: the trainer alone is read (its CPU per tick,
        proc.root_cpu); the workers are read once a second (_read_tree). Every member of
        every tree at 10 Hz cost 19-23 us a process a tick: ~2% of a core for 8 ranks with
        12 workers each (bench/sampler_cost.py), and the analysis reads the workers' CPU,
        blocked and member counts as means."""
        st = self._stat(tree.root, keep_open=True)
        prev = tree.members.get(tree.root)
        if st is None or prev is None or prev.start_ticks != st.start_ticks:
            return {}  # gone or replaced: the next full read sorts it out
        d = max(st.cpu_ticks - prev.cpu_ticks, 0)
        prev.cpu_ticks = st.cpu_ticks
        tree.root_pending += d
        tree.cpu_seconds += d / CLK_TCK
        tree.root_cpu_seconds += d / CLK_TCK
        return {tree.keys[2]: d / CLK_TCK / dt} if dt > 0 else {}

    def _read_tree(self, tree: _Tree, dt: float, with_io: bool) -> Row:
        """Every member of the tree: its CPU, max member, members, blocked over the time
        since the last full read (a second, or a tick for a tree that is its root alone),
        the root's CPU over the last tick."""
        first = not tree.members
        members = tree.members
        live: dict[int, _Member] = {}
        cpu_delta = 0
        max_member = 0
        root_delta = 0
        io_delta = {"read_bytes": 0, "rchar": 0, "write_bytes": 0}
        blocked = 0
        rss = 0
        for pid in tree.pids:
            st = self._stat(pid, keep_open=True)  # every tick: kept open (paths.ProcFile)
            prev = members.get(pid)
            if st is None:
                if prev is not None and os.path.exists(self.ctx.paths.proc(str(pid))):
                    # Alive but unreadable this time: keep its last reading, so that it is
                    # not taken for a newborn (all its CPU at once) when it reads again.
                    live[pid] = prev
                continue  # else exited since discovery

            if with_io or prev is None:
                io_text = read_optional(self.ctx.paths.proc(str(pid), "io"))
                if io_text is None and os.path.exists(self.ctx.paths.proc(str(pid))):
                    self.log_once(30, "io_denied",
                                  "cannot read /proc/%d/io (needs CAP_SYS_PTRACE for other "
                                  "users' processes); storage attribution is incomplete", pid)
                io = parse_proc_io(io_text) if io_text else None
            else:
                io = None  # read on slow ticks: attribution needs no 10 Hz resolution
            if prev is not None and prev.start_ticks == st.start_ticks:
                d = max(st.cpu_ticks - prev.cpu_ticks, 0)
                if io is not None and prev.io:
                    for k in io_delta:
                        io_delta[k] += max(io.get(k, 0) - prev.io.get(k, 0), 0)
                # The same process: its record is updated, not made again every tick.
                prev.cpu_ticks = st.cpu_ticks
                if io is not None:
                    prev.io = io
                m = prev
            else:
                m = _Member(st.start_ticks, st.cpu_ticks, io if io is not None else
                            (prev.io if prev is not None else None))
                if not first:
                    # Born since the last tick (a new worker): all its work is new.
                    d = st.cpu_ticks
                    if io:
                        for k in io_delta:
                            io_delta[k] += io.get(k, 0)
                else:
                    d = 0
            cpu_delta += d
            max_member = max(max_member, d)
            if pid == tree.root:
                root_delta = d
            blocked += st.state == "D"
            rss += st.rss_bytes
            live[pid] = m
        tree.members = live
        tree.cpu_seconds += cpu_delta / CLK_TCK
        tree.root_cpu_seconds += root_delta / CLK_TCK
        # Since the last full read: the workers' ticks are, the root's add its fast ticks'.
        since = self._last_t - tree.full_t if tree.full_t and self._last_t > tree.full_t \
            else dt
        tree.full_t = self._last_t
        tree_delta = cpu_delta + tree.root_pending
        max_member = max(max_member, root_delta + tree.root_pending)
        tree.root_pending = 0
        tree.read_bytes += io_delta["read_bytes"]
        tree.rchar += io_delta["rchar"]
        tree.write_bytes += io_delta["write_bytes"]
        tree.blocked = blocked
        tree.rss_bytes = rss
        if dt <= 0 or first:
            if with_io:
                tree.io_t = self._last_t
            return {}
        k = tree.keys
        row = {
            k[0]: tree_delta / CLK_TCK / since,
            k[1]: max_member / CLK_TCK / since,
            k[2]: root_delta / CLK_TCK / dt,
            k[3]: float(len(live)),
            k[4]: float(blocked),
        }
        if with_io:
            io_dt = self._last_t - tree.io_t if tree.io_t else 0.0
            tree.io_t = self._last_t
            if io_dt > 0:
                row[k[5]] = io_delta["read_bytes"] / io_dt
                row[k[6]] = io_delta["rchar"] / io_dt
        return row

    def meta(self) -> dict:
        procs = {}
        for t in list(self._trees.values()):
            a = t.attribution
            procs[str(t.root)] = {"gpus": list(t.gpus), "comm": t.comm,
                                  "systemd_unit": a.systemd_unit, "container_id": a.container_id,
                                  "pod_uid": a.pod_uid, "slurm_job_id": a.slurm_job_id, **t.k8s}
        return {"processes": procs}

    def series(self) -> list[Series]:
        """Per job: the sums over its trees, counters including its ended trees. Per GPU and
        job: the CPU and members of the job's trees on that GPU (a tree that holds several
        GPUs counts under its first), so that one rank's loader is seen apart from the
        job's mean tree."""
        retired = self._retired
        jobs: dict[tuple, dict[str, float]] = {}
        per_gpu: dict[tuple, list[float]] = {}  # (gpu, job) -> [cpu, root cpu, members]
        for t in list(self._trees.values()):
            j = jobs.setdefault(t.job, dict.fromkeys(
                _COUNTERS + ("trees", "members", "blocked", "rss_bytes"), 0.0))
            for k in _COUNTERS + ("blocked", "rss_bytes"):
                j[k] += getattr(t, k)
            j["trees"] += 1
            j["members"] += len(t.members)
            pg = per_gpu.setdefault((_gpu_of(t), t.job), [0.0, 0.0, 0.0])
            pg[0] += t.cpu_seconds
            pg[1] += t.root_cpu_seconds
            pg[2] += len(t.members)
        out: list[Series] = []
        for job in sorted(set(jobs) | set(retired)):
            j = jobs.get(job)
            counters = dict.fromkeys(_COUNTERS, 0.0)
            for ended in (retired[job][0].values() if job in retired else ()):
                for k in _COUNTERS:
                    counters[k] += ended[k]
            if j is not None:
                for k in _COUNTERS:
                    counters[k] += j[k]
            out += [
                ("agentd_process_cpu_seconds_total", job, counters["cpu_seconds"]),
                ("agentd_process_root_cpu_seconds_total", job, counters["root_cpu_seconds"]),
                ("agentd_process_read_bytes_total", job, float(counters["read_bytes"])),
                ("agentd_process_read_chars_total", job, float(counters["rchar"])),
                ("agentd_process_written_bytes_total", job, float(counters["write_bytes"])),
            ]
            if j is not None:
                out += [
                    ("agentd_process_trees", job, j["trees"]),
                    ("agentd_process_members", job, j["members"]),
                    ("agentd_process_blocked", job, j["blocked"]),
                    ("agentd_process_resident_memory_bytes", job, j["rss_bytes"]),
                ]
        uuids = self.ctx.shared.gpu_uuids
        keys = set(per_gpu) | {(g, job) for job, (by, _) in retired.items() for g in by}
        for g, job in sorted(keys):
            if g < 0:
                continue  # a tree matched by name that holds no GPU
            ended = retired[job][0].get(g) if job in retired else None
            live = per_gpu.get((g, job))
            cpu = (ended["cpu_seconds"] if ended else 0.0) + (live[0] if live else 0.0)
            root = (ended["root_cpu_seconds"] if ended else 0.0) + (live[1] if live else 0.0)
            labels = (str(g), uuids.get(g, "")) + job
            out += [("agentd_gpu_process_cpu_seconds_total", labels, cpu),
                    ("agentd_gpu_process_root_cpu_seconds_total", labels, root)]
            if live is not None:
                out.append(("agentd_gpu_process_members", labels, live[2]))
        return out
