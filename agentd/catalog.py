"""The one table of what agentd measures: canonical signals and the metrics that export them.

The exporter reads METRICS for every family's type, help and label names, the docs
(docs/metrics.md) are generated from it, and the tests fail on any exported name not in it.
SIGNALS names the unit-carrying signals that the window, the recordings and the analysis see,
whatever the source (agentd's samplers, a recording, dcgm-exporter or node_exporter in Prometheus).
"""

from __future__ import annotations

from dataclasses import dataclass

from agentd.jobs import JOB_LABELS


@dataclass(frozen=True)
class Signal:
    name: str
    unit: str
    help: str
    rate: str  # "fast" or "slow": the default sampling loop that feeds it


@dataclass(frozen=True)
class MetricSpec:
    name: str
    type: str  # "counter", "gauge", or "summary" (quantiles only)
    unit: str
    help: str
    labels: tuple[str, ...]
    source: str  # the sampler (or "self", "window") that exports it
    signal: str | None = None  # the canonical signal it carries, when it carries one


SIGNALS: dict[str, Signal] = {
    s.name: s
    for s in [
        Signal("gpu.busy", "ratio", "fraction of time a kernel ran (NVML utilization)", "fast"),
        Signal("gpu.busy_time", "seconds/s",
               "kernel time credited in the tick per second of tick (its mean over any window "
               "is the exact busy share, as rate() of the busy counter)", "fast"),
        Signal("gpu.util_sample", "ratio",
               "mean of the driver's utilization samples that arrived in the tick (NaN when "
               "none did)", "fast"),
        Signal("gpu.util_sample_age", "seconds",
               "how long before the tick the middle of those samples' periods lies, on the "
               "driver's own timeline: the samples' true times, for the step period", "fast"),
        Signal("gpu.sm_active", "ratio", "fraction of SMs busy (GPM SM utilization)", "fast"),
        Signal("gpu.sm_occupancy", "ratio", "resident warps over the maximum (GPM)", "fast"),
        Signal("gpu.tensor_active", "ratio", "fraction of time tensor cores ran (GPM)", "fast"),
        Signal("gpu.dram_active", "ratio", "DRAM bandwidth used over its peak (GPM)", "fast"),
        Signal("gpu.pcie_rx", "bytes/s", "PCIe bytes received by the GPU (host to device)", "fast"),
        Signal("gpu.pcie_tx", "bytes/s", "PCIe bytes sent by the GPU (device to host)", "fast"),
        Signal("gpu.pcie_capacity", "bytes/s", "PCIe link capacity per direction", "slow"),
        Signal("gpu.nvlink_rx", "bytes/s", "NVLink data bytes received", "fast"),
        Signal("gpu.nvlink_tx", "bytes/s", "NVLink data bytes sent", "fast"),
        Signal("gpu.mem_used", "bytes", "device memory in use", "slow"),
        Signal("gpu.sm_clock", "Hz", "SM clock", "slow"),
        Signal("gpu.sm_clock_max", "Hz", "maximum SM clock", "slow"),
        Signal("gpu.power", "W", "power draw", "slow"),
        Signal("gpu.power_limit", "W", "enforced power limit", "slow"),
        Signal("gpu.temperature", "celsius", "GPU temperature", "slow"),
        Signal("gpu.throttle", "bits",
               "clock-event reasons, NVML bit order (agentd.gpu.backend.CLOCK_EVENT_REASONS)",
               "slow"),
        Signal("cpu.busy", "cores", "CPU time not idle or iowait, in cores", "fast"),
        Signal("cpu.user", "cores", "user and nice CPU time, in cores", "fast"),
        Signal("cpu.system", "cores", "system, irq and softirq CPU time, in cores", "fast"),
        Signal("cpu.iowait", "cores", "iowait time, in cores", "fast"),
        Signal("cpu.steal", "cores", "time stolen by the hypervisor, in cores", "fast"),
        Signal("cpu.max_core", "ratio", "busy fraction of the busiest core over the last second",
               "slow"),
        Signal("cpu.count", "cores", "online CPUs", "fast"),
        Signal("cpu.procs_blocked", "tasks", "tasks blocked on I/O (D state)", "fast"),
        Signal("disk.read", "bytes/s", "bytes read from a whole block device", "fast"),
        Signal("disk.write", "bytes/s", "bytes written to a whole block device", "fast"),
        Signal("disk.read_ops", "ops/s", "reads completed", "fast"),
        Signal("disk.busy", "ratio", "fraction of time the device had I/O in flight", "fast"),
        Signal("disk.queue", "requests", "mean requests in flight (weighted I/O time)", "fast"),
        Signal("disk.await", "seconds", "mean time per completed request", "fast"),
        Signal("nfs.read", "bytes/s", "bytes read by NFS READ operations, per mount", "fast"),
        Signal("psi.cpu", "ratio", "share of time some task waited for CPU", "slow"),
        Signal("psi.io", "ratio", "share of time some task waited for I/O", "slow"),
        Signal("psi.io_full", "ratio", "share of time all non-idle tasks waited for I/O", "slow"),
        Signal("psi.memory", "ratio", "share of time some task waited for memory", "slow"),
        Signal("mem.available", "bytes", "MemAvailable", "slow"),
        Signal("mem.cached", "bytes", "page cache", "slow"),
        Signal("mem.refault", "pages/s", "file pages refaulted after eviction", "slow"),
        Signal("net.rx", "bytes/s", "bytes received by a network interface", "slow"),
        Signal("net.tx", "bytes/s", "bytes sent by a network interface", "slow"),
        Signal("rdma.rx", "bytes/s", "bytes received by an RDMA port", "slow"),
        Signal("rdma.tx", "bytes/s", "bytes sent by an RDMA port", "slow"),
        # A tree's members are read on slow ticks (every tick while it is its root alone).
        Signal("proc.cpu", "cores", "CPU of a GPU process and its descendants", "slow"),
        Signal("proc.max_member_cpu", "cores", "CPU of the busiest process in the tree", "slow"),
        Signal("proc.root_cpu", "cores",
               "CPU of the tree's root (the trainer): the rest is its data-loader workers'",
               "fast"),
        Signal("proc.members", "processes", "processes in the tree (trainer and workers)", "slow"),
        Signal("proc.read", "bytes/s", "bytes the tree caused to be read from storage", "slow"),
        Signal("proc.rchar", "bytes/s", "bytes the tree read through read() and friends", "slow"),
        Signal("proc.blocked", "processes", "processes of the tree in D state", "slow"),
        # What the daemon's rolling analysis served (agentd_finding_*), read back from
        # Prometheus and counted per scrape in each step; subject "KIND@GPU".
        # agentd/analysis/daemon_view.py
        Signal("daemon.scrapes", "scrapes", "scrapes of the node's agentd", "slow"),
        Signal("daemon.reports", "scrapes",
               "those that served a current report of its rolling analysis", "slow"),
        Signal("daemon.finding", "severity",
               "the severest it served of that finding on that GPU: 0 none, 1 info, "
               "2 warning, 3 critical (NaN: no report)", "slow"),
        Signal("daemon.finding_warned", "scrapes",
               "reports that held the finding at warning or worse", "slow"),
        Signal("daemon.finding_named", "scrapes", "reports that named the finding", "slow"),
        Signal("daemon.finding_stall", "ratio x scrapes",
               "the share of the GPU's time they said the finding cost, summed", "slow"),
        Signal("daemon.finding_confidence", "ratio", "the finding's confidence, while named",
               "slow"),
    ]
}

_GPU = ("gpu", "uuid")
_JOB = JOB_LABELS
_M = MetricSpec

METRICS: list[MetricSpec] = [
    # --- agentd itself -----------------------------------------------------------------------
    _M("agentd_build_info", "gauge", "", "Build information; the value is always 1.",
       ("version", "python_version", "gpu_backend"), "self"),
    _M("agentd_sampler_available", "gauge", "",
       "1 when the sampler's source is present (0: absent hardware or file, see the log).",
       ("sampler",), "self"),
    _M("agentd_sampler_success", "gauge", "", "1 when the sampler's last run succeeded.",
       ("sampler",), "self"),
    _M("agentd_sampler_duration_seconds", "gauge", "seconds", "Duration of the sampler's last run.",
       ("sampler",), "self"),
    _M("agentd_sampler_interval_seconds", "gauge", "seconds", "Configured interval of the sampler.",
       ("sampler",), "self"),
    _M("agentd_sampler_runs_total", "counter", "", "Runs of the sampler.", ("sampler",), "self"),
    _M("agentd_sampler_errors_total", "counter", "", "Runs of the sampler that failed.",
       ("sampler",), "self"),
    _M("agentd_sampler_overruns_total", "counter", "",
       "Ticks skipped because a run took longer than the interval.", ("sampler",), "self"),
    _M("agentd_sampler_last_success_timestamp_seconds", "gauge", "seconds",
       "Unix time of the sampler's last successful run.", ("sampler",), "self"),
    _M("agentd_config_last_reload_successful", "gauge", "",
       "1 when the last configuration (re)load succeeded.", (), "self"),
    _M("agentd_config_last_reload_success_timestamp_seconds", "gauge", "seconds",
       "Unix time of the last successful configuration load.", (), "self"),
    _M("agentd_window_capacity_seconds", "gauge", "seconds",
       "Time the high-rate window holds at the fast interval.", (), "window"),
    _M("agentd_window_memory_bytes", "gauge", "bytes",
       "Memory the high-rate window's ring buffers use now (they grow up to a fixed bound).",
       (), "window"),
    _M("agentd_window_columns_dropped_total", "counter", "",
       "Window channels refused because a ring was full of live channels.", ("sampler",), "window"),
    _M("agentd_window_stats_seconds", "gauge", "seconds",
       "Length of the trailing window the agentd_gpu_window_* statistics cover.", (), "window"),
    _M("agentd_fake_nvml_cpu_seconds_total", "counter", "seconds",
       "CPU time spent emulating the NVIDIA driver (only with --fake-nvml; part of "
       "process_cpu_seconds_total, absent on real GPUs).", (), "self"),
    _M("process_cpu_seconds_total", "counter", "seconds", "agentd's own user and system CPU time.",
       (), "self"),
    _M("process_resident_memory_bytes", "gauge", "bytes", "agentd's own resident memory.", (), "self"),
    _M("process_virtual_memory_bytes", "gauge", "bytes", "agentd's own virtual memory.", (), "self"),
    _M("process_start_time_seconds", "gauge", "seconds", "Unix time agentd started.", (), "self"),
    _M("process_open_fds", "gauge", "", "agentd's open file descriptors.", (), "self"),
    _M("process_max_fds", "gauge", "", "agentd's file descriptor limit.", (), "self"),
    _M("agentd_child_resident_memory_bytes", "gauge", "bytes",
       "Resident memory of agentd's helper processes (web: the HTTP server, analysis: the "
       "rolling analysis); process_resident_memory_bytes is the sampling process'.",
       ("process",), "self"),
    _M("agentd_child_cpu_seconds_total", "counter", "seconds",
       "User and system CPU time of agentd's helper processes (from 0 again after a restart); "
       "process_cpu_seconds_total is the sampling process'.", ("process",), "self"),
    _M("agentd_child_restarts_total", "counter", "",
       "Helper processes started again after they exited, hung or failed.", ("process",),
       "self"),
    _M("agentd_http_requests_total", "counter", "",
       "HTTP requests answered, by status code (those of server processes that exited "
       "included: it never goes back).", ("code",), "web"),
    _M("agentd_http_refused_total", "counter", "",
       "Connections and requests refused or cut off to keep sampling on time, by reason: "
       "connection_limit, queue_full, auth_rate_limited, deadline (request headers or TLS "
       "handshake too slow), tls_handshake (failed).", ("reason",), "web"),
    _M("agentd_http_open_connections", "gauge", "", "HTTP connections open now.", (), "web"),
    # --- GPU ---------------------------------------------------------------------------------
    _M("agentd_gpu_info", "gauge", "",
       "One series per GPU, lost ones included (labels it could not read are empty); the "
       "value is always 1. utilization_source: samples (the driver's sample buffer), rates "
       "(nvmlDeviceGetUtilizationRates integrated per tick, coarser) or none (busy time "
       "absent, never 0). UUID, device (nvidiaN), pci_bus_id and hostname are "
       "dcgm-exporter's label names and values, to join its series (e.g. on (UUID)); its "
       "modelName is name here, its Hostname (older releases) hostname (promtool wants "
       "snake_case label names).",
       _GPU + ("name", "pci_bus_id", "driver_version", "pcie_counter_source",
               "utilization_source", "UUID", "device", "hostname"), "gpu"),
    _M("agentd_gpu_busy_seconds_total", "counter", "seconds",
       "Time a kernel ran, integrated from the driver's utilization sample buffer "
       "(rate() is the mean utilization over any window).", _GPU, "gpu", "gpu.busy"),
    _M("agentd_gpu_sm_active_seconds_total", "counter", "seconds",
       "SM activity integrated over time (GPM; rate() is the mean fraction of SMs busy).",
       _GPU, "gpu", "gpu.sm_active"),
    _M("agentd_gpu_sm_occupancy_seconds_total", "counter", "seconds",
       "SM occupancy integrated over time (GPM).", _GPU, "gpu", "gpu.sm_occupancy"),
    _M("agentd_gpu_tensor_active_seconds_total", "counter", "seconds",
       "Tensor-core activity integrated over time (GPM).", _GPU, "gpu", "gpu.tensor_active"),
    _M("agentd_gpu_dram_active_seconds_total", "counter", "seconds",
       "DRAM bandwidth utilization integrated over time (GPM).", _GPU, "gpu", "gpu.dram_active"),
    _M("agentd_gpu_memory_used_bytes", "gauge", "bytes", "Device memory in use.", _GPU, "gpu",
       "gpu.mem_used"),
    _M("agentd_gpu_memory_total_bytes", "gauge", "bytes", "Device memory installed.", _GPU, "gpu"),
    _M("agentd_gpu_sm_clock_hertz", "gauge", "hertz", "Current SM clock.", _GPU, "gpu",
       "gpu.sm_clock"),
    _M("agentd_gpu_sm_clock_max_hertz", "gauge", "hertz", "Maximum SM clock.", _GPU, "gpu",
       "gpu.sm_clock_max"),
    _M("agentd_gpu_power_watts", "gauge", "watts", "Power draw.", _GPU, "gpu", "gpu.power"),
    _M("agentd_gpu_power_limit_watts", "gauge", "watts", "Enforced power limit.", _GPU, "gpu",
       "gpu.power_limit"),
    _M("agentd_gpu_temperature_celsius", "gauge", "celsius", "GPU die temperature.", _GPU, "gpu",
       "gpu.temperature"),
    _M("agentd_gpu_clock_event_active", "gauge", "",
       "1 while the clock-event (throttle) reason is active.", _GPU + ("reason",), "gpu",
       "gpu.throttle"),
    _M("agentd_gpu_clock_event_seconds_total", "counter", "seconds",
       "Time the clock-event (throttle) reason was active, sampled at the slow interval.",
       _GPU + ("reason",), "gpu"),
    _M("agentd_gpu_pcie_rx_bytes_total", "counter", "bytes",
       "PCIe bytes received by the GPU (host to device).", _GPU, "gpu", "gpu.pcie_rx"),
    _M("agentd_gpu_pcie_tx_bytes_total", "counter", "bytes",
       "PCIe bytes sent by the GPU (device to host).", _GPU, "gpu", "gpu.pcie_tx"),
    _M("agentd_gpu_pcie_link_generation", "gauge", "", "Current PCIe link generation.", _GPU, "gpu"),
    _M("agentd_gpu_pcie_link_max_generation", "gauge", "", "Maximum PCIe link generation.", _GPU,
       "gpu"),
    _M("agentd_gpu_pcie_link_width", "gauge", "", "Current PCIe link width in lanes.", _GPU, "gpu"),
    _M("agentd_gpu_pcie_link_max_width", "gauge", "", "Maximum PCIe link width in lanes.", _GPU,
       "gpu"),
    _M("agentd_gpu_pcie_link_capacity_bytes_per_second", "gauge", "",
       "Usable PCIe bandwidth per direction at the maximum generation and width "
       "(after line encoding).", _GPU, "gpu", "gpu.pcie_capacity"),
    _M("agentd_gpu_nvlink_rx_bytes_total", "counter", "bytes", "NVLink data bytes received.",
       _GPU, "gpu", "gpu.nvlink_rx"),
    _M("agentd_gpu_nvlink_tx_bytes_total", "counter", "bytes", "NVLink data bytes sent.",
       _GPU, "gpu", "gpu.nvlink_tx"),
    _M("agentd_gpu_xid_errors_total", "counter", "",
       "XID events reported by the driver, by class (application, degraded, fatal, unknown: "
       "agentd/gpu/xid.py); every class is exported at 0 from the start, so increase() sees "
       "the first event. Alert on this one.", _GPU + ("class",), "gpu"),
    _M("agentd_gpu_xid_code_errors_total", "counter", "",
       "XID events by code; a code's series is born at its first event, so increase() misses "
       "that one (alert on agentd_gpu_xid_errors_total).", _GPU + ("xid",), "gpu"),
    _M("agentd_gpu_xid_last_code", "gauge", "",
       "Code of the GPU's last XID event since agentd started (0: none), as dcgm-exporter's "
       "DCGM_FI_DEV_XID_ERRORS.", _GPU, "gpu"),
    _M("agentd_gpu_ecc_errors_total", "counter", "",
       "ECC errors over the GPU's lifetime (aggregate counters).", _GPU + ("type",), "gpu"),
    _M("agentd_gpu_remapped_rows", "gauge", "", "Memory rows remapped, by cause.",
       _GPU + ("cause",), "gpu"),
    _M("agentd_gpu_remapped_rows_pending", "gauge", "",
       "1 when a row remapping waits for a GPU reset.", _GPU, "gpu"),
    _M("agentd_gpu_remapped_rows_failed", "gauge", "", "1 when a row remapping failed.", _GPU,
       "gpu"),
    _M("agentd_gpu_lost", "gauge", "",
       "1 once the driver reports the GPU lost (fallen off the bus); it is no longer sampled.",
       _GPU, "gpu"),
    _M("agentd_gpu_errors_total", "counter", "",
       "NVML calls on this GPU that failed unexpectedly (neither unsupported nor GPU lost); "
       "the value they read is absent while they fail, the log names the call and error.",
       _GPU, "gpu"),
    _M("agentd_gpu_process_memory_used_bytes", "gauge", "bytes",
       "Device memory used by a job's processes on the GPU (job labels: agentd/jobs.py); "
       "which jobs use which GPU.", _GPU + _JOB, "gpu"),
    _M("agentd_gpu_process_cpu_seconds_total", "counter", "seconds",
       "User and system CPU of a job's process trees on the GPU (its trainer and data-loader "
       "workers; a tree holding several GPUs counts under its first): one rank's loader apart "
       "from the job's others.", _GPU + _JOB, "process"),
    _M("agentd_gpu_process_root_cpu_seconds_total", "counter", "seconds",
       "User and system CPU of the trainers (tree roots) among them.", _GPU + _JOB, "process"),
    _M("agentd_gpu_process_members", "gauge", "",
       "Processes in a job's trees on the GPU (trainer and workers).", _GPU + _JOB, "process"),
    _M("agentd_gpu_process_sm_utilization_ratio", "gauge", "ratio",
       "SM utilization the driver attributes to a job's processes on the GPU.", _GPU + _JOB,
       "gpu"),
    _M("agentd_gpu_window_idle_ratio", "gauge", "ratio",
       "Fraction of the trailing window the GPU was idle (busy below the idle threshold).",
       _GPU, "window"),
    _M("agentd_gpu_window_longest_idle_seconds", "gauge", "seconds",
       "Longest continuous idle gap in the trailing window.", _GPU, "window"),
    _M("agentd_gpu_window_utilization_ratio", "summary", "ratio",
       "Quantiles (0.1, 0.5, 0.9) of GPU utilization at the fast interval over the trailing "
       "window (a sliding-window summary: quantiles only; rate() of "
       "agentd_gpu_busy_seconds_total is the exact mean).", _GPU + ("quantile",), "window"),
    # --- the rolling analysis ----------------------------------------------------------------
    _M("agentd_finding_active", "gauge", "",
       "1 for each finding of the latest analysis and each GPU it concerns (gpu=\"\": the "
       "node as a whole).", ("kind", "severity") + _GPU, "analysis"),
    _M("agentd_finding_expected_speedup_ratio", "gauge", "ratio",
       "How much faster the affected GPUs' steps would run were the finding's cause removed "
       "(1.5: 50% more steps per second); the finding's figure, on each GPU it concerns.",
       ("kind",) + _GPU, "analysis"),
    _M("agentd_finding_stall_ratio", "gauge", "ratio",
       "Share of the affected GPUs' time lost to the finding's cause; the finding's figure, "
       "on each GPU it concerns.", ("kind",) + _GPU, "analysis"),
    _M("agentd_finding_confidence_ratio", "gauge", "ratio",
       "Confidence of the finding, 0 to 1, on each GPU it concerns.", ("kind",) + _GPU,
       "analysis"),
    _M("agentd_gpu_stall_ratio", "gauge", "ratio",
       "Share of the analysis window the GPU ran no kernel (NVML utilization), checkpoint "
       "writes excluded.", _GPU, "analysis"),
    _M("agentd_gpu_compute_ratio", "gauge", "ratio",
       "Share of the analysis window the GPU computed, from SM activity (collective waits "
       "excluded).", _GPU, "analysis"),
    _M("agentd_gpu_step_period_seconds", "gauge", "seconds",
       "Typical interval between two training steps, found in the GPU's activity (copies "
       "counted or a periodogram; pauses such as evaluation excluded); absent where it "
       "cannot be resolved.", _GPU, "analysis"),
    _M("agentd_analysis_runs_total", "counter", "", "Runs of the rolling analysis.", (),
       "analysis"),
    _M("agentd_analysis_skipped_total", "counter", "",
       "Looks at the window that did not run the rolling analysis: every GPU's busy share, "
       "SM activity, clock and power where the last run saw them, no finding held at "
       "warning, the analysis process up, the last run recent (--analysis.max-interval); "
       "the last report stands.", (), "analysis"),
    _M("agentd_analysis_errors_total", "counter", "",
       "Rolling analysis runs that failed (the analysis raised, or its process died or missed "
       "its deadline); findings are no longer exported once the last success is stale.", (),
       "analysis"),
    _M("agentd_analysis_duration_seconds", "gauge", "seconds",
       "Duration of the last analysis run.", (), "analysis"),
    _M("agentd_analysis_window_seconds", "gauge", "seconds",
       "Length of the window each analysis run covers.", (), "analysis"),
    _M("agentd_analysis_last_run_timestamp_seconds", "gauge", "seconds",
       "Unix time of the last analysis run.", (), "analysis"),
    # --- ceilings measured by `agentd probe` (its state file; absent until it has run) ------
    _M("agentd_storage_read_ceiling_bytes_per_second", "gauge", "",
       "Read throughput the whole block device reached with O_DIRECT (page cache excluded), "
       "best over queue depths: sequential 1 MiB reads, random 4 KiB reads.",
       ("device", "pattern", "source"), "probe"),
    _M("agentd_storage_read_ceiling_operations_per_second", "gauge", "",
       "Random 4 KiB O_DIRECT reads per second the device completed, best over queue depths.",
       ("device", "source"), "probe"),
    _M("agentd_gpu_h2d_ceiling_bytes_per_second", "gauge", "",
       "Host-to-device copy bandwidth from pinned or pageable memory (source measured); "
       "source nominal: the PCIe link's rate, what a pinned copy could reach at most.",
       ("gpu", "uuid", "memory", "source"), "probe"),
    _M("agentd_cpu_ceiling_cores", "gauge", "",
       "Cores the trainer's cgroup allows: its cpuset, capped by its CPU quota.", ("source",),
       "probe"),
    _M("agentd_ceilings_measured_timestamp_seconds", "gauge", "seconds",
       "Unix time `agentd probe` last wrote the ceilings in use.", (), "probe"),
    # --- CPU ---------------------------------------------------------------------------------
    _M("agentd_cpu_seconds_total", "counter", "seconds", "CPU time of all CPUs, per mode.",
       ("mode",), "cpu"),
    _M("agentd_cpu_core_seconds_total", "counter", "seconds",
       "CPU time per core and mode (only with --collector.cpu.per-core; node_exporter's "
       "node_cpu_seconds_total has it too).", ("cpu", "mode"), "cpu"),
    _M("agentd_cpu_online", "gauge", "", "Online CPUs.", (), "cpu", "cpu.count"),
    _M("agentd_cpu_procs_blocked", "gauge", "", "Tasks blocked waiting for I/O (D state).", (),
       "cpu", "cpu.procs_blocked"),
    _M("agentd_cpu_procs_running", "gauge", "", "Tasks runnable.", (), "cpu"),
    _M("agentd_cpu_context_switches_total", "counter", "", "Context switches.", (), "cpu"),
    # --- memory ------------------------------------------------------------------------------
    _M("agentd_memory_total_bytes", "gauge", "bytes", "MemTotal.", (), "memory"),
    _M("agentd_memory_available_bytes", "gauge", "bytes", "MemAvailable.", (), "memory",
       "mem.available"),
    _M("agentd_memory_cached_bytes", "gauge", "bytes", "Page cache (Cached).", (), "memory",
       "mem.cached"),
    _M("agentd_memory_dirty_bytes", "gauge", "bytes", "Dirty pages waiting for writeback.", (),
       "memory"),
    _M("agentd_memory_writeback_bytes", "gauge", "bytes", "Pages under writeback.", (), "memory"),
    _M("agentd_memory_swap_used_bytes", "gauge", "bytes", "Swap in use.", (), "memory"),
    _M("agentd_memory_major_faults_total", "counter", "", "Major page faults (pgmajfault).", (),
       "memory"),
    _M("agentd_memory_pages_scanned_total", "counter", "",
       "Pages scanned for reclaim (kswapd and direct).", (), "memory"),
    _M("agentd_memory_pages_reclaimed_total", "counter", "",
       "Pages reclaimed (kswapd and direct).", (), "memory"),
    _M("agentd_memory_file_refaults_total", "counter", "",
       "File pages read again after the page cache evicted them (workingset_refault_file).", (),
       "memory", "mem.refault"),
    # --- pressure ----------------------------------------------------------------------------
    _M("agentd_pressure_waiting_seconds_total", "counter", "seconds",
       "Pressure stall time: some (at least one task) or full (all non-idle tasks) waited.",
       ("resource", "kind"), "pressure"),
    # --- storage -----------------------------------------------------------------------------
    _M("agentd_disk_read_bytes_total", "counter", "bytes", "Bytes read from the device.",
       ("device",), "storage", "disk.read"),
    _M("agentd_disk_written_bytes_total", "counter", "bytes", "Bytes written to the device.",
       ("device",), "storage", "disk.write"),
    _M("agentd_disk_reads_completed_total", "counter", "", "Reads completed.", ("device",),
       "storage", "disk.read_ops"),
    _M("agentd_disk_writes_completed_total", "counter", "", "Writes completed.", ("device",),
       "storage"),
    _M("agentd_disk_read_time_seconds_total", "counter", "seconds", "Time spent on reads.",
       ("device",), "storage"),
    _M("agentd_disk_write_time_seconds_total", "counter", "seconds", "Time spent on writes.",
       ("device",), "storage"),
    _M("agentd_disk_io_time_seconds_total", "counter", "seconds",
       "Time the device had I/O in flight (busy).", ("device",), "storage", "disk.busy"),
    _M("agentd_disk_io_time_weighted_seconds_total", "counter", "seconds",
       "I/O time weighted by requests in flight (rate() is the mean queue depth).", ("device",),
       "storage", "disk.queue"),
    _M("agentd_disk_io_now", "gauge", "", "Requests in flight.", ("device",), "storage"),
    _M("agentd_disk_info", "gauge", "", "One series per whole block device; the value is 1.",
       ("device", "model", "rotational", "pci_address"), "storage"),
    _M("agentd_nfs_read_bytes_total", "counter", "bytes",
       "Bytes read from the server by NFS READ operations.", ("mountpoint", "export"), "storage",
       "nfs.read"),
    _M("agentd_nfs_write_bytes_total", "counter", "bytes",
       "Bytes written to the server by NFS WRITE operations.", ("mountpoint", "export"), "storage"),
    _M("agentd_nfs_operations_total", "counter", "", "NFS operations, by type.",
       ("mountpoint", "export", "operation"), "storage"),
    _M("agentd_nfs_rtt_seconds_total", "counter", "seconds",
       "Round-trip time of NFS operations, summed.", ("mountpoint", "export", "operation"),
       "storage"),
    _M("agentd_nfs_execute_seconds_total", "counter", "seconds",
       "Time from queueing to completion of NFS operations, summed.",
       ("mountpoint", "export", "operation"), "storage"),
    # --- network -----------------------------------------------------------------------------
    _M("agentd_network_receive_bytes_total", "counter", "bytes", "Bytes received.", ("device",),
       "network", "net.rx"),
    _M("agentd_network_transmit_bytes_total", "counter", "bytes", "Bytes sent.", ("device",),
       "network", "net.tx"),
    _M("agentd_network_receive_packets_total", "counter", "", "Packets received.", ("device",),
       "network"),
    _M("agentd_network_transmit_packets_total", "counter", "", "Packets sent.", ("device",),
       "network"),
    _M("agentd_network_receive_drop_total", "counter", "", "Received packets dropped.",
       ("device",), "network"),
    _M("agentd_network_receive_errors_total", "counter", "", "Receive errors.", ("device",),
       "network"),
    _M("agentd_network_transmit_errors_total", "counter", "", "Transmit errors.", ("device",),
       "network"),
    _M("agentd_network_speed_bytes", "gauge", "bytes",
       "Negotiated link speed in bytes per second.", ("device",), "network"),
    _M("agentd_rdma_receive_bytes_total", "counter", "bytes", "Bytes received by the RDMA port.",
       ("device", "port"), "network", "rdma.rx"),
    _M("agentd_rdma_transmit_bytes_total", "counter", "bytes", "Bytes sent by the RDMA port.",
       ("device", "port"), "network", "rdma.tx"),
    _M("agentd_rdma_receive_packets_total", "counter", "", "Packets received by the RDMA port.",
       ("device", "port"), "network"),
    _M("agentd_rdma_transmit_packets_total", "counter", "", "Packets sent by the RDMA port.",
       ("device", "port"), "network"),
    _M("agentd_rdma_transmit_wait_total", "counter", "",
       "Ticks the port had data to send but no flow-control credits (port_xmit_wait).",
       ("device", "port"), "network"),
    _M("agentd_rdma_port_errors_total", "counter", "",
       "The RDMA port's error counters by type (node_exporter's names): link errors "
       "(symbol_error, port_errors_received, local_link_integrity_errors, "
       "excessive_buffer_overrun_errors, port_discards_transmitted) and the link's "
       "link_error_recovery and link_downed events; those the adapter has.",
       ("device", "port", "type"), "network"),
    _M("agentd_rdma_port_speed_bytes", "gauge", "bytes", "RDMA port rate in bytes per second.",
       ("device", "port"), "network"),
    # --- processes ---------------------------------------------------------------------------
    _M("agentd_process_trees", "gauge", "",
       "GPU process trees (a GPU process and its descendants, e.g. a trainer and its "
       "data-loader workers) watched per job; the agentd_process_* series sum them. Job "
       "labels: agentd/jobs.py (only the ones that identify the job are set). Command lines "
       "are never exported.", _JOB, "process"),
    _M("agentd_process_cpu_seconds_total", "counter", "seconds",
       "User and system CPU of the job's GPU process trees (data-loader workers included).",
       _JOB, "process", "proc.cpu"),
    _M("agentd_process_root_cpu_seconds_total", "counter", "seconds",
       "User and system CPU of the trees' roots (the trainers themselves): the rest of "
       "agentd_process_cpu_seconds_total is their data-loader workers'.", _JOB, "process",
       "proc.root_cpu"),
    _M("agentd_process_read_bytes_total", "counter", "bytes",
       "Bytes the job's trees caused to be fetched from storage (/proc/PID/io read_bytes).",
       _JOB, "process", "proc.read"),
    _M("agentd_process_read_chars_total", "counter", "bytes",
       "Bytes the job's trees read through read() and friends, page-cache hits included "
       "(rchar).", _JOB, "process", "proc.rchar"),
    _M("agentd_process_written_bytes_total", "counter", "bytes",
       "Bytes the job's trees caused to be sent to storage (write_bytes).", _JOB, "process"),
    _M("agentd_process_members", "gauge", "", "Processes in the job's trees.", _JOB,
       "process", "proc.members"),
    _M("agentd_process_blocked", "gauge", "",
       "Processes of the job's trees in uninterruptible sleep (D state, usually waiting for "
       "I/O).", _JOB, "process", "proc.blocked"),
    _M("agentd_process_resident_memory_bytes", "gauge", "bytes",
       "Resident memory of the job's trees.", _JOB, "process"),
    # --- topology ----------------------------------------------------------------------------
    _M("agentd_pcie_device_info", "gauge", "",
       "A GPU, NVMe drive or network adapter on PCIe, where it hangs (root port, switch) and "
       "its block, network or RDMA device name (one series per name); value 1.",
       ("address", "kind", "name", "root_port", "switch", "numa_node"), "topology"),
    _M("agentd_pcie_link_capacity_bytes_per_second", "gauge", "",
       "Usable bandwidth per direction of the device's link at its current speed and width.",
       ("address",), "topology"),
    _M("agentd_pcie_link_max_capacity_bytes_per_second", "gauge", "",
       "Usable bandwidth per direction of the device's link at its maximum speed and width.",
       ("address",), "topology"),
    _M("agentd_pcie_shared_uplink", "gauge", "",
       "1 for each GPU and NVMe drive behind the same PCIe switch (whose uplink capacity is "
       "agentd_pcie_uplink_capacity_bytes_per_second{switch}).",
       ("gpu_address", "nvme_address", "switch"), "topology"),
    _M("agentd_pcie_uplink_capacity_bytes_per_second", "gauge", "",
       "Usable bandwidth per direction of the upstream link of a PCIe switch that carries both "
       "GPUs and NVMe drives, at its current speed and width.", ("switch",), "topology"),
]

METRICS_BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}


def render_markdown() -> str:
    """docs/metrics.md, generated so it cannot drift from what the exporter serves."""
    lines = [
        "# Metrics",
        "",
        "Generated from `agentd/catalog.py` by `agentd catalog --markdown`; do not edit by hand.",
        "",
        "## Metrics served on /metrics",
        "",
        "| name | type | labels | source | signal | help |",
        "|---|---|---|---|---|---|",
    ]
    for m in METRICS:
        labels = ", ".join(m.labels)
        lines.append(
            f"| `{m.name}` | {m.type} | {labels} | {m.source} | {m.signal or ''} | {m.help} |"
        )
    lines += [
        "",
        "## Canonical signals (window, recordings, analysis)",
        "",
        "| signal | unit | loop | meaning |",
        "|---|---|---|---|",
    ]
    for s in SIGNALS.values():
        lines.append(f"| `{s.name}` | {s.unit} | {s.rate} | {s.help} |")
    return "\n".join(lines) + "\n"
