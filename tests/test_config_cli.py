"""Configuration and command-line errors: one line, exit 2, never a traceback."""

from __future__ import annotations

import argparse
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
    ("[collectors.process]\nmax_trees = \"many\"\n", "expected a number"),
    ("[web]\nlisten_address = \"nowhere\"\n", "is not HOST:PORT"),
    ("this is = = not toml", "agentd.toml"),
])
def test_bad_config_files(tmp_path, text, message):
    f = tmp_path / "agentd.toml"
    f.write_text(text)
    with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        C.build(parse("--config.file", str(f)), env={})


def test_parse_duration():
    assert C.parse_duration("100ms", "x") == 0.1
    assert C.parse_duration("10m", "x") == 600
    assert C.parse_duration(2, "x") == 2
    with pytest.raises(C.ConfigError):
        C.parse_duration("0s", "x")


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
