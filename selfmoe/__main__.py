"""Command line: ``python -m selfmoe <phase> [key=value ...]``.

Phases: ``generate`` (self-generate a domain's data), ``expert`` (train a domain's LoRA expert;
``domain=all`` is instance merging), ``experts`` (every domain's expert), ``router`` (MiXSE:
train the router over the experts), ``config`` (print the resolved config of a phase). User
errors print one message and exit with status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from rich.console import Console
from rich.logging import RichHandler

from selfmoe.errors import SelfMoEError

USAGE = """usage: python -m selfmoe <phase> [key=value ...]

phases:
  generate   self-generate training data for domain=<d> (or all)
  expert     train the LoRA expert of domain=<d> (all = instance merging); generates data if missing
  experts    train every domain's expert
  router     compose the experts into MiXSE and train its router (router.* keys)
  merge      the weight-merging baselines of the experts (merge.methods: ties, dare, linear)
  eval       evaluate eval.targets on eval.suite through lm-eval; writes the results table
  report     one markdown report: results tables, routing figures, provenance
  experiment run a paper table or figure end to end: experiment=<table1|table2|...>
  config     print the resolved config: python -m selfmoe config <phase> [key=value ...]

examples:
  python -m selfmoe generate domain=math
  python -m selfmoe expert domain=math model=gemma-7b trainer=gpu
  python -m selfmoe eval eval.targets=[base,mixse] eval.suite=paper eval.limit=100
  python -m selfmoe experiment experiment=table1
"""


def _phases() -> dict[str, tuple[str, Callable]]:
    from selfmoe.phases import eval as evaluate
    from selfmoe.phases import experiment, expert, generate, merge, report, router

    return {
        "generate": ("generate", generate.run),
        "expert": ("expert", expert.run),
        "experts": ("expert", expert.run_all),
        "router": ("router", router.run),
        "merge": ("merge", merge.run),
        "eval": ("eval", evaluate.run),
        "report": ("report", report.run),
        "experiment": ("experiment", experiment.run),
    }


def _setup_logging() -> Console:
    """Rich logging for our own messages; Lightning and HF keep their own handlers."""
    console = Console(stderr=True)
    log = logging.getLogger("selfmoe")
    log.setLevel(os.environ.get("SELFMOE_LOG_LEVEL", "INFO"))
    if not log.handlers:
        log.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=True))
    log.propagate = False
    return console


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    console = _setup_logging()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    verb, overrides = argv[0], argv[1:]
    try:
        from selfmoe.config import load_config, to_yaml

        phases = _phases()
        if verb == "config":
            if not overrides or overrides[0] not in phases:
                raise SelfMoEError(
                    f"usage: python -m selfmoe config <phase> [key=value ...]; phases: {', '.join(phases)}"
                )
            print(to_yaml(load_config(phases[overrides[0]][0], overrides[1:])))
            return 0
        if verb not in phases:
            raise SelfMoEError(f"unknown phase {verb!r}; choose one of: {', '.join(phases)}, config.")
        schema_phase, run = phases[verb]
        cfg = load_config(schema_phase, overrides)
        run(cfg)
        return 0
    except SelfMoEError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
