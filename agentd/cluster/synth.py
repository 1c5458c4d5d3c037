"""Synthetic data-parallel jobs with one planted cause, for the tests and the benchmarks
(bench/cluster_accuracy.py, bench/cluster_scale.py). Vectorised: a 64-node job's hour takes
milliseconds.

The model of a step, per GPU g on node n (shares of the healthy step time):
    compute  c_g = c * (f_ref / f_g) * slow_g        clocks, and a slower GPU at equal clocks
    input    w_g = max(0, l_n - c_g)                  the batch is late: the GPU runs no kernel
    step     T   = max over all GPUs (c_g + w_g) + m * comm_factor
    spin     T - c_g - w_g                             NCCL kernels wait for the slowest rank
so NVML utilization (and DCGM graphics-engine activity) reads 1 - w_g / T everywhere but on a
starved node, tensor activity tau * c_g / T, SM activity (a c_g + a_spin spin) / T. A ring
all-reduce moves the same bytes per step on every node, at the pace of the slowest link:
comm_factor = the healthy rate over the slowest effective rate.

Natural variation between healthy nodes: clocks within +-3% (each GPU), temperature, power,
different disks (busy 5-60%), loader CPU, measurement noise per scrape. Planted causes:

    throttled    one node's GPUs (1 to all 8) held 12-40% under their clocks, at the power
                 limit or hot
    slow_gpu     one GPU computes 12-50% longer at normal clocks (e.g. rows remapped)
    slow_link    one node's RDMA port trained down (rate halved or quartered), or lossy
                 (symbol errors, link recoveries, 1.3-2.5x slower collectives); its ring
                 neighbour sees transmit waits
    input_starved  one node's loader needs 1.15-1.8x the compute time: its disk (busy ~1, I/O
                 pressure) or its CPUs (all busy, CPU pressure) saturated
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agentd.cluster.data import NODE_FAMILIES, Fleet, merge_rows

CAUSES = ("throttled", "slow_gpu", "slow_link", "input_starved")
MODEL = "NVIDIA H100 80GB HBM3"
CLOCK_MAX = 1980e6
POWER_LIMIT = 700.0
PORT_RATE = 50e9  # 400 Gb/s NDR, bytes/s


@dataclass
class Truth:
    cause: str | None  # None: a healthy job
    node: str | None = None
    gpus: list[int] = field(default_factory=list)
    onset: float | None = None  # Unix seconds
    detail: str = ""
    slowdown: float = 1.0  # step time with the fault over without


@dataclass
class Sim:
    """Per-scrape series of one job: what the exporters would have exposed."""

    job: str
    identity: dict
    nodes: list[str]
    t: np.ndarray  # [S] scrape times
    scrape: float
    gpu: dict[str, np.ndarray]  # [N, G, S]: util, gr_active, tensor, sm, clock, power, temp
    host: dict[str, np.ndarray]  # [N, S]: disk_busy, psi_io, psi_cpu, cpu_busy
    ports: dict[str, np.ndarray]  # [N, P, S]: rate, tx, errors, recover, wait (per second)
    truth: Truth
    pods: list[str] = field(default_factory=list)


def simulate_job(rng: np.random.Generator, nodes: int, cause: str | None, start: float,
                 seconds: float = 3600.0, scrape: float = 15.0, gpus: int = 8, ports: int = 8,
                 onset: float | None = None, job: str = "job-0", node_prefix: str = "",
                 namespace: str = "ml") -> Sim:
    """One job of `nodes` nodes, healthy or with one planted `cause` from `onset` (seconds
    after start; default a random time in the first half) to the end."""
    N, G, P = nodes, gpus, ports
    S = int(seconds // scrape)
    t = start + scrape * (np.arange(S) + 1)
    names = [f"{node_prefix or job}-n{i:03d}" for i in range(N)]
    # --- the job ------------------------------------------------------------------------------
    c = rng.uniform(0.5, 0.85)
    m = 1.0 - c
    tau, a, a_spin = rng.uniform(0.3, 0.6), rng.uniform(0.7, 0.9), rng.uniform(0.04, 0.1)
    f_job = CLOCK_MAX * rng.uniform(0.86, 0.98)
    f = f_job * (1 + rng.uniform(-0.03, 0.03, (N, G)))  # natural spread of clocks
    slow = np.ones((N, G))
    load = c * rng.uniform(0.3, 0.85, N)  # loader time per step, hidden by prefetch
    comm = np.ones(S)
    temp = rng.uniform(52, 72, (N, G))
    power_draw = rng.uniform(0.55, 0.85) * (1 + rng.uniform(-0.04, 0.04, (N, G)))
    disk = rng.uniform(0.05, 0.6, N)
    psi_io = rng.uniform(0.0, 0.04, N)
    cpu = rng.uniform(0.15, 0.65, N)
    psi_cpu = rng.uniform(0.0, 0.05, N)
    rate = np.full((N, P), PORT_RATE)
    errors = np.zeros((N, P))
    recover = np.zeros((N, P))
    # --- the fault ----------------------------------------------------------------------------
    active = np.zeros(S, dtype=bool)
    truth = Truth(None)
    k = int(rng.integers(N))
    if cause is not None:
        on = onset if onset is not None else rng.uniform(0.15, 0.5) * seconds
        active = (t - start) > on
        truth = Truth(cause, names[k], [], start + on)
    f_fault, slow_fault = f.copy(), slow.copy()
    load_fault, rate_fault = load.copy(), rate.copy()
    temp_fault, power_fault = temp.copy(), power_draw.copy()
    disk_f, psi_io_f, cpu_f, psi_cpu_f = disk.copy(), psi_io.copy(), cpu.copy(), psi_cpu.copy()
    err_f, rec_f = errors.copy(), recover.copy()
    comm_fault = 1.0
    if cause == "throttled":
        n_gpus = int(rng.choice([1, 1, 2, 4, 8]))
        gs = sorted(rng.choice(G, n_gpus, replace=False).tolist())
        depth = rng.uniform(0.12, 0.4)
        f_fault[k, gs] = f[k, gs] * (1 - depth)
        if rng.random() < 0.5:
            power_fault[k, gs] = rng.uniform(0.97, 1.0, len(gs))
            truth.detail = f"power cap, clocks -{depth * 100:.0f}%"
        else:
            temp_fault[k, gs] = rng.uniform(87, 93, len(gs))
            truth.detail = f"thermal, clocks -{depth * 100:.0f}%"
        truth.gpus = gs
    elif cause == "slow_gpu":
        g = int(rng.integers(G))
        extra = rng.uniform(0.12, 0.5)
        slow_fault[k, g] = 1 + extra
        truth.gpus, truth.detail = [g], f"{extra * 100:.0f}% more compute time"
    elif cause == "slow_link":
        if rng.random() < 0.5:
            p = int(rng.integers(P))
            factor = float(rng.choice([0.5, 0.25]))
            rate_fault[k, p] = PORT_RATE * factor
            comm_fault = 1 / factor
            truth.detail = f"port {p} at {factor * 400:.0f} Gb/s"
        else:
            p = int(rng.integers(P))
            err_f[k, p] = rng.uniform(0.5, 20)
            rec_f[k, p] = rng.uniform(1, 10) / 300
            comm_fault = rng.uniform(1.3, 2.5)
            truth.detail = f"port {p} lossy, collectives x{comm_fault:.1f}"
    elif cause == "input_starved":
        load_fault[k] = c * rng.uniform(1.15, 1.8)
        if rng.random() < 0.5:
            disk_f[k], psi_io_f[k] = rng.uniform(0.93, 1.0), rng.uniform(0.25, 0.6)
            truth.detail = "storage saturated"
        else:
            cpu_f[k], psi_cpu_f[k] = rng.uniform(0.93, 1.0), rng.uniform(0.25, 0.6)
            truth.detail = "CPU saturated"
        truth.gpus = list(range(G))

    def pick(healthy, faulty):
        return np.where(active.reshape((1,) * np.ndim(healthy) + (S,)),
                        np.asarray(faulty)[..., None], np.asarray(healthy)[..., None])

    F = pick(f, f_fault)  # [N, G, S]
    C = c * (f_job / F) * pick(slow, slow_fault)
    L = pick(load, load_fault)[:, None, :]  # [N, 1, S]
    W = np.maximum(L - C, 0.0)
    comm = np.where(active, comm_fault, 1.0)
    jitter = 1 + rng.normal(0, 0.01, S)  # the whole job's steps vary alike
    T = ((C + W).max(axis=(0, 1)) + m * comm) * jitter  # [S]
    healthy_T = ((c * (f_job / f[..., None]) * slow[..., None]).max(axis=(0, 1)) + m)
    truth.slowdown = float(np.median(T[active] / jitter[active] / healthy_T)) if \
        active.any() else 1.0
    spin = np.maximum(T - C - W, 0.0)

    def noisy(x, sd, lo=0.0, hi=None):
        y = x + rng.normal(0, sd, x.shape)
        return np.clip(y, lo, hi) if hi is not None else np.maximum(y, lo)

    busy = 1 - W / T
    gpu = {
        "util": noisy(busy, 0.01, 0, 1),
        "gr_active": noisy(busy, 0.005, 0, 1),
        "tensor": noisy(tau * C / T, 0.004, 0, 1),
        "sm": noisy((a * C + a_spin * spin) / T, 0.006, 0, 1),
        "clock": noisy(F, 0.004 * f_job),
        "power": noisy(POWER_LIMIT * np.minimum(pick(power_draw, power_fault) *
                                                (0.6 + 0.4 * C / T / c), 1.0), 8.0,
                       0, POWER_LIMIT),
        "temp": noisy(pick(temp, temp_fault), 0.7),
    }
    host = {
        "disk_busy": noisy(pick(disk, disk_f), 0.03, 0, 1),
        "psi_io": noisy(pick(psi_io, psi_io_f), 0.01, 0, 1),
        "cpu_busy": noisy(pick(cpu, cpu_f), 0.03, 0, 1),
        "psi_cpu": noisy(pick(psi_cpu, psi_cpu_f), 0.01, 0, 1),
    }
    R = pick(rate, rate_fault)  # [N, P, S]
    # Bytes per step: the healthy collective moves them in m at 85% of the port rate.
    tx = 0.85 * PORT_RATE * m / T * np.ones((N, P, S))
    wait = np.full((N, P, S), 0.0) + rng.uniform(0, 2e3, (N, P, 1))
    if cause == "slow_link":
        # The ring neighbour that sends into the slow link runs out of credits.
        prev = (k - 1) % N
        stalled = m * (comm - 1) / T  # share of time waiting on the slow link
        wait[prev] += (stalled * 2.5e6)[None, :] * rng.uniform(0.8, 1.2, (P, 1))
    ports_ = {"rate": R, "tx": noisy(tx, 0.01 * tx.mean()),
              "errors": rng.poisson(pick(errors, err_f) * scrape) / scrape,
              "recover": rng.poisson(pick(recover, rec_f) * scrape) / scrape,
              "wait": noisy(wait, 200.0)}
    pods = [f"{job}-worker-{i}" for i in range(N)]
    return Sim(job, {"namespace": namespace, "workload": job}, names, t, scrape, gpu, host,
               ports_, truth, pods)


def to_fleet(sims: list[Sim], step: float = 60.0, activity: str = "tensor") -> Fleet:
    """The per-node summaries a cluster source would read from these jobs' series: the
    mean over each base step per GPU, then min / max / mean over the job's GPUs per node
    (as the PromQL of agentd/cluster/source.py does)."""
    t0 = min(s.t[0] - s.scrape for s in sims)
    t1 = max(s.t[-1] for s in sims)
    T = int(round((t1 - t0) / step))
    grid = t0 + step * (np.arange(T) + 1)
    nodes = [n for s in sims for n in s.nodes]
    host = {f: np.full((len(nodes), T), np.nan) for f in
            NODE_FAMILIES}
    rows = []
    i0 = 0
    for s in sims:
        idx = np.clip(((s.t - t0 - 1e-6) // step).astype(int), 0, T - 1)

        cnt = np.bincount(idx, minlength=T).astype(float)

        def per_step(x):  # [..., S] -> [..., T]: mean over the scrapes in each step
            flat = x.reshape(-1, x.shape[-1])
            acc = np.zeros((T, flat.shape[0]))
            np.add.at(acc, idx, flat.T)
            with np.errstate(all="ignore"):
                out = (acc / cnt[:, None]).T
            out[:, cnt == 0] = np.nan
            return out.reshape(x.shape[:-1] + (T,))

        g = {k: per_step(v) for k, v in s.gpu.items()}  # [N, G, T]
        act = g["tensor"] if activity == "tensor" else g["sm"] if activity == "sm" else None
        for n, name in enumerate(s.nodes):
            fam = {"busy_min": g["gr_active"][n].min(axis=0),
                   "busy_avg": g["gr_active"][n].mean(axis=0),
                   "clock_min": g["clock"][n].min(axis=0),
                   "power_max": (g["power"][n] / POWER_LIMIT).max(axis=0),
                   "temp_max": g["temp"][n].max(axis=0)}
            if act is not None:
                fam["act_max"] = act[n].max(axis=0)
            rows.append((f"namespace={s.identity['namespace']},workload={s.job}", name,
                         s.identity, {"namespace": s.identity["namespace"],
                                      "pod": s.pods[n], "model": MODEL},
                         fam, s.gpu["util"].shape[1]))
        h = {k: per_step(v) for k, v in s.host.items()}
        p = {k: per_step(v) for k, v in s.ports.items()}
        sl = slice(i0, i0 + len(s.nodes))
        for k in ("disk_busy", "psi_io", "psi_cpu", "cpu_busy"):
            host[k][sl] = h[k]
        host["net_rate"][sl] = p["rate"].min(axis=1)
        host["net_util"][sl] = (p["tx"] / p["rate"]).max(axis=1)
        host["net_tx"][sl] = p["tx"].sum(axis=1)
        host["net_errors"][sl] = p["errors"].sum(axis=1)
        host["net_recover"][sl] = p["recover"].sum(axis=1)
        host["net_wait"][sl] = p["wait"].sum(axis=1)
        i0 += len(s.nodes)
    members, gpu = merge_rows(rows, nodes, T)
    return Fleet(grid, step, nodes, members, gpu, host, source="synthetic",
                 activity=activity if activity in ("tensor", "sm") else "",
                 models={n: MODEL for n in nodes}, clock_max={n: CLOCK_MAX for n in nodes}
                 ).check()


def gpu_detail(sims: list[Sim], activity: str = "tensor"):
    """A per-GPU lookup for the GPUs of a flagged node (what source.py asks Prometheus):
    detail(node, family, t0, t1) -> {gpu: mean over (t0, t1]}."""
    where = {n: (s, i) for s in sims for i, n in enumerate(s.nodes)}
    key = {"act_max": "tensor" if activity == "tensor" else "sm", "clock_min": "clock",
           "busy_min": "gr_active"}

    def detail(node: str, family: str, t0: float, t1: float) -> dict[str, float]:
        if node not in where or family not in key:
            return {}
        s, i = where[node]
        sel = (s.t > t0) & (s.t <= t1)
        if not sel.any():
            return {}
        x = s.gpu[key[family]][i][:, sel].mean(axis=1)
        return {str(g): float(v) for g, v in enumerate(x)}

    return detail


# --- the same jobs as the exporters would have exposed them ------------------------------------

def _lines(out, name: str, labels: list[str], t: np.ndarray, values: np.ndarray,
           fmt: str = "%.6g", millis: bool = False) -> None:
    """One sample line per (series, scrape): values [R, S], labels [R]."""
    ts = np.char.mod("%d", np.round(t * 1000).astype(np.int64)) if millis else \
        np.char.mod("%.3f", t)
    for lab, row in zip(labels, values):
        ok = np.isfinite(row)
        vs = np.char.mod(fmt, row[ok])
        head = f"{name}{{{lab}}} "
        out.write("".join(head + v + " " + s + "\n" for v, s in zip(vs, ts[ok])))


def write_exporters(sims: list[Sim], out, cores: int = 4, millis: bool = False) -> None:
    """dcgm-exporter (default counters: gauges per GPU, with the Kubernetes pod of each GPU)
    and node_exporter (diskstats, pressure, cpu, infiniband counters) samples of these jobs,
    as OpenMetrics with timestamps for `promtool tsdb create-blocks-from openmetrics` (the
    file ends with `# EOF`); with millis, as the Prometheus text format with millisecond
    timestamps that VictoriaMetrics imports (/api/v1/import/prometheus)."""
    def family(name: str, kind: str, help_: str, rows) -> None:
        base = name[:-6] if kind == "counter" and name.endswith("_total") else name
        out.write(f"# HELP {base} {help_}\n# TYPE {base} {kind}\n")
        for s, labels, values in rows:
            _lines(out, name, labels, s.t, values, millis=millis)

    def dcgm_rows(key: str, scale: float = 1.0):
        for s in sims:
            N, G, S = s.gpu[key].shape
            ns = s.identity["namespace"]
            labels = [f'gpu="{g}",UUID="GPU-{s.nodes[n]}-{g}",device="nvidia{g}",'
                      f'modelName="{MODEL}",Hostname="{s.nodes[n]}",'
                      f'instance="{s.nodes[n]}:9400",job="dcgm",namespace="{ns}",'
                      f'pod="{s.pods[n]}",container="trainer"'
                      for n in range(N) for g in range(G)]
            yield s, labels, s.gpu[key].reshape(N * G, S) * scale

    def node_rows(key: str, counter: bool, extra: str = ""):
        for s in sims:
            labels = [f'{extra}instance="{n}:9100",job="node"' for n in s.nodes]
            x = s.host[key]
            yield s, labels, np.cumsum(x, axis=1) * s.scrape if counter else x

    def port_rows(key: str, counter: bool):
        for s in sims:
            N, P, S = s.ports[key].shape
            labels = [f'device="mlx5_{p}",port="1",instance="{s.nodes[n]}:9100",job="node"'
                      for n in range(N) for p in range(P)]
            x = s.ports[key].reshape(N * P, S)
            yield s, labels, np.cumsum(x, axis=1) * s.scrape if counter else x

    for name, key, scale, help_ in (
            ("DCGM_FI_DEV_GPU_UTIL", "util", 100.0, "GPU utilization (in %)."),
            ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gr_active", 1.0, "Ratio of time the graphics "
             "engine is active."),
            ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "tensor", 1.0, "Ratio of cycles the tensor "
             "(HMMA) pipe is active."),
            ("DCGM_FI_DEV_SM_CLOCK", "clock", 1e-6, "SM clock frequency (in MHz)."),
            ("DCGM_FI_DEV_POWER_USAGE", "power", 1.0, "Power draw (in W)."),
            ("DCGM_FI_DEV_GPU_TEMP", "temp", 1.0, "GPU temperature (in C).")):
        family(name, "gauge", help_, dcgm_rows(key, scale))
    family("node_disk_io_time_seconds_total", "counter", "Total seconds spent doing I/Os.",
           node_rows("disk_busy", True, 'device="nvme0n1",'))
    family("node_pressure_io_waiting_seconds_total", "counter", "Total time in seconds that "
           "processes have waited due to IO congestion.", node_rows("psi_io", True))
    family("node_pressure_cpu_waiting_seconds_total", "counter", "Total time in seconds that "
           "processes have waited for CPU time.", node_rows("psi_cpu", True))
    out.write("# HELP node_cpu_seconds Seconds the CPUs spent in each mode.\n"
              "# TYPE node_cpu_seconds counter\n")
    for s in sims:
        busy = np.cumsum(s.host["cpu_busy"], axis=1) * s.scrape
        idle = np.cumsum(1 - s.host["cpu_busy"], axis=1) * s.scrape
        for c in range(cores):
            for mode, x in (("user", busy), ("idle", idle)):
                _lines(out, "node_cpu_seconds_total",
                       [f'cpu="{c}",mode="{mode}",instance="{n}:9100",job="node"'
                        for n in s.nodes], s.t, x, millis=millis)
    ib = "node_infiniband_"
    family(ib + "rate_bytes_per_second", "gauge", "Maximum signal transfer rate.",
           port_rows("rate", False))
    family(ib + "port_data_transmitted_bytes_total", "counter", "Number of data octets "
           "transmitted on all links.", port_rows("tx", True))
    family(ib + "symbol_error_total", "counter", "Number of minor link errors detected on "
           "one or more physical lanes.", port_rows("errors", True))
    family(ib + "link_error_recovery_total", "counter", "Number of times the link "
           "successfully recovered from an error state.", port_rows("recover", True))
    family(ib + "port_transmit_wait_total", "counter", "Number of ticks during which the "
           "port had data to transmit but no data was sent during the entire tick.",
           port_rows("wait", True))
    out.write("# EOF\n")
