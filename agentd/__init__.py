"""agentd: tells whether a node's GPUs are starved and why, from system counters alone."""

__version__ = "0.1.0"
