"""`python -m selfmoe report` (`make report`): see :mod:`evaluation.report`."""

from __future__ import annotations

from pathlib import Path

from selfmoe.config import Config


def run(cfg: Config) -> Path:
    from evaluation.report import REPORT_DIR, build_report
    from selfmoe.artifacts import Layout
    from selfmoe.phases.common import reporting_write_errors

    out = Layout.for_model(cfg.output_dir, cfg.model.name).root / REPORT_DIR
    with reporting_write_errors(out.parent, f"The previous report at {out}, if any, is unchanged."):
        return build_report(cfg)
