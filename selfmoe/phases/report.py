"""`python -m selfmoe report` (`make report`): see :mod:`evaluation.report`."""

from __future__ import annotations

from pathlib import Path

from selfmoe.config import Config


def run(cfg: Config) -> Path:
    from evaluation.report import build_report

    return build_report(cfg)
