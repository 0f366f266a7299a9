"""The paper's experiments: configs that load, the seed-only data, the line figure, and one
experiment end to end at smoke scale on the tiny model."""

from __future__ import annotations

import json

import pytest

from selfmoe.artifacts import Layout
from selfmoe.config import available
from selfmoe.data.schema import read_jsonl
from selfmoe.phases.experiment import line_series, row_config
from selfmoe.plots import line_png
from tests.conftest import make_config

EXPERIMENTS = ["fig5", "table1", "table2", "table3", "table4", "table8", "variance"]


def test_every_paper_experiment_has_a_config():
    assert available("experiment") == EXPERIMENTS
    for name in EXPERIMENTS:
        cfg = make_config("experiment", "out", f"experiment={name}")
        assert cfg.experiment.name == name and cfg.experiment.rows
        for row in cfg.experiment.rows:  # every row's config validates
            row_config(cfg, row)


def test_rows_apply_overrides_and_scale():
    cfg = make_config("experiment", "out", "experiment=fig5")
    row = cfg.experiment.rows[1]
    assert row_config(cfg, row).data.num_examples == 8  # smoke scale (tiny): the smoke sweep
    assert row_config(cfg, row).output_dir == "out/fig5-n2000"
    full = make_config("experiment", "out", "experiment=fig5", "eval.scale=full")
    assert row_config(full, full.experiment.rows[1]).data.num_examples == 500  # 2K in total over 4 domains
    table2 = make_config("experiment", "out", "experiment=table2")
    assert row_config(table2, table2.experiment.rows[2]).router.top_k is None  # all experts
    variance = make_config("experiment", "out", "experiment=variance")
    assert row_config(variance, variance.experiment.rows[0]).eval.seeds == [0, 1, 2]


def test_line_series_starts_every_curve_at_the_base_point():
    points = [
        {"series": None, "x": 0, "avg": {"mean": 0.4}},
        {"series": "MiXSE", "x": 2000, "avg": {"mean": 0.5}},
        {"series": "instance", "x": 2000, "avg": {"mean": 0.45}},
        {"series": "MiXSE", "x": 1000, "avg": None},  # not evaluated: left out
    ]
    assert line_series(points) == {"MiXSE": [(0.0, 40.0), (2000.0, 50.0)], "instance": [(0.0, 40.0), (2000.0, 45.0)]}
    png = line_png(line_series(points), title="t", x_label="x", y_label="y")
    assert png[:4] == b"\x89PNG"


def test_seed_only_data_are_the_seeds(outputs):
    from selfmoe.phases import generate

    cfg = make_config("generate", outputs / "seed-only", "domain=math", "data.source=seeds")
    path = generate.run(cfg)["math"]
    manifest = json.loads((path / "manifest.json").read_text())
    seeds = read_jsonl(path / "seeds.jsonl", domain="math")
    data = read_jsonl(path / "train.jsonl", domain="math") + read_jsonl(path / "val.jsonl", domain="math")
    assert sorted(e.id for e in data) == sorted(e.id for e in seeds)
    assert len(seeds) == manifest["train"] + manifest["val"]
    assert manifest["generation"] == {"source": "seeds"}


@pytest.mark.slow
def test_variance_experiment_end_to_end_at_smoke_scale(outputs, monkeypatch):
    """Runs every phase the rows need (data, experts, instance merging, router), evaluates the rows
    on two few-shot seeds and writes the table; its cells are the evaluation results'."""
    from selfmoe.phases import experiment

    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    cfg = make_config(
        "experiment", outputs, "experiment=variance", "experiment.seeds=[0,1]", "eval.confirm_run_unsafe_code=true",
        "eval.limit=4", "eval.routing_docs=2", "data.num_examples=8", "expert.epochs=1", "router.epochs=1",
    )  # fmt: skip
    out = experiment.run(cfg)
    table = json.loads((out / "table.json").read_text())
    assert [r["label"] for r in table["rows"]] == ["base", "instance merging", "MiXSE"]
    root = Layout.for_model(outputs, "tiny").root
    for row, slug in zip(table["rows"], ["base", "instance", "mixse"], strict=True):
        result = json.loads((root / "eval" / slug / "smoke" / "results.json").read_text())
        assert result["seeds"] == [0, 1]
        for task, cell in row["tasks"].items():
            assert cell["mean"] == pytest.approx(result["tasks"][task]["mean"])
            assert len(result["tasks"][task]["scores"]) == 2
        assert result["tasks"]["smoke_mc"]["std"] == 0  # 0-shot: no few-shot draw to vary
    text = (out / "table.md").read_text()
    assert "| MiXSE |" in text and " ± " in text
    for domain in ["knowledge", "reasoning", "math", "coding", "all"]:
        assert (root / "experts" / domain / "adapter_model.safetensors").is_file()


def test_disk_full_while_writing_data_keeps_the_previous_data(outputs, monkeypatch):
    """The data phase maps a full disk to one clear error and leaves the previous data as it was."""
    import errno
    import os

    from selfmoe import artifacts
    from selfmoe.phases import generate
    from selfmoe.training.faults import OutputWriteError

    path = Layout.for_model(outputs, "tiny").data("math")
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    replace = os.replace

    def no_space(src, dst):
        if ".tmp" in os.path.basename(src):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", no_space)
    cfg = make_config("generate", outputs, "domain=math", "data.source=seeds")  # other settings: rebuilt in place
    with pytest.raises(OutputWriteError) as info:
        generate.run(cfg)
    assert "No space left on device" in str(info.value) and f"previous data at {path}" in str(info.value)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before
