"""The cluster view: which node holds a whole job back, why, and what the fleet loses.

A data-parallel job runs at the pace of its slowest rank, and there every GPU reads ~100%
busy (the others spin in their collectives): per-node views see nothing wrong. This layer sits
on top of the per-node analysis (agentd/analysis/) and compares the nodes of one job with each
other.

    groups.py   jobs from labels: Slurm job, pod owner, systemd unit, HPC job, --group-by
    data.py     Fleet: per-node (and per job) summaries on one time grid, what a source reads
    peers.py    sliding windows and robust peer statistics (median/MAD with natural floors)
    causes.py   per job: the node that deviates and the physics that says why, with its gain
    fleet.py    roll-ups: GPU-hours lost per cause, job and namespace/user, and their cost
    report.py   ClusterReport (JSON) and analyze_fleet(), the pure entry point
    render.py   the text report
    plot.py     --plot: a job's nodes side by side
    source.py   Prometheus (or VictoriaMetrics, Thanos, Mimir): per-node summaries by PromQL
    synth.py    synthetic jobs with planted causes, for the tests and the benchmarks
    run.py      `agentd diagnose --prometheus URL --cluster`

Everything but source.py and run.py is pure: arrays in, findings out.
"""
