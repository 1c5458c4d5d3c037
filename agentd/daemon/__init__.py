"""The node daemon (`agentd run`) and its parts.

    core.py        the Daemon: samplers' loops, the window, the HTTP endpoint, signals, reloads
    config.py      defaults, the TOML file and flags, validated into one Config
    runner.py      sampling loops on a fixed grid; one sampler's failure never stops another
    window.py      the high-rate window (ring buffers) and its file format (also recordings)
    exporter.py    /metrics from the samplers' state and the catalog
    exposition.py  the Prometheus text format, written directly
    web.py         the HTTP server (TLS, basic auth, bounded concurrency)
    webconfig.py   exporter-toolkit's web configuration file
    rolling.py     the rolling analysis behind agentd_finding_* and /api/v1/findings
    systemd.py     sd_notify (READY, WATCHDOG, STOPPING)

Importing this package is cheap: `agentd.daemon.window` is read by `diagnose` too.
"""
