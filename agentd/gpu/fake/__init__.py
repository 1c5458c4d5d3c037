"""The GPU stand-in: a fake libnvidia-ml under the real pynvml module."""

from agentd.gpu.fake.library import (FakeNvmlLibrary, install, installed, private_pynvml,
                                     uninstall)
from agentd.gpu.fake.scenario import ScenarioError, library_from_dict, load_scenario

__all__ = ["FakeNvmlLibrary", "ScenarioError", "install", "installed", "library_from_dict",
           "load_scenario", "private_pynvml", "uninstall"]
