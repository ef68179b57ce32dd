"""What a cluster has free and who holds the rest, and the error a refused or unfinished request raises."""

from __future__ import annotations

from collections import Counter


class ClusterError(RuntimeError):
    """The cluster refused, cannot hold, or did not finish a request; the message says which and why."""


def resource_report() -> str:
    """What the cluster has free, and what holds the rest: live actors by job and class, pending placement groups."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    lines = ["free: " + ", ".join(f"{free.get(k, 0):g} of {total[k]:g} {k}s" for k in ("CPU", "GPU") if total.get(k))]
    try:
        from ray.util.state import list_actors, list_placement_groups

        holders: Counter = Counter()
        for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000, timeout=5,
                                 raise_on_missing_output=False):
            cpus = (actor.required_resources or {}).get("CPU", 0)
            if cpus:
                holders[f"job {actor.job_id}: {actor.class_name}"] += cpus
        if holders:
            lines.append("held by " + "; ".join(f"{who} ({cpus:g} CPUs)" for who, cpus in holders.most_common(8)))
        pending = [pg for pg in list_placement_groups(filters=[("state", "=", "PENDING")], limit=100, timeout=5,
                                                      raise_on_missing_output=False)]
        if pending:
            lines.append(f"{len(pending)} placement groups waiting (jobs {', '.join(sorted({pg.creator_job_id for pg in pending}))})")
    except Exception as err:  # noqa: BLE001 — the state API needs the dashboard; the free counts still help
        lines.append(f"(who holds them is unknown: {type(err).__name__})")
    return "; ".join(lines)
