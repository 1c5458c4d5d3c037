"""`agentd probe`: measure the parts asked for within a time budget, show progress, write the
state file, and say what could not be measured.

Exit status (agentd/exitcodes.py): 0 every part measured; 2 usage error; 3 a part (or one
device or GPU of it) could not be measured: what was measured is still written and the
failure named; 4 the state file cannot be written; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import threading
import time

from agentd.exitcodes import INTERRUPTED, OK as EXIT_OK, OUTPUT as EXIT_WRITE, \
    SOURCE as EXIT_PARTIAL, USAGE as EXIT_USAGE
from agentd.probe import state as S

DEFAULT_BUDGET = 50.0  # seconds of measuring; start-up and imports come on top
H2D_SHARE = 0.3  # of the budget, when a CUDA runtime measures copies


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default=None,
                   help="what to measure, comma-separated (default storage,h2d,cpu)")
    p.add_argument("--state-file", default=S.DEFAULT_STATE_FILE, metavar="FILE",
                   help=f"where to write the ceilings (default {S.DEFAULT_STATE_FILE})")
    p.add_argument("--budget", default=f"{DEFAULT_BUDGET:g}s", metavar="DURATION",
                   help=f"time for all measurements (default {DEFAULT_BUDGET:g}s)")
    g = p.add_argument_group("storage")
    g.add_argument("--storage", action="append", default=[], metavar="PATH",
                   help="a directory on the device to measure (repeatable); a test file is "
                   "written there and removed")
    g.add_argument("--raw-device", action="store_true",
                   help="read the block device itself (read-only) instead of a test file")
    g.add_argument("--storage-method", choices=("auto", "fio", "threads"), default="auto",
                   help="fio when installed (auto), or our own O_DIRECT reader threads")
    g.add_argument("--file-size", default="1G", metavar="SIZE",
                   help="test file size (default 1G; 512M, 4G, ...)")
    g.add_argument("--queue-depths", default="1,8,32", metavar="N,N,...",
                   help="queue depths to read at (default 1,8,32)")
    g = p.add_argument_group("host-to-device copies")
    g.add_argument("--fake-nvml", dest="fake_nvml", metavar="SCENARIO",
                   help="fake GPUs (their nominal link rates), for machines without one")
    g = p.add_argument_group("CPU")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--pid", type=int, help="the trainer's process (default: this one)")
    src.add_argument("--cgroup", metavar="PATH",
                     help="the trainer's cgroup (/system.slice/train.service or a directory "
                     "under /sys/fs/cgroup)")
    p.add_argument("--json", action="store_true", help="print the document written, as JSON")
    p.add_argument("--dry-run", action="store_true", help="measure and print; write nothing")


class UsageError(ValueError):
    pass


def parse_size(text: str) -> int:
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", str(text), re.I)
    if not m:
        raise UsageError(f"--file-size: {text!r} is not a size (e.g. 512M, 1G)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


class Progress:
    """A bar on a terminal (stderr), redrawn by a thread; elsewhere one line per step."""

    def __init__(self, stream, budget: float):
        self.stream = stream
        self.tty = stream.isatty()
        self.budget = budget
        self.t0 = time.monotonic()
        self.label = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if self.tty:
            self._thread = threading.Thread(target=self._draw_loop, daemon=True)
            self._thread.start()

    def step(self, label: str) -> None:
        with self._lock:
            self.label = label
        if self.tty:
            self._draw()
        else:
            self.stream.write(f"agentd probe: {label}\n")
            self.stream.flush()

    def _draw_loop(self) -> None:
        while not self._stop.wait(0.2):
            self._draw()

    def _draw(self) -> None:
        elapsed = time.monotonic() - self.t0
        done = int(min(elapsed / self.budget, 1.0) * 30) if self.budget else 30
        with self._lock:
            self.stream.write(f"\rprobe [{'#' * done:<30}] {elapsed:4.0f}/{self.budget:.0f} s "
                              f"{self.label[:50]:<50}")
            self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()


def _si(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.2f} {prefix}{unit}"
    return f"{v:.0f} {unit}"


def summary(doc: dict, parts: tuple[str, ...]) -> str:
    lines = []
    if "storage" in parts:
        for dev, e in doc.get("storage", {}).items():
            lines.append(
                f"storage  {dev} ({', '.join(e.get('paths', []))}): sequential "
                f"{_si(e.get('seq_read_bytes_per_second'), 'B/s')}, random "
                f"{e['block_bytes']['rand'] // 1024} KiB {_si(e.get('rand_read_iops'), 'IOPS')}"
                f" ({_si(e.get('rand_read_bytes_per_second'), 'B/s')}) [{e.get('method')}]")
            for qd, q in sorted(e.get("by_queue_depth", {}).items(), key=lambda kv: int(kv[0])):
                lines.append(f"           queue depth {qd:>3}: sequential "
                             f"{_si(q.get('seq_read_bytes_per_second'), 'B/s')}, random "
                             f"{_si(q.get('rand_read_iops'), 'IOPS')}")
    if "h2d" in parts:
        for gpu, e in doc.get("h2d", {}).items():
            lines.append(f"h2d      GPU {gpu} ({e.get('uuid', '')}): pinned "
                         f"{_si(e.get('pinned_bytes_per_second'), 'B/s')}, pageable "
                         f"{_si(e.get('pageable_bytes_per_second'), 'B/s')}, link "
                         f"{_si(e.get('link_bytes_per_second'), 'B/s')} ({e['source']})")
        if not doc.get("h2d"):
            lines.append("h2d      no GPU")
    if "cpu" in parts and doc.get("cpu"):
        c = doc["cpu"]
        quota = f"quota {c['quota_cores']:g} cores" if c.get("quota_cores") else "no quota"
        lines.append(f"cpu      {c['cores']:g} cores (cpuset {c['cpuset']}, {quota}) for cgroup "
                     f"{c.get('cgroup') or '?'}")
    return "\n".join(lines) + "\n"


def _measure_storage(args, budget: float, progress: Progress, failures: list[str]) -> dict:
    from agentd.probe import storage as ST
    from agentd.probe.blockdev import NoBlockDevice, block_device

    depths = tuple(int(x) for x in args.queue_depths.split(","))
    devices: dict[str, list[str]] = {}
    for path in args.storage:
        try:
            dev = block_device(path)
        except NoBlockDevice as e:
            failures.append(f"storage: {e}: not measured")
            continue
        devices.setdefault(dev.name, []).append(os.path.abspath(path))
    out: dict[str, dict] = {}
    if not devices:
        return out
    try:
        rdr = ST.reader(args.storage_method)
    except ST.StorageError as e:
        failures.append(f"storage: {e}")
        return out
    deadline = time.monotonic() + budget
    for i, (name, dev_paths) in enumerate(devices.items()):
        share = (deadline - time.monotonic()) / (len(devices) - i)
        target = None
        try:
            if args.raw_device:
                target = ST.device_target(name)
            else:
                directory = dev_paths[0] if os.path.isdir(dev_paths[0]) else \
                    os.path.dirname(dev_paths[0])
                progress.step(f"storage {name}: writing a test file")
                target = ST.create_test_file(directory, args.file_size,
                                             time.monotonic() + share * 0.25)
            runs = len(depths) * 2
            # Per run: the ramp and about half a second of start-up on top of the measurement.
            left = deadline - time.monotonic() - (len(devices) - i - 1) * share
            seconds = max(1.0, min(10.0, left / runs - ST.RAMP_SECONDS - 0.5))
            entry = ST.measure(target, ST.plan(seconds, depths), rdr, on_run=lambda s: (
                progress.step(f"storage {name}: {'sequential' if s.pattern == 'seq' else 'random'}"
                              f" reads, queue depth {s.queue_depth}")))
            entry["paths"] = dev_paths
            entry["measured_at"] = time.time()
            out[name] = entry
        except ST.StorageError as e:
            failures.append(f"storage: {name}: {e}")
        finally:
            if target is not None and target.created:
                try:
                    os.unlink(target.path)
                except OSError:
                    pass
    return out


def _measure_h2d(args, budget: float, progress: Progress, failures: list[str]) -> dict:
    from agentd.probe import h2d

    progress.step("h2d: looking for GPUs")
    gpus = h2d.nvml_gpus()
    rt = h2d.runtime() if gpus and not args.fake_nvml else None
    out, errs = h2d.measure(gpus, rt, budget, on_step=lambda s: progress.step(f"h2d: {s}"))
    failures += errs
    now = time.time()
    for e in out.values():
        e["measured_at"] = now
    return out


def _measure_cpu(args, failures: list[str]) -> dict | None:
    from agentd.probe import cpu

    try:
        entry = cpu.measure(pid=args.pid, cgroup=args.cgroup)
    except cpu.CpuError as e:
        failures.append(f"cpu: {e}")
        return None
    entry["measured_at"] = time.time()
    return entry


def _guarded(part: str, failures: list[str], fn, *args):
    """A part's result; an unexpected fault is that part's failure, not the others'."""
    try:
        return fn(*args)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        failures.append(f"{part}: {type(e).__name__}: {e}")
        return None


def main(args: argparse.Namespace) -> int:
    from agentd.daemon.config import ConfigError, parse_duration

    try:
        explicit = args.parts is not None
        parts = tuple(p.strip() for p in (args.parts or ",".join(S.PARTS)).split(",")
                      if p.strip())
        unknown = [p for p in parts if p not in S.PARTS]
        if unknown or not parts:
            raise UsageError(f"--parts: unknown part {unknown[0]!r} (known: "
                             f"{', '.join(S.PARTS)})" if unknown else "--parts: none given")
        budget = parse_duration(args.budget, "--budget")
        args.file_size = parse_size(args.file_size)
        try:
            depths = [int(x) for x in args.queue_depths.split(",")]
        except ValueError:
            depths = []
        if not depths or any(not 1 <= d <= 1024 for d in depths):
            raise UsageError("--queue-depths: expected numbers from 1 to 1024, e.g. 1,8,32")
        if "storage" in parts and not args.storage and explicit:
            raise UsageError("--parts storage needs --storage PATH (a directory on the disk "
                             "that holds your data)")
        for path in args.storage:
            if not os.path.exists(path):
                raise UsageError(f"--storage {path}: no such file or directory")
        if args.pid is not None and not os.path.exists(f"/proc/{args.pid}"):
            raise UsageError(f"--pid {args.pid}: no such process")
        if args.fake_nvml:
            from agentd.gpu.fake import ScenarioError, install, load_scenario

            try:
                install(load_scenario(args.fake_nvml))
            except ScenarioError as e:
                raise UsageError(str(e)) from None
    except (UsageError, ConfigError) as e:
        print(f"agentd probe: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not args.dry_run:
        try:
            S.check_writable(args.state_file)
        except S.StateWriteError as e:
            print(f"agentd probe: {e}", file=sys.stderr)
            return EXIT_WRITE
    failures: list[str] = []
    notes: list[str] = []
    new: dict = {"version": S.VERSION, "measured_at": time.time(), "host": socket.gethostname()}
    progress = Progress(sys.stderr, budget)
    t_end = time.monotonic() + budget
    try:
        if "cpu" in parts:
            progress.step("cpu: reading the cgroup")
            cpu_entry = _guarded("cpu", failures, _measure_cpu, args, failures)
            if cpu_entry is not None:
                new["cpu"] = cpu_entry
        if "h2d" in parts:
            share = budget * H2D_SHARE if "storage" in parts and args.storage else \
                t_end - time.monotonic()
            new["h2d"] = _guarded("h2d", failures, _measure_h2d, args, share, progress,
                                  failures) or {}
        if "storage" in parts:
            if args.storage:
                new["storage"] = _guarded("storage", failures, _measure_storage, args,
                                          max(t_end - time.monotonic(), 6.0), progress,
                                          failures) or {}
            else:
                notes.append("storage: not measured: give --storage PATH (a directory on "
                             "the disk that holds your training data)")
    except KeyboardInterrupt:
        progress.close()
        print("agentd probe: interrupted; nothing written", file=sys.stderr)
        return INTERRUPTED
    finally:
        progress.close()
    measured = tuple(p for p in parts if p != "storage" or args.storage)
    old = None
    if not args.dry_run:
        try:
            old = S.load(args.state_file)
        except FileNotFoundError:
            old = None
        except S.StateError as e:
            notes.append(f"{e}; replaced")
    doc = S.merge(old, new, measured)
    sys.stdout.write(summary(doc, parts))
    for n in notes:
        print(f"agentd probe: {n}", file=sys.stderr)
    for f in failures:
        print(f"agentd probe: {f}", file=sys.stderr)
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    if not args.dry_run:
        try:
            S.write(args.state_file, doc)
        except S.StateWriteError as e:
            print(f"agentd probe: {e}", file=sys.stderr)
            return EXIT_WRITE
        print(f"agentd probe: written to {args.state_file}; a running agentd reads it on "
              "SIGHUP (systemctl reload agentd)", file=sys.stderr)
    return EXIT_PARTIAL if failures else EXIT_OK
