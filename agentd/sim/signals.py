"""What agentd's window would hold for a simulated run, computed straight from the
simulator's counters: the fast path for the accuracy benchmark's hundreds of runs.

It applies the samplers' own conversions (NVML's integer-percent utilization over 1/6 s
samples read at 10 Hz, GPM every 0.2 s, counter deltas over each tick) without writing and
parsing /proc. tests/test_analysis.py checks it against the real samplers on a simulated
node, so the two paths cannot drift apart unnoticed.
"""

from __future__ import annotations

import numpy as np

from agentd.analysis.signals import Signals
from agentd.sim.model import Simulator, Trace
from agentd.pcie import capacity as pcie_capacity
from agentd.pcie import sysfs_capacity
from agentd.sim.node import (MEM_TOTAL, SimulatedGpu, disk_names, nvme_link, probed_ceilings,
                             trainer_pid, uplink_sysfs)
from agentd.sim.scenario import Scenario

TICK = 0.1
UTIL_PERIOD = 1 / 6
GPM_PERIOD = 0.2


def _at(t_src: np.ndarray, cum: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Cumulative counter(s) at times t (linear between simulator steps)."""
    if cum.ndim == 1:
        return np.interp(t, t_src, cum)
    return np.stack([np.interp(t, t_src, cum[:, i]) for i in range(cum.shape[1])], axis=1)


def simulate(scenario: Scenario, seconds: float | None = None, start: float = 1.7e9
             ) -> tuple[Signals, Trace]:
    """Run the scenario and return (the window agentd would see, the simulator's trace)."""
    seconds = seconds or scenario.duration_s
    sim = Simulator(scenario.job)
    tr = sim.run(seconds)
    return window_from_trace(scenario, tr, start), tr


def window_from_trace(scenario: Scenario, tr: Trace, start: float = 1.7e9) -> Signals:
    p = scenario.job
    g = p.gpus
    ts = np.concatenate(([0.0], tr.t))

    def cum(a: np.ndarray) -> np.ndarray:
        return np.concatenate((np.zeros((1,) + a.shape[1:]), a))

    ticks = np.arange(TICK, tr.t[-1] + 1e-9, TICK)
    n = len(ticks)
    ch: dict[str, np.ndarray] = {}
    lost = {ev.gpu: ev.at_s for ev in scenario.events if ev.lost}

    # NVML utilization: integer percent over each 1/6 s driver sample, read at 10 Hz.
    samples_t = np.arange(UTIL_PERIOD, tr.t[-1] + 1e-9, UTIL_PERIOD)
    busy_c = _at(ts, cum(tr.busy), np.concatenate(([0.0], samples_t)))
    util = np.round(np.diff(busy_c, axis=0) / UTIL_PERIOD * 100) / 100
    which = np.searchsorted(samples_t, ticks + 1e-9, side="right") - 1
    # Kernel time credited per tick: the samples that arrived in it, each one period long.
    arrived = np.searchsorted(samples_t, ticks + 1e-9, side="right")
    per_sample = np.vstack((np.zeros((1, g)), np.cumsum(util * UTIL_PERIOD, axis=0)))
    busy_time = np.diff(np.vstack((np.zeros((1, g)), per_sample[arrived])), axis=0) / TICK
    # The samples that arrived in each tick on the driver's timeline (gpu.util_sample/_age).
    n_new = np.diff(np.concatenate(([0], arrived)))
    cum_util = np.vstack((np.zeros((1, g)), np.cumsum(util, axis=0)))
    cum_ts = np.concatenate(([0.0], np.cumsum(samples_t)))
    with np.errstate(invalid="ignore", divide="ignore"):
        new_mean = (cum_util[arrived] - cum_util[arrived - n_new]) / n_new[:, None]
        new_ts = (cum_ts[arrived] - cum_ts[arrived - n_new]) / n_new
    new_mean[n_new == 0] = np.nan
    new_age = np.where(n_new > 0, ticks - (new_ts - UTIL_PERIOD / 2), np.nan)
    # GPM: SM activity over 0.2 s spans.
    gpm_t = np.arange(GPM_PERIOD, tr.t[-1] + 1e-9, GPM_PERIOD)
    sm_c = _at(ts, cum(tr.sm_active), np.concatenate(([0.0], gpm_t)))
    sm = np.diff(sm_c, axis=0) / GPM_PERIOD
    gpm_idx = np.round(gpm_t / TICK).astype(int) - 1
    rx = np.diff(_at(ts, cum(tr.pcie_rx), np.concatenate(([0.0], ticks))), axis=0) / TICK
    tx = np.diff(_at(ts, cum(tr.pcie_tx), np.concatenate(([0.0], ticks))), axis=0) / TICK
    nv = np.diff(_at(ts, cum(tr.nvlink), np.concatenate(([0.0], ticks))), axis=0) / TICK
    clock = tr.clock_factor[np.clip(np.round(ticks / tr.dt).astype(int) - 1, 0, len(tr.t) - 1)]
    node = _node_info(scenario)
    for i in range(g):
        gi = str(i)
        b = np.where(which >= 0, util[np.clip(which, 0, None), i], np.nan)
        s = np.full(n, np.nan)
        ok = gpm_idx < n
        s[gpm_idx[ok]] = sm[ok, i]
        info = node["gpus"][i]
        cap = pcie_capacity(info.pcie_gen, info.pcie_width) or np.nan
        slow_mask = (np.arange(n) % 10) == 0
        idle_reason = (np.nan_to_num(b) < 0.01).astype(int)  # gpu_idle bit 0
        power_cap = (clock[:, i] < 0.99).astype(int) << 2  # sw_power_cap bit 2
        channels = {
            "gpu.busy": b, "gpu.busy_time": busy_time[:, i], "gpu.util_sample": new_mean[:, i],
            "gpu.util_sample_age": new_age, "gpu.sm_active": s, "gpu.pcie_rx": rx[:, i],
            "gpu.pcie_tx": rx[:, i] * 0.02 + tx[:, i], "gpu.nvlink_rx": nv[:, i], "gpu.nvlink_tx": nv[:, i],
            "gpu.pcie_capacity": np.where(slow_mask, cap, np.nan),
            "gpu.mem_used": np.where(slow_mask, 0.82 * info.memory_total, np.nan),
            "gpu.sm_clock": np.where(slow_mask, info.sm_clock_max_mhz * 1e6 * clock[:, i],
                                     np.nan),
            "gpu.sm_clock_max": np.where(slow_mask, info.sm_clock_max_mhz * 1e6, np.nan),
            "gpu.throttle": np.where(slow_mask, (idle_reason | power_cap).astype(float), np.nan),
            "gpu.power": np.where(slow_mask, 90 + 560 * np.nan_to_num(b) * clock[:, i], np.nan),
        }
        if i in lost:
            gone = ticks >= lost[i]
            for k in channels:
                channels[k] = np.where(gone, np.nan, channels[k])
        for k, v in channels.items():
            ch[f"{k}:{gi}"] = v

    def rate(a: np.ndarray) -> np.ndarray:
        return np.diff(_at(ts, cum(a), np.concatenate(([0.0], ticks))), axis=0) / TICK

    nd = max(p.storage_devices, 1)
    read, ops = rate(tr.storage_read) / nd, rate(tr.storage_ops) / nd
    busy_dev, weighted = rate(tr.storage_busy), rate(tr.storage_weighted) / nd
    write = rate(tr.write) / nd
    for d in node["disks"]:
        ch[f"disk.read:{d}"] = read
        ch[f"disk.write:{d}"] = write
        ch[f"disk.read_ops:{d}"] = ops
        ch[f"disk.busy:{d}"] = np.minimum(busy_dev, 1.0)
        ch[f"disk.queue:{d}"] = weighted
        with np.errstate(invalid="ignore", divide="ignore"):
            ch[f"disk.await:{d}"] = np.where(ops > 0, weighted / np.maximum(ops, 1e-9), np.nan)
    worker = rate(tr.worker_cpu)
    trainer = rate(tr.trainer_cpu)
    cores = float(p.cores)
    ch["cpu.busy:"] = np.minimum(worker.sum(axis=1) + trainer.sum(axis=1), cores)
    ch["cpu.count:"] = np.full(n, cores)
    # A core idles "in iowait" while a task that last ran on it waits for a read: about as
    # many cores as workers are blocked on reads (as long as cores are idle).
    idle_cores = np.maximum(cores - ch["cpu.busy:"], 0.0)
    ch["cpu.iowait:"] = np.minimum(rate(tr.io_blocked).sum(axis=1), idle_cores)
    ch["cpu.max_core:"] = np.minimum(worker.max(axis=1) / max(p.workers_per_gpu, 1) * 1.0, 1.0)
    slow = (np.arange(n) % 10) == 9
    ch["psi.io:"] = np.where(slow, _slow_rate(ts, tr.io_wait, ticks), np.nan)
    ch["psi.io_full:"] = np.where(slow, _slow_rate(ts, tr.io_full, ticks), np.nan)
    ch["psi.cpu:"] = np.where(slow, _slow_rate(ts, tr.cpu_wait, ticks), np.nan)
    drop = any(ep.cache_hit is not None and ep.cache_hit < p.cache_hit for ep in p.episodes)
    refault = np.where(ticks >= scenario.onset_s, read * nd / 4096, 0.0) if drop else \
        np.zeros(n)
    ch["mem.refault:"] = np.where(slow, refault, np.nan)
    ch["psi.memory:"] = np.where(slow, _slow_rate(ts, tr.mem_wait, ticks), np.nan)
    ch["mem.cached:"] = np.where(slow, MEM_TOTAL / (3 if drop else 2), np.nan)
    ch["mem.available:"] = np.where(slow, MEM_TOTAL * 0.75, np.nan)
    procs = {}
    gpu_read = rate(tr.gpu_read)
    blocked = rate(tr.io_blocked)
    for i in range(g):
        pid = str(node["trainer_pids"][i])
        ch[f"proc.cpu:{pid}"] = worker[:, i] + trainer[:, i]
        ch[f"proc.max_member_cpu:{pid}"] = np.minimum(worker[:, i] / max(p.workers_per_gpu, 1),
                                                      1.0)
        ch[f"proc.root_cpu:{pid}"] = trainer[:, i]
        ch[f"proc.members:{pid}"] = np.full(n, 1.0 + p.workers_per_gpu)
        ch[f"proc.blocked:{pid}"] = blocked[:, i]
        ch[f"proc.read:{pid}"] = np.where(slow, gpu_read[:, i], np.nan)
        ch[f"proc.rchar:{pid}"] = np.where(slow, gpu_read[:, i] + rate(tr.cache_read)[:, i],
                                           np.nan)
        procs[pid] = {"gpus": [i], "comm": "python3", "systemd_unit": "train.service"}
    meta = {"processes": procs, "shared_uplinks": node["shared_uplinks"],
            "scenario": scenario.name, "disks": node["disk_info"],
            "gpus": {str(i): {"uuid": info.uuid, "name": info.name,
                              "pci_bus_id": info.pci_bus_id, "lost": i in lost}
                     for i, info in enumerate(node["gpus"])}}
    if p.probed:
        meta["ceilings"] = probed_ceilings(p, [pcie_capacity(x.pcie_max_gen, x.pcie_max_width)
                                               for x in node["gpus"]])
    return Signals(start + ticks, ch, TICK, source="simulation", node=scenario.node_name,
                   meta=meta)


def _slow_rate(ts: np.ndarray, a: np.ndarray, ticks: np.ndarray) -> np.ndarray:
    c = np.interp(ticks, ts, np.concatenate(([0.0], a)))
    prev = np.interp(np.maximum(ticks - 1.0, 0), ts, np.concatenate(([0.0], a)))
    return (c - prev) / np.minimum(ticks, 1.0)


def _node_info(scenario: Scenario) -> dict:
    """The identities a SimulatedNode gives its GPUs, disks and processes, without writing
    its trees."""
    p = scenario.job

    class _Stub:  # enough of a SimulatedNode for SimulatedGpu's constructor
        pass

    stub = _Stub()
    stub.scenario = scenario
    gpus = [SimulatedGpu(stub, i) for i in range(p.gpus)]
    disks = disk_names(p)
    disk_info = {}
    for d in disks:
        info = {"rotational": "0"}
        if p.storage_kind == "nvme":
            gen, width = nvme_link(p)
            info["link_bytes_per_second"] = pcie_capacity(gen, width)
        disk_info[d] = info
    uplinks = []
    if p.shared_uplink_bandwidth > 0:
        cap = sysfs_capacity(*uplink_sysfs(p))
        switches = (p.gpus + p.gpus_per_switch - 1) // p.gpus_per_switch
        for sw in range(switches):
            members = [i for i in range(sw * p.gpus_per_switch,
                                        min((sw + 1) * p.gpus_per_switch, p.gpus))]
            uplinks.append({"switch": f"0000:{0x16 + 0x20 * sw:02x}:00.0",
                            "uplink_bytes_per_second": cap, "gpus": members,
                            "disks": [disks[sw]] if sw < len(disks) and
                            p.storage_kind == "nvme" else []})
    return {"gpus": [x.info for x in gpus], "disks": disks,
            "trainer_pids": [trainer_pid(i) for i in range(p.gpus)],
            "shared_uplinks": uplinks, "disk_info": disk_info}
