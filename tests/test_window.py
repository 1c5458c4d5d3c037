from __future__ import annotations

import json

import numpy as np
import pytest

from agentd.daemon import npzfmt
from agentd.daemon.window import Ring, Window, gpu_window_stats, load_npz, load_npz_with_meta


def test_ring_keeps_the_last_rows_in_order():
    r = Ring(rows=5)
    for i in range(12):
        r.append(float(i), {"a": i, "b": -i})
    t, names, v = r.snapshot()
    assert list(t) == [7, 8, 9, 10, 11]
    assert names == ["a", "b"]
    assert list(v[:, 0]) == [7, 8, 9, 10, 11]


def test_ring_missing_values_are_nan_not_zero():
    r = Ring(rows=4)
    r.append(1.0, {"a": 1.0})
    r.append(2.0, {"b": 2.0})
    t, v = r.column("a")
    assert v[0] == 1.0 and np.isnan(v[1])


def test_ring_grows_columns_up_to_its_bound_then_reuses_aged_out_ones():
    r = Ring(rows=3, max_columns=4, initial_columns=2)
    r.append(0.0, {f"c{i}": i for i in range(4)})
    assert r.used_bytes < r.reserved_bytes or r._v.shape[1] == 4
    r.append(1.0, {"c4": 4.0})  # full, nothing aged out yet
    assert r.dropped_columns == 1
    for t in range(2, 6):
        r.append(float(t), {"c0": 0.0})  # c1..c3 age out after 3 rows
    r.append(6.0, {"new": 9.0})
    assert r.dropped_columns == 1
    t, v = r.column("new")
    assert v[-1] == 9.0 and np.isnan(v[:-1]).all()  # no stale data from the old channel


def test_ring_rows_of_the_same_keys_reuse_their_columns():
    """Rows are stored through a per-key-set column layout: a reordered or different key set,
    a column that changes hands, and a full ring (every such row counted) stay correct."""
    r = Ring(rows=4, max_columns=3, initial_columns=2)
    r.append(0.0, {"a": 1.0, "b": 2.0})
    r.append(1.0, {"b": 20.0, "a": 10.0})  # the same keys in another order
    r.append(2.0, {"a": 100.0, "b": 200.0, "c": 300.0})  # grows the matrix
    r.append(3.0, {"a": 1e3, "d": 4e3})  # no room for d: a is kept, d dropped
    r.append(4.0, {"a": 1e4, "d": 4e4})  # dropped again, counted again
    assert r.dropped_columns == 2
    t, names, v = r.snapshot()
    assert names == ["a", "b", "c"]
    assert list(v[:, 0]) == [10.0, 100.0, 1e3, 1e4]
    assert list(v[:2, 1]) == [20.0, 200.0] and np.isnan(v[2:, 1]).all()
    for k in range(5, 9):
        r.append(float(k), {"a": float(k)})  # b and c age out
    r.append(9.0, {"a": 9.0, "d": 9e4})  # d takes an aged-out column
    t, v = r.column("d")
    assert v[-1] == 9e4 and np.isnan(v[:-1]).all()
    t, v = r.column("a", since=7.0)
    assert list(t) == [7.0, 8.0, 9.0] and list(v) == [7.0, 8.0, 9.0]


def test_memory_bound():
    r = Ring(rows=6000, max_columns=256)
    assert r.reserved_bytes == 6000 * (256 * 4 + 8)
    r.append(0.0, {"x": 1.0})
    assert r.used_bytes == 6000 * 8 + 6000 * 16 * 4  # columns are allocated as they appear


def test_window_json_and_npz_round_trip():
    w = Window(seconds=10)
    ring = w.ring("gpu", 0.5)
    assert ring.rows == 20
    for i in range(30):
        ring.append(100.0 + i * 0.5, {"gpu.busy:0": 0.25, "gpu.busy:1": float(i % 2)})
    # The server process encodes JSON from the uncompressed npz, without numpy.
    doc = json.loads(npzfmt.to_json(w.to_npz(since=110.0, compress=False), w.seconds))
    g = doc["groups"]["gpu"]
    assert g["interval_seconds"] == 0.5 and len(g["t"]) == 10
    assert g["columns"]["gpu.busy:0"] == [0.25] * 10
    assert g["columns"]["gpu.busy:1"] == [float(i % 2) for i in range(20, 30)]
    back = load_npz(w.to_npz())
    assert back["gpu"]["columns"] == ["gpu.busy:0", "gpu.busy:1"]
    assert back["gpu"]["values"].shape == (20, 2)
    assert w.ring("gpu", 0.5) is ring  # kept across sampler restarts


def test_npz_reencoded_without_numpy_reads_the_same():
    """Deflated by the server process (npzfmt.compress), the npz still loads with
    load_npz_with_meta; its JSON has null where a channel had no value and keeps meta."""
    w = Window(seconds=60)
    gpu, mem = w.ring("gpu", 0.1), w.ring("memory", 1.0)
    w.ring("network", 1.0)  # a ring with no rows yet
    for i in range(100):
        gpu.append(200.0 + i / 10, {"gpu.busy:0": i / 100, **({"gpu.busy:1": 0.5} if i % 3
                                                               else {})})
        if i % 10 == 0:
            mem.append(200.0 + i / 10, {"mem.cached:": 1e6 + i})
    meta = {"node": "n1", "gpus": {"0": {"uuid": "GPU-x"}}}
    raw = w.to_npz(meta=meta, compress=False)
    packed = npzfmt.compress(raw)
    assert len(packed) < len(raw)
    groups, back_meta = load_npz_with_meta(packed)
    assert back_meta == meta
    assert np.array_equal(groups["gpu"]["values"], load_npz(raw)["gpu"]["values"],
                          equal_nan=True)
    doc = json.loads(npzfmt.to_json(packed, 60.0))
    assert doc["meta"] == meta and doc["window_seconds"] == 60.0
    busy1 = doc["groups"]["gpu"]["columns"]["gpu.busy:1"]
    assert busy1[0] is None and busy1[1] == 0.5
    assert doc["groups"]["memory"]["columns"]["mem.cached:"][-1] == 1e6 + 90
    assert doc["groups"]["network"] == {"interval_seconds": 1.0, "t": [], "columns": {}}
    with pytest.raises(npzfmt.FormatError):
        npzfmt.to_json(b"not a zip", 60.0)


def test_gpu_window_stats():
    t = np.arange(0, 60, 0.1)
    busy = np.where((t % 10) < 7, 0.9, 0.0)  # 3 s idle gaps every 10 s
    s = gpu_window_stats(t, busy.astype(np.float32), 0.05)
    assert s["idle_ratio"] == pytest.approx(0.3, abs=0.01)
    assert s["longest_idle_seconds"] == pytest.approx(3.0, abs=0.11)
    assert s["p10"] == 0.0 and s["p90"] == pytest.approx(0.9)
    assert gpu_window_stats(t[:1], busy[:1], 0.05) is None


def test_ring_times_survive_a_wall_clock_step():
    """Rows keep arrival order and true spacing when the wall clock steps back an hour;
    they read in the wall clock's current frame."""
    r = Ring(rows=100)
    mono, offset = 500.0, 1.8e9
    for i in range(20):
        if i == 10:
            offset -= 3600.0  # NTP steps the wall clock back by an hour
        mono += 0.1
        r.append(mono + offset, {"a": float(i)}, mono)
    t, v = r.column("a")
    assert np.all(np.diff(t) > 0)
    assert np.allclose(np.diff(t), 0.1)
    assert t[-1] == pytest.approx(mono + offset)  # the newest row: the wall clock's reading
    t, _, _ = r.snapshot(since=mono + offset - 0.55)
    assert len(t) == 6  # "the last 0.55 s" is what it says, not the hour before the step


def test_window_stats_never_negative_on_times_that_go_back():
    """A series whose timestamps step back (a recording across a clock step) gives no
    negative duration: idle ratio within [0, 1], longest gap not negative."""
    t = np.concatenate([np.arange(0, 10, 0.1), np.arange(0, 10, 0.1) - 3600 + 10])
    busy = np.where(np.arange(len(t)) % 4 == 0, 0.0, 1.0)
    stats = gpu_window_stats(t, busy, 0.05)
    assert 0 <= stats["idle_ratio"] <= 1 and stats["longest_idle_seconds"] >= 0
    assert stats["idle_ratio"] == pytest.approx(0.25, abs=0.02)
