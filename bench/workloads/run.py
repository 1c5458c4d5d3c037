"""Check agentd against real input pipelines whose stall they time themselves.

Each case (cases.py) runs a real trainer (trainer.py) with a real multi-process loader
(loader.py) over real JPEG files on the real disk (dataset.py), under real kernel limits
where the case needs them (cgroups.py). While it runs, `agentd record` samples the node with
its real samplers; then `agentd diagnose --recording` judges the recording. The case passes
when agentd names the class the case was built to have (healthy: no finding at warning or
above) and its stall fraction is within 5 points of the trainer's own measurement.

Without a GPU the trainer's "GPU" is a stand-in whose kernels and copies it publishes to a
feed that agentd's fake NVML reads (agentd/gpu/fake/trainer.py); with CUDA (torch) the
trainer runs real kernels and agentd reads the real driver.

    python bench/workloads/run.py --list
    python bench/workloads/run.py NAME [NAME ...] [--seconds N] [--json]
    python bench/workloads/run.py --all

Exit status: 0 every case run passed; 1 a case failed; 2 usage error; 3 a case could not
run. A case whose limits need root or a cgroup controller this machine lacks is skipped and
says why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cgroups  # noqa: E402
import dataset  # noqa: E402
from cases import BY_NAME, CASES, Case  # noqa: E402

SEVERE = ("warning", "critical")
STALL_TOLERANCE = 0.05


class CaseError(Exception):
    """The case could not run (one line)."""


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def agentd(*args: str) -> list[str]:
    return [sys.executable, "-m", "agentd", *args]


# --- the pieces of a run ----------------------------------------------------------------------

def probe(state_file: str, parts: str, extra: list[str], procs: list[str] | None = None,
          budget: str = "10s") -> str:
    """Run `agentd probe` (inside the case's cgroups when given, so it measures what the
    trainer can have); returns its complaint, or ""."""
    cmd = agentd("probe", "--parts", parts, "--state-file", state_file, "--budget", budget,
                 "--file-size", "256M", *extra)
    if procs:
        # Join the groups first, then become the probe: its readers inherit the limits.
        cmd = [sys.executable, "-c",
               "import os, sys\n"
               "for p in sys.argv[1].split(','):\n"
               "    open(p, 'w').write(str(os.getpid()))\n"
               "os.execv(sys.argv[2], sys.argv[2:])", ",".join(procs), *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if p.returncode not in (0, 3):
        return (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
    return ""


def scenario(path: str, feed: str) -> None:
    with open(path, "w") as f:
        f.write("description = \"one GPU driven by a bench/workloads trainer\"\n"
                "[[gpus]]\ncount = 1\n"
                f"trainer_feed = {json.dumps(feed)}\n"
                "memory_total_bytes = 85520809984\n")


def read_steps(path: str) -> tuple[list[tuple[float, ...]], list[tuple[float, float]]]:
    steps, ckpts = [], []
    with open(path) as f:
        for line in f:
            p = line.split()
            if p and p[0] == "s" and len(p) == 5:
                steps.append(tuple(float(x) for x in p[1:]))
            elif p and p[0] == "c" and len(p) == 3:
                ckpts.append((float(p[1]), float(p[2])))
    return steps, ckpts


def _overlap(a: float, b: float, lo: float, hi: float) -> float:
    return max(min(b, hi) - max(a, lo), 0.0)


def trainer_truth(steps, ckpts, t0: float, t1: float) -> dict:
    """What the trainer measured over [t0, t1]: the share of (non-checkpoint) time it was
    blocked on the next batch and its copy, and the share its device was busy."""
    window = t1 - t0
    blocked = sum(_overlap(s[0], s[2], t0, t1) for s in steps)
    busy = sum(_overlap(s[2], s[3], t0, t1) for s in steps)
    ckpt = sum(_overlap(a, b, t0, t1) for a, b in ckpts)
    inside = [s for s in steps if s[0] >= t0 and s[3] <= t1]
    return {
        "stall_fraction": blocked / max(window - ckpt, 1e-9),
        "busy_fraction": busy / window,
        "checkpoint_fraction": ckpt / window,
        "steps": len(inside),
        "step_seconds": (sum(s[3] - s[0] for s in inside) / len(inside)) if inside else None,
    }


def recording_facts(path: str, trainer_pid: int) -> dict:
    """What agentd recorded: the window, the GPU's mean busy share, the trainer's tree."""
    import numpy as np

    from agentd.diagnose.sources.recording import RecordingSource

    sig = RecordingSource(path).read()
    busy = sig.get("gpu.busy_time", "0")
    if busy is None:
        busy = sig.get("gpu.busy", "0")
    members = sig.get("proc.members", str(trainer_pid))
    procs = sig.meta.get("processes", {})
    return {
        "t0": float(sig.t[0] - sig.resolution), "t1": float(sig.t[-1]),
        "gpu_busy_fraction": float(np.nanmean(busy)) if busy is not None else None,
        "trainer_tree_seen": str(trainer_pid) in procs,
        "trainer_tree_members": int(np.nanmax(members)) if members is not None and
        np.isfinite(members).any() else 0,
    }


def diagnose(recording: str, state_file: str | None) -> dict:
    cmd = agentd("diagnose", "--recording", recording, "--json")
    if state_file:
        cmd += ["--state-file", state_file]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode not in (0, 1):
        raise CaseError("agentd diagnose failed: " + (p.stderr.strip().splitlines() or
                                                       [f"exit {p.returncode}"])[-1])
    return json.loads(p.stdout)


def agentd_summary(report: dict) -> dict:
    findings = report.get("findings", [])
    stalls = [g["stall"] for g in report.get("gpus", []) if g.get("stall") is not None]
    return {
        "kinds": [f["kind"] for f in findings],
        "stall_fraction": sum(stalls) / len(stalls) if stalls else None,
        "findings": [{"kind": f["kind"], "severity": f["severity"],
                      "stall_fraction": f.get("stall_fraction"),
                      "confidence": f.get("confidence")} for f in findings],
    }


def judge(expected: str | None, summary: dict, measured: float) -> dict:
    severe = [f["kind"] for f in summary["findings"] if f["severity"] in SEVERE]
    if expected is None:
        class_ok = not severe
    else:
        class_ok = bool(severe) and severe[0] == expected
    stall = summary["stall_fraction"]
    stall_ok = stall is not None and abs(stall - measured) <= STALL_TOLERANCE
    return {"class_ok": class_ok, "stall_ok": stall_ok, "pass": class_ok and stall_ok}


def _wait_ready(proc: subprocess.Popen, ready: str, log: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(ready):
        if proc.poll() is not None:
            with open(log) as f:
                tail = f.read().strip().splitlines()[-3:]
            raise CaseError(f"the trainer exited ({proc.returncode}): {' | '.join(tail)}")
        if time.monotonic() > deadline:
            raise CaseError(f"the trainer did not get going within {timeout:.0f} s")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    """End the trainer (it finishes its step and closes its loader), then anything left of
    its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers left behind, if any
    except ProcessLookupError:
        pass
    proc.wait()


# --- one case ---------------------------------------------------------------------------------

class Options:
    def __init__(self, args):
        self.seconds = args.seconds
        self.data_dir = args.data_dir
        self.work_dir = args.work_dir
        self.keep = args.keep
        self.probe = not args.no_probe
        self.state_file = args.state_file
        self.cuda = cuda_available() and not args.stand_in
        self._node_state: str | None = None

    def node_state(self) -> str | None:
        """The node's ceilings (measured once per run, unless given)."""
        if self.state_file:
            return self.state_file
        if not self.probe:
            return None
        if self._node_state is None:
            path = os.path.join(self.work_dir, "ceilings-node.json")
            problem = probe(path, "storage,h2d", ["--storage", self.data_dir])
            self._node_state = path if os.path.exists(path) else ""
            if problem:
                print(f"workloads: agentd probe: {problem}", file=sys.stderr)
        return self._node_state or None


def run_case(case: Case, opts: Options) -> dict:
    from agentd.probe.blockdev import block_device

    seconds = max(opts.seconds, case.min_seconds)
    out: dict = {"case": case.name, "expected": case.expected, "shows": case.shows,
                 "seconds": seconds, "device": "cuda" if opts.cuda else "stand-in",
                 "measured_stall_fraction": None, "agentd": None, "pass": None}
    if case.gpu_only and not opts.cuda:
        out["skipped"] = "needs a CUDA GPU"
        return out
    why = cgroups.unavailable(bool(case.read_bps), case.memory_cache_bytes is not None) \
        if case.read_bps or case.memory_cache_bytes is not None else None
    if why:
        out["skipped"] = why
        return out
    os.makedirs(opts.data_dir, exist_ok=True)
    files = dataset.make(opts.data_dir, case.dataset)
    disk = block_device(opts.data_dir).name
    work = tempfile.mkdtemp(prefix=f"{case.name}-", dir=opts.work_dir)
    group = None
    proc = None
    try:
        if case.read_bps or case.memory_cache_bytes is not None:
            group = cgroups.Group(f"agentd-workload-{case.name}-{os.getpid()}",
                                  read_bps=(disk, case.read_bps) if case.read_bps else None,
                                  memory_bytes=None if case.memory_cache_bytes is None
                                  else 1 << 40).create()
        state = None
        node = opts.node_state()
        if node:
            state = os.path.join(work, "ceilings.json")
            shutil.copy(node, state)
            out["ceilings"] = "given" if opts.state_file else "node probe"
            if group is not None and case.read_bps and not opts.state_file:
                # The trainer's storage ceiling is its cgroup's: measure it from inside.
                problem = probe(state, "storage", ["--storage", opts.data_dir],
                                group.procs_files())
                out["ceilings"] = "storage probed inside the case's cgroup"
                if problem:
                    out.setdefault("notes", []).append(f"agentd probe: {problem}")
        if case.cache == "warm":
            dataset.warm(files)
        else:
            dataset.evict(files)
        out["cached_before"] = round(dataset.cached_fraction(files), 3)
        feed = os.path.join(work, "feed")
        cfg = {
            "files": files, "batch": case.batch, "workers": case.workers,
            "prefetch": case.prefetch, "transform": case.transform,
            "compute_seconds": case.compute_seconds, "pinned": case.pinned,
            "feed": feed, "step_log": os.path.join(work, "steps.log"),
            "ready_file": os.path.join(work, "ready"),
            "ready_after_steps": case.ready_after_steps,
            "checkpoint_every_seconds": case.checkpoint_every_seconds,
            "checkpoint_bytes": case.checkpoint_bytes,
            "checkpoint_path": os.path.join(work, "checkpoint.bin"),
            "stand_in": not opts.cuda,
            "cgroup_procs": group.procs_files() if group else [],
        }
        cfg_path = os.path.join(work, "trainer.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        log_path = os.path.join(work, "trainer.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, "trainer.py"), cfg_path],
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        _wait_ready(proc, cfg["ready_file"], log_path, timeout=180)
        if case.memory_cache_bytes is not None:
            # Room for what the processes hold plus a little page cache: the dataset thrashes.
            usage = group.memory_usage()
            resident = usage.get("rss", usage.get("anon", 0)) + usage.get("mapped_file", 0)
            group.set_memory(int(resident * 1.2) + case.memory_cache_bytes)
            out["memory_limit_bytes"] = int(resident * 1.2) + case.memory_cache_bytes
        if state:
            problem = probe(state, "cpu", ["--pid", str(proc.pid)])
            if problem:
                out.setdefault("notes", []).append(f"agentd probe: {problem}")
        time.sleep(2.0)  # past the start-up transient
        recording = os.path.join(work, "recording.agentd")
        rec = agentd("record", "--out", recording, "--duration", f"{seconds:g}s")
        if not opts.cuda:
            scen = os.path.join(work, "gpu.toml")
            scenario(scen, feed)
            rec += ["--fake-nvml", scen]
        r = subprocess.run(rec, capture_output=True, text=True, timeout=seconds + 120)
        if r.returncode != 0:
            raise CaseError("agentd record failed: " + (r.stderr.strip().splitlines() or
                                                        [f"exit {r.returncode}"])[-1])
        if proc.poll() is not None:
            raise CaseError(f"the trainer exited ({proc.returncode}) during the recording")
        _stop(proc)
        facts = recording_facts(recording, proc.pid)
        steps, ckpts = read_steps(cfg["step_log"])
        truth = trainer_truth(steps, ckpts, facts["t0"], facts["t1"])
        summary = agentd_summary(diagnose(recording, state))
        out.update({
            "measured_stall_fraction": truth["stall_fraction"],
            "agentd": summary,
            "trainer": truth,
            "recording": {k: v for k, v in facts.items() if k not in ("t0", "t1")},
            **judge(case.expected, summary, truth["stall_fraction"]),
        })
        return out
    finally:
        if proc is not None:
            _stop(proc)
        if group is not None:
            group.remove()
        if opts.keep:
            out["work_dir"] = work
        else:
            shutil.rmtree(work, ignore_errors=True)


# --- the command ------------------------------------------------------------------------------

def _pct(v) -> str:
    return "-" if v is None else f"{v * 100:5.1f}%"


def table(results: list[dict]) -> str:
    head = ("case", "expected", "trainer stall", "agentd stall", "agentd findings (warning+)",
            "class", "stall", "result")
    rows = []
    for r in results:
        a = r.get("agentd") or {}
        severe = [f"{f['kind']}" for f in a.get("findings", []) if f["severity"] in SEVERE]
        if r.get("skipped"):
            result = f"skipped: {r['skipped']}"
        elif r.get("error"):
            result = f"error: {r['error']}"
        else:
            result = "PASS" if r["pass"] else "FAIL"
        rows.append((r["case"], r["expected"] or "(healthy)", _pct(r["measured_stall_fraction"]),
                     _pct(a.get("stall_fraction")), ", ".join(severe) or "none",
                     "-" if "class_ok" not in r else ("ok" if r["class_ok"] else "wrong"),
                     "-" if "stall_ok" not in r else ("ok" if r["stall_ok"] else "off"), result))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(head, widths))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines) + "\n"


def available_cases(cuda: bool) -> list[Case]:
    return [c for c in CASES if cuda or not c.gpu_only]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check agentd against real input pipelines.")
    p.add_argument("cases", nargs="*", metavar="NAME")
    p.add_argument("--list", action="store_true", help="print the case names, one a line")
    p.add_argument("--all", action="store_true", help="run every case this machine can run")
    p.add_argument("--seconds", type=float, default=30.0,
                   help="seconds agentd records each case (default 30)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per case (one line each) instead of a table")
    p.add_argument("--data-dir", default="/var/tmp/agentd-workloads",
                   help="where the datasets live, on the disk under test (kept between runs)")
    p.add_argument("--work-dir", default=None, help="where a run's files go (default a "
                   "temporary directory)")
    p.add_argument("--state-file", help="ceilings to diagnose with, instead of probing")
    p.add_argument("--no-probe", action="store_true", help="diagnose without ceilings")
    p.add_argument("--stand-in", action="store_true",
                   help="use the fake GPU even where CUDA is available")
    p.add_argument("--keep", action="store_true", help="keep each case's files (recording, "
                   "step log, trainer log)")
    args = p.parse_args(argv)
    cuda = cuda_available() and not args.stand_in
    names = [c.name for c in available_cases(cuda)]
    if args.list:
        print("\n".join(names))
        return 0
    chosen = names if args.all else args.cases
    unknown = [n for n in chosen if n not in BY_NAME]
    if not chosen or unknown or not args.seconds > 0:
        p.print_usage(sys.stderr)
        why = f"unknown case {unknown[0]!r} (see --list)" if unknown else \
            "--seconds must be positive" if not args.seconds > 0 else "name a case or --all"
        print(f"run.py: error: {why}", file=sys.stderr)
        return 2
    own_work = args.work_dir is None
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="agentd-workloads-")
    os.makedirs(args.work_dir, exist_ok=True)
    opts = Options(args)
    results = []
    try:
        for name in chosen:
            started = time.time()
            try:
                r = run_case(BY_NAME[name], opts)
            except (CaseError, OSError, subprocess.SubprocessError, ValueError) as e:
                why = str(e) if isinstance(e, CaseError) else f"{type(e).__name__}: {e}"
                r = {"case": name, "expected": BY_NAME[name].expected,
                     "measured_stall_fraction": None, "agentd": None, "pass": None,
                     "error": why}
            r["wall_seconds"] = round(time.time() - started, 1)
            results.append(r)
            if args.json:
                print(json.dumps(r), flush=True)
    finally:
        if own_work and not args.keep:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    if not args.json:
        sys.stdout.write(table(results))
        print(f"\n{time.strftime('%Y-%m-%d')}, {'CUDA' if cuda else 'stand-in GPU (fake NVML)'}"
              f", {args.seconds:g} s recorded per case")
    if any(r.get("error") for r in results):
        return 3
    return 1 if any(r.get("pass") is False for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
