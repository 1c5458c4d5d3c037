"""Configuration and command-line errors: one line, exit 2, never a traceback."""

from __future__ import annotations

import argparse
import re
import subprocess

import pytest

from agentd.daemon import config as C
from conftest import agentd_cmd


def parse(*flags: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    C.add_run_flags(p)
    return p.parse_args(list(flags))


def test_defaults():
    cfg = C.build(parse(), env={})
    assert cfg.listen_address == ":9445"
    assert cfg.fast_interval == 0.1 and cfg.slow_interval == 1.0 and cfg.window_seconds == 600
    assert cfg.collector("gpu").enabled and cfg.collector("topology").interval == 60.0


def test_file_then_env_then_flags(tmp_path):
    f = tmp_path / "agentd.toml"
    f.write_text('[sampling]\nfast_interval = "50ms"\nwindow = "5m"\n'
                 '[collectors.storage]\ndevice_exclude = "^sd"\n'
                 '[collectors.network]\nenabled = false\n')
    scenario = tmp_path / "s.toml"
    scenario.write_text("[[gpus]]\ncount = 1\n")
    cfg = C.build(parse("--config.file", str(f), "--sampling.window", "2m",
                        "--collector.network", "--collector.process.max-trees", "8"),
                  env={C.FAKE_NVML_ENV: str(scenario)})
    assert cfg.fast_interval == 0.05
    assert cfg.window_seconds == 120  # the flag wins over the file
    assert cfg.collector("storage").options["device_exclude"] == "^sd"
    assert cfg.collector("network").enabled  # --collector.network re-enables it
    assert cfg.collector("process").options["max_trees"] == 8
    assert cfg.fake_nvml == str(scenario)


def test_boolean_collector_option_alone_switches_it_on():
    assert not C.build(parse(), env={}).collector("cpu").options["per_core"]
    assert C.build(parse("--collector.cpu.per-core"), env={}).collector("cpu").options["per_core"]
    cfg = C.build(parse("--collector.gpu.processes=false"), env={})
    assert cfg.collector("gpu").options["processes"] is False


@pytest.mark.parametrize("text, message", [
    ("[sampling]\nfast_interval = \"fast\"\n", "sampling.fast_interval: 'fast' is not a duration"),
    ("[sampling]\nspeed = 1\n", "unknown key sampling.speed"),
    ("[nonsense]\nx = 1\n", "unknown section [nonsense]"),
    ("[collectors.gpu]\nfrobnicate = true\n", "unknown option 'frobnicate' for collector gpu"),
    ("[collectors.warp]\nenabled = true\n", "unknown collector 'warp'"),
    ("[collectors.process]\nmax_trees = \"many\"\n", "expected an integer"),
    ("[web]\nlisten_address = \"nowhere\"\n", "is not HOST:PORT"),
    ("this is = = not toml", "agentd.toml"),
])
def test_bad_config_files(tmp_path, text, message):
    f = tmp_path / "agentd.toml"
    f.write_text(text)
    with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        C.build(parse("--config.file", str(f)), env={})


@pytest.mark.parametrize("text, seconds", [
    ("100ms", 0.1), ("10m", 600), (2, 2), (0.5, 0.5), ("0.5", 0.5), ("30", 30),
    # Prometheus' grammar: units in order, each at most once
    ("1h30m", 5400), ("1d", 86400), ("1w", 7 * 86400), ("1y", 365 * 86400),
    ("2m30s", 150), ("1s500ms", 1.5), ("1y2w3d4h5m6s7ms", 365 * 86400 + 17 * 86400 + 14706.007),
    # a fraction per part, as Go's time.ParseDuration takes it
    ("1.5h", 5400), (".5s", 0.5), (" 5m ", 300),
])
def test_parse_duration(text, seconds):
    assert C.parse_duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("text, message", [
    ("0s", "must be a positive duration"), ("0", "must be a positive duration"),
    ("-1s", "must be a positive duration"), (-1, "must be a positive duration"),
    (float("nan"), "must be a positive duration"), (float("inf"), "must be a positive"),
    ("1..5s", "'1..5s' is not a duration"), ("1h1h", "not a duration"),
    ("1m1h", "not a duration"), ("", "not a duration"), ("ms", "not a duration"),
    ("5x", "not a duration"), ("nan", "not a duration"), ("inf", "not a duration"),
    ("1e3", "not a duration"), (True, "expected a duration"), ("9" * 400, "positive"),
])
def test_parse_duration_refuses(text, message):
    with pytest.raises(C.ConfigError, match=re.escape(message)):
        C.parse_duration(text, "x")


def test_parse_duration_bounds_say_them():
    with pytest.raises(C.ConfigError, match=re.escape("x: must be between 10ms and 10s, got 20s")):
        C.parse_duration("20s", "x", 0.01, 10)
    assert C.parse_duration("10s", "x", 0.01, 10) == 10


@pytest.mark.parametrize("text, message", [
    ('[sampling]\nwindow = "1000000h"\n', "TiB of memory at a 100ms fast interval"),
    ('[sampling]\nfast_interval = "0.0001ms"\n', "must be between 10ms and 10s"),
    ('[sampling]\nfast_interval = "20s"\nslow_interval = "1m"\n', "between 10ms and 10s"),
    ('[sampling]\nslow_interval = "1h"\n', "between 100ms and 10m"),
    ('[sampling]\nwindow = "5s"\n', "at least 10s"),
    ('[sampling]\nstats_window = "100ms"\n', "at least 1s"),
    ('[sampling]\nidle_threshold = 1.5\n', "must be in [0, 1)"),
    ('[sampling]\nidle_threshold = nan\n', "must be in [0, 1)"),
    ('[analysis]\ninterval = "2h"\n', "between 1s and 1h"),
    ('[analysis]\nwindow = "1s"\n', "at least 10s"),
    ('[collectors.process]\nmax_trees = -5\n', "must be between 1 and 4096, got -5"),
    ('[collectors.process]\nmax_trees = 1.5\n', "expected an integer, got 1.5"),
    ('[collectors.gpu]\ngpm_interval = -1\n', "must be a positive duration"),
    ('[collectors.gpu]\ngpm_interval = "50ms"\n', "must be between 100ms and 1m"),
    ('[collectors.cpu]\ninterval = "2d"\n', "must be between 10ms and 1d"),
])
def test_bounds(tmp_path, text, message):
    f = tmp_path / "agentd.toml"
    f.write_text(text)
    with pytest.raises(C.ConfigError, match=re.escape(message)):
        C.build(parse("--config.file", str(f)), env={})


def test_window_memory_is_computed_from_rows_and_columns(tmp_path):
    """The bound is the rings' worst case: rows x (max columns x 4 B + 8 B) per enabled
    sampler, so a longer window fits when samplers are off or slower."""
    from agentd.daemon.window import Window

    cfg = C.build(parse(), env={})
    w = Window(cfg.window_seconds)
    for name, cls in C.registry().items():
        if cls.window_columns and cfg.collector(name).enabled:
            w.ring(name, cfg.sampler_interval(name), cls.window_columns)
    assert C.window_bytes(cfg) == w.reserved_bytes
    assert 25e6 < C.window_bytes(cfg) < 40e6  # docs/daemon.md: about 33 MB at the defaults
    longest = C.longest_window(cfg)
    assert 8 * 3600 < longest < 14 * 3600
    C.build(parse("--sampling.window", f"{longest * 0.99:.0f}s"), env={})
    with pytest.raises(C.ConfigError, match="at most 2 GiB is allowed, about "
                       + re.escape(C.format_duration(longest, 3))):
        C.build(parse("--sampling.window", f"{longest * 1.01:.0f}s"), env={})
    cfg = C.build(parse("--sampling.window", f"{longest * 1.01:.0f}s",
                        "--sampling.fast-interval", "200ms"), env={})
    assert C.window_bytes(cfg) <= C.WINDOW_MEMORY_CAP


def test_every_numeric_option_has_documented_bounds():
    for name, cls in C.registry().items():
        for key, opt in cls.options.items():
            if opt.type in (int, float, C.Duration):
                assert opt.bounds is not None, f"{name}.{key} has no bounds"
                lo, hi = opt.bounds
                assert lo <= opt.default <= hi
    p = argparse.ArgumentParser()
    C.add_run_flags(p)
    text = p.format_help()
    assert "1..4096" in text and "100ms..1m" in text and "10ms..10s" in text


def test_seed_must_be_a_non_negative_integer():
    with pytest.raises(C.ConfigError, match="--simulate.seed: must be between 0"):
        C.build(parse("--simulate", "input-cpu", "--simulate.seed", "-1"), env={})
    assert C.build(parse("--simulate", "input-cpu", "--simulate.seed", "7"),
                   env={}).simulate_seed == 7


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(agentd_cmd(*args), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "--sampling.fast-interval", "-1"], "--sampling.fast-interval"),
    (["run", "--config.file", "/nonexistent.toml"], "cannot read config file"),
    (["run", "--path.procfs", "/nonexistent"], "--path.procfs"),
    (["run", "--fake-nvml", "/nonexistent.toml"], "does not exist"),
    (["run", "--collector.storage.device-exclude", "("], "not a regular expression"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_errors_are_one_line_exit_2(args, message, tmp_path):
    r = run_cli(*args, "--web.listen-address", "127.0.0.1:0") if args[0] == "run" else \
        run_cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr


def test_bad_scenario_file_is_one_line(tmp_path):
    s = tmp_path / "bad.toml"
    s.write_text("[[gpus]]\ncount = 1\nutilization = 7\n")
    r = run_cli("run", "--fake-nvml", str(s), "--web.listen-address", "127.0.0.1:0")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("agentd: error: ")
    assert "utilization: 7 is outside" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_web_config_is_one_line(tmp_path):
    w = tmp_path / "web.yml"
    w.write_text("basic_auth_users:\n  alice: plaintext\n")
    r = run_cli("run", "--web.config.file", str(w), "--web.listen-address", "127.0.0.1:0")
    assert r.returncode == 2
    assert "not a bcrypt hash" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr


def test_catalog_markdown_is_current():
    """docs/metrics.md is generated from the catalog; regenerate with
    `agentd catalog --markdown > docs/metrics.md`."""
    import os

    from agentd.catalog import render_markdown

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "metrics.md")
    with open(path) as f:
        assert f.read() == render_markdown()


def test_example_config_is_valid():
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "systemd", "agentd.toml")
    cfg = C.build(parse("--config.file", path), env={})
    assert cfg.listen_address == ":9445" and cfg.collector("topology").interval == 60


# --- the web configuration ---------------------------------------------------------------------


def _web(tmp_path, text: str):
    from agentd.daemon.webconfig import load_web_config

    f = tmp_path / "web.yml"
    f.write_text(text)
    return load_web_config(str(f))


@pytest.fixture(scope="module")
def bcrypt_hash() -> str:
    import bcrypt

    return bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()


def test_bcrypt_hashes_in_every_prefix_are_accepted(tmp_path, bcrypt_hash):
    for prefix in ("$2a$", "$2b$", "$2y$"):
        h = prefix + bcrypt_hash[4:]
        web = _web(tmp_path, f"basic_auth_users:\n  alice: '{h}'\n")
        assert web.check_password("alice", "s3cret") and not web.check_password("alice", "x")


def test_hashes_bcrypt_cannot_check_are_refused_at_load(tmp_path, bcrypt_hash):
    """Each of these would lock every client out without a word."""
    from agentd.daemon.webconfig import WebConfigError

    import bcrypt

    # The salt's last character carries 2 unused bits: bcrypt refuses most of its values.
    alphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    def refused_by_bcrypt(h):
        try:
            bcrypt.checkpw(b"", h.encode())
        except ValueError:
            return True
        return False
    odd_salt = next(h for h in (bcrypt_hash[:28] + c + bcrypt_hash[29:] for c in alphabet)
                    if refused_by_bcrypt(h))
    cases = {
        bcrypt_hash[:-1]: "was it copied whole?",
        bcrypt_hash + "x": "was it copied whole?",
        bcrypt_hash[:-1] + "!": "53 of [./A-Za-z0-9]",
        "$2y$03$" + bcrypt_hash[7:]: "bcrypt cost 3 is outside 4..16",
        "$2y$31$" + bcrypt_hash[7:]: "bcrypt cost 31 is outside 4..16",
        "$2c$" + bcrypt_hash[4:]: "not a bcrypt hash",
        odd_salt: "bcrypt cannot parse it",
    }
    for h, message in cases.items():
        with pytest.raises(WebConfigError, match=re.escape(message)):
            _web(tmp_path, f"basic_auth_users:\n  alice: '{h}'\n")
    with pytest.raises(WebConfigError, match="not a user name"):
        _web(tmp_path, f"basic_auth_users:\n  'a:b': '{bcrypt_hash}'\n")


@pytest.mark.parametrize("headers, message", [
    ('Content-Security-Policy: "default-src \'self\'\\r\\nSet-Cookie: a=b"', "one line of text"),
    ('Strict-Transport-Security: "max-age=1\\n"', "one line of text"),
    ("X-XSS-Protection: 1", "one line of text"),  # a number, not text
    ("Content-Type: text/html", "'Content-Type' cannot be set"),
    ("Set-Cookie: a=b", "cannot be set"),
    ("X-Frame-Options: allow", "expected one of deny, sameorigin"),
    ("X-Content-Type-Options: sniff", "expected one of nosniff"),
])
def test_web_headers_refused(tmp_path, headers, message):
    from agentd.daemon.webconfig import WebConfigError

    with pytest.raises(WebConfigError, match=re.escape(message)):
        _web(tmp_path, f"http_server_config:\n  headers:\n    {headers}\n")


def test_web_headers_accepted(tmp_path):
    web = _web(tmp_path, "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
               "    Content-Security-Policy: \"default-src 'self';\\tframe-ancestors 'none'\"\n")
    assert web.headers["X-Frame-Options"] == "deny"
    assert "\t" in web.headers["Content-Security-Policy"]


@pytest.mark.parametrize("data, message", [
    (b"\xff\xfe\x00\x01binary", "is not UTF-8 text"),
    (b"a: [" * 50_000, "nested too deeply"),
    (b"# " + b"x" * (5 << 20), "larger than 4 MiB"),
])
def test_web_config_files_that_are_not_yaml(tmp_path, data, message):
    from agentd.daemon.webconfig import WebConfigError, load_web_config

    f = tmp_path / "web.yml"
    f.write_bytes(data)
    with pytest.raises(WebConfigError, match=re.escape(message)):
        load_web_config(str(f))
