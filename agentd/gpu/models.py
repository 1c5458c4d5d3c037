"""What a GPU model can do, for sources that do not say (dcgm-exporter's default counters carry
`modelName` but not the PCIe link, the maximum SM clock or the power limit).

Figures are NVIDIA's published specifications for the board (PCIe host interface, boost SM
clock, maximum board power). A source's own reading always wins over this table; GPUs of the
same model on the node are the next fallback (agentd.analysis.features), this table the last.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuModel:
    pattern: str  # matched case-insensitively against the model name
    pcie_generation: int
    pcie_width: int
    sm_clock_max_hz: float
    power_limit_watts: float  # 0: set per system, no board figure


# Most specific first: "H100 PCIe" must not match the SXM entry.
MODELS: tuple[GpuModel, ...] = (
    # GH200: the module's power is shared between its CPU and GPU and set per system: no
    # board figure (0) to judge the GPU's power against.
    GpuModel(r"GH200", 5, 16, 1980e6, 0),
    GpuModel(r"H200 NVL", 5, 16, 1785e6, 600),
    GpuModel(r"H200", 5, 16, 1980e6, 700),
    GpuModel(r"H100 NVL", 5, 16, 1785e6, 400),
    GpuModel(r"H100 PCIe", 5, 16, 1755e6, 350),
    GpuModel(r"H100.*HBM2e", 5, 16, 1755e6, 350),  # the PCIe card's HBM2e (SXM5 has HBM3)
    GpuModel(r"H100", 5, 16, 1980e6, 700),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    GpuModel(r"H800 PCIe", 5, 16, 1755e6, 350),
    GpuModel(r"H800", 5, 16, 1980e6, 700),
    GpuModel(r"A100.*PCIE.*40GB|A100-PCIE-40GB", 4, 16, 1410e6, 250),
    GpuModel(r"A100.*PCIe", 4, 16, 1410e6, 300),
    GpuModel(r"A100", 4, 16, 1410e6, 400),  # SXM4
    GpuModel(r"A800.*PCIe", 4, 16, 1410e6, 300),
    GpuModel(r"A800.*Active", 4, 16, 1410e6, 240),
    GpuModel(r"A800", 4, 16, 1410e6, 400),
    GpuModel(r"L40S", 4, 16, 2520e6, 350),
    GpuModel(r"L40", 4, 16, 2490e6, 300),
    GpuModel(r"\bL4\b", 4, 16, 2040e6, 72),
    GpuModel(r"A10G", 4, 16, 1710e6, 300),
    GpuModel(r"\bA10\b", 4, 16, 1695e6, 150),
    GpuModel(r"A30", 4, 16, 1440e6, 165),
    GpuModel(r"V100.*FHHL", 3, 16, 1290e6, 150),
    GpuModel(r"V100.*PCIE", 3, 16, 1380e6, 250),
    GpuModel(r"V100", 3, 16, 1530e6, 300),  # SXM2
    GpuModel(r"\bT4\b", 3, 16, 1590e6, 70),
)


def lookup(name: str | None) -> GpuModel | None:
    if not name:
        return None
    for m in MODELS:
        if re.search(m.pattern, name, re.IGNORECASE):
            return m
    return None
