"""Parsers of /proc and /sys files, on fixtures copied from real machines and composed ones,
and 'against' the live system's own view (psutil, the kernel's files)."""

from __future__ import annotations

import os

import psutil
import pytest

from agentd.paths import Paths, ProcFile, read_text
from agentd.samplers.base import Context
from agentd.samplers.cpu import CpuSampler, parse_stat, usage_row
from agentd.samplers.memory import MemorySampler, parse_meminfo, parse_vmstat
from agentd.samplers.network import NetworkSampler, parse_net_dev, parse_rdma_rate
from agentd.samplers.pressure import PressureSampler, parse_pressure
from agentd.samplers.storage import StorageSampler, parse_diskstats, parse_mountstats
from conftest import fixture_path

VM_PROC = fixture_path("vm-debian12", "proc")


def ctx(procfs: str, sysfs: str) -> Context:
    return Context(paths=Paths(procfs, sysfs), fast_interval=0.1, slow_interval=1.0)


# --- /proc/stat ------------------------------------------------------------------------------


def test_parse_stat_fixture():
    stat = parse_stat(read_text(os.path.join(VM_PROC, "stat")))
    assert set(stat.per_cpu) == {"0", "1"}
    assert len(stat.total) == 8
    # The aggregate line is the sum of the per-CPU lines (the kernel reads them a moment
    # apart, so allow a few ticks).
    for mode in range(8):
        assert stat.total[mode] == pytest.approx(sum(v[mode] for v in stat.per_cpu.values()),
                                                 abs=10)
    assert stat.context_switches > 0


def test_parse_stat_pads_old_kernels():
    stat = parse_stat("cpu  10 0 5 100\ncpu0 10 0 5 100\nprocs_blocked 3\n")
    assert stat.total == (10, 0, 5, 100, 0, 0, 0, 0)
    assert stat.procs_blocked == 3


def test_usage_row_in_cores():
    a = parse_stat("cpu  0 0 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 0 0 0 0 0\n")
    b = parse_stat("cpu  10 0 5 0 3 0 2 0\ncpu0 10 0 0 0 0 0 0 0\ncpu1 0 0 5 0 3 0 2 0\n")
    row = usage_row(a, b)
    # 20 jiffies elapsed over 2 CPUs: 17 busy = 1.7 cores of 2
    assert row["cpu.busy:"] == pytest.approx(17 / 20 * 2)
    assert row["cpu.iowait:"] == pytest.approx(3 / 20 * 2)
    assert row["cpu.max_core:"] == pytest.approx(1.0)  # cpu0 was busy throughout
    assert row["cpu.count:"] == 2


def test_per_cpu_lines_once_a_second():
    """A GPU node has 100-200 CPUs: their lines are parsed on slow ticks only (the busiest
    core over the last second, the per-core series), the aggregate line and the task
    counts every tick, whatever the CPU count (bench/sampler_cost.py)."""
    def stat(busy: dict[int, int] | None, cpus) -> str:  # None: nothing counted yet
        lines = [f"cpu  {sum((busy or {}).values())} 0 0 0 0 0 0 0 0 0"]
        lines += [f"cpu{i} {busy.get(i, 0)} 0 0 {1000 - busy.get(i, 0)} 0 0 0 0 0 0"
                  if busy is not None else f"cpu{i} 0 0 0 0 0 0 0 0 0 0" for i in cpus]
        return "\n".join(lines + ["intr 5 0 0", "ctxt 7", "procs_running 4",
                                  "procs_blocked 2"]) + "\n"

    fast = parse_stat(stat({7: 300}, range(192)), per_cpu=False)
    assert fast.per_cpu is None and fast.cpus == 192
    assert (fast.context_switches, fast.procs_running, fast.procs_blocked) == (7, 4, 2)
    a = parse_stat(stat(None, range(192)))
    b = parse_stat(stat({7: 300, 150: 900}, range(192)))
    assert b.per_cpu["150"][:4] == (900, 0, 0, 100)
    assert usage_row(a, b)["cpu.max_core:"] == pytest.approx(0.9)
    assert "cpu.max_core:" not in usage_row(a, fast)  # a fast tick: no per-CPU figures
    # cpu150 went offline: the busiest of the CPUs in both readings is cpu7.
    c = parse_stat(stat({7: 300, 150: 900}, [i for i in range(192) if i != 150]))
    assert usage_row(a, c)["cpu.max_core:"] == pytest.approx(0.3)
    with pytest.raises(Malformed, match="not a number"):
        parse_stat(stat(None, range(4)).replace("cpu2 0", "cpu2 x"))
    with pytest.raises(Malformed, match="procs_blocked"):
        parse_stat(stat(None, range(4)).replace("procs_blocked 2", "procs_blocked 2 3"),
                   per_cpu=False)


def test_cpu_sampler_busiest_core_on_slow_ticks(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    text = read_text(os.path.join(VM_PROC, "stat"))
    (proc / "stat").write_text(text)
    ctx = Context(paths=Paths(str(proc), str(tmp_path), str(tmp_path)), fast_interval=0.1,
                  slow_interval=1.0)
    s = CpuSampler(ctx, {})
    s.open()
    cpu0 = next(line for line in text.splitlines() if line.startswith("cpu0 "))
    f = cpu0.split()
    f[1] = str(int(f[1]) + 40)  # cpu0 busy for 40 jiffies
    agg = text.splitlines()[0].split()
    agg[1] = str(int(agg[1]) + 40)
    agg[4] = str(int(agg[4]) + 60)
    (proc / "stat").write_text(text.replace(cpu0, " ".join(f)).replace(
        text.splitlines()[0], " ".join(agg)))
    row = s.sample(1.0, False)
    assert "cpu.max_core:" not in row and row["cpu.busy:"] > 0
    agg[4] = str(int(agg[4]) + 10)  # the aggregate ticks on; cpu0 did since the open
    (proc / "stat").write_text(text.replace(cpu0, " ".join(f)).replace(
        text.splitlines()[0], " ".join(agg)))
    row = s.sample(2.0, True)
    assert row["cpu.max_core:"] == pytest.approx(1.0, abs=0.01)


def test_cpu_against_psutil():
    """Our per-mode seconds agree with psutil's reading of the live /proc/stat, per core only
    on request (node_exporter exports per-core time; a 96-core node makes it 768 series)."""
    s = CpuSampler(ctx("/proc", "/sys"))
    s.open()
    assert not [n for n, _, _ in s.series() if n == "agentd_cpu_core_seconds_total"]
    ours = {labels: v for name, labels, v in s.series() if name == "agentd_cpu_seconds_total"}
    total = psutil.cpu_times()
    assert set(ours) == {(m,) for m in ("user", "nice", "system", "idle", "iowait", "irq",
                                        "softirq", "steal")}
    assert ours[("user",)] == pytest.approx(total.user, abs=0.5 * psutil.cpu_count())
    assert ours[("idle",)] == pytest.approx(total.idle, abs=1.0 * psutil.cpu_count())

    s = CpuSampler(ctx("/proc", "/sys"), {"per_core": True})
    s.open()
    ours = {labels: v for name, labels, v in s.series()
            if name == "agentd_cpu_core_seconds_total"}
    theirs = psutil.cpu_times(percpu=True)
    for i, t in enumerate(theirs):
        assert ours[(str(i), "user")] == pytest.approx(t.user, abs=0.5)
        assert ours[(str(i), "idle")] == pytest.approx(t.idle, abs=1.0)


# --- memory and pressure ------------------------------------------------------------------------


def test_parse_meminfo_and_vmstat():
    mem = parse_meminfo(read_text(os.path.join(VM_PROC, "meminfo")))
    assert mem["MemTotal"] > mem["MemAvailable"] > 0
    assert mem["MemTotal"] % 1024 == 0  # kB converted to bytes
    vm = parse_vmstat(read_text(os.path.join(VM_PROC, "vmstat")))
    assert "pgmajfault" in vm


def test_memory_sampler_refaults(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text("MemTotal: 1000 kB\nMemAvailable: 500 kB\nCached: 200 kB\n")
    (proc / "vmstat").write_text("workingset_refault_file 100\npgscan_kswapd 5\n"
                                 "pgscan_direct 7\npgscan_direct_throttle 99\n")
    s = MemorySampler(ctx(str(proc), str(tmp_path)))
    s.open()
    s.sample(100.0, True)
    (proc / "vmstat").write_text("workingset_refault_file 300\npgscan_kswapd 5\npgscan_direct 7\n")
    row = s.sample(102.0, True)
    assert row["mem.refault:"] == pytest.approx(100.0)  # 200 pages over 2 s
    assert row["mem.available:"] == 500 * 1024
    series = {n: v for n, _, v in s.series()}
    assert series["agentd_memory_pages_scanned_total"] == 12  # throttle events excluded


def test_memory_against_psutil():
    s = MemorySampler(ctx("/proc", "/sys"))
    s.open()
    s.sample(0.0, True)
    ours = {n: v for n, _, v in s.series()}
    assert ours["agentd_memory_total_bytes"] == psutil.virtual_memory().total


def test_parse_pressure():
    text = "some avg10=1.00 avg60=0.50 avg300=0.10 total=2500000\n" \
           "full avg10=0.00 avg60=0.00 avg300=0.00 total=1000000\n"
    assert parse_pressure(text) == {"some": 2.5, "full": 1.0}
    fixture = parse_pressure(read_text(os.path.join(VM_PROC, "pressure", "io")))
    assert fixture["some"] >= fixture["full"] > 0


def test_pressure_sampler_share(tmp_path):
    pdir = tmp_path / "pressure"
    pdir.mkdir()
    for res in ("cpu", "io", "memory"):
        (pdir / res).write_text("some avg10=0 avg60=0 avg300=0 total=0\n"
                                "full avg10=0 avg60=0 avg300=0 total=0\n")
    s = PressureSampler(ctx(str(tmp_path), str(tmp_path)))
    s.open()
    s.sample(10.0, True)
    (pdir / "io").write_text("some avg10=0 avg60=0 avg300=0 total=500000\n"
                             "full avg10=0 avg60=0 avg300=0 total=250000\n")
    row = s.sample(11.0, True)
    assert row["psi.io:"] == pytest.approx(0.5)
    assert row["psi.io_full:"] == pytest.approx(0.25)
    assert row["psi.cpu:"] == 0


def test_pressure_absent_is_unavailable(tmp_path):
    from agentd.samplers.base import Unavailable

    with pytest.raises(Unavailable, match="CONFIG_PSI"):
        PressureSampler(ctx(str(tmp_path), str(tmp_path))).open()


# --- storage ----------------------------------------------------------------------------------


def test_parse_diskstats_fixture_units():
    stats = parse_diskstats(read_text(fixture_path("dgx-like", "proc", "diskstats")))
    nvme = stats["nvme0n1"]
    assert nvme.read_bytes == 45318311424 * 512  # sectors are 512 bytes whatever the device
    assert nvme.in_flight == 3
    assert nvme.io_ms == 19288112


def test_storage_whole_devices_only(dgx_procfs, dgx_sysfs):
    s = StorageSampler(ctx(dgx_procfs, dgx_sysfs))
    s.open()
    s.sample(1.0, True)
    devices = {labels[0] for name, labels, _ in s.series() if name == "agentd_disk_read_bytes_total"}
    # Partitions (sda1, nvme0n1p1) and loop devices are left out; md and dm stay.
    assert devices == {"sda", "nvme0n1", "nvme1n1", "nvme2n1", "nvme3n1", "md0", "dm-0"}
    info = {labels[0]: labels for name, labels, _ in s.series() if name == "agentd_disk_info"}
    assert info["nvme0n1"][3] == "0000:19:00.0"  # the PCI function the drive hangs on
    assert info["sda"][1] == "Micron_5300_MTFD"


def test_storage_without_sysfs_uses_name_rules(dgx_procfs, tmp_path):
    s = StorageSampler(ctx(dgx_procfs, str(tmp_path)))
    s.open()
    devices = set(s._devices)
    assert "nvme0n1p1" not in devices and "sda1" not in devices and "nvme0n1" in devices


def test_storage_rates(tmp_path):
    line = "259 0 nvme0n1 {r} 0 {sec} {rms} 0 0 0 0 {inflight} {io} {w} 0 0 0 0 0 0\n"
    (tmp_path / "diskstats").write_text(line.format(r=0, sec=0, rms=0, inflight=0, io=0, w=0))
    s = StorageSampler(ctx(str(tmp_path), str(tmp_path / "nosys")), {"nfs": False})
    s.open()
    s._last_t = 10.0
    (tmp_path / "diskstats").write_text(
        line.format(r=1000, sec=2048000, rms=4000, inflight=4, io=500, w=2000))
    row = s.sample(10.5, True)
    assert row["disk.read:nvme0n1"] == pytest.approx(2048000 * 512 / 0.5)
    assert row["disk.busy:nvme0n1"] == pytest.approx(1.0)  # 500 ms busy in 500 ms
    assert row["disk.queue:nvme0n1"] == pytest.approx(4.0)  # 2 s weighted in 0.5 s
    assert row["disk.await:nvme0n1"] == pytest.approx(0.004)


def test_storage_against_psutil():
    s = StorageSampler(ctx("/proc", "/sys"))
    s.open()
    ours = {labels[0]: v for name, labels, v in s.series()
            if name == "agentd_disk_read_bytes_total"}
    theirs = psutil.disk_io_counters(perdisk=True)
    assert ours, "no whole block device found on this machine"
    for dev, v in ours.items():
        # Reads may land between the two readings; a 64 MiB margin covers a busy CI machine.
        assert abs(theirs[dev].read_bytes - v) < 64 * 2**20


def test_parse_mountstats_nfs():
    mounts = parse_mountstats(read_text(fixture_path("dgx-like", "proc", "self", "mountstats")))
    assert len(mounts) == 1
    m = mounts[0]
    assert (m.export, m.mountpoint) == ("10.0.0.5:/datasets", "/mnt/datasets")
    assert m.read_bytes == 81300000000  # server read bytes (READ payload)
    assert m.ops["READ"].ops == 77543
    assert m.ops["READ"].rtt_ms == 4711234
    assert m.ops["READ"].execute_ms == 4730112


def test_parse_mountstats_without_nfs():
    assert parse_mountstats(read_text(os.path.join(VM_PROC, "self", "mountstats"))) == []


def test_storage_reads_mountstats_every_tick_only_while_nfs_is_mounted(tmp_path):
    """Without an NFS mount, mountstats is read on the first and on slow ticks only; a mount
    that appears is found at the next slow tick and then read, with its rate, every tick."""
    (tmp_path / "self").mkdir()
    (tmp_path / "diskstats").write_text("259 0 nvme0n1" + " 0" * 17 + "\n")
    mountstats = tmp_path / "self" / "mountstats"
    plain = read_text(os.path.join(VM_PROC, "self", "mountstats"))
    nfs = read_text(fixture_path("dgx-like", "proc", "self", "mountstats"))
    mountstats.write_text(plain)
    s = StorageSampler(ctx(str(tmp_path), str(tmp_path / "nosys")))
    s.open()
    reads = []

    class Counted:
        def __init__(self, f):
            self.f = f

        def read_optional(self):
            reads.append(1)
            return self.f.read_optional()

        def close(self):
            self.f.close()

    s._mountstats_file = Counted(s._mountstats_file)
    s.sample(10.0, False)  # the first tick reads it
    assert len(reads) == 1
    mountstats.write_text(nfs)
    for i in range(1, 10):
        assert not any(k.startswith("nfs.") for k in s.sample(10.0 + i * 0.1, False))
    assert len(reads) == 1  # no NFS at the last look: fast ticks leave the file alone
    s.sample(11.0, True)  # a slow tick finds the mount
    assert len(reads) == 2
    assert ("agentd_nfs_read_bytes_total", ("/mnt/datasets", "10.0.0.5:/datasets"),
            81300000000) in s.series()
    mountstats.write_text(nfs.replace("81300000000", "81400000000"))
    row = s.sample(11.1, False)  # and from then on every tick
    assert len(reads) == 3
    assert row["nfs.read:/mnt/datasets"] == pytest.approx(100000000 / 0.1)
    mountstats.write_text(plain)
    s.sample(11.2, False)  # unmounted: seen on this tick, then slow ticks only again
    s.sample(11.3, False)
    assert len(reads) == 4
    assert not any(name.startswith("agentd_nfs_") for name, _, _ in s.series())


# --- network ----------------------------------------------------------------------------------


def test_parse_net_dev_fixture():
    devs = parse_net_dev(read_text(os.path.join(VM_PROC, "net", "dev")))
    assert "eth0" in devs and devs["eth0"].rx_bytes > 0


def test_parse_rdma_rate():
    assert parse_rdma_rate("400 Gb/sec (4X NDR)\n") == 400e9 / 8
    assert parse_rdma_rate("garbage") is None


def test_network_rdma_ports(dgx_procfs, dgx_sysfs):
    s = NetworkSampler(ctx(dgx_procfs, dgx_sysfs))
    s.open()
    s.sample(1.0, True)
    series = {(n, labels): v for n, labels, v in s.series()}
    # port_rcv_data counts 4-byte words
    assert series[("agentd_rdma_receive_bytes_total", ("mlx5_0", "1"))] == 2_500_000_000 * 4
    assert series[("agentd_rdma_port_speed_bytes", ("mlx5_3", "1"))] == 50e9
    assert ("agentd_network_receive_bytes_total", ("lo",)) not in series
    # The fixture's adapters have no error counter files: absent, not 0.
    assert not any(n == "agentd_rdma_port_errors_total" for n, _ in series)


def test_network_rdma_error_counters(tmp_path):
    """A lossy link's port: its error and recovery counters are exported as they are."""
    port = tmp_path / "sys" / "class" / "infiniband" / "mlx5_2" / "ports" / "1"
    (port / "counters").mkdir(parents=True)
    (port / "rate").write_text("200 Gb/sec (4X HDR)\n")
    for name, v in {"port_rcv_data": 100, "port_xmit_data": 50, "port_rcv_packets": 9,
                    "port_xmit_packets": 8, "port_xmit_wait": 7, "symbol_error": 1234,
                    "port_rcv_errors": 56, "link_error_recovery": 3, "link_downed": 1,
                    "port_xmit_discards": 2}.items():
        (port / "counters" / name).write_text(f"{v}\n")
    (tmp_path / "proc" / "net").mkdir(parents=True)
    (tmp_path / "proc" / "net" / "dev").write_text(
        "Inter-| Receive | Transmit\n face |bytes packets|bytes packets\n")
    s = NetworkSampler(ctx(str(tmp_path / "proc"), str(tmp_path / "sys")))
    s.open()
    s.sample(1.0, True)
    series = {n: v for n, labels, v in s.series() if labels == ("mlx5_2", "1")}
    errors = {labels[2]: v for n, labels, v in s.series()
              if n == "agentd_rdma_port_errors_total"}
    # The files the adapter has, by node_exporter's names; the ones it lacks are absent.
    assert errors == {"symbol_error": 1234, "port_errors_received": 56,
                      "link_error_recovery": 3, "link_downed": 1,
                      "port_discards_transmitted": 2}
    assert series["agentd_rdma_transmit_wait_total"] == 7
    assert series["agentd_rdma_port_speed_bytes"] == 25e9


def test_network_against_psutil():
    s = NetworkSampler(ctx("/proc", "/sys"), {"device_exclude": "^$"})
    s.open()
    s.sample(1.0, True)
    ours = {labels[0]: v for n, labels, v in s.series()
            if n == "agentd_network_receive_bytes_total"}
    theirs = psutil.net_io_counters(pernic=True)
    for nic, v in ours.items():
        assert abs(theirs[nic].bytes_recv - v) < 10 * 2**20


# --- counters that go backwards, truncated and malformed files --------------------------------
# Temporary copies of the real fixtures, corrupted the way a reset device, a short read or
# a broken file presents them.

import re  # noqa: E402
import shutil  # noqa: E402

from agentd.daemon.runner import SamplerState  # noqa: E402
from agentd.samplers.base import Malformed  # noqa: E402


def _proc_copy(tmp_path) -> str:
    dest = tmp_path / "proc"
    shutil.copytree(VM_PROC, dest)
    return str(dest)


def _bump_diskstats(path: str, dev: str, factor: float) -> None:
    """Scale every counter of one device's line (fields 4..14, in_flight aside)."""
    lines = []
    with open(path) as f:
        for line in f:
            f_ = line.split()
            if f_[2] == dev:
                f_ = f_[:3] + [str(int(int(v) * factor)) if i != 8 else v
                               for i, v in enumerate(f_[3:])]
                line = " ".join(f_) + "\n"
            lines.append(line)
    with open(path, "w") as f:
        f.writelines(lines)


def test_diskstats_counters_going_back_are_a_reset(tmp_path):
    proc = _proc_copy(tmp_path)
    diskstats = os.path.join(proc, "diskstats")
    s = StorageSampler(ctx(proc, str(tmp_path / "nosys")), {"nfs": False})
    s.open()
    s.sample(100.0, True)
    _bump_diskstats(diskstats, "vda", 1.5)
    grown = s.sample(101.0, True)
    assert grown["disk.read:vda"] > 0
    _bump_diskstats(diskstats, "vda", 0.01)  # the device was reset (or replaced)
    reset = s.sample(102.0, True)
    assert not any(k.endswith(":vda") for k in reset), reset  # no figure, not a negative one
    assert all(v >= 0 for v in reset.values())
    _bump_diskstats(diskstats, "vda", 2.0)
    again = s.sample(103.0, True)
    assert again["disk.read:vda"] > 0 and 0 <= again["disk.busy:vda"] <= 1.0


def test_diskstats_short_line_is_an_error_not_a_missing_disk(tmp_path):
    proc = _proc_copy(tmp_path)
    diskstats = os.path.join(proc, "diskstats")
    text = open(diskstats).read()
    vda = next(line for line in text.splitlines() if " vda " in line)
    with pytest.raises(Malformed, match="fields, expected at least 14"):
        parse_diskstats(text.replace(vda, " ".join(vda.split()[:9])))
    with pytest.raises(Malformed, match="truncated"):
        parse_diskstats(text[: text.index(vda) + len(vda) // 2])
    with pytest.raises(Malformed, match="not a number"):
        parse_diskstats(text.replace(vda, vda.replace(vda.split()[5], "12x4", 1)))


def test_truncated_meminfo_counts_an_error_and_exports_no_wrong_number(tmp_path):
    """A /proc/meminfo cut after 'MemTotal:       2468' used to export
    agentd_memory_total_bytes 2468."""
    proc = _proc_copy(tmp_path)
    meminfo = os.path.join(proc, "meminfo")
    full = open(meminfo).read()
    s = MemorySampler(ctx(proc, str(tmp_path)))
    s.open()
    state = SamplerState(s, 1.0, 1.0, None)
    state.available = True
    state.run(0, 1.0)
    total = {n: v for n, _, v in s.series()}["agentd_memory_total_bytes"]
    assert total == 24683656 * 1024
    for cut in (full[: full.index("kB")].rstrip()[:-4],  # inside the MemTotal number
                "Cached:          1234 kB\n",  # no MemTotal at all
                full.replace("MemFree:", "MemFree")):  # a line out of format
        with open(meminfo, "w") as f:
            f.write(cut)
        state.next_try = 0.0
        state.run(1, 1.0)
        assert {n: v for n, _, v in s.series()}["agentd_memory_total_bytes"] == total
    assert state.errors == 3 and not state.success
    assert "meminfo" in state.last_error


def test_vmstat_and_pressure_malformed(tmp_path):
    with pytest.raises(Malformed):
        parse_vmstat("pgmajfault 10\nworkingset_refault_file\n")
    with pytest.raises(Malformed, match="truncated"):
        parse_vmstat("pgmajfault 10\nworkingset_refault_fi")
    with pytest.raises(Malformed, match="truncated"):
        parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=12")
    with pytest.raises(Malformed):
        parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00\n")


def test_pressure_total_going_back_is_no_rate(tmp_path):
    pdir = tmp_path / "pressure"
    pdir.mkdir()
    line = "some avg10=0 avg60=0 avg300=0 total={}\nfull avg10=0 avg60=0 avg300=0 total={}\n"
    for res in ("cpu", "io", "memory"):
        (pdir / res).write_text(line.format(9_000_000, 1_000_000))
    s = PressureSampler(ctx(str(tmp_path), str(tmp_path)))
    s.open()
    s.sample(10.0, True)
    (pdir / "io").write_text(line.format(1000, 0))
    row = s.sample(11.0, True)
    assert "psi.io:" not in row and "psi.io_full:" not in row
    assert row["psi.cpu:"] == 0
    (pdir / "io").write_text(line.format(501000, 250000))
    row = s.sample(12.0, True)
    assert row["psi.io:"] == pytest.approx(0.5)
    (pdir / "memory").write_text("some avg10=0 avg60=0 av")  # a short read of one file
    with pytest.raises(Malformed, match="memory"):
        s.sample(13.0, True)


def test_stat_truncated_and_going_back(tmp_path):
    text = read_text(os.path.join(VM_PROC, "stat"))
    cpu1 = next(line for line in text.splitlines() if line.startswith("cpu1 "))
    with pytest.raises(Malformed, match="CPU columns"):
        parse_stat(text.replace(cpu1, cpu1.rsplit(" ", 4)[0]))
    with pytest.raises(Malformed, match="truncated"):
        parse_stat(text[: text.index(cpu1) + 10])
    a = parse_stat("cpu  100 0 50 1000 40 0 0 0\ncpu0 100 0 50 1000 40 0 0 0\n")
    # iowait may decrease a little (documented kernel behaviour): clamped, the tick stands.
    b = parse_stat("cpu  150 0 60 1090 38 0 0 0\ncpu0 150 0 60 1090 38 0 0 0\n")
    row = usage_row(a, b)
    assert row["cpu.busy:"] == pytest.approx(60 / 150) and row["cpu.iowait:"] == 0
    # user time going back is a reset (CPU hot-plug, a restored snapshot): no figures.
    c = parse_stat("cpu  10 0 60 1190 38 0 0 0\ncpu0 10 0 60 1190 38 0 0 0\n")
    assert usage_row(b, c) == {}


def test_net_dev_truncated_and_going_back(tmp_path):
    text = read_text(os.path.join(VM_PROC, "net", "dev"))
    with pytest.raises(Malformed, match="truncated"):
        parse_net_dev(text[:-20])
    last = text.splitlines()[-1]
    with pytest.raises(Malformed, match="counters, expected 16"):
        parse_net_dev(text.replace(last, last.rsplit(None, 6)[0]))
    proc = _proc_copy(tmp_path)
    s = NetworkSampler(ctx(proc, str(tmp_path / "nosys")), {"device_exclude": "^$"})
    s.open()
    s.sample(1.0, True)
    dev_file = os.path.join(proc, "net", "dev")
    lines = text.splitlines(keepends=True)
    name = lines[2].split(":")[0].strip()
    lines[2] = re.sub(r":\s*\d+", ": 5", lines[2], count=1)  # rx bytes back to 5
    with open(dev_file, "w") as f:
        f.writelines(lines)
    row = s.sample(2.0, True)
    assert f"net.rx:{name}" not in row and all(v >= 0 for v in row.values())


def test_procfile_rereads_in_place_and_grows(tmp_path):
    """A procfs file kept open is read afresh each time (pread at 0), whole even when larger
    than its buffer; a regular file replaced under it is read anew; a process that exited
    reads as absent, and a new one is found again."""
    import subprocess

    p = tmp_path / "f"
    p.write_text("a" * 10)
    f = ProcFile(str(p))
    assert f.read() == "a" * 10
    (tmp_path / "g").write_text("b" * 3)
    os.replace(tmp_path / "g", p)  # as the simulator writes its /proc: a new file
    assert f.read() == "bbb"
    big = ProcFile("/proc/self/mountinfo", size=4)  # kept open, and larger than its buffer
    with open("/proc/self/mountinfo") as g:
        assert big.read() == g.read()
    big.close()
    child = subprocess.Popen(["sleep", "30"])
    stat = ProcFile(f"/proc/{child.pid}/stat")
    assert f"({'sleep'})" in stat.read()
    child.kill()
    child.wait()
    assert stat.read_optional() is None
    stat.path = f"/proc/{os.getpid()}/stat"
    assert stat.read().startswith(f"{os.getpid()} (")
    f.close()
    stat.close()
