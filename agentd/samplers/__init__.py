"""Samplers, one source per file. REGISTRY maps each name to its class, in start-up order."""

from __future__ import annotations

from agentd.samplers.base import Sampler


def registry() -> dict[str, type[Sampler]]:
    from agentd.samplers.cpu import CpuSampler
    from agentd.samplers.gpu import GpuSampler
    from agentd.samplers.memory import MemorySampler
    from agentd.samplers.network import NetworkSampler
    from agentd.samplers.pressure import PressureSampler
    from agentd.samplers.process import ProcessSampler
    from agentd.samplers.storage import StorageSampler
    from agentd.samplers.topology import TopologySampler

    classes = [GpuSampler, CpuSampler, MemorySampler, PressureSampler, StorageSampler,
               NetworkSampler, ProcessSampler, TopologySampler]
    return {c.name: c for c in classes}
