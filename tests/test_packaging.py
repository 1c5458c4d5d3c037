"""What a user gets from `pip install .`: the wheel, not the editable tree, and the
dependencies it declares against what the code imports."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request

import pytest

from conftest import free_ports, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the wheel --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
    """A fresh virtual environment holding agentd from a wheel built off a copy of the
    source; the test environment's site-packages only lends the dependencies (via a .pth
    line, which does not run that directory's own .pth files, so the editable agentd there
    stays invisible). Returns the environment's bin directory."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "agentd"), src / "agentd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = base / "dist"
    # Build isolation, as `pip install .` does it (setuptools comes from the index or cache).
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheels = list(dist.glob("agentd-*.whl"))
    assert len(wheels) == 1, wheels
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True,
                          check=True).stdout.strip()
    with open(os.path.join(site, "_deps_from_test_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                        "--no-deps", "--no-index", str(wheels[0])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return str(venv / "bin")


def _outside(tmp_path) -> dict:
    """Run from a directory outside the repository, with no PYTHONPATH into it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AGENTD_FAKE_NVML")}
    return {"cwd": str(tmp_path), "env": env}


@pytest.mark.slow
def test_wheel_imports_from_its_own_install(installed, tmp_path):
    r = subprocess.run([os.path.join(installed, "python"), "-c",
                        "import agentd.sim.scenario as s, agentd.gpu.fake.scenario as f, "
                        "agentd.sim.cluster_scenario as c; "
                        "print(s.__file__); print(len(s.library()), len(f.library()), "
                        "len(c.library()))"],
                       capture_output=True, text=True, timeout=60, **_outside(tmp_path))
    assert r.returncode == 0, r.stderr
    path, counts = r.stdout.splitlines()
    assert path.startswith(os.path.dirname(installed)), path  # not the source tree
    sims, fakes, clusters = map(int, counts.split())
    assert sims >= 10 and fakes >= 1 and clusters >= 8  # every cluster scenario shipped


@pytest.mark.slow
@pytest.mark.parametrize("args, expect", [
    (["--seconds", "3"], ["GPU"]),
    # The README's `agentd demo --cluster`, smaller: the library's cluster scenario, every
    # node served and shown, and the cluster analysis' verdict line.
    (["--cluster", "--nodes", "3", "--gpus", "1", "--seconds", "6"],
     ["gpu-node-00", "gpu-node-02", "Holding the job back:", "agentd's cluster analysis"]),
])
def test_wheel_runs_the_demo(installed, tmp_path, args, expect):
    r = subprocess.run([os.path.join(installed, "agentd"), "demo", *args,
                        "--web.listen-address", f"127.0.0.1:{free_ports(3)}"],
                       capture_output=True, text=True, timeout=120, **_outside(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for text in expect:
        assert text in r.stdout, r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, expect", [
    (["--simulate", "input-cpu"], 'agentd_build_info{'),
    (["--fake-nvml", "h100x8-steady"], 'agentd_gpu_busy_seconds_total{gpu="7"'),
    (["--simulate-cluster", "lossy-link", "--simulate.nodes", "2", "--simulate.gpus", "1"],
     'agentd_rdma_port_errors_total{'),
])
def test_wheel_runs_the_daemon_on_library_scenarios(installed, tmp_path, spawn, args, expect):
    port = free_ports(2)  # the simulated job's two nodes on port and port + 1
    p = spawn([os.path.join(installed, "agentd"), "run", *args, "--web.listen-address",
               f"127.0.0.1:{port}"], **_outside(tmp_path))
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_http(url, timeout=30)
    except TimeoutError:
        pytest.fail(f"agentd did not serve: {p.output()}")
    deadline = time.monotonic() + 60  # the GPU sampler's first run, on a loaded machine
    text = ""
    while time.monotonic() < deadline and not (expect in text and 'agentd_gpu_info{' in text):
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        time.sleep(0.5)
    assert expect in text, p.output()
    assert 'agentd_gpu_info{' in text, p.output()
    assert p.stop() == 0, p.output()
    assert "Traceback" not in p.output()


# --- declared dependencies ----------------------------------------------------------------------

# Import name -> distribution name, where they differ.
_DISTRIBUTION = {"pynvml": "nvidia-ml-py", "yaml": "PyYAML", "prometheus_client":
                 "prometheus-client", "tomli": "tomli", "attr": "attrs"}
# Commands whose dependency is an extra: module -> the extra that must hold its imports.
_OPTIONAL_MODULES = {"agentd/dashboards.py": "dashboards", "agentd/diagnose/plot.py": "plot",
                     "agentd/probe/h2d.py": "h2d"}


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]

    def names(reqs) -> set[str]:
        return {re.split(r"[\s<>=!~;\[@]", r, maxsplit=1)[0].lower() for r in reqs}

    extras = {k: names(v) for k, v in project.get("optional-dependencies", {}).items()}
    return names(project["dependencies"]), extras


def _guarded(node: ast.AST, parents: dict) -> bool:
    """An import inside `try: ... except ImportError/ModuleNotFoundError`."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for h in node.handlers:
                caught = h.type
                names = [caught] if not isinstance(caught, ast.Tuple) else caught.elts
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
                       for n in names):
                    return True
    return False


def _third_party_imports(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        else:
            continue
        if _guarded(node, parents):
            continue
        for m in mods:
            top = m.split(".")[0]
            if top != "agentd" and top not in sys.stdlib_module_names:
                out.add(top)
    return out


def _imports_by_module() -> dict[str, set[str]]:
    out = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "agentd")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                out[os.path.relpath(path, ROOT)] = _third_party_imports(path)
    return out


def test_every_runtime_import_is_declared_and_every_dependency_used():
    runtime, extras = _declared()
    used: set[str] = set()
    missing = []
    for module, imports in _imports_by_module().items():
        extra = _OPTIONAL_MODULES.get(module)
        allowed = runtime | (extras.get(extra, set()) if extra else set())
        for imp in imports:
            dist = _DISTRIBUTION.get(imp, imp).lower()
            if dist not in allowed:
                missing.append(f"{module} imports {imp} ({dist}), not declared"
                               + (f" in [{extra}]" if extra else ""))
            if extra is None:
                used.add(dist)
    assert not missing, "\n".join(missing)
    # tomli is a backport for Python 3.10 only; agentd.tomlfile imports it there.
    unused = {d for d in runtime if d not in used and d != "tomli"}
    assert not unused, f"declared but never imported outside the extras: {sorted(unused)}"


def test_test_extra_holds_the_optional_commands_dependencies():
    _, extras = _declared()
    assert extras["dashboards"] <= extras["test"]
    assert extras["plot"] <= extras["test"]
    assert "psutil" in extras["test"]


def test_dashboards_without_grafanalib_is_one_line_exit_2(tmp_path):
    # A directory earlier on sys.path whose `grafanalib` fails to import, as when the extra
    # is not installed.
    shadow = tmp_path / "shadow" / "grafanalib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named grafanalib')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow")}
    r = subprocess.run([sys.executable, "-m", "agentd", "dashboards", "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "grafanalib" in lines[0] and "dashboards" in lines[0], r.stderr
    assert "pip install agentd" not in r.stderr
