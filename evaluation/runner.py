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

import json
import logging
import time
from collections.abc import Mapping
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
    read_manifest,
    sha256_text,
    versions,
)
from selfmoe.config import Config, EvalTaskConfig
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


def evaluate_target(cfg: Config, target: Target, manager: Any) -> dict[str, Any]:
    """Evaluate one target on the suite; returns its results document (also written to disk)."""
    suite, tasks = suite_tasks(cfg)
    groups = shot_groups(tasks)
    out_dir = eval_root(cfg) / target.slug / suite
    key = results_key(cfg, target, tasks)
    previous = read_json(out_dir / RESULTS)
    if previous.get("key") == key and not cfg.force:
        log.info("%s on %s is up to date at %s (force=true to redo)", target.spec, suite, out_dir)
        return previous
    started = time.time()
    built = build_target(cfg, target, default_device(cfg))
    lm = SelfMoELM(cfg=cfg, built=built)
    metric_of = {t.task: t.metric for t in tasks}
    scores: dict[str, dict[str, Any]] = {t.task: {"num_fewshot": t.num_fewshot, "scores": []} for t in tasks}
    runs, first_samples, leaf_map = [], {}, {}
    for i, seed in enumerate(cfg.eval.seeds):
        for shots, names in groups.items():
            if shots == 0 and i > 0:  # no few-shot draw to vary: the first seed's run stands for all
                for name in names:
                    scores[name]["scores"].append(scores[name]["scores"][0])
                continue
            log.info("lm-eval: %s, %s (%d-shot, seed %d)", target.spec, ", ".join(names), shots, seed)
            res = simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=shots,
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
            for name in names:
                value, metric = task_score(res, name, metric_of[name])
                scores[name]["scores"].append(value)
                scores[name]["metric"] = metric
                scores[name]["version"] = res.get("versions", {}).get(name)
            samples = res.pop("samples", {})
            if i == 0:
                first_samples.update(samples)
                leaf_map.update(_leaf_to_task(res, names))
            runs.append({"seed": seed, "num_fewshot": shots, "tasks": names, **{k: res.get(k) for k in LM_EVAL_KEYS}})
    for entry in scores.values():
        entry["mean"], entry["std"] = mean_std(entry["scores"])
    doc: dict[str, Any] = {
        "key": key,
        "target": target.spec,
        "label": target.label,
        "suite": suite,
        "tasks": scores,
        "seeds": list(cfg.eval.seeds),
        "limit": cfg.eval.limit,
        "batch_size": cfg.eval.batch_size,
        "lm_eval_version": lm_eval.__version__,
        "provenance": built.provenance,
        "seed_overlap": find_overlap(first_samples, seed_texts(cfg)),
        "seconds": round(time.time() - started, 1),
        "versions": versions(),
        "runs": runs,
    }
    if doc["seed_overlap"]:
        log.warning("%d evaluated item(s) equal a generation seed: see seed_overlap in %s", len(doc["seed_overlap"]),
                    out_dir / RESULTS)  # fmt: skip
    lines = [json.dumps(_jsonable({"task": t, **s})) + "\n" for t, rows in first_samples.items() for s in rows]
    atomic_write_text(out_dir / "samples.jsonl", "".join(lines))
    if built.is_mixse and cfg.eval.routing_docs > 0:
        texts = _routing_texts(first_samples, leaf_map, cfg.eval.routing_docs)
        doc["routing"] = _write_routing(cfg, lm, built, texts, out_dir)
    atomic_write_json(out_dir / RESULTS, _jsonable(doc))
    return doc


LM_EVAL_KEYS = ("results", "group_subtasks", "versions", "n-shot", "n-samples", "higher_is_better")


def _write_routing(cfg: Config, lm: SelfMoELM, built: Any, texts: dict[str, list[str]], out_dir: Path) -> dict:
    recorder = routing_pass(
        built.model, built.tokenizer, texts, batch_size=cfg.eval.batch_size, max_length=lm.max_length
    )
    routing = recorder.result()
    payload = {"experts": recorder.experts, "target": built.target.spec, "tasks": routing}
    atomic_write_json(out_dir / "routing.json", payload)
    if routing:
        title = f"{built.target.label}: mean router weight per benchmark"
        atomic_write_bytes(out_dir / "routing.png", routing_heatmap(routing, recorder.experts, title))
    return {task: entry["probs"]["overall"] for task, entry in routing.items()}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


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


def run(cfg: Config, targets: list[str] | None = None) -> Path:
    """`python -m selfmoe eval`: every target of ``eval.targets`` (or ``targets``) on the suite."""
    parsed = [parse_target(t, cfg) for t in (targets or cfg.eval.targets)]
    check_available(cfg, parsed)
    _, tasks = suite_tasks(cfg)
    manager = task_manager(cfg)
    preflight(cfg, manager, shot_groups(tasks))  # offline and code opt-in problems stop us before any model
    for target in parsed:
        evaluate_target(cfg, target, manager)
    summary = write_summary(cfg, [t.spec for t in parsed])
    log.info("results table: %s", summary)
    return summary
