"""The real `ddp` strategy, run through the CLI in a subprocess (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, TEST_OVERRIDES

from selfmoe.artifacts import Layout
from selfmoe.phases.expert import EXPERT_FILES

pytestmark = pytest.mark.slow


def test_expert_training_under_real_ddp_keeps_the_global_batch(outputs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    args = [f"output_dir={outputs}", *TEST_OVERRIDES, "domain=math", "trainer.accelerator=cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "selfmoe", "expert", *args, "trainer.strategy=ddp", "trainer.devices=2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    target = Layout.for_model(outputs, "tiny").expert("math")
    assert sorted(p.name for p in target.iterdir()) == sorted(EXPERT_FILES)  # rank zero wrote it, whole
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    # global batch 8 = 4 per rank x 2 ranks x 1 accumulation step: as many optimizer steps as on one process
    n_train = manifest["train_examples"]
    assert manifest["steps"] == manifest["epochs"] * -(-n_train // manifest["global_batch_size"])
    assert manifest["metrics"]["val_loss_after"] < manifest["metrics"]["val_loss_before"]
