"""Real workloads to check agentd against (docs/workloads.md): `python bench/workloads/run.py`.

    run.py      the harness: runs each case, records it with agentd, scores the diagnosis
    cases.py    the cases, each a real input pipeline built to have one bottleneck (or none)
    trainer.py  the step loop that times what it is blocked on (the ground truth)
    loader.py   a multi-process data loader (PyTorch's DataLoader when torch is importable)
    dataset.py  JPEG datasets on the real disk; per-file page-cache eviction
    cgroups.py  read-bandwidth and memory limits (cgroup v1, else v2)
"""
