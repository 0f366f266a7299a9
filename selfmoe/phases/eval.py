"""`python -m selfmoe eval` (`make eval`): lm-eval over the targets; see :mod:`evaluation.runner`."""

from __future__ import annotations

from pathlib import Path

from selfmoe.config import Config


def run(cfg: Config) -> Path:
    from evaluation.runner import run as evaluate

    return evaluate(cfg)
