"""Evaluation through lm-eval: targets, the registered ``selfmoe`` model, suites, results, report.

Lightning-free. ``import evaluation.lm`` registers the lm-eval model ``selfmoe``; the smoke
suite's tasks live in ``evaluation/tasks/``.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"
