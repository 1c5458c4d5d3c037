"""Storage read ceilings: sequential and random O_DIRECT reads at several queue depths.

fio's method, with fio when it is installed (`fio --direct=1 --output-format=json`, libaio,
else io_uring, else psync jobs), and otherwise with our own reader: worker processes whose
threads each keep one read in flight (`os.preadv` on an O_DIRECT descriptor into a
page-aligned buffer), queue depth = threads in all. Several processes rather than one, so
that one interpreter lock does not cap the IOPS it can keep in flight (on this project's VM
one process reaches ~70% of fio's 4 KiB IOPS at depth 32, four processes ~90%).

O_DIRECT keeps the page cache out of every figure. By default the reads go to a test file
written in the directory named (pseudo-random data, so compressing or deduplicating drives
cannot shortcut it), removed afterwards; `--raw-device` reads the block device itself,
read-only. Each run is time-based with a ramp (warm-up) that is not counted.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

SEQ_BLOCK = 1 << 20
RAND_BLOCK = 4096
QUEUE_DEPTHS = (1, 8, 32)
RAMP_SECONDS = 0.5
MIN_FILE = 64 << 20
TEST_FILE = ".agentd-probe.dat"


class StorageError(Exception):
    """A device could not be measured (one line)."""


@dataclass(frozen=True)
class Target:
    path: str  # the file or device read
    size: int  # bytes that may be read
    created: bool  # a test file we wrote (and remove)


@dataclass(frozen=True)
class RunSpec:
    pattern: str  # "seq" or "rand"
    queue_depth: int
    block: int
    seconds: float  # measured time, after the ramp


@dataclass(frozen=True)
class Result:
    bytes_per_second: float
    iops: float


# --- the target ------------------------------------------------------------------------------

def _aligned(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size)  # anonymous mappings are page-aligned


def create_test_file(directory: str, size: int, deadline: float) -> Target:
    """Write a test file of up to `size` bytes in `directory` with O_DIRECT (never through the
    page cache), stopping early at `deadline` (monotonic); at least MIN_FILE is needed."""
    import numpy as np

    path = os.path.join(directory, TEST_FILE)
    try:
        st = os.statvfs(directory)
    except OSError as e:
        raise StorageError(f"cannot use {directory}: {e.strerror}") from None
    free = st.f_bavail * st.f_frsize
    try:
        existing = os.path.getsize(path)
    except OSError:
        existing = 0
    size = min(size, free + existing - (1 << 30))  # leave a GiB for everyone else
    size -= size % SEQ_BLOCK
    if size < MIN_FILE:
        raise StorageError(f"{directory} has too little free space for a test file "
                           f"({free >> 20} MiB free)")
    if existing >= size:  # left by an earlier run that was interrupted: fully written
        return Target(path, existing - existing % SEQ_BLOCK, True)
    chunk = 4 << 20
    buf = _aligned(chunk)
    words = np.frombuffer(buf, dtype=np.uint64).reshape(chunk // 4096, 512)
    words[:] = np.random.default_rng().integers(0, 2**63, size=words.shape, dtype=np.uint64)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as e:
        raise StorageError(f"cannot create a test file in {directory}: {e.strerror}") from None
    written = 0
    try:
        while written < size:
            # Each 4 KiB block differs from every other, defeating deduplication.
            words[:, 0] = np.arange(written // 4096, written // 4096 + len(words),
                                    dtype=np.uint64)
            n = os.pwritev(fd, [buf], written)
            if n <= 0:
                break
            written += n
            if time.monotonic() > deadline and written >= MIN_FILE:
                break
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise StorageError(f"cannot write a test file in {directory}: {e.strerror}") from None
    os.close(fd)
    written -= written % SEQ_BLOCK
    os.truncate(path, written)
    return Target(path, written, True)


def device_target(name: str, sysfs: str = "/sys") -> Target:
    """The raw block device /dev/NAME, read-only."""
    try:
        with open(os.path.join(sysfs, "class", "block", name.replace("/", "!"), "size")) as f:
            size = int(f.read()) * 512
    except (OSError, ValueError):
        raise StorageError(f"cannot read the size of /dev/{name}") from None
    return Target(f"/dev/{name}", size - size % SEQ_BLOCK, False)


# --- fio --------------------------------------------------------------------------------------

class FioReader:
    method = "fio"
    ENGINES = ("libaio", "io_uring", "psync")

    def __init__(self, binary: str | None = None):
        self.binary = binary or shutil.which("fio")
        if not self.binary:
            raise StorageError("fio is not installed")
        self._engine: str | None = None

    def _command(self, target: Target, run: RunSpec, engine: str) -> list[str]:
        cmd = [self.binary, "--name=agentd-probe", f"--filename={target.path}", "--readonly",
               "--direct=1", "--rw=" + ("read" if run.pattern == "seq" else "randread"),
               f"--bs={run.block}", f"--ioengine={engine}", "--time_based",
               f"--runtime={max(run.seconds, 0.5):.3f}s", f"--ramp_time={RAMP_SECONDS}s",
               "--norandommap", "--randrepeat=0", "--output-format=json"]
        if target.created:
            cmd.append(f"--size={target.size}")
        if engine == "psync":
            cmd += [f"--numjobs={run.queue_depth}", "--group_reporting"]
        else:
            cmd.append(f"--iodepth={run.queue_depth}")
        return cmd

    def run(self, target: Target, run: RunSpec) -> Result:
        engines = [self._engine] if self._engine else list(self.ENGINES)
        last = ""
        for engine in engines:
            try:
                p = subprocess.run(self._command(target, run, engine), capture_output=True,
                                   text=True, timeout=run.seconds + RAMP_SECONDS + 30)
            except subprocess.TimeoutExpired:
                raise StorageError(f"fio did not finish reading {target.path}") from None
            result, last = _parse_fio(p.stdout, p.stderr, p.returncode)
            if result is not None:
                self._engine = engine
                return result
        raise StorageError(f"fio failed on {target.path}: {last}")


def _parse_fio(stdout: str, stderr: str, rc: int) -> tuple[Result | None, str]:
    """(the result, or None and why) from fio's JSON output; fio may print warnings first."""
    start = stdout.find("{")
    why = (stderr.strip().splitlines() or [f"exit status {rc}"])[-1]
    if start < 0:
        return None, why
    try:
        job = json.loads(stdout[start:])["jobs"][0]
        read = job["read"]
        if job.get("error"):
            return None, f"error {job['error']}: {why}"
        return Result(float(read["bw_bytes"]), float(read["iops"])), ""
    except (ValueError, KeyError, IndexError, TypeError):
        return None, why


# --- our own reader ---------------------------------------------------------------------------

def _reader_main() -> None:
    """A worker process (`python -c`): a thread per slot, each with one O_DIRECT read in
    flight. Reads its task as one JSON line on stdin, prints "ready", waits for the start
    line (the end of the ramp and the stop, monotonic seconds), then prints
    [ops, bytes, error] for the reads completed between the two."""
    import sys

    task = json.loads(sys.stdin.readline())
    path, size, block, depth = task["path"], task["size"], task["block"], task["depth"]
    slots, pattern = task["slots"], task["pattern"]
    counts = {s: [0, 0] for s in slots}
    errors: list[str] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        print(json.dumps([0, 0, f"cannot open {path} with O_DIRECT: {e.strerror}"]), flush=True)
        return
    blocks = size // block
    buffers = {s: _aligned(block) for s in slots}
    times: list[float] = []

    def reader(slot: int) -> None:
        buf = buffers[slot]
        rng = random.Random(slot * 7919 + os.getpid())
        ramp_end, stop_at = times
        i = 0
        c = counts[slot]
        try:
            while True:
                if pattern == "seq":
                    offset = ((slot + i * depth) % blocks) * block
                    i += 1
                else:
                    offset = rng.randrange(blocks) * block
                n = os.preadv(fd, [buf], offset)
                now = time.monotonic()
                if now >= stop_at:
                    return
                if now >= ramp_end:
                    c[0] += 1
                    c[1] += n
        except OSError as e:
            errors.append(f"reading {path}: {e.strerror}")

    threads = [threading.Thread(target=reader, args=(s,), daemon=True) for s in slots]
    print("ready", flush=True)
    line = sys.stdin.readline()
    if not line:
        return
    times.extend(json.loads(line))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.close(fd)
    print(json.dumps([sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values()),
                      errors[0] if errors else ""]), flush=True)


class ThreadReader:
    method = "threads"

    def __init__(self, processes: int | None = None):
        self.processes = processes or max(4, os.cpu_count() or 1)

    @staticmethod
    def _line(p: subprocess.Popen, deadline: float, path: str) -> str:
        import select

        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageError(f"a reader of {path} did not answer")
            ready, _, _ = select.select([p.stdout], [], [], left)
            if ready:
                line = p.stdout.readline()
                if not line:
                    err = p.stderr.read().strip().splitlines() if p.stderr else []
                    raise StorageError(f"a reader of {path} died"
                                       + (f": {err[-1]}" if err else ""))
                return line.strip()

    def run(self, target: Target, run: RunSpec) -> Result:
        import sys

        nproc = min(run.queue_depth, self.processes)
        procs: list[subprocess.Popen] = []
        try:
            for k in range(nproc):
                # Our own interpreter, not multiprocessing: a spawned child would re-import
                # whatever script started the probe.
                p = subprocess.Popen(
                    [sys.executable, "-c",
                     "from agentd.probe.storage import _reader_main; _reader_main()"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True, bufsize=1)
                p.stdin.write(json.dumps({
                    "path": target.path, "size": target.size, "block": run.block,
                    "depth": run.queue_depth, "pattern": run.pattern,
                    "slots": list(range(k, run.queue_depth, nproc))}) + "\n")
                p.stdin.flush()
                procs.append(p)
            # The clock starts once every worker is up (an interpreter costs ~0.1 s).
            deadline = time.monotonic() + 60
            for p in procs:
                msg = self._line(p, deadline, target.path)
                if msg != "ready":
                    raise StorageError(json.loads(msg)[2])
            t0 = time.monotonic() + 0.05
            times = [t0 + RAMP_SECONDS, t0 + RAMP_SECONDS + run.seconds]
            for p in procs:
                p.stdin.write(json.dumps(times) + "\n")
                p.stdin.flush()
            ops = nbytes = 0
            deadline = times[1] + 30
            for p in procs:
                n, b, err = json.loads(self._line(p, deadline, target.path))
                if err:
                    raise StorageError(err)
                ops += n
                nbytes += b
        finally:
            for p in procs:
                try:
                    p.stdin.close()
                except OSError:
                    pass
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                for f in (p.stdout, p.stderr):
                    f.close()
        return Result(nbytes / run.seconds, ops / run.seconds)


def reader(method: str = "auto"):
    """The reader to use: fio when installed (auto), else our threads."""
    if method in ("auto", "fio") and shutil.which("fio"):
        return FioReader()
    if method == "fio":
        raise StorageError("fio is not installed (use --storage-method threads)")
    return ThreadReader()


# --- one device -------------------------------------------------------------------------------

def plan(seconds_per_run: float, depths: tuple[int, ...] = QUEUE_DEPTHS) -> list[RunSpec]:
    return [RunSpec(p, qd, SEQ_BLOCK if p == "seq" else RAND_BLOCK, seconds_per_run)
            for p in ("seq", "rand") for qd in depths]


def measure(target: Target, runs: list[RunSpec], rdr, on_run=None) -> dict:
    """The device's entry in the state file: each run's figures by queue depth, and the best
    over depths as the ceiling. `on_run(spec)` is called before each run (progress)."""
    by_qd: dict[str, dict] = {}
    for spec in runs:
        if on_run is not None:
            on_run(spec)
        r = rdr.run(target, spec)
        q = by_qd.setdefault(str(spec.queue_depth), {})
        if spec.pattern == "seq":
            q["seq_read_bytes_per_second"] = r.bytes_per_second
        else:
            q["rand_read_bytes_per_second"] = r.bytes_per_second
            q["rand_read_iops"] = r.iops

    def best(key: str) -> float | None:
        values = [q[key] for q in by_qd.values() if key in q]
        return max(values) if values else None

    return {
        "source": "measured",
        "seq_read_bytes_per_second": best("seq_read_bytes_per_second"),
        "rand_read_bytes_per_second": best("rand_read_bytes_per_second"),
        "rand_read_iops": best("rand_read_iops"),
        "block_bytes": {"seq": SEQ_BLOCK, "rand": RAND_BLOCK},
        "by_queue_depth": by_qd,
        "method": rdr.method,
        "seconds_per_run": runs[0].seconds if runs else None,
        "target": "device" if not target.created else "file",
        "bytes_readable": target.size,
    }
