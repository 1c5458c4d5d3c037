"""Storage throughput and latency per whole block device (/proc/diskstats) and per NFS mount
(/proc/self/mountstats).

Partitions are left out: their I/O is already counted in their disk's line, so adding them
would count it twice. A name is a whole device when /sys/block has an entry for it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

from agentd.paths import ProcFile, read_optional
from agentd.samplers.base import (Malformed, Option, Row, Sampler, Series, Unavailable, complete,
                                  ints, regex)

SECTOR = 512  # /proc/diskstats counts 512-byte sectors whatever the device's block size
# Used only when no sysfs is available to tell disks from partitions.
_PARTITION = re.compile(r"^(?:(?:[hsv]|xv)d[a-z]+\d+|nvme\d+n\d+p\d+|mmcblk\d+p\d+)$")


class DiskStat(NamedTuple):
    """One line of /proc/diskstats. A NamedTuple, not a frozen dataclass: every line is
    parsed ten times a second, and a frozen dataclass' __init__ costs several times a
    tuple's."""

    reads: int
    read_bytes: int
    read_ms: int
    writes: int
    write_bytes: int
    write_ms: int
    in_flight: int
    io_ms: int
    weighted_ms: int


def parse_diskstats(text: str, path: str = "/proc/diskstats") -> dict[str, DiskStat]:
    """Every line, or Malformed: a line with fewer than the 14 fields every kernel since
    2.6.25 prints, or with a field that is not a number, is a truncated or corrupt read."""
    out = {}
    for n, line in enumerate(complete(text, path).splitlines(), 1):
        f = line.split()
        if not f:
            continue
        if len(f) < 14:
            raise Malformed(f"{path} line {n}: {len(f)} fields, expected at least 14")
        v = ints(f[3:14], path, n)
        # reads, read bytes, read ms, writes, written bytes, write ms, in flight, io ms,
        # weighted ms (positional: this runs for every line ten times a second)
        out[f[2]] = DiskStat(v[0], v[2] * SECTOR, v[3], v[4], v[6] * SECTOR, v[7], v[8], v[9],
                             v[10])
    return out


def went_back(prev: DiskStat, cur: DiskStat) -> bool:
    """A counter that decreased: the device was reset or replaced (or the counters wrapped,
    on 32-bit kernels). Its rates are unknown for that tick. (in_flight is a gauge.)"""
    return (cur.reads < prev.reads or cur.read_bytes < prev.read_bytes
            or cur.read_ms < prev.read_ms or cur.writes < prev.writes
            or cur.write_bytes < prev.write_bytes or cur.write_ms < prev.write_ms
            or cur.io_ms < prev.io_ms or cur.weighted_ms < prev.weighted_ms)


@dataclass(frozen=True)
class NfsOp:
    ops: int
    rtt_ms: int
    execute_ms: int


@dataclass(frozen=True)
class NfsMount:
    export: str
    mountpoint: str
    read_bytes: int  # bytes the client read from the server (READ payload)
    write_bytes: int  # bytes the client wrote to the server (WRITE payload)
    ops: dict[str, NfsOp]


def parse_mountstats(text: str) -> list[NfsMount]:
    """NFS mounts in /proc/PID/mountstats (format: statvers=1.1, fs/nfs/stats.c)."""
    mounts = []
    cur: dict | None = None
    in_ops = False
    for line in text.splitlines():
        if line.startswith("device "):
            if cur:
                mounts.append(NfsMount(**cur))
            cur = None
            in_ops = False
            # device SERVER:/export mounted on /mnt with fstype nfs4 statvers=1.1
            parts = line.split()
            if len(parts) >= 8 and parts[7].startswith("nfs"):
                cur = {"export": parts[1], "mountpoint": parts[4], "read_bytes": 0,
                       "write_bytes": 0, "ops": {}}
            continue
        if cur is None:
            continue
        s = line.strip()
        if s.startswith("bytes:"):
            # normal read, normal write, direct read, direct write, server read, server write
            b = [int(x) for x in s.split()[1:]]
            if len(b) >= 6:
                cur["read_bytes"], cur["write_bytes"] = b[4], b[5]
        elif s.startswith("per-op statistics"):
            in_ops = True
        elif in_ops and ":" in s:
            op, _, rest = s.partition(":")
            v = rest.split()
            # ops transmissions timeouts bytes_sent bytes_recv queue_ms rtt_ms execute_ms ...
            if len(v) >= 8 and op in ("READ", "WRITE", "GETATTR", "LOOKUP", "ACCESS", "OPEN"):
                cur["ops"][op] = NfsOp(int(v[0]), int(v[6]), int(v[7]))
    if cur:
        mounts.append(NfsMount(**cur))
    return mounts


class StorageSampler(Sampler):
    name = "storage"
    help = "per whole block device bytes, IOs, busy and weighted time; NFS mounts"
    default_rate = "fast"
    options = {
        "device_exclude": Option(str, r"^(ram|loop|fd|zram)\d+$",
                                 "regular expression of device names to leave out", check=regex),
        "nfs": Option(bool, True, "read NFS client statistics from mountstats"),
    }

    def open(self) -> None:
        self._diskstats = self.ctx.paths.proc("diskstats")
        self._mountstats = self.ctx.paths.proc("self", "mountstats")
        self._diskstats_file = ProcFile(self._diskstats)
        self._mountstats_file = ProcFile(self._mountstats)
        try:
            stats = parse_diskstats(self._diskstats_file.read(), self._diskstats)
        except OSError as e:
            raise Unavailable(f"cannot read {self._diskstats}: {e.strerror}") from None
        try:
            self._exclude = re.compile(self.opts["device_exclude"])
        except re.error as e:
            raise ValueError(f"collectors.storage.device_exclude: {e}") from None
        self._last: dict[str, DiskStat] = stats
        self._last_t: float | None = None  # the first tick sets the time base
        self._last_nfs: dict[str, tuple[float, int]] = {}
        self._nfs: list[NfsMount] = []
        self._keys: dict[str, tuple[str, ...]] = {}  # device -> its window channels
        self._devices = self._whole_devices(stats)
        self._export_info()

    def _whole_devices(self, stats: dict[str, DiskStat]) -> list[str]:
        block = self.ctx.paths.sys("block")
        names = sorted(stats)
        if os.path.isdir(block):
            present = set(os.listdir(block))
            names = [n for n in names if n.replace("/", "!") in present]
        else:
            names = [n for n in names if not _PARTITION.match(n)]
        return [n for n in names if not self._exclude.match(n)]

    def _export_info(self) -> None:
        info = []
        self._info: dict[str, dict] = {}
        for dev in self._devices:
            base = self.ctx.paths.sys("block", dev.replace("/", "!"))
            model = (read_optional(os.path.join(base, "device", "model")) or "").strip()
            rotational = (read_optional(os.path.join(base, "queue", "rotational")) or "").strip()
            pci = ""
            try:
                # .../0000:00:04.0/nvme/nvme0/nvme0n1 -> the PCI function the disk hangs on
                real = os.path.realpath(base)
                for part in real.split(os.sep):
                    if re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", part):
                        pci = part
            except OSError:
                pass
            info.append(("agentd_disk_info", (dev, model, rotational, pci), 1.0))
            self._info[dev] = {"model": model, "rotational": rotational, "pci_address": pci}
        self.out.replace_gauges("info", info)

    def sample(self, now: float, slow: bool) -> Row:
        stats = parse_diskstats(self._diskstats_file.read(), self._diskstats)
        if slow and set(stats) != set(self._last):
            # Hot-plugged or removed device: rediscover, and forget the vanished ones.
            self._devices = self._whole_devices(stats)
            self._export_info()
        row: Row = {}
        first = self._last_t is None
        dt = now - self._last_t if not first else 0.0
        last = self._last
        for dev in self._devices if dt > 0 else ():
            s = stats.get(dev)
            p = last.get(dev)
            if s is None or p is None:
                continue
            if went_back(p, s):
                self.log_once(logging.INFO, ("reset", dev), "%s: counters went backwards "
                              "(device reset or replaced); counting again from here", dev)
                continue
            keys = self._keys.get(dev)
            if keys is None:  # the channel names, formatted once per device
                keys = self._keys[dev] = tuple(f"disk.{k}:{dev}" for k in (
                    "read", "write", "read_ops", "busy", "queue", "await"))
            ops = (s.reads - p.reads) + (s.writes - p.writes)
            row[keys[0]] = (s.read_bytes - p.read_bytes) / dt
            row[keys[1]] = (s.write_bytes - p.write_bytes) / dt
            row[keys[2]] = (s.reads - p.reads) / dt
            row[keys[3]] = min((s.io_ms - p.io_ms) / 1e3 / dt, 1.0)
            row[keys[4]] = (s.weighted_ms - p.weighted_ms) / 1e3 / dt
            if ops > 0:
                busy_ms = (s.read_ms - p.read_ms) + (s.write_ms - p.write_ms)
                row[keys[5]] = busy_ms / 1e3 / ops
        self._last = stats
        self._last_t = now
        # mountstats is as long as the mount table and mostly not NFS: while no NFS mount
        # is there it is read on slow ticks only (and the first), which finds a new mount
        # within one slow interval; once there is one, every tick.
        if self.opts["nfs"] and (slow or first or self._nfs):
            row.update(self._sample_nfs(now))
        return row

    def _sample_nfs(self, now: float) -> Row:
        text = self._mountstats_file.read_optional()
        mounts = parse_mountstats(text) if text and "nfs" in text else []
        row: Row = {}
        for m in mounts:
            last = self._last_nfs.get(m.mountpoint)
            if last is not None and now > last[0] and m.read_bytes >= last[1]:  # else remounted
                row[f"nfs.read:{m.mountpoint}"] = (m.read_bytes - last[1]) / (now - last[0])
            self._last_nfs[m.mountpoint] = (now, m.read_bytes)
        self._nfs = mounts
        return row

    def meta(self) -> dict:
        """The whole devices, for the analysis' device-class defaults (joined with their
        PCIe links by the daemon)."""
        return {"disks": {k: dict(v) for k, v in getattr(self, "_info", {}).items()}}

    def close(self) -> None:
        self._diskstats_file.close()
        self._mountstats_file.close()

    def series(self) -> list[Series]:
        # Built from the last reading at scrape time: the kernel keeps these counters already.
        out = self.out.items()  # agentd_disk_info
        stats = self._last
        for dev in self._devices:
            s = stats.get(dev)
            if s is None:
                continue
            d = (dev,)
            out += [
                ("agentd_disk_read_bytes_total", d, s.read_bytes),
                ("agentd_disk_written_bytes_total", d, s.write_bytes),
                ("agentd_disk_reads_completed_total", d, s.reads),
                ("agentd_disk_writes_completed_total", d, s.writes),
                ("agentd_disk_read_time_seconds_total", d, s.read_ms / 1e3),
                ("agentd_disk_write_time_seconds_total", d, s.write_ms / 1e3),
                ("agentd_disk_io_time_seconds_total", d, s.io_ms / 1e3),
                ("agentd_disk_io_time_weighted_seconds_total", d, s.weighted_ms / 1e3),
                ("agentd_disk_io_now", d, s.in_flight),
            ]
        for m in self._nfs:
            labels = (m.mountpoint, m.export)
            out.append(("agentd_nfs_read_bytes_total", labels, m.read_bytes))
            out.append(("agentd_nfs_write_bytes_total", labels, m.write_bytes))
            for op, o in m.ops.items():
                ol = labels + (op,)
                out.append(("agentd_nfs_operations_total", ol, o.ops))
                out.append(("agentd_nfs_rtt_seconds_total", ol, o.rtt_ms / 1e3))
                out.append(("agentd_nfs_execute_seconds_total", ol, o.execute_ms / 1e3))
        return out
