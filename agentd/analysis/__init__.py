"""The analysis: why are the GPUs idle? Pure functions over arrays; no I/O, no clock.

    signals.py      every source's data on one time grid (Signals; from_groups for rings)
    evidence.py     the window measured once: per GPU busy, idle, compute, period, peers;
                    links, uplinks, drives, loaders, pressure (Evidence)
    stats.py        estimates with their uncertainty from the source, correlation tests
    limits.py       the ceilings rates are compared with: measured, per device class, unknown
    periodicity.py  the step period, or why it cannot be resolved at this resolution
    detectors/      one module per class, each a finding only on positive evidence
    findings.py     a Finding: subject, mechanism, evidence, expected gain, advice
    core.py         analyze(): evidence -> findings ranked root cause first -> a Report

The daemon runs it in a process of its own (agentd/daemon/analyst.py): it imports numpy and
scipy, which the sampling process never does. docs/analysis.md explains every rule.
"""
