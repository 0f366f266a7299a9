"""`make eval`: evaluate targets on a suite through lm-eval and write results, routing and the table.

For each target (in ``eval.targets`` order) and the suite (``eval.suite``; ``smoke`` at smoke
scale): every task is loaded and checked first (offline datasets, the code opt-in), then the
target is built once and lm-eval runs once per shot setting and seed (0-shot tasks have no
few-shot draw to vary, so they run once and count for every seed). Outputs, under
``outputs/<model>/eval/``::

    <target>/<suite>/results.json   scores per seed, lm-eval + task versions, shots, seeds, limit,
                                    provenance of the target, seed overlap
    <target>/<suite>/samples.jsonl  lm-eval's logged samples of the first seed (to audit answers)
    <target>/<suite>/routing.{json,png}   MiXSE only: routing per benchmark (evaluation.routing)
    summary.md, summary.json        one table per suite, in the paper's layout

A target whose results exist for the same inputs (target artifact, suite, seeds, limit, lm-eval
version) is not evaluated again unless ``force=true``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lm_eval
from lm_eval import simple_evaluate

from evaluation.lm import SelfMoELM, default_device
from evaluation.overlap import find_overlap, seed_texts
from evaluation.results import markdown_table, mean_std, summary_rows, task_score
from evaluation.routing import routing_heatmap, routing_pass, sample_text
from evaluation.suites import preflight, shot_groups, suite_tasks, task_manager
from evaluation.targets import Target, artifact_dir, build_target, check_available, parse_target
from selfmoe.artifacts import (
    Layout,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_manifest,
    sha256_text,
    versions,
)
from selfmoe.config import Config, EvalTaskConfig
from selfmoe.data.sharded import Collective, LocalCollective
from selfmoe.models.base import model_id

log = logging.getLogger("selfmoe")
RESULTS, SUMMARY = "results.json", "summary"


def eval_root(cfg: Config) -> Path:
    return Layout.for_model(cfg.output_dir, cfg.model.name).root / "eval"


def _artifact_key(cfg: Config, target: Target) -> str | None:
    """What the target's weights are: their artifact's manifest key (None for the base model)."""
    directory = artifact_dir(cfg, target)
    if directory is None:
        return None
    return (read_manifest(directory) or {}).get("key")


def results_key(cfg: Config, target: Target, tasks: list[EvalTaskConfig]) -> str:
    """Everything a results file depends on; a change means evaluating again."""
    return sha256_text(
        json.dumps(
            {
                "base": model_id(cfg),
                "target": target.spec,
                "artifact": _artifact_key(cfg, target),
                "tasks": [(t.task, t.num_fewshot, t.metric) for t in tasks],
                "seeds": list(cfg.eval.seeds),
                "limit": cfg.eval.limit,
                "template": cfg.model.template,
                "lm_eval": lm_eval.__version__,
            },
            sort_keys=True,
        )
    )


def _leaf_to_task(results: Mapping[str, Any], names: list[str]) -> dict[str, str]:
    """Each leaf task of a run mapped to the suite task (task or group) it belongs to."""
    groups = results.get("group_subtasks", {})
    out: dict[str, str] = {}

    def walk(node: str, top: str) -> None:
        children = groups.get(node) or []
        if not children:
            out[node] = top
        for child in children:
            walk(child, top)

    for name in names:
        walk(name, name)
    return out


def _routing_texts(samples: Mapping[str, list[Mapping[str, Any]]], leaf_to_task: Mapping[str, str], docs: int):
    """Up to ``docs`` texts per suite task, spread evenly over its leaf tasks."""
    by_task: dict[str, list[str]] = {}
    for task in dict.fromkeys(leaf_to_task.values()):
        leaves = [leaf for leaf, top in leaf_to_task.items() if top == task and leaf in samples]
        per_leaf = -(-docs // max(len(leaves), 1))
        texts = [sample_text(s) for leaf in leaves for s in samples[leaf][:per_leaf]]
        by_task[task] = texts[:docs]
    return by_task


def _jsonable(obj: Any) -> Any:
    """lm-eval results carry numpy scalars and tuples; make them plain JSON."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


@dataclass(frozen=True)
class Unit:
    """One target on one shot setting of the suite: one lm-eval call per seed, the unit of sharding."""

    target: Target
    shots: int
    names: tuple[str, ...]


def up_to_date(cfg: Config, target: Target, tasks: list[EvalTaskConfig]) -> bool:
    out_dir = eval_root(cfg) / target.slug / suite_tasks(cfg)[0]
    if cfg.force or read_json(out_dir / RESULTS).get("key") != results_key(cfg, target, tasks):
        return False
    log.info("%s on %s is up to date at %s (force=true to redo)", target.spec, out_dir.name, out_dir)
    return True


@contextlib.contextmanager
def _as_single_process() -> Iterator[None]:
    """Run one lm-eval call as the single process it is, on any rank.

    Each rank runs its own units with lm-eval single-process (a model object, world size 1), but
    lm-eval returns results only where ``LOCAL_RANK`` is 0 (its tensor-parallel convention), so
    the variable is hidden for the duration of the call.
    """
    saved = os.environ.pop("LOCAL_RANK", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["LOCAL_RANK"] = saved


class _Models:
    """The target model of the current unit: consecutive units of one target share one build."""

    def __init__(self, cfg: Config, device: str) -> None:
        self.cfg, self.device, self.spec, self.lm = cfg, device, None, None

    def get(self, target: Target) -> SelfMoELM:
        if self.spec != target.spec:
            self.lm = None  # free the previous target before building the next
            self.lm = SelfMoELM(cfg=self.cfg, built=build_target(self.cfg, target, self.device))
            self.spec = target.spec
        assert self.lm is not None
        return self.lm


def evaluate_unit(cfg: Config, unit: Unit, manager: Any, models: _Models) -> dict[str, Any]:
    """Run one unit (every seed) and return its part of the target's results, as plain JSON."""
    started = time.time()
    lm = models.get(unit.target)
    metric_of = {t.task: t.metric for t in cfg.eval.suites[suite_tasks(cfg)[0]]}
    scores: dict[str, dict[str, Any]] = {name: {"num_fewshot": unit.shots, "scores": []} for name in unit.names}
    runs: list[dict[str, Any]] = []
    samples: dict[str, list[Any]] = {}
    leaf_map: dict[str, str] = {}
    for i, seed in enumerate(cfg.eval.seeds):
        if unit.shots == 0 and i > 0:  # no few-shot draw to vary: the first seed's run stands for all
            for entry in scores.values():
                entry["scores"].append(entry["scores"][0])
            continue
        log.info("lm-eval: %s, %s (%d-shot, seed %d)", unit.target.spec, ", ".join(unit.names), unit.shots, seed)
        with _as_single_process():
            res = simple_evaluate(
                model=lm,
                tasks=list(unit.names),
                num_fewshot=unit.shots,
                task_manager=manager,
                limit=cfg.eval.limit,
                log_samples=True,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                confirm_run_unsafe_code=cfg.eval.confirm_run_unsafe_code,
                apply_chat_template=cfg.model.template == "chat",
            )
        for name in unit.names:
            value, metric = task_score(res, name, metric_of[name])
            scores[name]["scores"].append(value)
            scores[name]["metric"] = metric
            scores[name]["version"] = res.get("versions", {}).get(name)
        if i == 0:
            samples = res.pop("samples", {})
            leaf_map = _leaf_to_task(res, list(unit.names))
        run_ = {"seed": seed, "num_fewshot": unit.shots, "tasks": list(unit.names)}
        runs.append(run_ | {k: res.get(k) for k in LM_EVAL_KEYS})
    part: dict[str, Any] = {"target": unit.target.spec, "shots": unit.shots, "scores": scores, "runs": runs}
    part["samples"] = samples
    part["provenance"] = lm.built.provenance
    if lm.built.is_mixse and cfg.eval.routing_docs > 0:
        texts = _routing_texts(samples, leaf_map, cfg.eval.routing_docs)
        recorder = routing_pass(
            lm.built.model, lm.built.tokenizer, texts, batch_size=cfg.eval.batch_size, max_length=lm.max_length
        )
        part["routing"] = {"experts": recorder.experts, "tasks": recorder.result()}
    part["seconds"] = time.time() - started
    return _jsonable(part)


def assemble(cfg: Config, target: Target, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Join a target's parts (in suite order) into its results files; returns the results document."""
    suite, tasks = suite_tasks(cfg)
    out_dir = eval_root(cfg) / target.slug / suite
    parts = sorted(parts, key=lambda p: list(shot_groups(tasks)).index(p["shots"]))
    scores = {t.task: next(p["scores"][t.task] for p in parts if t.task in p["scores"]) for t in tasks}
    for entry in scores.values():
        entry["mean"], entry["std"] = mean_std(entry["scores"])
    samples = {leaf: rows for p in parts for leaf, rows in p["samples"].items()}
    doc: dict[str, Any] = {
        "key": results_key(cfg, target, tasks),
        "target": target.spec,
        "label": target.label,
        "suite": suite,
        "tasks": scores,
        "seeds": list(cfg.eval.seeds),
        "limit": cfg.eval.limit,
        "batch_size": cfg.eval.batch_size,
        "lm_eval_version": lm_eval.__version__,
        "provenance": parts[0]["provenance"],
        "seed_overlap": find_overlap(samples, seed_texts(cfg)),
        "seconds": round(sum(p["seconds"] for p in parts), 1),
        "versions": versions(),
        "runs": [run for p in parts for run in p["runs"]],
    }
    if doc["seed_overlap"]:
        log.warning("%d evaluated item(s) equal a generation seed: see seed_overlap in %s", len(doc["seed_overlap"]),
                    out_dir / RESULTS)  # fmt: skip
    lines = [json.dumps({"task": t, **s}) + "\n" for t, rows in samples.items() for s in rows]
    atomic_write_text(out_dir / "samples.jsonl", "".join(lines))
    routed = [p["routing"] for p in parts if "routing" in p]
    if routed:
        merged = {task: entry for r in routed for task, entry in r["tasks"].items()}
        routing = {t.task: merged[t.task] for t in tasks if t.task in merged}  # rows in suite order
        experts = routed[0]["experts"]
        atomic_write_json(out_dir / "routing.json", {"experts": experts, "target": target.spec, "tasks": routing})
        title = f"{target.label}: mean router weight per benchmark"
        atomic_write_bytes(out_dir / "routing.png", routing_heatmap(routing, experts, title))
        doc["routing"] = {task: entry["probs"]["overall"] for task, entry in routing.items()}
    atomic_write_json(out_dir / RESULTS, doc)
    return doc


def evaluate_targets(
    cfg: Config, targets: list[Target], manager: Any, collective: Collective | None = None, device: str | None = None
) -> dict[str, dict[str, Any]]:
    """Evaluate ``targets`` on the suite, the units spread over the ranks; rank zero writes the results.

    Returns {target spec: results document} on rank zero ({} on the other ranks).
    """
    collective = collective or LocalCollective()
    _, tasks = suite_tasks(cfg)
    todo = [t for t in targets if not up_to_date(cfg, t, tasks)]
    units = [Unit(t, shots, tuple(names)) for t in todo for shots, names in shot_groups(tasks).items()]
    models = _Models(cfg, device or default_device(cfg))
    mine = [evaluate_unit(cfg, u, manager, models) for u in units[collective.rank :: collective.world_size]]
    models.lm = None
    parts = [part for rank_parts in collective.all_gather(mine) for part in rank_parts]
    docs: dict[str, dict[str, Any]] = {}
    if collective.rank == 0:
        for t in todo:
            docs[t.spec] = assemble(cfg, t, [p for p in parts if p["target"] == t.spec])
        for t in targets:
            if t.spec not in docs:
                docs[t.spec] = read_json(eval_root(cfg) / t.slug / suite_tasks(cfg)[0] / RESULTS)
    collective.barrier()  # the other ranks go on only once the results are in place
    return docs


def evaluate_target(cfg: Config, target: Target, manager: Any, collective: Collective | None = None) -> dict[str, Any]:
    """Evaluate one target (see :func:`evaluate_targets`); its results document on rank zero."""
    return evaluate_targets(cfg, [target], manager, collective).get(target.spec, {})


LM_EVAL_KEYS = ("results", "group_subtasks", "versions", "n-shot", "n-samples", "higher_is_better")


def write_summary(cfg: Config, order: list[str] | None = None) -> Path:
    """``eval/summary.{md,json}``: one paper-layout table per suite that has results."""
    root = eval_root(cfg)
    order = order if order is not None else list(cfg.eval.targets)
    by_suite: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(root.glob(f"*/*/{RESULTS}")):
        doc = read_json(path)
        if doc.get("tasks"):
            by_suite.setdefault(doc["suite"], []).append(doc)
    rank = {spec: i for i, spec in enumerate(order)}
    sections, tables = [f"# Evaluation summary: {cfg.model.name}\n"], {}
    for suite, docs in sorted(by_suite.items()):
        docs.sort(key=lambda d: (rank.get(d["target"], len(rank)), d["target"]))
        names = [t.task for t in cfg.eval.suites.get(suite, [])] or list(docs[0]["tasks"])
        rows = summary_rows(docs, names)
        shots = {n: docs[0]["tasks"].get(n, {}).get("num_fewshot") for n in names}
        headers = {n: f"{n} ({shots[n]}-shot)" for n in names}
        seeds = sorted({len(d["seeds"]) for d in docs})
        note = f"Scores in percent; {'mean ± std over ' + str(seeds[-1]) + ' seeds' if seeds[-1] > 1 else 'one seed'}."
        sections.append(f"## Suite `{suite}`\n\n{markdown_table(rows, names, headers)}\n{note}\n")
        tables[suite] = {"tasks": names, "rows": rows}
    atomic_write_text(root / f"{SUMMARY}.md", "\n".join(sections))
    atomic_write_json(root / f"{SUMMARY}.json", {"model": model_id(cfg), "suites": tables})
    return root / f"{SUMMARY}.md"


def run(
    cfg: Config, targets: list[str] | None = None, collective: Collective | None = None, device: str | None = None
) -> Path:
    """`python -m selfmoe eval`: every target of ``eval.targets`` (or ``targets``) on the suite.

    With a ``collective`` of several ranks, the (target, shot setting) units are dealt out
    round-robin, each rank runs lm-eval single-process on its own device, and rank zero writes
    every results file and the table.
    """
    collective = collective or LocalCollective()
    parsed = [parse_target(t, cfg) for t in (targets or cfg.eval.targets)]
    check_available(cfg, parsed)
    _, tasks = suite_tasks(cfg)
    manager = task_manager(cfg)
    preflight(cfg, manager, shot_groups(tasks))  # offline and code opt-in problems stop us before any model
    evaluate_targets(cfg, parsed, manager, collective, device)
    summary = eval_root(cfg) / f"{SUMMARY}.md"
    if collective.rank == 0:
        write_summary(cfg, [t.spec for t in parsed])
        log.info("results table: %s", summary)
    collective.barrier()
    return summary
