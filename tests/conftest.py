"""Test-wide settings: offline, one thread, deterministic."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from selfmoe.config import TinyConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# A tiny model smaller still, for unit tests that build one in-process in a second or less.
SMALL_TINY = TinyConfig(
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    vocab_size=300,
    pretrain_steps=20,
    pretrain_batch_size=4,
    pretrain_seq_len=32,
    pretrain_lr=1e-2,
)
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real benchmark files beside the checkout; tests using them skip where absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark data not found at {SHARED_DATA} (only present on the developers' machines)")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def tiny_llama(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    """A 2-layer Llama with seeded random weights: the shared fixture model of the unit tests."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


# Shared by the integration tests: the default tiny model and a small self-generated math set,
# built once per session (the tiny model's pretraining dominates: about a minute on one core).
# A tiny model pretrained on this learns the seed formats, EOS included: generation tests use it.
GENERATION_CORPUS = [
    "Task 1:\nAdd two and three.\n\nTask 2:\nAdd four and five.\n\nTask 3:\nAdd six and seven.\n\n",
    "### Instruction:\nWhat is 2 + 2?\n\n### Response:\nThe answer is 4.\n\n"
    "### Instruction:\nWhat is 3 + 3?\n\n### Response:\nThe answer is 6.",
    "the cat sat on the mat. the dog sat on the log. the cow ate the grass.",
] * 4
TEST_OVERRIDES = ["data.num_examples=24", "trainer.progress_bar=false"]


def make_config(phase: str, output_dir, *overrides: str):
    from selfmoe.config import load_config

    return load_config(phase, [f"output_dir={output_dir}", *TEST_OVERRIDES, *overrides])


@pytest.fixture(scope="session")
def tiny_outputs(tmp_path_factory) -> Path:
    """An output_dir holding the tiny base model and generated math data (do not modify)."""
    from selfmoe.phases import generate

    out = tmp_path_factory.mktemp("tiny-outputs")
    generate.run(make_config("generate", out, "domain=math"))
    return out


@pytest.fixture
def outputs(tmp_path, tiny_outputs) -> Path:
    """A private copy of ``tiny_outputs`` that a test may change."""
    import shutil

    dst = tmp_path / "outputs"
    shutil.copytree(tiny_outputs, dst)
    return dst


class FirstStep(L.Callback):
    """Writes the global step a run starts from to ``path`` (readable from a forked rank too): a
    resumed run starts past 0, which is how resume tests tell a resume from a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.is_global_zero and not self.path.exists():
            self.path.write_text(str(trainer.global_step))


def run_selfmoe(*args: str, timeout: int = 600, **env: str):
    """``python -m selfmoe <args>`` in a subprocess (offline, one thread per process), output captured."""
    import subprocess
    import sys

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200", **env}
    return subprocess.run(
        [sys.executable, "-m", "selfmoe", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
