"""Safety: weights come from safetensors only (pickles are never opened), checkpoints load with
weights_only, and no token from the config or the environment reaches an artifact file."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMALL_TINY
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from selfmoe.__main__ import main
from selfmoe.artifacts import REDACTED, Layout, is_secret_key, redact
from selfmoe.config import load_config
from selfmoe.errors import DataError, SelfMoEError
from selfmoe.models.adapter import check_adapter
from selfmoe.models.merging import lora_deltas
from selfmoe.models.mixse import read_expert

SOURCES = ("selfmoe", "callbacks", "evaluation", "tests", "benchmarks")


# --- source scan: how weights and checkpoints are loaded ---------------------------------------------


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func), {k.arg: k.value for k in node.keywords}


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(path: Path, root: Path = REPO) -> list[str]:
    """Calls in ``path`` that could unpickle arbitrary objects, as ``file:line: call ...``."""
    found = []
    for call, func, kw in _calls(path):
        where = f"{path.relative_to(root)}:{call.lineno}: {func}"
        if func.endswith("torch.load") and not _is_true(kw.get("weights_only")):
            found.append(f"{where} without weights_only=True")
        elif func.split(".")[-1] in ("load", "loads", "Unpickler") and func.split(".")[0] in (
            "pickle", "cPickle", "dill", "cloudpickle", "joblib", "_pickle"):  # fmt: skip
            found.append(where)
        elif func.endswith((".fit", ".validate", ".test", ".predict")) and "ckpt_path" in kw:
            if not _is_true(kw.get("weights_only")):
                found.append(f"{where}(ckpt_path=...) without weights_only=True")
        elif func.endswith("load_from_checkpoint") and not _is_true(kw.get("weights_only")):
            found.append(f"{where} without weights_only=True")
        elif func.endswith("from_pretrained") and getattr(kw.get("use_safetensors"), "value", None) is False:
            found.append(f"{where}(use_safetensors=False)")
    return found


def test_no_source_file_unpickles_weights_or_checkpoints():
    files = [p for root in SOURCES if (REPO / root).is_dir() for p in sorted((REPO / root).rglob("*.py"))]
    assert len(files) > 20
    assert [hit for path in files for hit in unsafe_loads(path)] == []


def test_the_scan_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle, torch\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\npickle.loads(b'')\n"
        "trainer.fit(m, ckpt_path='last.ckpt')\nM.from_pretrained('d', use_safetensors=False)\n"
        "torch.load('x', weights_only=True)\ntrainer.fit(m, ckpt_path=p, weights_only=True)\n"
    )
    hits = unsafe_loads(bad, root=tmp_path)
    assert [h.split(": ", 1)[1] for h in hits] == [
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        "pickle.loads",
        "trainer.fit(ckpt_path=...) without weights_only=True",
        "M.from_pretrained(use_safetensors=False)",
    ]


# --- pickles are refused, never opened ------------------------------------------------------------


class _Armed:
    """Unpickling this creates ``marker``: proof that code ran while loading."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def armed_pickle(path: Path, marker: Path, state: dict[str, torch.Tensor]) -> None:
    torch.save({**state, "payload": _Armed(marker)}, path)


def small_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )


def test_the_armed_pickle_really_runs_code(tmp_path):
    """The fixture is live: a plain unpickling creates the marker (so its absence below means something)."""
    marker = tmp_path / "ran"
    armed_pickle(tmp_path / "x.bin", marker, {})
    with pytest.raises(Exception):  # noqa: B017 - weights_only refuses the object
        torch.load(tmp_path / "x.bin", weights_only=True)
    assert not marker.exists()
    # What selfmoe never does, in another process so that the source scan above stays strict.
    unsafe = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", unsafe, str(tmp_path / "x.bin")], check=True, timeout=120)
    assert marker.exists()


def test_pickle_adapters_are_refused_without_being_opened(tmp_path):
    adapter, marker = tmp_path / "expert", tmp_path / "ran"
    peft = get_peft_model(small_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.save_pretrained(adapter)
    state = {k: v.clone() for k, v in peft.state_dict().items() if "lora_" in k}
    (adapter / "adapter_model.safetensors").unlink()
    armed_pickle(adapter / "adapter_model.bin", marker, state)
    for load in (lambda: read_expert("math", adapter), lambda: lora_deltas(adapter),
                 lambda: check_adapter(small_llama(), adapter)):  # fmt: skip
        with pytest.raises(DataError, match=r"adapter_model\.bin but no adapter_model\.safetensors.*pickle"):
            load()
    assert not marker.exists()


def test_a_pickle_beside_the_safetensors_is_ignored(tmp_path):
    adapter, marker = tmp_path / "expert", tmp_path / "ran"
    get_peft_model(small_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    armed_pickle(adapter / "adapter_model.bin", marker, {})
    assert read_expert("math", adapter).deltas and lora_deltas(adapter)
    assert not marker.exists()


def test_a_base_model_with_pickle_weights_only_is_refused(tmp_path):
    from selfmoe.models.base import load_base
    from selfmoe.models.tiny import build_tokenizer

    model_dir, marker = tmp_path / "model", tmp_path / "ran"
    model = small_llama()
    model.config.save_pretrained(model_dir)
    build_tokenizer(["a tiny corpus for a tokenizer"] * 4, SMALL_TINY.vocab_size).save_pretrained(model_dir)
    armed_pickle(model_dir / "pytorch_model.bin", marker, model.state_dict())
    cfg = load_config("generate", [f"model.path={model_dir}", "model.name=pickled"])
    with pytest.raises(SelfMoEError, match="no safetensors weights: selfmoe loads weights from safetensors only"):
        load_base(cfg)
    assert not marker.exists()


# --- no secrets in artifacts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("token", True), ("hf_token", True), ("HF_TOKEN", True), ("HUGGING_FACE_HUB_TOKEN", True),
        ("WANDB_API_KEY", True), ("apiKey", True), ("password", True), ("client_secret", True),
        ("AWS_SECRET_ACCESS_KEY", True), ("credentials", True),
        ("max_new_tokens_brainstorm", False), ("max_prompt_tokens", False), ("pad_token_id", False),
        ("tokens_per_second", False), ("tokenizer", False), ("key", False), ("cache_key", False), ("seed", False),
    ],
)  # fmt: skip
def test_secret_keys(key, secret):
    assert is_secret_key(key) is secret


def test_redact_keys_env_values_and_token_formats():
    env = {"MY_SERVICE_TOKEN": "s3cr3t-value-123", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "PATH": "/usr/bin"}
    hub = "hf_" + "A1b2" * 9
    doc = {
        "model": {"path": "org/model", "hf_token": "anything", "revision": None},
        "notes": [f"uses s3cr3t-value-123 and {hub}", 1, 2.5, True],
        "steps": 1,
        "tokens_per_second": 12.0,
    }
    assert redact(doc, env) == {
        "model": {"path": "org/model", "hf_token": REDACTED, "revision": None},
        "notes": [f"uses {REDACTED} and {REDACTED}", 1, 2.5, True],
        "steps": 1,
        "tokens_per_second": 12.0,
    }


def test_no_token_reaches_an_artifact(tmp_path, monkeypatch, capsys):
    """Tokens in the environment and a token pasted into a setting: absent from every file a phase writes."""
    hf, wandb = "hf_" + "Zq9x" * 9, "0123456789abcdef" * 2 + "feedbeef"
    monkeypatch.setenv("HF_TOKEN", hf)
    monkeypatch.setenv("WANDB_API_KEY", wandb)
    out = tmp_path / "outputs"
    experts = Layout.for_model(out, "tiny").root / "experts"
    for i, name in enumerate(["math", "knowledge"]):  # merging reads adapters only: no base model needed
        torch.manual_seed(i)
        get_peft_model(small_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
                       ).save_pretrained(experts / name)  # fmt: skip
    args = [f"output_dir={out}", "merge.experts=[math,knowledge]", "merge.methods=[linear]",
            f"trainer.wandb_project={wandb}", f"model.revision=main-{hf}"]  # fmt: skip
    assert main(["merge", *args]) == 0
    written = [p for p in out.rglob("*") if p.is_file() and "experts" not in p.parts]
    assert {p.name for p in written} >= {"config.yaml", "manifest.json", "merge.json", "merged.safetensors"}
    for path in written:
        data = path.read_bytes()
        assert hf.encode() not in data and wandb.encode() not in data, path
    config = (out / "tiny" / "merges" / "linear" / "config.yaml").read_text()
    assert f"wandb_project: {REDACTED}" in config and f"revision: main-{REDACTED}" in config
    assert main(["config", "merge", *args]) == 0  # printing the config redacts too
    printed = capsys.readouterr().out
    assert hf not in printed and wandb not in printed and REDACTED in printed
    assert json.loads((out / "tiny" / "merges" / "linear" / "manifest.json").read_text())["kind"] == "merge"
