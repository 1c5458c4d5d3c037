"""The node daemon (`agentd run`) and its parts.

    core.py        the Daemon: samplers' loops, the window, the HTTP endpoint, signals, reloads
    config.py      defaults, the TOML file and flags, validated into one Config
    runner.py      sampling loops on a fixed grid; one sampler's failure never stops another
    window.py      the high-rate window (ring buffers) and its file format (also recordings)
    exporter.py    /metrics from the samplers' state and the catalog
    exposition.py  the Prometheus text format, written directly
    web.py         the HTTP endpoint from the sampling process: socket, server process, answers
    httpd.py       the HTTP server's own process (TLS, basic auth, deadlines, bounds, caches)
    npzfmt.py      the window's npz re-encoded without numpy (deflated, or JSON), for httpd.py
    webconfig.py   exporter-toolkit's web configuration file
    rolling.py     the rolling analysis behind agentd_finding_* and /api/v1/findings
    analyst.py     the rolling analysis' own process (the only one importing agentd.analysis)
    child.py       starting, framing and supervising those helper processes
    systemd.py     sd_notify (READY, WATCHDOG, STOPPING)

Three processes: sampling (everything above but httpd.py and analyst.py), serving and
analysis; see docs/daemon.md. Importing this package is cheap: `agentd.daemon.window` is read
by `diagnose` too.
"""
