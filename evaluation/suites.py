"""Suites of lm-eval tasks, and the checks made before any model is loaded.

A suite (``eval.suites.<name>`` in config) is a list of tasks with their shot counts.
lm-eval's ``num_fewshot`` is global to a call, so a suite runs as one call per shot setting
(:func:`shot_groups`). Before the model is built, :func:`preflight` loads every task: this is
where a hub dataset that cannot be reached fails (offline, with the dataset named and how to
point lm-eval at a local copy), and where a code-executing task is refused unless both
``eval.confirm_run_unsafe_code`` and ``HF_ALLOW_CODE_EVAL=1`` are set.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from lm_eval.tasks import TaskManager

from evaluation import TASKS_DIR
from evaluation.code_exec import ALLOW_ENV, code_eval_allowed
from selfmoe.config import Config, EvalTaskConfig, suite_name
from selfmoe.errors import ConfigError, OfflineError, SelfMoEError

LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")


def suite_tasks(cfg: Config) -> tuple[str, list[EvalTaskConfig]]:
    """The name and tasks of the suite this run evaluates."""
    name = suite_name(cfg)
    return name, list(cfg.eval.suites[name])


def shot_groups(tasks: Iterable[EvalTaskConfig]) -> dict[int, list[str]]:
    """Tasks grouped by shot count, in suite order: one lm-eval call per group."""
    groups: dict[int, list[str]] = {}
    for t in tasks:
        groups.setdefault(t.num_fewshot, []).append(t.task)
    return groups


def task_manager(cfg: Config) -> TaskManager:
    """lm-eval's task index with our smoke tasks and any ``eval.include_paths`` added."""
    paths = [str(TASKS_DIR), *(str(Path(p).expanduser().resolve()) for p in cfg.eval.include_paths)]
    quiet_lm_eval()
    return TaskManager(include_path=paths, verbosity="ERROR")


def quiet_lm_eval() -> None:
    """lm-eval warns per task about things we chose on purpose (custom loaders, model objects)."""
    import logging

    level = logging.DEBUG if os.environ.get("SELFMOE_LOG_LEVEL") == "DEBUG" else logging.ERROR
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(level)


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAML as data: tags such as ``!function`` become plain strings."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: str(getattr(node, "value", "")))


def read_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML with its ``include:`` chain merged (the including file wins), without importing code."""
    config = yaml.load(path.read_text(), Loader=_TaskYamlLoader) or {}  # a SafeLoader subclass: no code runs
    include = config.pop("include", None)
    if isinstance(include, str):
        parent = Path(include) if Path(include).is_absolute() else path.parent / include
        config = {**read_task_yaml(parent), **config}
    return config


def dataset_paths(manager: TaskManager, name: str) -> list[str]:
    """The hub datasets a task (or every task of a group) reads, from its YAML; [] when unknown."""
    entry = manager.task_index.get(name)
    if entry is None:
        return []
    config: dict[str, Any] = dict(entry.cfg or {})
    if entry.yaml_path:
        try:
            config = read_task_yaml(Path(entry.yaml_path))
        except (OSError, yaml.YAMLError):  # naming the dataset is best effort; the load error follows
            return []
    found = [config["dataset_path"]] if isinstance(config.get("dataset_path"), str) else []
    children = config.get("task") if "group" in config else None
    for child in children if isinstance(children, list) else []:
        child_name = child if isinstance(child, str) else child.get("task") if isinstance(child, dict) else None
        if isinstance(child_name, str) and child_name != name:
            found += dataset_paths(manager, child_name)
    return sorted({p for p in found if p not in LOCAL_BUILDERS})


def _offline_message(name: str, datasets: list[str], reason: str) -> str:
    which = ", ".join(datasets) if datasets else "its dataset"
    return (
        f"task {name!r} needs {which} from the Hugging Face hub, which cannot be reached ({reason}). "
        "Fix: on a machine with hub access run the evaluation once (or `datasets.load_dataset(...)`) and copy "
        "its Hugging Face cache (~/.cache/huggingface) here, then run with HF_DATASETS_OFFLINE=1; or write a local "
        "mirror task (a YAML with `include: <the task's yaml>` and `dataset_path: json` + `dataset_kwargs: "
        "{data_files: ...}` pointing at your copy) in a directory given by eval.include_paths, and list it in the "
        "suite (docs/evaluation.md shows one)."
    )


def _is_offline_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    keys = ("offline", "connection", "resolve", "network", "unreachable", "max retries", "couldn't reach", "timed out")
    return any(k in text for k in keys) or type(exc).__name__ in ("DatasetNotFoundError", "LocalEntryNotFoundError")


def load_tasks(manager: TaskManager, names: list[str]) -> dict[str, Any]:
    """lm-eval task objects for ``names`` (groups expanded), with offline failures explained."""
    unknown = [n for n in names if n not in manager.task_index]
    if unknown:
        raise ConfigError(
            f"unknown lm-eval task(s) {unknown}; check the suite in eval.suites, or add their YAML directory "
            "to eval.include_paths."
        )
    loaded: dict[str, Any] = {}
    for name in names:
        try:
            loaded.update(manager.load([name])["tasks"])
        except SelfMoEError:
            raise
        except Exception as exc:  # lm-eval and datasets raise many types here
            if _is_offline_failure(exc) or os.environ.get("HF_DATASETS_OFFLINE") == "1":
                raise OfflineError(_offline_message(name, dataset_paths(manager, name), type(exc).__name__)) from None
            raise SelfMoEError(f"cannot load lm-eval task {name!r}: {type(exc).__name__}: {exc}") from None
    return loaded


def unsafe_tasks(tasks: dict[str, Any]) -> list[str]:
    """The loaded tasks that execute model-written code."""
    return sorted(name for name, task in tasks.items() if getattr(task, "UNSAFE_CODE", False))


def check_code_opt_in(cfg: Config, unsafe: list[str]) -> None:
    """Refuse code-executing tasks unless both switches are on (before anything is generated)."""
    if not unsafe:
        return
    missing = []
    if not cfg.eval.confirm_run_unsafe_code:
        missing.append("eval.confirm_run_unsafe_code=true")
    if not code_eval_allowed():
        missing.append(f"{ALLOW_ENV}=1 in the environment")
    if missing:
        raise SelfMoEError(
            f"task(s) {unsafe} execute model-written code, which needs an explicit opt-in: set "
            + " and ".join(missing)
            + " (preferably inside a container or VM), or drop them from the suite."
        )


def preflight(cfg: Config, manager: TaskManager, groups: dict[int, list[str]]) -> dict[str, Any]:
    """Load every task of the suite and check the code opt-in; returns the loaded leaf tasks."""
    loaded = load_tasks(manager, [name for names in groups.values() for name in names])
    check_code_opt_in(cfg, unsafe_tasks(loaded))
    return loaded
