"""`agentd probe`: the state file, path -> block device, the cgroup's CPU, copy plateaus, the
storage readers against `fio --direct=1` on this machine's disk, and the command's exit codes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from agentd.catalog import METRICS_BY_NAME
from agentd.paths import Paths
from agentd.probe import blockdev, cpu, h2d, state, storage
from conftest import agentd_cmd

GOOD = {
    "version": 1, "measured_at": 1.8e9, "host": "gpu-node-7",
    "storage": {"nvme0n1": {
        "source": "measured", "paths": ["/data"], "seq_read_bytes_per_second": 6.8e9,
        "rand_read_bytes_per_second": 3.9e9, "rand_read_iops": 9.5e5,
        "block_bytes": {"seq": 1 << 20, "rand": 4096},
        "by_queue_depth": {"1": {"seq_read_bytes_per_second": 2.1e9}, "32": {}},
        "method": "fio"}},
    "h2d": {"0": {"source": "measured", "uuid": "GPU-abc", "pinned_bytes_per_second": 5.3e10,
                  "pageable_bytes_per_second": 2.1e10, "link_bytes_per_second": 6.3e10},
            "1": {"source": "nominal", "uuid": "GPU-def", "pinned_bytes_per_second": None,
                  "pageable_bytes_per_second": None, "link_bytes_per_second": 6.3e10}},
    "cpu": {"source": "measured", "cores": 12.5, "cpuset": "0-15", "cgroup": "/train.slice"},
}


# --- the state file ---------------------------------------------------------------------------

def test_valid_document_round_trips(tmp_path):
    path = str(tmp_path / "sub" / "ceilings.json")
    state.write(path, GOOD)
    assert state.load(path) == GOOD
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # the daemon's user reads it
    assert [p for p in os.listdir(tmp_path / "sub")] == ["ceilings.json"]  # no temporaries


@pytest.mark.parametrize("patch, message", [
    ({"version": 2}, "version 2 is not 1"),
    ({"measured_at": "yesterday"}, "measured_at"),
    ({"storage": {"../etc": {"source": "measured"}}}, "not a block device name"),
    ({"storage": {"sda": {"source": "guessed"}}}, "source"),
    ({"storage": {"sda": {"source": "measured", "rand_read_iops": -1}}}, "rand_read_iops"),
    ({"storage": {"sda": {"source": "measured", "by_queue_depth": {"deep": {}}}}},
     "not a queue depth"),
    ({"h2d": {"gpu0": {"source": "nominal"}}}, "not a GPU index"),
    ({"h2d": {"0": {"source": "measured", "pinned_bytes_per_second": float("nan")}}},
     "pinned_bytes_per_second"),
    ({"cpu": {"source": "measured", "cores": True}}, "cores"),
])
def test_invalid_documents_name_the_problem(patch, message):
    with pytest.raises(state.StateError, match=message):
        state.validate({**GOOD, **patch})


def test_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        state.load(str(tmp_path / "absent.json"))
    with pytest.raises(state.StateError, match="it is a directory"):
        state.load(str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(state.StateError, match="is not JSON"):
        state.load(str(bad))


def test_merge_replaces_what_ran_and_keeps_the_rest():
    new = {"version": 1, "measured_at": 1.9e9, "host": "gpu-node-7",
           "storage": {"sda": {"source": "measured"}}, "cpu": {"source": "measured",
                                                              "cores": 4.0}}
    out = state.merge(GOOD, new, ("storage", "cpu"))
    assert set(out["storage"]) == {"nvme0n1", "sda"}  # per device
    assert out["cpu"]["cores"] == 4.0
    assert out["h2d"] == GOOD["h2d"]  # not run: kept
    assert out["measured_at"] == 1.9e9
    other_host = state.merge({**GOOD, "host": "elsewhere"}, new, ("storage",))
    assert set(other_host["storage"]) == {"sda"} and "h2d" not in other_host


def test_metrics_and_back():
    rows = state.series(GOOD)
    names = {r[0] for r in rows}
    assert names == {state.STORAGE_BYTES, state.STORAGE_OPS, state.H2D_BYTES, state.CPU_CORES,
                     state.MEASURED_AT}
    for name, labels, _ in rows:
        assert len(labels) == len(METRICS_BY_NAME[name].labels)
    assert (state.H2D_BYTES, ("1", "GPU-def", "pinned", "nominal"), 6.3e10) in rows
    assert (state.STORAGE_BYTES, ("nvme0n1", "random", "measured"), 3.9e9) in rows
    # What a Prometheus query returns: labels as dicts.
    back = state.from_series([(n, dict(zip(METRICS_BY_NAME[n].labels, lab)), v)
                              for n, lab, v in rows], "x")
    assert back["storage"]["nvme0n1"]["seq_read_bytes_per_second"] == 6.8e9
    assert back["storage"]["nvme0n1"]["rand_read_iops"] == 9.5e5
    assert back["h2d"]["0"]["pageable_bytes_per_second"] == 2.1e10
    assert back["h2d"]["1"]["link_bytes_per_second"] == 6.3e10
    assert back["h2d"]["1"]["pinned_bytes_per_second"] is None
    assert back["cpu"]["cores"] == 12.5 and back["measured_at"] == 1.8e9
    assert state.from_series([]) is None


def test_reader_logs_a_missing_file_once_and_a_bad_one_as_a_warning(tmp_path, caplog):
    log = logging.getLogger("agentd.test.ceilings")
    r = state.Reader(log)
    missing = str(tmp_path / "none.json")
    with caplog.at_level(logging.DEBUG, logger=log.name):
        assert r.read(missing) is None
        assert r.read(missing) is None
    infos = [x for x in caplog.records if x.levelno == logging.INFO]
    assert len(infos) == 1 and "agentd probe" in infos[0].getMessage()
    caplog.clear()
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1}')
    with caplog.at_level(logging.INFO, logger=log.name):
        assert r.read(str(bad)) is None
    assert [x.levelno for x in caplog.records] == [logging.WARNING]
    assert "\n" not in caplog.records[0].getMessage()


# --- path -> block device -----------------------------------------------------------------------

MOUNTINFO = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 27 8:1 / /data rw,relatime shared:1 - xfs /dev/sda1 rw,attr2
34 30 253:0 / /data/lvm rw - ext4 /dev/mapper/vg-lv rw
35 27 9:127 / /scratch rw - ext4 /dev/md127 rw
36 27 0:51 / /mnt/nfs rw - nfs4 server:/export rw,vers=4.2
37 27 0:52 / /mnt/my\040data rw - xfs /dev/sda1 rw
38 27 0:60 / /merged rw - overlay overlay rw,lowerdir=/lower,upperdir=/data/upper,workdir=/w
39 27 0:33 / /dev/shm rw - tmpfs tmpfs rw
"""


@pytest.fixture
def dev_block(tmp_path) -> str:
    """A /sys/dev/block with a partition on a disk, a device-mapper volume and an md array."""
    devices = tmp_path / "devices"
    part = devices / "pci0000:00" / "0000:00:17.0" / "block" / "sda" / "sda1"
    part.mkdir(parents=True)
    (part / "partition").write_text("1\n")
    (devices / "virtual" / "block" / "dm-0").mkdir(parents=True)
    (devices / "virtual" / "block" / "md127").mkdir(parents=True)
    (devices / "virtual" / "block" / "vda").mkdir(parents=True)
    links = tmp_path / "dev" / "block"
    links.mkdir(parents=True)
    for number, target in (("8:1", part), ("253:0", devices / "virtual/block/dm-0"),
                           ("9:127", devices / "virtual/block/md127"),
                           ("254:0", devices / "virtual/block/vda")):
        os.symlink(os.path.relpath(target, links), links / number)
    return str(links)


def test_mountinfo_parsing():
    mounts = blockdev.parse_mountinfo(MOUNTINFO)
    assert len(mounts) == 9
    assert mounts[2].major == 8 and mounts[2].minor == 1 and mounts[2].fstype == "xfs"
    assert mounts[6].mount_point == "/mnt/my data"  # \040 unescaped
    assert blockdev.mount_for("/data/lvm/train", mounts).mount_point == "/data/lvm"
    assert blockdev.mount_for("/database", mounts).mount_point == "/"  # not /data
    assert blockdev.mount_for("/data", mounts).fstype == "xfs"


@pytest.mark.parametrize("path, name, partition", [
    ("/data/imagenet", "sda", "sda1"),  # a partition: its disk
    ("/data/lvm/shards", "dm-0", None),  # device-mapper stays itself
    ("/scratch", "md127", None),  # so does md
    ("/merged/x", "sda", "sda1"),  # overlayfs: where its upper directory lives
    ("/home/user", "vda", None),
])
def test_paths_resolve_to_whole_devices(dev_block, path, name, partition):
    dev = blockdev.resolve(path, blockdev.parse_mountinfo(MOUNTINFO), dev_block)
    assert (dev.name, dev.partition) == (name, partition)


@pytest.mark.parametrize("path, why", [("/mnt/nfs/x", "nfs4"), ("/dev/shm/x", "tmpfs")])
def test_no_local_block_device(dev_block, path, why):
    with pytest.raises(blockdev.NoBlockDevice, match=why):
        blockdev.resolve(path, blockdev.parse_mountinfo(MOUNTINFO), dev_block)


def test_anonymous_device_number_follows_the_mount_source(tmp_path, dev_block):
    """btrfs reports 0:N in mountinfo; the source device node says which disk it is."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    node = tmp_path / "nvme0n1p2"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(8, 1))
    text = f"40 27 0:45 / /fast rw - btrfs {node} rw\n"
    dev = blockdev.resolve("/fast/x", blockdev.parse_mountinfo(text), dev_block)
    assert dev.name == "sda"


def test_this_machine_agrees_with_stat():
    """The path's own device number (stat) names the same disk as the mountinfo walk."""
    here = os.path.dirname(os.path.abspath(__file__))
    st = os.stat(here)
    dev = blockdev.block_device(here)
    if os.major(st.st_dev) == 0:
        pytest.skip("this checkout is on a filesystem without a device number of its own")
    node = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    whole = os.path.basename(os.path.dirname(node)) if os.path.exists(
        os.path.join(node, "partition")) else os.path.basename(node)
    assert dev.name == whole
    with open("/proc/diskstats") as f:
        assert dev.name in {line.split()[2] for line in f}


# --- CPU ----------------------------------------------------------------------------------------

def test_cpulists():
    assert cpu.parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert cpu.format_cpulist({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11"
    assert cpu.parse_cpu_max("max 100000") is None
    assert cpu.parse_cpu_max("250000 100000") == 2.5


def _tree(tmp_path, mountinfo: str, cgroup: str, files: dict[str, str]) -> Paths:
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "4242").mkdir()
    (proc / "self" / "mountinfo").write_text(mountinfo.replace("@", str(tmp_path)))
    (proc / "4242" / "cgroup").write_text(cgroup)
    online = sys_ / "devices" / "system" / "cpu"
    online.mkdir(parents=True)
    (online / "online").write_text("0-31\n")
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return Paths(str(proc), str(sys_))


def test_cgroup_v2_quota_is_the_tightest_ancestor(tmp_path):
    paths = _tree(tmp_path, "30 1 0:26 / @/cg rw - cgroup2 cgroup2 rw\n",
                  "0::/train.slice/job.service\n", {
                      "cg/cpu.max": "max 100000\n",
                      "cg/train.slice/cpu.max": "400000 100000\n",
                      "cg/train.slice/job.service/cpu.max": "max 100000\n",
                      "cg/train.slice/job.service/cpuset.cpus.effective": "0-3,8-11\n"})
    c = cpu.measure(pid=4242, paths=paths)
    assert c["cores"] == 4.0 and c["quota_cores"] == 4.0
    assert c["cpuset"] == "0-3,8-11" and c["cpuset_cores"] == 8
    assert c["cgroup"] == "/train.slice/job.service"


def test_cgroup_v1_and_v2_mixed(tmp_path):
    """This project's machines: v1 cpu and cpuset controllers, a v2 tree without them."""
    paths = _tree(tmp_path, (
        "32 31 0:29 / @/cpu rw - cgroup cgroup rw,cpu\n"
        "34 31 0:31 / @/cpuset rw - cgroup cgroup rw,cpuset\n"
        "41 31 0:38 / @/unified rw - cgroup2 cgroup2 rw\n"),
        "3:cpuset:/jobs/17\n1:cpu:/jobs/17\n0::/\n", {
            "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n",
            "cpu/jobs/cpu.cfs_quota_us": "-1\n", "cpu/jobs/cpu.cfs_period_us": "100000\n",
            "cpu/jobs/17/cpu.cfs_quota_us": "150000\n",
            "cpu/jobs/17/cpu.cfs_period_us": "100000\n",
            "cpuset/jobs/17/cpuset.effective_cpus": "4-7\n"})
    c = cpu.measure(pid=4242, paths=paths)
    assert c["cores"] == 1.5 and c["cpuset"] == "4-7" and c["cgroup"] == "/jobs/17"
    # Named by its directory instead of a process:
    c = cpu.measure(cgroup=str(tmp_path / "cpu" / "jobs" / "17"), paths=paths)
    assert c["cores"] == 1.5
    with pytest.raises(cpu.CpuError, match="no such cgroup"):
        cpu.measure(cgroup="/jobs/18", paths=paths)


def _remove_cgroup(d: str) -> None:
    """rmdir a cgroup once its last process has gone (the kernel takes a moment)."""
    for _ in range(50):
        try:
            os.rmdir(d)
            return
        except OSError:
            time.sleep(0.1)


@pytest.fixture
def v1_groups():
    """A real cgroup v1 pair (cpu quota 1.5 cores; cpuset CPU 0) holding a sleeping child."""
    roots = {c: f"/sys/fs/cgroup/{c}" for c in ("cpu", "cpuset")}
    if os.geteuid() != 0 or not all(os.path.isfile(f"{r}/cgroup.procs") and not os.path.exists(
            f"{r}/cgroup.controllers") for r in roots.values()):
        pytest.skip("needs root and the cgroup v1 cpu and cpuset controllers")
    name = f"agentd-test-probe-{os.getpid()}"
    dirs = {c: os.path.join(r, name) for c, r in roots.items()}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    with open(f"{dirs['cpu']}/cpu.cfs_quota_us", "w") as f:
        f.write("150000")
    with open(f"{roots['cpuset']}/cpuset.mems") as f:
        mems = f.read().strip()
    with open(f"{dirs['cpuset']}/cpuset.mems", "w") as f:
        f.write(mems)
    with open(f"{dirs['cpuset']}/cpuset.cpus", "w") as f:
        f.write("0")
    child = subprocess.Popen(["sleep", "60"])
    try:
        for d in dirs.values():
            with open(f"{d}/cgroup.procs", "w") as f:
                f.write(str(child.pid))
        yield child.pid, name
    finally:
        child.kill()
        child.wait()
        for d in dirs.values():
            _remove_cgroup(d)


def test_real_cgroup_through_the_command(v1_groups, tmp_path):
    pid, name = v1_groups
    out = tmp_path / "c.json"
    r = subprocess.run(agentd_cmd("probe", "--parts", "cpu", "--pid", str(pid),
                                  "--state-file", str(out)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    c = json.loads(out.read_text())["cpu"]
    # Affinity follows the cpuset; the quota would allow 1.5.
    assert c["cpuset"] == "0" and c["cores"] == 1.0 and c["quota_cores"] == 1.5
    assert c["cgroup"] == f"/{name}"
    r = subprocess.run(agentd_cmd("probe", "--parts", "cpu", "--cgroup",
                                  f"/sys/fs/cgroup/cpu/{name}", "--state-file", str(out)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["cpu"]["quota_cores"] == 1.5


# --- host-to-device copies ------------------------------------------------------------------

def test_plateau_is_where_the_rate_stops_growing():
    mib = h2d.MIB
    points = [(1 * mib, 6e9), (4 * mib, 15e9), (16 * mib, 24.1e9), (64 * mib, 24.6e9),
              (256 * mib, 24.4e9)]
    assert h2d.plateau(points) == 24.4e9  # median of the flat tail
    assert h2d.plateau([(mib, 0.0)]) is None
    assert h2d.plateau([(4 * mib, 10e9), (mib, 5e9)]) == 10e9  # order does not matter


class _Runtime:
    """A CUDA runtime's copy rates, for what cannot run here: mapping CUDA's device order to
    NVML's by UUID, and one GPU's failure not costing the others."""

    name = "test-runtime"

    def __init__(self, uuids, broken=()):
        self.uuids, self.broken = uuids, broken

    def devices(self):
        return self.uuids

    def rate(self, device, size, pinned, seconds):
        if device in self.broken:
            raise RuntimeError("CUDA error: out of memory")
        peak = (25e9 if pinned else 10e9) * (1 + device)
        return peak * size / (size + 2 * h2d.MIB)


def test_measured_copies_map_to_nvml_indexes_by_uuid():
    gpus = [h2d.Gpu(0, "GPU-a", 63e9), h2d.Gpu(1, "GPU-b", 63e9), h2d.Gpu(2, "GPU-c", 31e9)]
    # CUDA sees them in another order, and not GPU-c at all.
    out, failures = h2d.measure(gpus, _Runtime(["GPU-b", "GPU-a"]), budget=2)
    assert failures == []
    assert out["0"]["source"] == "measured" and out["1"]["source"] == "measured"
    assert out["1"]["pinned_bytes_per_second"] == pytest.approx(25e9, rel=0.05)  # CUDA 0
    assert out["0"]["pinned_bytes_per_second"] == pytest.approx(50e9, rel=0.05)  # CUDA 1
    assert out["0"]["pageable_bytes_per_second"] < out["0"]["pinned_bytes_per_second"]
    assert out["2"] == {"source": "nominal", "uuid": "GPU-c", "pinned_bytes_per_second": None,
                        "pageable_bytes_per_second": None, "link_bytes_per_second": 31e9}
    out, failures = h2d.measure(gpus[:2], _Runtime(["GPU-a", "GPU-b"], broken=(0,)), budget=2)
    assert out["0"]["source"] == "nominal" and out["1"]["source"] == "measured"
    assert len(failures) == 1 and "GPU 0" in failures[0]


def test_unmatched_uuids_fall_back_to_pci_order_only_when_safe(monkeypatch):
    gpus = [h2d.Gpu(0, "GPU-a", 63e9), h2d.Gpu(1, "GPU-b", 63e9)]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out, failures = h2d.measure(gpus, _Runtime(["GPU-other-1", "GPU-other-2"]), budget=2)
    assert failures == [] and out["1"]["pinned_bytes_per_second"] == pytest.approx(
        50e9, rel=0.05)  # CUDA 1 is NVML 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    out, failures = h2d.measure(gpus, _Runtime(["GPU-other-1", "GPU-other-2"]), budget=2)
    assert all(e["source"] == "nominal" for e in out.values())
    assert len(failures) == 1 and "cannot tell which" in failures[0]


def test_nominal_link_rates_from_fake_gpus(tmp_path):
    scen = tmp_path / "gpus.toml"
    scen.write_text("[[gpus]]\ncount = 2\npcie_max_generation = 4\npcie_max_width = 16\n")
    out = tmp_path / "c.json"
    r = subprocess.run(agentd_cmd("probe", "--parts", "h2d", "--fake-nvml", str(scen),
                                  "--state-file", str(out)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert set(doc["h2d"]) == {"0", "1"}
    e = doc["h2d"]["0"]
    assert e["source"] == "nominal" and e["pinned_bytes_per_second"] is None
    assert e["link_bytes_per_second"] == pytest.approx(16e9 * 128 / 130 / 8 * 16)
    assert e["uuid"].startswith("GPU-")


def test_no_gpu_leaves_h2d_empty(tmp_path):
    out = tmp_path / "c.json"
    r = subprocess.run(agentd_cmd("probe", "--parts", "h2d", "--state-file", str(out)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["h2d"] == {}


# --- storage ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def disk_dir():
    """A directory on this machine's disk (not tmpfs), removed after the module."""
    directory = os.environ.get("AGENTD_TEST_DISK_DIR", "/var/tmp")
    try:
        blockdev.block_device(directory)
    except blockdev.NoBlockDevice as e:
        pytest.skip(f"no disk-backed directory: {e}")
    d = os.path.join(directory, f"agentd-test-probe-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def disk_file(disk_dir):
    """A test file on the disk, written once for the module."""
    d = os.path.join(disk_dir, "file")
    os.makedirs(d, exist_ok=True)
    return storage.create_test_file(d, 512 << 20, time.monotonic() + 60)


def test_thread_reader_counts_only_the_measured_window(disk_file):
    spec = storage.RunSpec("rand", 4, storage.RAND_BLOCK, 1.0)
    r = storage.ThreadReader().run(disk_file, spec)
    assert r.iops > 100
    assert r.bytes_per_second == pytest.approx(r.iops * storage.RAND_BLOCK)


def test_a_reader_that_cannot_open_is_one_line(tmp_path):
    """A worker's failure comes back as the reason, not as a hang or a traceback."""
    t = storage.Target(str(tmp_path / "gone.dat"), 4 << 20, True)
    with pytest.raises(storage.StorageError, match="cannot open .*gone.dat with O_DIRECT"):
        storage.ThreadReader().run(t, storage.RunSpec("rand", 2, storage.RAND_BLOCK, 0.5))


# --- the command ----------------------------------------------------------------------------

def probe(*args, timeout=180):
    r = subprocess.run(agentd_cmd("probe", *args), capture_output=True, text=True,
                       timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    return r


@pytest.mark.parametrize("args, message", [
    (["--parts", "gpu"], "unknown part 'gpu'"),
    (["--parts", "storage"], "needs --storage PATH"),
    (["--budget", "soon"], "--budget"),
    (["--storage", "/no/such/dir"], "no such file or directory"),
    (["--file-size", "big", "--storage", "."], "--file-size"),
    (["--queue-depths", "0,8"], "--queue-depths"),
    (["--pid", "999999999"], "no such process"),
])
def test_usage_errors_exit_2(tmp_path, args, message):
    r = probe(*args, "--state-file", str(tmp_path / "c.json"))
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unwritable_state_file_exits_4_before_measuring(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    t0 = time.monotonic()
    r = probe("--parts", "cpu", "--state-file", str(blocker / "ceilings.json"))
    assert r.returncode == 4 and "cannot write ceilings file" in r.stderr
    assert time.monotonic() - t0 < 30


def test_a_part_that_cannot_measure_exits_3_and_writes_the_rest(tmp_path):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    out = tmp_path / "c.json"
    r = probe("--parts", "storage,cpu", "--storage", "/dev/shm", "--state-file", str(out))
    assert r.returncode == 3
    assert "storage: /dev/shm is on tmpfs" in r.stderr
    doc = json.loads(out.read_text())
    assert doc["cpu"]["cores"] >= 1 and doc["storage"] == {}


@pytest.mark.slow
def test_probe_inside_a_read_limited_cgroup(tmp_path, disk_dir):
    """Run from inside a cgroup with a read-bandwidth limit (as a job's unit may have), the
    probe measures the limit: the ceiling that job can have."""
    blkio = "/sys/fs/cgroup/blkio"
    if os.geteuid() != 0 or not os.path.isfile(f"{blkio}/cgroup.procs") or os.path.exists(
            f"{blkio}/cgroup.controllers"):
        pytest.skip("needs root and the cgroup v1 blkio controller")
    dev = blockdev.block_device(disk_dir)
    group = f"{blkio}/agentd-test-probe-{os.getpid()}"
    os.makedirs(group, exist_ok=True)
    limit = 16 << 20
    with open(f"/sys/class/block/{dev.name}/dev") as f:
        number = f.read().strip()
    with open(f"{group}/blkio.throttle.read_bps_device", "w") as f:
        f.write(f"{number} {limit}")
    directory = os.path.join(disk_dir, "limited")
    os.makedirs(directory, exist_ok=True)
    out = tmp_path / "c.json"
    join = ("import os, sys\nopen(sys.argv[1], 'w').write(str(os.getpid()))\n"
            "os.execv(sys.executable, [sys.executable] + sys.argv[2:])")
    try:
        r = subprocess.run([sys.executable, "-c", join, f"{group}/cgroup.procs", "-m", "agentd",
                            "probe", "--parts", "storage", "--storage", directory,
                            "--queue-depths", "1,8", "--budget", "6s", "--file-size", "64M",
                            "--state-file", str(out)],
                           capture_output=True, text=True, timeout=180)
    finally:
        _remove_cgroup(group)
    assert r.returncode == 0, r.stderr
    e = json.loads(out.read_text())["storage"][dev.name]
    assert e["seq_read_bytes_per_second"] == pytest.approx(limit, rel=0.15)
    assert e["rand_read_iops"] == pytest.approx(limit / 4096, rel=0.15)


@pytest.mark.slow
def test_storage_probe_end_to_end(tmp_path, disk_dir):
    """The whole command on this machine's disk: written, merged, the test file removed."""
    out = tmp_path / "c.json"
    state.write(str(out), {**GOOD, "host": os.uname().nodename})
    directory = os.path.join(disk_dir, "e2e")
    os.makedirs(directory, exist_ok=True)
    r = probe("--parts", "storage", "--storage", directory, "--storage-method", "threads",
              "--budget", "10s", "--queue-depths", "1,8", "--file-size", "128M",
              "--state-file", str(out), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    dev = blockdev.block_device(directory).name
    e = doc["storage"][dev]
    assert e["method"] == "threads" and e["paths"] == [directory]
    assert set(e["by_queue_depth"]) == {"1", "8"}
    assert e["rand_read_iops"] == max(q["rand_read_iops"] for q in e["by_queue_depth"].values())
    assert e["seq_read_bytes_per_second"] > 1e6
    assert "nvme0n1" in doc["storage"] and doc["h2d"] == GOOD["h2d"]  # the rest kept
    assert not os.path.exists(os.path.join(directory, storage.TEST_FILE))
    assert json.loads(r.stdout[r.stdout.index("{"):]) == doc


def test_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "c.json"
    r = probe("--parts", "cpu", "--dry-run", "--json", "--state-file", str(out))
    assert r.returncode == 0, r.stderr
    assert not out.exists()
    doc = json.loads(r.stdout[r.stdout.index("{"):])
    assert doc["cpu"]["cores"] >= 1 and "storage" not in doc


def test_progress_bar_on_a_terminal(tmp_path):
    """A bar redrawn in place on a TTY (a pseudo-terminal here); plain lines elsewhere."""
    import pty

    main, sub = pty.openpty()
    p = subprocess.Popen(agentd_cmd("probe", "--parts", "cpu,h2d", "--state-file",
                                    str(tmp_path / "c.json")),
                         stdin=sub, stdout=subprocess.PIPE, stderr=sub)
    os.close(sub)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert p.wait(60) == 0
    assert b"\rprobe [" in out and b"agentd probe: cpu:" not in out
    r = probe("--parts", "cpu", "--state-file", str(tmp_path / "c.json"))
    assert "agentd probe: cpu: reading the cgroup" in r.stderr and "\r" not in r.stderr
