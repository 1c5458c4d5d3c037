"""`agentd probe`: the node's measured stage ceilings, written to a state file that the daemon
and `agentd diagnose` read as the limits a finding compares achieved rates with.

    state.py     the state file: format, validation, atomic writes, merging, metrics
    blockdev.py  path -> mount -> whole block device (/proc/self/mountinfo, /sys/class/block)
    storage.py   O_DIRECT read throughput and IOPS at several queue depths (fio, or threads)
    h2d.py       host-to-device copy bandwidth per GPU (torch), else NVML's link rate
    cpu.py       cores a process's cgroup and cpuset allow (cgroup v1 and v2)
    run.py       the command: parts, time budgets, progress, exit codes

A probe loads the node: it runs only when an operator asks, never inside the daemon.
"""
