"""The GPU stand-in: a fake libnvidia-ml under the real pynvml module."""

from agentd.gpu.fake.library import FakeNvmlLibrary, install, installed, uninstall
from agentd.gpu.fake.scenario import ScenarioError, library_from_dict, load_scenario

__all__ = ["FakeNvmlLibrary", "ScenarioError", "install", "installed", "library_from_dict",
           "load_scenario", "uninstall"]
