"""Jobs from labels: which nodes and GPUs run the same job, so they can be compared.

What the series carry decides, in this order (the first that a GPU series has):

  --group-by LABEL       the user's label, whatever it is (a relabelled job name, a rack...)
  slurm_job_id           agentd's Slurm attribution (agentd/jobs.py): one job cluster-wide
  hpc_job                dcgm-exporter's HPC job mapping (--hpc-job-mapping-dir)
  namespace + pod        Kubernetes (agentd or dcgm-exporter): the pod's owner, i.e. the pod
                         name without its ordinal or hash suffix (pod_owner below)
  systemd_unit           agentd's unit attribution: the same unit on several nodes
  nothing of the above   no job identity (pod_uid, container_id and comm name a process on
                         one node, not a job across nodes)

When no GPU in range carries a job identity, the nodes in range form one peer group (the
user's node selector says which nodes those are). GPU series without one, in a fleet where
others have one, hold no job (spare GPUs) and are left out of every peer group.
"""

from __future__ import annotations

import re

# A pod's owner: the pod name without the suffixes its controller adds.
#  - a role and index of training operators: train-worker-3, train-master-0, mpi-launcher
#    (Kubeflow PyTorchJob/TFJob/MPIJob, Volcano tasks), ray-head-x2k4q
#  - Deployment: <name>-<pod-template-hash>-<5 random>  (train-7d9f8c6b5-x2k4q)
#  - Job: <name>-<5 random>, indexed Job: <name>-<index>-<5 random>
#  - StatefulSet and LeaderWorkerSet: <name>-<ordinal>[-<ordinal>]
# Kubernetes' random suffixes use the alphabet bcdfghjklmnpqrstvwxz2456789 (no vowels,
# no 0/1/3), which tells `train-x2k4q` (a Job's pod) from `train-final` (a name).
_RAND = "[bcdfghjklmnpqrstvwxz2456789]"
_ROLE = "master|worker|launcher|chief|ps|evaluator|head|leader|driver|executor"
POD_OWNER_REGEX = (rf"(.+?)(-({_ROLE}))?(-{_RAND}{{6,10}})?(-[0-9]+)*(-{_RAND}{{5}})?")
_POD_OWNER = re.compile(POD_OWNER_REGEX)

# Labels of a GPU series that identify its job, in order of precedence.
IDENTITY = ("slurm_job_id", "hpc_job", "namespace", "pod", "systemd_unit")
# Labels a job's roll-up is charged to (a team or user), the first present.
OWNER_LABELS = ("namespace", "user", "account", "team")


def pod_owner(pod: str) -> str:
    """The name of what created the pod: its Deployment, StatefulSet, Job or training job.

    >>> pod_owner("train-3"), pod_owner("train-7d9f8c6b5-x2k4q"), pod_owner("train-worker-3")
    ('train', 'train', 'train')
    """
    m = _POD_OWNER.fullmatch(pod)
    return m.group(1) if m and m.group(1) else pod


def job_of(labels: dict, group_by: str | None = None) -> tuple[str, dict] | None:
    """(key, identity) of the job a GPU series belongs to, or None when it names none.

    The key is stable and readable ("slurm_job_id=48213", "namespace=ml,workload=train");
    the identity is the labels behind it, for the report and the roll-ups."""
    if group_by:
        v = labels.get(group_by, "")
        return (f"{group_by}={v}", {group_by: v}) if v else None
    if labels.get("slurm_job_id"):
        return f"slurm_job_id={labels['slurm_job_id']}", {"slurm_job_id": labels["slurm_job_id"]}
    if labels.get("hpc_job"):
        return f"hpc_job={labels['hpc_job']}", {"hpc_job": labels["hpc_job"]}
    if labels.get("pod"):
        ns, owner = labels.get("namespace", ""), pod_owner(labels["pod"])
        ident = {"namespace": ns, "workload": owner} if ns else {"workload": owner}
        return ",".join(f"{k}={v}" for k, v in ident.items()), ident
    if labels.get("workload"):  # `agentd rules`' per-job series: the pod's owner already
        ns, owner = labels.get("namespace", ""), labels["workload"]
        ident = {"namespace": ns, "workload": owner} if ns else {"workload": owner}
        return ",".join(f"{k}={v}" for k, v in ident.items()), ident
    if labels.get("systemd_unit"):
        return f"systemd_unit={labels['systemd_unit']}", {"systemd_unit": labels["systemd_unit"]}
    return None


ALL_NODES = "nodes in range"


def charged_to(identity: dict, labels: dict | None = None) -> str:
    """Whom a job's lost GPU-hours are charged to: its namespace, user, account or team
    label, else "-"."""
    for k in OWNER_LABELS:
        v = identity.get(k) or (labels or {}).get(k)
        if v:
            return f"{k}={v}"
    return "-"
