"""Fleet roll-ups: GPU-hours lost per cause, per job and per namespace (or user, account,
team), and their cost at the configured price.

A finding's GPU-hours are the job's: while one node holds a data-parallel job back, every GPU
of the job loses the same share of its time (its `loss`), for as long as the finding lasts.
Lossy links carry no measured loss and add nothing here (their count is reported).
"""

from __future__ import annotations

from agentd.analysis.findings import Finding
from agentd.cluster.groups import charged_to


def price_for(prices: dict[str, float], model: str | None, flag: float | None) -> float | None:
    """The price of an hour of one GPU: --price-per-gpu-hour, else the operator's
    agentd_gpu_price_per_hour series for the GPU's model, else the one without a model."""
    if flag is not None:
        return flag
    if model and model in prices:
        return prices[model]
    return prices.get("")


def rollups(findings: list[Finding], jobs: list[dict], price: dict[str, float],
            flag_price: float | None, models: dict[str, str]) -> dict:
    by_cause: dict[str, dict] = {}
    by_job: dict[str, dict] = {}
    by_owner: dict[str, dict] = {}
    ident = {j["job"]: j.get("identity") or {} for j in jobs}
    unpriced = 0
    for f in findings:
        hours = float(f.gain.get("job_gpu_hours_lost") or 0.0)
        p = price_for(price, models.get(f.subject.get("node", "")), flag_price)
        cost = hours * p if p is not None else None
        if p is None and hours:
            unpriced += 1
        job = f.subject.get("job", "")
        owner = charged_to(ident.get(job, {}), f.subject)
        for table, key in ((by_cause, f.kind), (by_job, job), (by_owner, owner)):
            row = table.setdefault(key, {"findings": 0, "gpu_hours_lost": 0.0, "cost": None})
            row["findings"] += 1
            row["gpu_hours_lost"] += hours
            if cost is not None:
                row["cost"] = (row["cost"] or 0.0) + cost
    total = sum(r["gpu_hours_lost"] for r in by_cause.values())
    costs = [r["cost"] for r in by_cause.values() if r["cost"] is not None]
    held = sum(j.get("gpu_hours", 0.0) for j in jobs)

    def ranked(table: dict) -> list[dict]:
        return [{"key": k, **v} for k, v in sorted(table.items(),
                                                   key=lambda kv: -kv[1]["gpu_hours_lost"])]

    return {"gpu_hours_lost": total, "cost": sum(costs) if costs else None,
            "gpu_hours_in_jobs": held, "by_cause": ranked(by_cause), "by_job": ranked(by_job),
            "by_owner": ranked(by_owner),
            "unpriced_findings": unpriced}
