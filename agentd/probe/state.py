"""The ceilings state file: what `agentd probe` measured, read by the daemon and `diagnose`.

One JSON document (keys others depend on; more may be added within version 1):

    {"version": 1, "measured_at": <unix s>, "host": "<hostname>",
     "storage": {"<whole block device>": {"source": "measured", "paths": ["/data"],
                 "seq_read_bytes_per_second": f, "rand_read_bytes_per_second": f,
                 "rand_read_iops": f, "block_bytes": {"seq": n, "rand": n},
                 "by_queue_depth": {"1": {...}, "8": {...}, "32": {...}},
                 "method": "fio" | "io_uring" | "threads"}},
     "h2d": {"<gpu index>": {"source": "measured" | "nominal", "uuid": "GPU-...",
             "pinned_bytes_per_second": f | null, "pageable_bytes_per_second": f | null,
             "link_bytes_per_second": f | null}},
     "cpu": {"source": "measured", "cores": f, "cpuset": "0-95", "cgroup": "/x" | null}}

Written atomically (a temporary file in the same directory, fsync, rename), so a reader sees
the old document or the new one, never half of one. The same table is exported as metrics
(`series`) and read back from Prometheus (`from_series`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile

from agentd.logs import LogOnce

VERSION = 1
DEFAULT_STATE_FILE = "/var/lib/agentd/ceilings.json"
PARTS = ("storage", "h2d", "cpu")
SOURCES = ("measured", "nominal")
# Label values must stay bounded and printable: device names, GPU indexes.
_NAME = re.compile(r"^[A-Za-z0-9_.:!+-]{1,64}$")


class StateError(ValueError):
    """The state file cannot be read or is not a ceilings document (one line)."""


class StateWriteError(OSError):
    """The state file cannot be written (one line)."""


# --- validation ---------------------------------------------------------------------------------

def _number(v, where: str, optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise StateError(f"{where}: expected a non-negative number, got {v!r}")
    return float(v)


def _table(v, where: str) -> dict:
    if not isinstance(v, dict):
        raise StateError(f"{where}: expected an object")
    return v


def _entry(e, where: str, keys: tuple[str, ...]) -> dict:
    """An entry: an object with a known source and optional non-negative numbers."""
    _table(e, where)
    if e.get("source") not in SOURCES:
        raise StateError(f"{where}.source: expected one of {', '.join(SOURCES)}")
    for key in keys:
        _number(e.get(key), f"{where}.{key}", optional=True)
    return e


def validate(doc, where: str = "") -> dict:
    """The document itself when it is a valid version-1 ceilings document; StateError names
    the first problem otherwise ("storage.sda.source: ...", prefixed by `where`)."""

    def at(*keys) -> str:
        return ".".join(str(k) for k in keys if k != "") or "document"

    try:
        doc = _table(doc, at())
        if doc.get("version") != VERSION:
            raise StateError(f"version {doc.get('version')!r} is not {VERSION}")
        _number(doc.get("measured_at"), "measured_at")
        if not isinstance(doc.get("host", ""), str):
            raise StateError("host: expected a string")
        for dev, e in _table(doc.get("storage", {}), "storage").items():
            w = at("storage", dev)
            if not _NAME.match(dev):
                raise StateError(f"{w}: not a block device name")
            _entry(e, w, ("seq_read_bytes_per_second", "rand_read_bytes_per_second",
                          "rand_read_iops"))
            for qd, m in _table(e.get("by_queue_depth", {}), f"{w}.by_queue_depth").items():
                if not str(qd).isdigit():
                    raise StateError(f"{w}.by_queue_depth: {qd!r} is not a queue depth")
                for key, v in _table(m, f"{w}.by_queue_depth.{qd}").items():
                    _number(v, f"{w}.by_queue_depth.{qd}.{key}", optional=True)
            paths = e.get("paths", [])
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise StateError(f"{w}.paths: expected a list of paths")
        for gpu, e in _table(doc.get("h2d", {}), "h2d").items():
            w = at("h2d", gpu)
            if not str(gpu).isdigit():
                raise StateError(f"{w}: not a GPU index")
            _entry(e, w, ("pinned_bytes_per_second", "pageable_bytes_per_second",
                          "link_bytes_per_second"))
            if not isinstance(e.get("uuid", ""), str) or len(e.get("uuid", "")) > 96:
                raise StateError(f"{w}.uuid: expected a GPU UUID")
        cpu = doc.get("cpu")
        if cpu:
            _entry(cpu, "cpu", ())
            _number(cpu.get("cores"), "cpu.cores")
            if cpu.get("cgroup") is not None and not isinstance(cpu.get("cgroup"), str):
                raise StateError("cpu.cgroup: expected a path or null")
    except StateError as e:
        raise StateError(f"{where}: {e}" if where else str(e)) from None
    return doc


def load(path: str) -> dict:
    """The validated document at `path`. FileNotFoundError when it does not exist;
    StateError when it cannot be read or is not a ceilings document."""
    try:
        with open(path, "rb") as f:
            data = f.read(16 * 2**20 + 1)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise StateError(f"cannot read ceilings file {path}: it is a directory") from None
    except OSError as e:
        raise StateError(f"cannot read ceilings file {path}: {e.strerror}") from None
    if len(data) > 16 * 2**20:
        raise StateError(f"ceilings file {path} is larger than 16 MiB")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise StateError(f"ceilings file {path} is not JSON ({e})") from None
    return validate(doc, f"ceilings file {path}")


class Reader:
    """The daemon's view: a missing file means no ceilings (logged once, at info); a bad one
    is a one-line warning and is ignored."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self._once = LogOnce(log)

    def read(self, path: str) -> dict | None:
        if not path:
            return None
        try:
            doc = load(path)
        except FileNotFoundError:
            self._once(logging.INFO, ("missing", path),
                       "no ceilings file %s: findings use default limits until "
                       "`agentd probe` writes one", path)
            return None
        except StateError as e:
            self.log.warning("%s; ignored", e)
            return None
        self._once.forget(("missing", path))
        self.log.info("ceilings from %s (measured %s on %s)", path,
                      _age(doc.get("measured_at")), doc.get("host") or "?")
        return doc


def _age(t) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"


# --- writing ----------------------------------------------------------------------------------

def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path: str) -> None:
    """Raise StateWriteError now, before minutes of measuring, if `path` cannot be written."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise StateWriteError(f"cannot write ceilings file {path}: it is a directory")
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ceilings.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise StateWriteError(f"cannot write ceilings file {path}: "
                              f"{e.strerror or e}") from None


def write(path: str, doc: dict) -> None:
    """Replace `path` with `doc` atomically (mode 0644: the daemon's user reads it)."""
    validate(doc, "new ceilings")
    directory = os.path.dirname(os.path.abspath(path)) or "."
    data = (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
    tmp = None
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ceilings.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(directory)
    except OSError as e:
        raise StateWriteError(f"cannot write ceilings file {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def merge(old: dict | None, new: dict, parts: tuple[str, ...]) -> dict:
    """The document to write: each part that ran replaces what it measured (storage: per
    device, so probing /scratch keeps /data's figures); the parts that did not run keep the
    old values. An old document from another host is dropped."""
    out = {k: v for k, v in new.items() if k not in PARTS}
    old = old if old and old.get("host") == new.get("host") else {}
    for part in PARTS:
        before = old.get(part)
        if part not in parts:
            if before:
                out[part] = before
            continue
        if part == "storage":
            out[part] = {**(before or {}), **new.get(part, {})}
        elif part in new:
            out[part] = new[part]
    return out


# --- metrics --------------------------------------------------------------------------------

STORAGE_BYTES = "agentd_storage_read_ceiling_bytes_per_second"
STORAGE_OPS = "agentd_storage_read_ceiling_operations_per_second"
H2D_BYTES = "agentd_gpu_h2d_ceiling_bytes_per_second"
CPU_CORES = "agentd_cpu_ceiling_cores"
MEASURED_AT = "agentd_ceilings_measured_timestamp_seconds"
_PATTERNS = (("sequential", "seq_read_bytes_per_second"), ("random", "rand_read_bytes_per_second"))


def series(doc: dict | None) -> list[tuple[str, tuple, float]]:
    """The state as exported series (name, label values in catalog order, value). A nominal
    host-to-device entry exports its link rate as the pinned ceiling: the most a pinned copy
    could reach."""
    if not doc:
        return []
    out: list[tuple[str, tuple, float]] = [(MEASURED_AT, (), float(doc["measured_at"]))]
    for dev, e in sorted(doc.get("storage", {}).items()):
        src = e["source"]
        for pattern, key in _PATTERNS:
            if e.get(key) is not None:
                out.append((STORAGE_BYTES, (dev, pattern, src), float(e[key])))
        if e.get("rand_read_iops") is not None:
            out.append((STORAGE_OPS, (dev, src), float(e["rand_read_iops"])))
    for gpu, e in sorted(doc.get("h2d", {}).items(), key=lambda kv: int(kv[0])):
        src, uuid = e["source"], e.get("uuid", "")
        pinned = e.get("pinned_bytes_per_second")
        if pinned is None and src == "nominal":
            pinned = e.get("link_bytes_per_second")
        for memory, v in (("pinned", pinned), ("pageable", e.get("pageable_bytes_per_second"))):
            if v is not None:
                out.append((H2D_BYTES, (str(gpu), uuid, memory, src), float(v)))
    cpu = doc.get("cpu")
    if cpu and cpu.get("cores") is not None:
        out.append((CPU_CORES, (cpu["source"],), float(cpu["cores"])))
    return out


def from_series(rows: list[tuple[str, dict, float]], host: str = "") -> dict | None:
    """The inverse of `series`, from (metric name, labels, value) rows as a Prometheus query
    returns them: the figures the metrics carry (not the queue-depth detail or paths)."""
    doc: dict = {"version": VERSION, "measured_at": 0.0, "host": host, "storage": {},
                 "h2d": {}}
    seen = False
    for name, labels, value in rows:
        if value is None or not math.isfinite(value) or value < 0:
            continue
        src = labels.get("source", "measured")
        if src not in SOURCES:
            continue
        seen = True
        if name == MEASURED_AT:
            doc["measured_at"] = float(value)
        elif name == STORAGE_BYTES and _NAME.match(labels.get("device", "")):
            e = doc["storage"].setdefault(labels["device"], {"source": src})
            key = dict(_PATTERNS).get(labels.get("pattern", ""))
            if key:
                e[key] = float(value)
        elif name == STORAGE_OPS and _NAME.match(labels.get("device", "")):
            doc["storage"].setdefault(labels["device"], {"source": src})["rand_read_iops"] = \
                float(value)
        elif name == H2D_BYTES and labels.get("gpu", "").isdigit():
            e = doc["h2d"].setdefault(labels["gpu"], {"source": src,
                                                       "uuid": labels.get("uuid", "")})
            if src == "nominal":
                e["link_bytes_per_second"] = float(value)
                e.setdefault("pinned_bytes_per_second", None)
                e.setdefault("pageable_bytes_per_second", None)
            elif labels.get("memory") in ("pinned", "pageable"):
                e[f"{labels['memory']}_bytes_per_second"] = float(value)
        elif name == CPU_CORES:
            doc["cpu"] = {"source": src, "cores": float(value)}
    if not seen:
        return None
    return validate(doc, "ceilings from Prometheus")
