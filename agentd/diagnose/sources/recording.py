"""A recording written by `agentd record`: the daemon's window format, one file.

A recording is a stream of chunks, so that what was written before a crash or a full disk is
kept: the magic line below, then for each chunk its length (8 bytes, little-endian) and a
window in npz form (agentd.daemon.window.groups_to_npz) holding the rows since the previous
chunk. A truncated last chunk is ignored. A plain npz (the window served by
/api/v1/window?format=npz, or a recording of agentd <= 0.1) is read as one chunk.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from agentd.analysis.signals import Signals, from_groups
from agentd.diagnose.sources import SourceError

MAGIC = b"AGENTD-RECORDING 1\n"
_LEN = struct.Struct("<Q")
MAX_CHUNK = 2**31


def chunk(npz: bytes) -> bytes:
    """One chunk as written to the stream."""
    return _LEN.pack(len(npz)) + npz


def split_chunks(data: bytes) -> tuple[list[bytes], bool]:
    """(the npz chunks, whether the stream ended cleanly)."""
    if not data.startswith(MAGIC):
        return [data], True
    out, pos = [], len(MAGIC)
    while pos + _LEN.size <= len(data):
        (n,) = _LEN.unpack_from(data, pos)
        if n > MAX_CHUNK or pos + _LEN.size + n > len(data):
            return out, False
        out.append(data[pos + _LEN.size: pos + _LEN.size + n])
        pos += _LEN.size + n
    return out, pos == len(data)


def merge_groups(parts: list[dict[str, dict]]) -> dict[str, dict]:
    """Rows of several windows, per sampler ring, on the union of their channels, in time
    order with duplicate times dropped (consecutive daemon windows overlap)."""
    names: dict[str, list[dict]] = {}
    for groups in parts:
        for name, g in groups.items():
            names.setdefault(name, []).append(g)
    out = {}
    for name, gs in names.items():
        cols = list(dict.fromkeys(c for g in gs for c in g["columns"]))
        index = {c: j for j, c in enumerate(cols)}
        ts, vs = [], []
        for g in gs:
            v = np.full((len(g["t"]), len(cols)), np.nan, dtype=np.float32)
            for j, c in enumerate(g["columns"]):
                v[:, index[c]] = g["values"][:, j]
            ts.append(np.asarray(g["t"], dtype=float))
            vs.append(v)
        t = np.concatenate(ts) if ts else np.zeros(0)
        v = np.concatenate(vs) if vs else np.zeros((0, len(cols)), np.float32)
        order = np.argsort(t, kind="stable")
        t, v = t[order], v[order]
        keep = np.ones(len(t), dtype=bool)
        keep[1:] = np.diff(t) > 0
        out[name] = {"interval": gs[0]["interval"], "t": t[keep], "columns": cols,
                     "values": v[keep]}
    return out


def signals_from_npz_chunks(chunks: list[bytes], what: str, complete: bool = True) -> Signals:
    from agentd.daemon.window import load_npz_with_meta

    parts, meta = [], {}
    for i, data in enumerate(chunks):
        try:
            groups, m = load_npz_with_meta(data)
        except ValueError as e:
            if i == len(chunks) - 1 and i > 0:
                complete = False  # a last chunk cut short by a crash: keep the others
                break
            raise SourceError(f"{what} is not an agentd window or recording: {e}") from None
        parts.append({k: g for k, g in groups.items() if k != "topology"})
        meta = {**meta, **m}
    groups = merge_groups(parts)
    if not any(len(g["t"]) for g in groups.values()):
        raise SourceError(f"{what} holds no samples")
    step = meta.get("fast_interval") or 0.1
    if isinstance(step, bool) or not isinstance(step, (int, float)) or \
            not 0.001 <= step <= 3600:
        raise SourceError(f"{what}: fast_interval {step!r} is not a sampling interval")
    step = float(step)
    sig = from_groups(groups, step=step, source=what, node=str(meta.get("node", "")),
                      meta=meta)
    if not complete:
        sig.meta.setdefault("notes", []).append(
            "the recording ends in a partial chunk (the writer stopped mid-write); the rows "
            "before it are analysed")
    return sig


class RecordingSource:
    name = "recording"

    def __init__(self, path: str, seconds: float | None = None):
        self.path = path
        self.seconds = seconds

    def read(self) -> Signals:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except IsADirectoryError:
            raise SourceError(f"cannot read recording {self.path}: it is a directory") from None
        except OSError as e:
            raise SourceError(f"cannot read recording {self.path}: {e.strerror}") from None
        chunks, complete = split_chunks(data)
        what = f"recording {os.path.basename(self.path)}"
        if not chunks:
            raise SourceError(f"{what} holds no samples")
        sig = signals_from_npz_chunks(chunks, what, complete)
        if self.seconds and len(sig.t):
            sig = sig.slice(sig.t[-1] - self.seconds, sig.t[-1])
        return sig
