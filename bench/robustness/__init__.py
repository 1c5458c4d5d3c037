"""The robustness suite: agentd's diagnoses on telemetry it did not generate.

An independent model of training nodes (it shares nothing with agentd/sim or the analysis):
    hardware.py   boards, drives, PCIe switches: published specifications and measurements
    pwc.py        piecewise-constant signals, integrated exactly
    timeline.py   the event-level timeline of a node's jobs, with the cause of every idle second
    cases.py      the cases (healthy and each class), drawn from a seed, and their ground truth
    sampling.py   the timeline read as agentd's samplers read a node; agentd recordings
    exporters.py  the timeline as dcgm-exporter and node_exporter series, backfilled into a
                  real Prometheus with promtool
    run.py        the runner: diagnoses every case from every source and scores them

Run it with `python -m bench.robustness` (see docs/robustness.md).
"""
