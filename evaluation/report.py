"""`make report`: one markdown file with the results tables, the routing figures and provenance.

Reads what the phases wrote under ``outputs/<model>/`` (nothing is recomputed) and writes
``outputs/<model>/report/`` = ``report.md`` + ``figures/*.png`` (copies, so the folder can be
shared on its own). Sections: results per suite (the paper's layout), the experiments'
tables and plots, the routing figures (per benchmark at evaluation; per domain in training),
the data and training numbers, and the provenance of every result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from evaluation.runner import RESULTS, eval_root, write_summary
from selfmoe.artifacts import Layout, atomic_dir, read_json, versions
from selfmoe.config import Config
from selfmoe.models.base import model_id

REPORT_DIR, REPORT_FILE = "report", "report.md"


def _figure(src: Path, figures: Path, name: str) -> str:
    """Copy ``src`` into the report's figures and return its markdown image line."""
    shutil.copyfile(src, figures / name)
    return f"![{name}](figures/{name})\n"


def _manifest(path: Path) -> dict[str, Any]:
    return read_json(path / "manifest.json")


def _data_section(layout: Layout, cfg: Config) -> list[str]:
    lines = ["| domain | requested | train | val | seeds | seconds |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for domain in sorted([*cfg.domains, "all"]):
        m = _manifest(layout.data(domain))
        if m:
            lines.append(
                f"| {domain} | {m.get('requested', 'n/a')} | {m.get('train', 'n/a')} | {m.get('val', 'n/a')} | "
                f"{len(m.get('seed_ids', [])) or 'n/a'} | {m.get('seconds', 'n/a')} |"
            )
    return lines if len(lines) > 2 else []


def _training_section(layout: Layout) -> list[str]:
    lines = ["| artifact | val loss before | val loss after | seconds |", "| --- | ---: | ---: | ---: |"]
    for path in sorted([*layout.root.glob("experts/*"), *(p.parent for p in layout.root.glob("*/mixse.json"))]):
        m = _manifest(path)
        if m:
            metrics = m.get("metrics", {})  # experts record val_loss_after, the router its last val/loss
            before, after = metrics.get("val_loss_before"), metrics.get("val_loss_after", metrics.get("val/loss"))
            fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "n/a"  # noqa: E731
            name, seconds = path.relative_to(layout.root), m.get("seconds", "n/a")
            lines.append(f"| {name} | {fmt(before)} | {fmt(after)} | {seconds} |")
    return lines if len(lines) > 2 else []


def build_report(cfg: Config) -> Path:
    """Write ``outputs/<model>/report/``; returns the path of report.md."""
    layout = Layout.for_model(cfg.output_dir, cfg.model.name)
    summary = write_summary(cfg) if eval_root(cfg).is_dir() else None
    out = layout.root / REPORT_DIR
    with atomic_dir(out) as tmp:
        figures = tmp / "figures"
        figures.mkdir()
        md = [f"# selfmoe report: {cfg.model.name}\n", f"Base model: `{model_id(cfg)}`.\n"]
        md.append("## Results\n")
        if summary is not None:
            md.append(summary.read_text().split("\n", 1)[1].replace("## Suite", "### Suite"))
        else:
            md.append("No evaluation results yet: run `make eval`.\n")
        for exp in sorted(layout.root.glob("experiments/*/table.md")):
            md.append(f"## Experiment `{exp.parent.name}`\n\n" + exp.read_text().split("\n", 1)[1])
            if (exp.parent / "plot.png").is_file():
                md.append(_figure(exp.parent / "plot.png", figures, f"experiment-{exp.parent.name}.png"))
        md.append("## Routing on the benchmarks\n")
        md.append("Mean router weight per expert over the tokens of each benchmark (MiXSE targets).\n")
        for png in sorted(eval_root(cfg).glob("*/*/routing.png")):
            target, suite = png.parent.parent.name, png.parent.name
            md.append(f"### `{target}` on `{suite}`\n\n" + _figure(png, figures, f"routing-{target}-{suite}.png"))
        md.append("## Routing in training\n")
        for png in sorted(layout.root.glob("*/routing/*.png")):
            if png.parent.parent.name not in ("eval", "report"):
                name = f"train-{png.parent.parent.name}-{png.name}"
                md.append(f"### `{png.parent.parent.name}`: {png.stem}\n\n" + _figure(png, figures, name))
        data = _data_section(layout, cfg)
        if data:
            md.append("## Generated data\n\n" + "\n".join(data) + "\n")
        training = _training_section(layout)
        if training:
            md.append("## Training\n\n" + "\n".join(training) + "\n")
        md.append(_provenance(cfg))
        md.append("## Versions\n\n```json\n" + json.dumps(versions(), indent=1) + "\n```\n")
        (tmp / REPORT_FILE).write_text("\n".join(md))
    return out / REPORT_FILE


def _provenance(cfg: Config) -> str:
    rows = [
        "| target | suite | artifact | seeds | limit | lm-eval | task versions | seed overlap |",
        "| --- | --- | --- | --- | --- | --- | --- | ---: |",
    ]
    for path in sorted(eval_root(cfg).glob(f"*/*/{RESULTS}")):
        doc = read_json(path)
        prov = doc.get("provenance", {})
        artifact = prov.get("artifact")
        where = f"`{Path(artifact).name}`" if artifact else "base"
        tasks = ", ".join(f"{t} v{e.get('version')}" for t, e in doc.get("tasks", {}).items())
        rows.append(
            f"| {doc.get('target')} | {doc.get('suite')} | {where} | {doc.get('seeds')} | {doc.get('limit')} | "
            f"{doc.get('lm_eval_version')} | {tasks} | {len(doc.get('seed_overlap', []))} |"
        )
    return "## Provenance\n\n" + "\n".join(rows) + "\n"
