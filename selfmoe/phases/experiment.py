"""`python -m selfmoe experiment experiment=<name>` (`make experiment NAME=...`): a paper table or figure.

An experiment (``configs/experiment/<name>.yaml``) is a list of rows; each row is a target built
under its own config overrides (``router.top_k=2``, ``data.num_examples=500``, ...). For every
row the phases its target needs run first (data, experts, merges, router: finished artifacts
are reused), then the target is evaluated on the experiment's suite. The result goes to
``outputs/<model>/experiments/<name>/``: ``table.md`` + ``table.json`` in the paper's layout,
and ``plot.png`` for line figures (the data-size sweep). At ``eval.scale=smoke`` (the tiny model)
every suite is the smoke suite and rows add their ``smoke_overrides``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from selfmoe.artifacts import Layout, atomic_write_bytes, atomic_write_json, atomic_write_text
from selfmoe.config import ALL_DOMAINS, Config, ExperimentRow, available, with_overrides
from selfmoe.errors import ConfigError

log = logging.getLogger("selfmoe")


def current_collective() -> Any:
    """The ranks training started (Lightning keeps the process group after fit), or one process."""
    import torch.distributed as dist

    from selfmoe.data.sharded import LocalCollective, TorchCollective

    if dist.is_available() and dist.is_initialized():
        return TorchCollective(dist.get_rank(), dist.get_world_size())
    return LocalCollective()


def row_config(cfg: Config, row: ExperimentRow) -> Config:
    """The config a row runs under: the experiment's, plus the row's overrides."""
    extra = list(row.overrides) + (list(row.smoke_overrides) if cfg.eval.scale == "smoke" else [])
    if cfg.experiment.seeds is not None:
        extra.append(f"eval.seeds=[{','.join(str(s) for s in cfg.experiment.seeds)}]")
    return with_overrides(cfg, extra) if extra else cfg


def ensure_target(cfg: Config, target: Any) -> None:
    """Run the phases ``target`` needs (each skips when its artifact is up to date)."""
    from selfmoe.phases import expert, merge, router

    if target.kind == "base":
        return
    if target.kind in ("expert", "instance"):
        domain = target.arg if target.kind == "expert" else ALL_DOMAINS
        expert.run(dataclasses.replace(cfg, phase="expert", domain=domain))
        return
    needed = (cfg.merge.experts or cfg.router.experts) if target.kind == "merge" else cfg.router.experts
    for domain in needed:
        expert.run(dataclasses.replace(cfg, phase="expert", domain=domain))
    if target.kind == "merge":
        merge.run(dataclasses.replace(cfg, phase="merge"), [target.arg])
    else:
        routed = dataclasses.replace(cfg.router, name=target.arg)
        router.run(dataclasses.replace(cfg, phase="router", router=routed))


def line_series(points: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Curves of a line figure: ``(x, average in %)`` per series; a point without a series (the
    base model at x = 0) starts every curve."""
    names = sorted({p["series"] for p in points if p["series"]})
    series: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for p in points:
        if p["avg"] is not None and p["x"] is not None:
            for name in [p["series"]] if p["series"] else names:
                series[name].append((float(p["x"]), 100 * p["avg"]["mean"]))
    return {name: sorted(values) for name, values in series.items()}


def run(cfg: Config) -> Path:
    """Run every row of ``cfg.experiment`` and write its table (and plot)."""
    from evaluation.results import markdown_table, summary_rows
    from evaluation.runner import evaluate_target
    from evaluation.suites import preflight, shot_groups, suite_tasks, task_manager
    from evaluation.targets import parse_target
    from selfmoe.plots import line_png

    x = cfg.experiment
    if not x.name or not x.rows:
        raise ConfigError(f"choose an experiment: experiment=<name>, one of {available('experiment')}.")
    suite, tasks = suite_tasks(cfg)
    manager = task_manager(cfg)
    preflight(cfg, manager, shot_groups(tasks))
    collective = current_collective()
    docs = []
    for i, row in enumerate(x.rows):
        rcfg = row_config(cfg, row)
        target = parse_target(row.target, rcfg)
        log.info("[%s] row %d/%d: %s (%s)", x.name, i + 1, len(x.rows), row.label or target.label, target.spec)
        ensure_target(rcfg, target)
        doc = evaluate_target(rcfg, target, manager, collective)
        docs.append({**doc, "label": row.label or target.label, "series": row.series, "x": row.x})
    if collective.rank != 0:  # rank zero writes the table
        return Layout.for_model(cfg.output_dir, cfg.model.name).root / "experiments" / x.name
    names = [t.task for t in tasks]
    rows = summary_rows(docs, names)
    out = Layout.for_model(cfg.output_dir, cfg.model.name).root / "experiments" / x.name
    headers = {t.task: f"{t.task} ({t.num_fewshot}-shot)" for t in tasks}
    table = markdown_table(rows, names, headers)
    atomic_write_text(out / "table.md", f"# {x.title or x.name}\n\nSuite `{suite}`, scores in percent.\n\n{table}")
    points = [
        {"series": d["series"], "x": d["x"], "label": d["label"], "avg": r["avg"]}
        for d, r in zip(docs, rows, strict=True)
    ]
    meta = {"name": x.name, "title": x.title, "suite": suite, "tasks": names}
    atomic_write_json(out / "table.json", {**meta, "rows": rows, "points": points})
    if x.kind == "line":
        series = line_series(points)
        png = line_png(series, title=x.title or x.name, x_label=x.x_label, y_label=f"average score ({suite}, %)")
        atomic_write_bytes(out / "plot.png", png)
    log.info("[%s] table: %s", x.name, out / "table.md")
    return out
