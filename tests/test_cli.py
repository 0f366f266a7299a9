"""The command line and its bad-input contract: one clear message, exit 2, no partial artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, TEST_OVERRIDES

from selfmoe.__main__ import main
from selfmoe.artifacts import Layout


def cli(outputs, *args: str) -> list[str]:
    return [args[0], f"output_dir={outputs}", *TEST_OVERRIDES, *args[1:]]


def no_leftovers(root) -> None:
    """Nothing half-written: no temp files or directories anywhere under ``root``."""
    leftovers = [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".old-" in p.name]
    assert leftovers == []


def run_main(capsys, argv) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, " ".join(err.split())  # rich wraps long lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "domain=physics"], "unknown domain 'physics'"),
        (["expert", "domain=physics"], "unknown domain 'physics'"),
        (["generate", "data.batchsize=3"], "data.batchsize"),
        (["generate", "data.batch_size=many"], "data.batch_size"),
        (["generate", "model=gpt-17"], "unknown model 'gpt-17'"),
        (["frobnicate"], "unknown phase 'frobnicate'"),
        (["generate", "domain"], "not key=value"),
    ],
)
def test_config_errors_exit_2_with_the_key_named(tmp_path, capsys, args, message):
    code, err = run_main(capsys, cli(tmp_path, *args))
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_missing_model_path(tmp_path, capsys):
    code, err = run_main(capsys, cli(tmp_path, "generate", "model.path=/nonexistent/model-dir"))
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "tiny" / "data").exists()


def test_hub_model_while_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_main(capsys, cli(tmp_path, "generate", "model.path=some-org/some-model", "model.name=some"))
    assert code == 2
    assert "some-org/some-model" in err and "model.path" in err


def test_hub_seeds_while_offline(outputs, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, err = run_main(capsys, cli(outputs, "generate", "domain=knowledge", "data.seed_source=hub"))
    assert code == 2
    assert "cais/mmlu" in err and "seed_source=local" in err
    assert not Layout.for_model(outputs, "tiny").data("knowledge").exists()


def test_seed_file_with_wrong_fields(outputs, tmp_path, capsys):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text(json.dumps({"question": "What is 2+2?", "answer": "4"}) + "\n")
    code, err = run_main(
        capsys, cli(outputs, "generate", "domain=knowledge", f"domains.knowledge.seeds.local.path={bad}")
    )
    assert code == 2
    assert str(bad) in err and "instruction" in err
    assert not Layout.for_model(outputs, "tiny").data("knowledge").exists()
    no_leftovers(outputs)


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "has no examples"), ('{"id": "a", "instruction": "x", "output": "y"}\n{broken\n', "line 2")],
)
def test_empty_or_invalid_data_file(outputs, capsys, content, message):
    train = Layout.for_model(outputs, "tiny").data("math") / "train.jsonl"
    train.write_text(content)
    code, err = run_main(capsys, cli(outputs, "expert", "domain=math"))
    assert code == 2
    assert "train.jsonl" in err and message in err
    assert not Layout.for_model(outputs, "tiny").expert("math").exists()
    no_leftovers(outputs)


def test_missing_data_file_is_regenerated(outputs, capsys):
    """`make expert` makes the data first when it is missing (here: one file deleted)."""
    data = Layout.for_model(outputs, "tiny").data("math")
    (data / "train.jsonl").unlink()
    code, _ = run_main(capsys, cli(outputs, "expert", "domain=math"))
    assert code == 0
    assert (data / "train.jsonl").is_file()
    assert (Layout.for_model(outputs, "tiny").expert("math") / "adapter_model.safetensors").is_file()


def test_config_verb_prints_the_resolved_config(tmp_path, capsys):
    assert main(["config", "expert", "model=gemma-7b", "expert.lr=1e-4"]) == 0
    out = capsys.readouterr().out
    assert "path: google/gemma-7b" in out and "lr: 0.0001" in out


def test_python_m_selfmoe_subprocess_exit_code(tmp_path):
    """The real entry point: exit status 2 and one message on stderr, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "selfmoe", "generate", f"output_dir={tmp_path}", "domain=physics"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown domain 'physics'" in proc.stderr
    assert "Traceback" not in proc.stderr
