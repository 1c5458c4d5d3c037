"""Parsers of /proc and /sys files, on fixtures copied from real machines and composed ones,
and 'against' the live system's own view (psutil, the kernel's files)."""

from __future__ import annotations

import os

import psutil
import pytest

from agentd.paths import Paths, read_text
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


def test_network_against_psutil():
    s = NetworkSampler(ctx("/proc", "/sys"), {"device_exclude": "^$"})
    s.open()
    s.sample(1.0, True)
    ours = {labels[0]: v for n, labels, v in s.series()
            if n == "agentd_network_receive_bytes_total"}
    theirs = psutil.net_io_counters(pernic=True)
    for nic, v in ours.items():
        assert abs(theirs[nic].bytes_recv - v) < 10 * 2**20
