"""Simulation scenarios as data files (agentd/scenarios/sim/*.toml), randomizable by seed.

    description = "8 GPUs starved by a slow dataset volume"
    class = "input_storage"            # the bottleneck class this scenario exhibits
    duration_s = 180                   # for batch runs (tests, benchmarks)
    onset_s = 0                        # when the problem starts (detection-delay benchmarks)

    [job]                              # any JobParams field (agentd/sim/model.py)
    gpus = 8
    storage_bandwidth = 6.0e8

    [randomize]                        # field = [low, high]: drawn uniformly for a seed
    storage_bandwidth = [4.0e8, 8.0e8]

    [[episodes]]                       # time-bounded conditions (throttling, cache loss, idle)
    start_s = 30
    end_s = 90
    gpus = [3]
    clock_factor = 0.6

    [[events]]                         # XIDs and GPUs falling off the bus
    at_s = 40
    gpu = 2
    xid = 79
    lost = true
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

import numpy as np

from agentd.sim.model import Episode, JobParams
from agentd.tomlfile import read_toml


SCENARIO_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scenarios", "sim")

CLASSES = ("healthy", "gpu_lost", "idle_allocated", "input_storage", "input_cpu", "h2d_pcie",
           "io_h2d_serialized", "shared_link", "comm_wait", "throttled", "straggler",
           "memory_pressure")


class ScenarioError(ValueError):
    pass


@dataclass
class GpuEvent:
    at_s: float
    gpu: int
    xid: int = 0
    lost: bool = False


@dataclass
class Scenario:
    name: str
    description: str
    klass: str
    job: JobParams
    duration_s: float = 120.0
    onset_s: float = 0.0
    events: list[GpuEvent] = field(default_factory=list)
    node_name: str = "sim-node"
    # Ranges the job's fields were drawn from, for the record.
    randomized: dict[str, float] = field(default_factory=dict)


_JOB_FIELDS = {f.name: f for f in fields(JobParams)} 


def _coerce(name: str, value, where: str):
    f = _JOB_FIELDS.get(name)
    if f is None or name in ("episodes", "seed"):
        raise ScenarioError(f"{where}: unknown job parameter {name!r}")
    kind = type(getattr(JobParams(), name))
    if name == "storage_kind":
        if value not in ("nvme", "sata", "network"):
            raise ScenarioError(f"{where}.{name}: expected \"nvme\", \"sata\" or \"network\"")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ScenarioError(f"{where}.{name}: expected true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScenarioError(f"{where}.{name}: expected a number, got {value!r}")
    if value < 0 and name != "straggler_gpu":
        raise ScenarioError(f"{where}.{name}: must not be negative")
    return kind(value)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# What each field annotation of Episode and GpuEvent accepts from a TOML file.
_FIELD_CHECKS = {
    "float": _is_number,
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "float | None": _is_number,
    "tuple[int, ...]": lambda v: isinstance(v, list) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in v),
}


def _record(cls, doc, where: str):
    """An Episode or GpuEvent from a TOML table, its keys and value types checked."""
    if not isinstance(doc, dict):
        raise ScenarioError(f"{where}: expected a table")
    known = {f.name: f for f in fields(cls)}
    bad = set(doc) - set(known)
    if bad:
        raise ScenarioError(f"{where}: unknown key {sorted(bad)[0]!r}")
    for key, value in doc.items():
        check = _FIELD_CHECKS.get(str(known[key].type))
        if check is not None and not check(value):
            raise ScenarioError(f"{where}.{key}: expected {known[key].type}, got {value!r}")
    try:
        return cls(**doc)
    except TypeError as e:  # a required key is missing
        raise ScenarioError(f"{where}: {e}") from None


def _list(doc: dict, key: str, where: str) -> list:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise ScenarioError(f"{where}.{key}: expected an array of tables ([[{key}]])")
    return value


def _table(doc: dict, key: str, where: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}.{key}: expected a table ([{key}])")
    return value


MAX_GPUS = 64  # a node; the fake driver and the simulator allocate per GPU


def from_dict(doc: dict, name: str, seed: int | None = None) -> Scenario:
    where = name
    unknown = set(doc) - {"description", "class", "duration_s", "onset_s", "job", "randomize",
                          "episodes", "events", "node_name"}
    if unknown:
        raise ScenarioError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    klass = doc.get("class", "healthy")
    if klass not in CLASSES:
        raise ScenarioError(f"{where}: class must be one of {', '.join(CLASSES)}")
    for key in ("duration_s", "onset_s"):
        if key in doc and not (_is_number(doc[key]) and 0 <= doc[key] < 1e9):
            raise ScenarioError(f"{where}.{key}: expected a number of seconds, got "
                                f"{doc[key]!r}")
    for key in ("description", "node_name"):
        if key in doc and not isinstance(doc[key], str):
            raise ScenarioError(f"{where}.{key}: expected a string")
    job = {k: _coerce(k, v, f"{where}.job") for k, v in _table(doc, "job", where).items()}
    drawn: dict[str, float] = {}
    if seed is not None:
        rng = np.random.default_rng(seed)
        for k, bounds in sorted(_table(doc, "randomize", where).items()):
            if not (isinstance(bounds, list) and len(bounds) == 2):
                raise ScenarioError(f"{where}.randomize.{k}: expected [low, high]")
            lo, hi = (_coerce(k, b, f"{where}.randomize") for b in bounds)
            if isinstance(lo, bool) or isinstance(hi, bool):
                v = bool(rng.random() < 0.5) if lo != hi else lo
            elif isinstance(lo, str):
                v = lo if rng.random() < 0.5 else hi
            else:
                v = rng.uniform(lo, hi) if isinstance(lo, float) or isinstance(hi, float) \
                    else int(rng.integers(lo, hi + 1))
            job[k] = _coerce(k, v, f"{where}.randomize")
            drawn[k] = job[k]
    episodes = []
    for i, ep in enumerate(_list(doc, "episodes", where)):
        ep = _record(Episode, ep, f"{where}.episodes[{i}]")
        episodes.append(replace(ep, gpus=tuple(ep.gpus)))
    events = [_record(GpuEvent, ev, f"{where}.events[{i}]")
              for i, ev in enumerate(_list(doc, "events", where))]
    params = replace(JobParams(), **job, episodes=episodes,
                     seed=seed if seed is not None else 0)
    if params.gpus < 1 or params.batch_size < 1 or params.compute_s <= 0:
        raise ScenarioError(f"{where}.job: gpus, batch_size and compute_s must be positive")
    if params.gpus > MAX_GPUS:
        raise ScenarioError(f"{where}.job.gpus: at most {MAX_GPUS}")
    if params.straggler_gpu >= params.gpus:
        raise ScenarioError(f"{where}.job.straggler_gpu: no such GPU")
    for ev in events:
        if not 0 <= ev.gpu < params.gpus:
            raise ScenarioError(f"{where}.events: no GPU {ev.gpu}")
    return Scenario(name=name, description=str(doc.get("description", "")), klass=klass,
                    job=params, duration_s=float(doc.get("duration_s", 120.0)),
                    onset_s=float(doc.get("onset_s", 0.0)), events=events,
                    node_name=str(doc.get("node_name", "sim-node")), randomized=drawn)


def load(path_or_name: str, seed: int | None = None) -> Scenario:
    """A scenario by file path, or by name from the library (agentd/scenarios/sim)."""
    path = find(path_or_name, SCENARIO_DIR, "scenario")
    doc = read_toml(path, "scenario", ScenarioError)
    return from_dict(doc, os.path.splitext(os.path.basename(path))[0], seed)


def find(path_or_name: str, directory: str, what: str) -> str:
    """The file a scenario flag names: a path, or a name in `directory` (ScenarioError
    listing the library's names otherwise)."""
    if os.path.exists(path_or_name):
        return path_or_name
    candidate = os.path.join(directory, path_or_name + ".toml")
    if not os.path.exists(candidate):
        raise ScenarioError(f"no {what} {path_or_name!r} (a file, or one of: "
                            f"{', '.join(library(directory))})")
    return candidate


def library(directory: str = SCENARIO_DIR) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(directory) if f.endswith(".toml"))
