"""Scores out of lm-eval's results, and the paper-layout table (markdown + JSON).

Per target and suite, ``results.json`` keeps, for each task, the score of every seed run on the
task's table metric (``eval.suites.*.metric``, or the first metric lm-eval reports; a group
without an aggregate gets the unweighted mean of its subtasks), plus the raw lm-eval output.
The table has methods as rows and the suite's benchmarks plus their average as columns, in
percent, with ``mean ± std`` (sample standard deviation over seeds) when several seeds ran.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

SKIP_KEYS = ("alias", "name", "sample_len", "samples")


def metric_keys(task_results: Mapping[str, Any]) -> list[str]:
    """lm-eval's ``metric,filter`` keys of one task's results, in its order (no stderr)."""
    return [
        k
        for k, v in task_results.items()
        if k not in SKIP_KEYS and "_stderr" not in k and "," in k and isinstance(v, (int, float))
    ]


def task_score(results: Mapping[str, Any], task: str, metric: str | None) -> tuple[float, str]:
    """The score of ``task`` (a task or group) in one lm-eval run, and the metric used."""
    table: Mapping[str, Any] = results["results"]
    entry = table.get(task, {})
    keys = metric_keys(entry)
    if metric is None and keys:
        metric = keys[0]
    if metric is not None and isinstance(entry.get(metric), (int, float)):
        return float(entry[metric]), metric
    subtasks = results.get("group_subtasks", {}).get(task, [])
    if subtasks:  # a group that lm-eval does not aggregate: the plain mean of its subtasks
        scores = [task_score(results, sub, metric) for sub in subtasks]
        return statistics.fmean(s for s, _ in scores), scores[0][1]
    raise KeyError(f"lm-eval reported no metric {metric!r} for {task!r}; it has {keys}.")


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _cell(mean: float, std: float | None) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def summary_rows(docs: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """One row per results document: per-task mean/std and the average over the suite's tasks.

    The average of a seed is the mean over tasks of that seed's scores; its mean/std is taken over
    seeds (so the std of the average is the spread of whole runs, as the paper reports it).
    """
    rows = []
    for doc in docs:
        scores = doc["tasks"]
        row: dict[str, Any] = {"label": doc["label"], "target": doc["target"], "tasks": {}}
        for task in tasks:
            values = scores.get(task, {}).get("scores")
            row["tasks"][task] = dict(zip(("mean", "std"), mean_std(values), strict=True)) if values else None
        complete = all(scores.get(t, {}).get("scores") for t in tasks)
        if complete:
            per_seed = [statistics.fmean(scores[t]["scores"][i] for t in tasks) for i in range(len(doc["seeds"]))]
            row["avg"] = dict(zip(("mean", "std"), mean_std(per_seed), strict=True))
        else:
            row["avg"] = None
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], headers: Mapping[str, str]) -> str:
    """The paper's layout: | method | benchmark ... | avg |, scores in percent."""
    cols = [headers.get(t, t) for t in tasks]
    lines = ["| method | " + " | ".join(cols) + " | avg |", "| --- |" + " ---: |" * (len(cols) + 1)]
    for row in rows:
        cells = [_cell(c["mean"], c["std"]) if c else "n/a" for c in (row["tasks"][t] for t in tasks)]
        avg = row["avg"]
        cells.append(_cell(avg["mean"], avg["std"]) if avg else "n/a")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
