"""One detector per class. Each is a pure function of the window's Evidence and returns
Findings only on positive evidence of its mechanism (storage at its ceiling, the loader tree
saturated, PCIe at link rate during the gaps, reads and copies alternating with compute, ...).
None of them reasons by elimination: idle time that no mechanism explains is reported by
agentd.analysis.core as `unexplained_idle`, at info.

    common.py             what they share: who is starved, thresholds, the finding's shape
    gpu_lost.py           a GPU fell off the bus (or stopped reporting)
    idle_allocated.py     memory held, no kernels, for minutes
    input_storage.py      reads at the device's ceiling, or readers stalled on I/O
    input_cpu.py          the loader's workers (or the node's cores) saturated
    h2d_pcie.py           copies at link rate fill the gaps, or the link never rests
    io_h2d_serialized.py  loading alternates with compute (no prefetch)
    shared_link.py        a switch uplink saturated by its GPUs' and drives' traffic
    memory_pressure.py    evicted pages read again while readers stall
    throttled.py          clocks held down by power or heat
    straggler.py          one GPU computes longest, or idles while its peers spin
    comm_wait.py          time in collectives, with their traffic, and no other cause
"""

from agentd.analysis.detectors import (comm_wait, gpu_lost, h2d_pcie, idle_allocated,
                                       input_cpu, input_storage, io_h2d_serialized,
                                       memory_pressure, shared_link, straggler, throttled)

# Input causes, root causes first: a cause outranks the symptom it produces (refaults over
# the storage saturation they cause; a shared uplink over slow copies or reads).
INPUT = (memory_pressure, shared_link, input_storage, input_cpu, h2d_pcie, io_h2d_serialized)
DEVICE = (gpu_lost, idle_allocated, throttled, straggler)
COLLECTIVE = (comm_wait,)

__all__ = ["COLLECTIVE", "DEVICE", "INPUT"]
