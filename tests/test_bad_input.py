"""Issue 8's bad-input table: every case through the real command line (or, for the generation
counters, the real generation loop), each checked for the same contract.

A user error exits with status 2, prints one message that names the problem and the fix, shows
no traceback, and leaves the outputs exactly as they were (nothing half-written, a previous
artifact untouched). Cases a setting lets through (``data.on_bad_line=skip``, empty generations,
overlong prompts) exit 0 and say what they skipped or counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from conftest import REPO, TEST_OVERRIDES, make_config
from fake_generation import DATA, DOMAIN, SEEDS, PureBackend
from safetensors.torch import load_file, save_file

from selfmoe.__main__ import main
from selfmoe.artifacts import Layout
from selfmoe.data.generation import Throughput
from selfmoe.data.schema import Example, read_jsonl, write_jsonl
from selfmoe.data.selfgen import self_generate

SCRATCH = "runs"  # training scratch space (logs, checkpoints): not an artifact


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bad_outputs(tmp_path_factory, tiny_outputs) -> Path:
    """tiny_outputs plus random (untrained) experts for math and knowledge, a MiXSE over them, and
    beside the outputs an adapter made for a model of another width. Built without training."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfmoe.models.base import load_base, model_id
    from selfmoe.models.mixse import RouterSettings, build_mixse, read_expert, save_mixse

    root = tmp_path_factory.mktemp("bad")
    out = root / "outputs"
    shutil.copytree(tiny_outputs, out)
    cfg = make_config("router", out)
    layout = Layout.for_model(out, cfg.model.name)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(cfg.model.lora_targets), init_lora_weights=False)
    for i, name in enumerate(["math", "knowledge"]):
        torch.manual_seed(i)
        get_peft_model(load_base(cfg)[0], lora).save_pretrained(layout.expert(name))
    dirs = {d: layout.expert(d) for d in ["math", "knowledge"]}
    model = build_mixse(load_base(cfg)[0], [read_expert(d, p) for d, p in dirs.items()], RouterSettings())
    save_mixse(model, layout.root / "mixse", base_model=model_id(cfg), expert_dirs=dirs)
    for d in dirs.values():
        (d / "README.md").unlink(missing_ok=True)
    tiny = cfg.tiny
    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tiny.vocab_size,
            hidden_size=2 * tiny.hidden_size,  # made for another base model
            intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.num_layers,
            num_attention_heads=tiny.num_heads,
            num_key_value_heads=tiny.num_kv_heads,
        )
    )
    get_peft_model(wide, lora).save_pretrained(root / "wide")
    return out


def snapshot(root: Path) -> dict[str, str]:
    """Content hash of every file under ``root`` except training scratch space."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and SCRATCH not in p.relative_to(root).parts
    }


# --------------------------------------------------------------------------- how to break things


def tiny_dir(out: Path) -> Path:
    return Layout.for_model(out, "tiny").root


def broken_yaml(out: Path) -> dict[str, str]:
    configs = out.parent / "configs"
    shutil.copytree(REPO / "configs", configs)
    (configs / "model" / "tiny.yaml").write_text("model:\n  name: tiny\n  path: [tiny\n")
    return {"SELFMOE_CONFIG_DIR": str(configs)}


def truncated_expert(out: Path) -> None:
    weights = tiny_dir(out) / "experts" / "math" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def corrupt_expert_bytes(out: Path) -> None:
    """Bytes overwritten inside the tensor data: the file still parses, the values are NaN."""
    weights = tiny_dir(out) / "experts" / "math" / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(blob[:8], "little")
    blob[header + 64 : header + 80] = b"\xff" * 16
    weights.write_bytes(bytes(blob))


def expert_for_another_base(out: Path) -> None:
    target = tiny_dir(out) / "experts" / "math"
    shutil.rmtree(target)
    shutil.copytree(out.parent / "wide", target)


def retrained_expert(out: Path) -> None:
    """The expert changed after the router was trained on it (still a valid adapter)."""
    weights = tiny_dir(out) / "experts" / "math" / "adapter_model.safetensors"
    save_file({k: v * 2 for k, v in load_file(weights).items()}, weights)


BAD_SEEDS = "\n".join(
    [
        json.dumps({"id": "k1", "instruction": "Name the largest planet.", "output": "Jupiter."}),
        '{"id": "k2", "instruction": "unterminated',
        json.dumps({"id": "k3", "instruction": "Name the closest star.", "output": "The Sun."}),
        json.dumps({"id": "k4", "instruction": "No output here."}),
        "",
    ]
)


MMLU_ROW = {"question": "Which planet is largest?", "choices": ["Mars", "Jupiter", "Venus", "Earth"], "answer": 1}
BAD_MMLU = "\n".join(
    [
        json.dumps(MMLU_ROW),
        "{not json",
        json.dumps({**MMLU_ROW, "answer": 9}),  # parses, but there is no such option
        json.dumps({k: v for k, v in MMLU_ROW.items() if k != "choices"}),
        json.dumps({**MMLU_ROW, "question": "Which planet is smallest?", "answer": "D"}),
        "",
    ]
)


def broken_seed_lines(out: Path) -> None:
    (out.parent / "seeds.jsonl").write_text(BAD_SEEDS)
    (out.parent / "mmlu.jsonl").write_text(BAD_MMLU)


def broken_data_lines(out: Path) -> None:
    data = tiny_dir(out) / "data" / "math"
    lines = (data / "train.jsonl").read_text().splitlines(keepends=True)
    lines[1] = "{broken\n"
    (data / "train.jsonl").write_text("".join(lines))
    with (data / "val.jsonl").open("a") as fh:
        fh.write("[1, 2]\n")


# --------------------------------------------------------------------------- generation counters


def backend(empty_every: int = 0) -> PureBackend:
    """The sharding tests' pure fake model, with the throughput counter the generation loop reads."""
    gen = PureBackend(empty_every=empty_every)
    gen.throughput = Throughput()
    return gen


def empty_generations(tmp: Path) -> tuple[int, str]:
    """A backend that writes nothing for a third of the brainstorming prompts."""
    result = self_generate(backend(empty_every=3), DOMAIN, SEEDS, replace(DATA, max_idle_batches=2), target=6, seed=0)
    return 0, _generation_report(result, tmp)


def overlong_prompts(policy: str) -> Callable[[Path], tuple[int, str]]:
    def run(tmp: Path) -> tuple[int, str]:
        # Tokens are words; a 70-token context leaves 6 tokens of prompt next to 64 new tokens.
        data = replace(DATA, context_length=DATA.max_new_tokens_brainstorm + 6, overlong=policy, max_idle_batches=1)
        result = self_generate(backend(), DOMAIN, SEEDS, data, target=3, seed=0)
        return 0, _generation_report(result, tmp)

    return run


def _generation_report(result, tmp: Path) -> str:
    """The counters, and proof that every item (kept or rejected) keeps the schema through a file."""
    rows = [*result.items, *result.rejected]
    assert rows == [Example.from_dict(e.to_dict()) for e in rows]
    path = tmp / "raw.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    stats = result.stats()
    return f"empty_generations={stats['empty_generations']} prompts_overlong={stats['prompts_overlong']} " + (
        f"overlong_policy={stats['overlong_policy']} kept={len(result.items)}"
    )


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...] = ()  # CLI phase and overrides (output_dir and the test overrides are added)
    expect: tuple[str, ...] = ()  # fragments of stderr: the problem, then the fix
    breaks: Callable[[Path], dict[str, str] | None] | None = None  # damages a fresh copy of the outputs
    code: int = 2
    subprocess: bool = False  # the real `python -m selfmoe` process (exit status, no traceback at all)
    writes: str | None = None  # the artifact (under outputs/tiny) a passing run writes; None: nothing changes
    stub_generation: bool = False  # stop the generate phase after its inputs are read (no model run)
    call: Callable[[Path], tuple[int, str]] | None = None  # instead of the CLI (given a scratch dir)


EVAL_ONE_TASK = ("eval.suites.smoke=[{task: smoke_mc}]", "eval.limit=2")

CASES = {
    "malformed YAML in a config layer": Case(
        ("generate",),
        ("tiny.yaml", "malformed YAML at line 4, column 1", "expected ',' or ']'", "Fix the file's syntax"),
        breaks=broken_yaml,
        subprocess=True,
    ),
    "wrong type": Case(
        ("generate", "expert.lr=abc"),
        ("invalid value for 'expert.lr'", "'abc'", "Float", "Fix: give it a value of the type the schema expects"),
        subprocess=True,
    ),
    "unknown key": Case(
        ("generate", "expert.lrr=1"),
        ("unknown key 'expert.lrr'", "Did you mean: 'lr'", "Fix: remove it or correct its name"),
        subprocess=True,
    ),
    "truncated safetensors of an expert": Case(
        ("router", "router.experts=[math]"),
        ("expert 'math'", "adapter_model.safetensors is unreadable", "truncated or corrupt", "make expert DOMAIN=math"),
        breaks=truncated_expert,
    ),
    "corrupted bytes in an adapter": Case(
        ("router", "router.experts=[math]"),
        ("expert 'math'", "NaN or inf", "the file is corrupt", "make expert DOMAIN=math force=true"),
        breaks=corrupt_expert_bytes,
    ),
    "adapter shapes for another base model": Case(
        ("router", "router.experts=[math]"),
        ("expert 'math' does not fit this base model", "trained on another base model", "retrain it on this one"),
        breaks=expert_for_another_base,
    ),
    "mixse.json expert changed (hash mismatch)": Case(
        ("eval", "eval.targets=[mixse]", *EVAL_ONE_TASK),
        ("expert 'math'", "changed since the router was trained (hash mismatch)", "make router force=true"),
        breaks=retrained_expert,
    ),
    "broken seed lines, on_bad_line=error": Case(
        ("generate", "domain=knowledge", "domains.knowledge.seeds.local.path={tmp}/seeds.jsonl"),
        (
            "seeds.jsonl",
            "2 broken row(s)",
            "line 2: not valid JSON",
            "line 4: missing field(s) ['output']",
            "data.on_bad_line=skip",
        ),
        breaks=broken_seed_lines,
    ),
    # Hub-style (MMLU) seeds from a local file: the tiny model's own corpus (local seeds) stays as it is.
    "broken seed lines (MMLU format), on_bad_line=skip": Case(
        (
            "generate",
            "domain=knowledge",
            "data.seed_source=hub",
            "domains.knowledge.seeds.hub.path={tmp}/mmlu.jsonl",
            "data.on_bad_line=skip",
        ),
        (
            "mmlu.jsonl: skipped 1 broken row(s)",
            "line 2: not valid JSON",
            "skipped 2 broken row(s)",
            "line 3: answer must be an index 0-3",
            "line 4: missing field 'choices'",
        ),
        breaks=broken_seed_lines,
        code=0,
        stub_generation=True,
    ),
    "broken data lines, on_bad_line=error": Case(
        ("expert", "domain=math"),
        ("train.jsonl", "1 broken line(s)", "line 2: not valid JSON", "data.on_bad_line=skip"),
        breaks=broken_data_lines,
    ),
    "broken data lines, on_bad_line=skip (expert)": Case(
        ("expert", "domain=math", "data.on_bad_line=skip", "expert.epochs=1"),
        (
            "train.jsonl: skipped 1 broken line(s)",
            "line 2: not valid JSON",
            "val.jsonl: skipped 1",
            "not a JSON object (a list)",
        ),
        breaks=broken_data_lines,
        code=0,
        writes="experts/math",
    ),
    "broken data lines, on_bad_line=skip (router)": Case(
        ("router", "router.experts=[math]", "data.on_bad_line=skip", "router.epochs=1"),
        ("train.jsonl: skipped 1 broken line(s)", "val.jsonl: skipped 1"),
        breaks=broken_data_lines,
        code=0,
        writes="mixse",
    ),
    "empty generations (counted, schema kept)": Case(
        expect=("empty_generations={'brainstorm':",), code=0, call=empty_generations
    ),
    "overlong prompts, data.overlong=skip": Case(
        expect=("prompts_overlong={'brainstorm':", "overlong_policy=skip", "kept=0"),
        code=0,
        call=overlong_prompts("skip"),
    ),
    "overlong prompts, data.overlong=truncate": Case(
        expect=("prompts_overlong={'brainstorm':", "overlong_policy=truncate", "kept=3"),
        code=0,
        call=overlong_prompts("truncate"),
    ),
}


def run_cli(case: Case, out: Path, env: dict[str, str], capsys, monkeypatch) -> tuple[int, str]:
    args = [a.replace("{tmp}", str(out.parent)) for a in case.args]
    argv = [args[0], f"output_dir={out}", *TEST_OVERRIDES, *args[1:]]
    if case.subprocess:
        proc = subprocess.run(
            [sys.executable, "-m", "selfmoe", *argv],
            cwd=REPO,
            env={**os.environ, "COLUMNS": "200", **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        return proc.returncode, proc.stderr
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if case.stub_generation:
        monkeypatch.setattr("selfmoe.phases.generate.run_on_ranks", lambda cfg, model, job: None)
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_table(case: Case, bad_outputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per message, whatever the terminal
    out = tmp_path / "outputs"
    shutil.copytree(bad_outputs, out)
    shutil.copytree(bad_outputs.parent / "wide", tmp_path / "wide")
    env = (case.breaks(out) if case.breaks else None) or {}
    before = snapshot(out)
    code, text = case.call(tmp_path) if case.call else run_cli(case, out, env, capsys, monkeypatch)
    flat = " ".join(text.split())  # rich wraps long lines
    print(f"exit {code}: {flat[-1500:]}")  # shown with -rP: what the user sees
    assert code == case.code, flat[-3000:]
    for fragment in case.expect:
        assert fragment in flat, f"{fragment!r} not in: {flat[-3000:]}"
    assert "Traceback" not in text
    after = snapshot(out)
    leftovers = [p for p in after if p.endswith(".tmp") or ".old-" in p]
    assert leftovers == []
    if case.writes is None:
        assert after == before  # no partial artifact, every previous one untouched
    else:
        changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
        assert changed and all(p.startswith(f"tiny/{case.writes}/") for p in changed), sorted(changed)
        assert json.loads((out / "tiny" / case.writes / "manifest.json").read_text())["kind"]


def test_eval_of_a_truncated_expert_is_a_clear_error(bad_outputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    out = tmp_path / "outputs"
    shutil.copytree(bad_outputs, out)
    truncated_expert(out)
    case = Case(("eval", "eval.targets=[expert:math]", *EVAL_ONE_TASK))
    try:
        code, text = run_cli(case, out, {}, capsys, monkeypatch)
    except Exception as exc:  # e.g. safetensors' own error escaping the CLI
        pytest.fail(f"{type(exc).__name__} escaped the CLI: {exc}")
    assert code == 2 and "unreadable" in text and "Traceback" not in text
