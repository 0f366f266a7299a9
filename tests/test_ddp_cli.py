"""The real `ddp` strategy, run through the CLI in a subprocess (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TEST_OVERRIDES, make_config, run_selfmoe
from safetensors.torch import load_file

from selfmoe.artifacts import Layout
from selfmoe.phases import expert
from selfmoe.phases.expert import EXPERT_FILES

pytestmark = pytest.mark.slow


def test_expert_training_under_real_ddp_keeps_the_global_batch(outputs, tmp_path):
    # No LoRA dropout: each rank draws its own masks, so only then can 2 ranks equal 1 process.
    same = ["domain=math", "trainer.accelerator=cpu", "expert.lora.dropout=0.0"]
    args = [f"output_dir={outputs}", *TEST_OVERRIDES, *same]
    proc = run_selfmoe("expert", *args, "trainer.strategy=ddp", "trainer.devices=2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    target = Layout.for_model(outputs, "tiny").expert("math")
    assert sorted(p.name for p in target.iterdir()) == sorted(EXPERT_FILES)  # rank zero wrote it, whole
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    # global batch 8 = 4 per rank x 2 ranks x 1 accumulation step: as many optimizer steps as on one process
    n_train = manifest["train_examples"]
    assert manifest["steps"] == manifest["epochs"] * -(-n_train // manifest["global_batch_size"])
    assert manifest["metrics"]["val_loss_after"] < manifest["metrics"]["val_loss_before"]

    # The same steps as one process accumulating 2 micro-batches of 4 (atol 1e-6: only the order
    # of float additions differs), and the same token-weighted validation loss.
    single = tmp_path / "single"
    shutil.copytree(outputs, single, ignore=shutil.ignore_patterns("runs", "experts"))
    cfg = make_config("expert", single, *same)
    one = expert.train_expert(cfg, "math", {"math": Layout.for_model(single, "tiny").data("math")})
    want, got = load_file(one / "adapter_model.safetensors"), load_file(target / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    single_manifest = json.loads((one / "manifest.json").read_text())
    assert single_manifest["steps"] == manifest["steps"]
    # The logged train/loss is the last global batch's token mean, whatever the world size.
    train_last = single_manifest["metrics"]["train_loss_last"]
    assert manifest["metrics"]["train_loss_last"] == pytest.approx(train_last, abs=1e-5)
    assert manifest["metrics"]["val_loss_after"] == pytest.approx(
        single_manifest["metrics"]["val_loss_after"], abs=1e-5
    )
