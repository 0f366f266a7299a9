"""Training under faults: a crash or SIGKILL mid-epoch, a pre-emption signal, a NaN loss, a full disk,
a rank that fails under DDP, and a second run over finished work.

The expert phase runs on the tiny model with a checkpoint after every optimizer step: 20 training
examples, global batch 8, 3 epochs = 9 steps, so step 4 is in the middle of the second epoch.
A resumed run must reach the uninterrupted run's adapter exactly (atol 0: same process count,
same data order, same RNG; LoRA dropout is on). CLI runs use ``tests/hooked_cli.py``, which
pauses training right after a given step so the test can kill or signal it there.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, TEST_OVERRIDES, FirstStep, make_config
from safetensors.torch import load_file

from selfmoe import artifacts
from selfmoe.__main__ import main
from selfmoe.artifacts import Layout
from selfmoe.models.mixse import adapter_hash
from selfmoe.phases import expert, router
from selfmoe.training.faults import PREEMPTED_EXIT_CODE, NonFiniteLossError, OutputWriteError

EXPERT = ("domain=math", "expert.checkpoint_every_n_steps=1")
STEPS = 9
PAUSE_STEP = 4  # mid-epoch: epoch 1 holds steps 4..6


def expert_cfg(out: Path, *overrides: str):
    return make_config("expert", out, *EXPERT, *overrides)


def data_dirs(out: Path) -> dict[str, Path]:
    return {"math": Layout.for_model(out, "tiny").data("math")}


def target(out: Path) -> Path:
    return Layout.for_model(out, "tiny").expert("math")


def last_ckpt(out: Path) -> Path:
    return Layout.for_model(out, "tiny").run("expert-math") / "checkpoints" / "last.ckpt"


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(target(out) / "adapter_model.safetensors")


def assert_same_adapter(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and got
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".old-" in p.name]


@pytest.fixture
def out(tmp_path, tiny_outputs) -> Path:
    dst = tmp_path / "outputs"
    shutil.copytree(tiny_outputs, dst)
    return dst


@pytest.fixture(scope="module")
def reference(tiny_outputs, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapter of an uninterrupted run (in-process, one thread, like the CLI runs)."""
    dst = tmp_path_factory.mktemp("reference") / "outputs"
    shutil.copytree(tiny_outputs, dst)
    expert.train_expert(expert_cfg(dst), "math", data_dirs(dst))
    assert json.loads((target(dst) / "manifest.json").read_text())["steps"] == STEPS
    return adapter(dst)


class CrashAtStep(L.Callback):
    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            raise RuntimeError(f"simulated crash on rank {trainer.global_rank}")


# ---------------------------------------------------------------------------------------------
# crash, kill, pre-emption: resume from the last checkpoint and end where an uninterrupted run ends
# ---------------------------------------------------------------------------------------------


def test_crash_mid_epoch_resumes_exactly(out, tmp_path, reference):
    with pytest.raises(RuntimeError, match="simulated crash"):
        expert.train_expert(expert_cfg(out), "math", data_dirs(out), callbacks=[CrashAtStep(PAUSE_STEP)])
    assert not target(out).exists()
    saved = torch.load(last_ckpt(out), weights_only=True)
    assert (saved["global_step"], saved["epoch"]) == (PAUSE_STEP, 1)  # mid-epoch
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "steps_done": 1}]
    expert.train_expert(expert_cfg(out), "math", data_dirs(out), callbacks=[FirstStep(tmp_path / "first")])
    assert (tmp_path / "first").read_text() == str(PAUSE_STEP)  # resumed, not restarted
    assert json.loads((target(out) / "manifest.json").read_text())["steps"] == STEPS
    assert_same_adapter(adapter(out), reference)


def cli(
    out: Path, *args: str, log: Path, pause_file: Path | None = None, verb: str = "expert", **popen
) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    if pause_file is not None:
        env |= {"SELFMOE_TEST_PAUSE_AT_STEP": str(PAUSE_STEP), "SELFMOE_TEST_PAUSE_FILE": str(pause_file)}
    command = [sys.executable, str(REPO / "tests" / "hooked_cli.py"), verb, f"output_dir={out}", *TEST_OVERRIDES]
    return subprocess.Popen(
        [*command, *args], cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, **popen
    )


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before pausing:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the run never paused"
        time.sleep(0.1)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> tuple[int, str]:
    code = proc.wait(timeout=timeout)
    return code, " ".join(log.read_text().split())  # rich wraps long lines


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_matches_an_uninterrupted_run(out, tmp_path, reference):
    pause, log = tmp_path / "paused", tmp_path / "run.log"
    proc = cli(out, *EXPERT, log=log, pause_file=pause, start_new_session=True)
    wait_for(pause, proc, log)
    assert torch.load(last_ckpt(out), weights_only=True)["global_step"] == PAUSE_STEP
    os.killpg(proc.pid, signal.SIGKILL)
    code, _ = finish(proc, log)
    assert code == -signal.SIGKILL
    assert not target(out).exists()

    code, text = finish(cli(out, *EXPERT, log=tmp_path / "rerun.log"), tmp_path / "rerun.log")
    assert code == 0, text[-3000:]
    assert "resuming from" in text
    assert_same_adapter(adapter(out), reference)


ROUTER = ("router.experts=[math,coding]", "router.checkpoint_every_n_steps=1")


@pytest.fixture(scope="module")
def with_experts(tiny_outputs, tmp_path_factory) -> Path:
    """tiny_outputs plus trained math and coding experts (the coding data generated first)."""
    dst = tmp_path_factory.mktemp("experts") / "outputs"
    shutil.copytree(tiny_outputs, dst)
    for domain in ("math", "coding"):
        expert.run(make_config("expert", dst, f"domain={domain}"))
    return dst


@pytest.mark.slow
def test_router_sigkill_mid_epoch_then_rerun_matches_an_uninterrupted_run(with_experts, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "outputs"
    shutil.copytree(with_experts, reference)
    shutil.copytree(with_experts, out)
    want = load_file(router.run(make_config("router", reference, *ROUTER)) / "router.safetensors")

    pause, log = tmp_path / "paused", tmp_path / "run.log"
    proc = cli(out, *ROUTER, verb="router", log=log, pause_file=pause, start_new_session=True)
    wait_for(pause, proc, log)
    ckpt = Layout.for_model(out, "tiny").run("mixse") / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == PAUSE_STEP
    at_kill = next(v for k, v in saved["state_dict"].items() if k.endswith("router.weight"))
    os.killpg(proc.pid, signal.SIGKILL)
    assert finish(proc, log)[0] == -signal.SIGKILL
    assert not (Layout.for_model(out, "tiny").root / "mixse").exists()

    code, text = finish(cli(out, *ROUTER, verb="router", log=tmp_path / "rerun.log"), tmp_path / "rerun.log")
    assert code == 0, text[-3000:]
    assert "resuming from" in text
    got = load_file(Layout.for_model(out, "tiny").root / "mixse" / "router.safetensors")
    assert got.keys() == want.keys()
    for key in want:  # the router trains in eval mode (no dropout): same steps, same weights
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(got["weight"], at_kill)  # the rerun went on training from the checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_a_checkpoint_and_the_rerun_resumes(out, tmp_path, reference, signum):
    pause, log = tmp_path / "paused", tmp_path / "run.log"
    proc = cli(out, *EXPERT, log=log, pause_file=pause)
    wait_for(pause, proc, log)
    os.kill(proc.pid, signum)
    pause.unlink()  # let it go on: it stops at the next step boundary
    code, text = finish(proc, log)
    assert code == PREEMPTED_EXIT_CODE, text[-3000:]
    assert f"pre-empted ({signum.name})" in text and "rerun the same command" in text
    assert torch.load(last_ckpt(out), weights_only=True)["global_step"] == PAUSE_STEP + 1
    assert not target(out).exists() and not leftovers(out)

    code, text = finish(cli(out, *EXPERT, log=tmp_path / "rerun.log"), tmp_path / "rerun.log")
    assert code == 0, text[-3000:]
    assert "resuming from" in text
    assert_same_adapter(adapter(out), reference)


@pytest.mark.slow
def test_preemption_under_real_ddp_stops_every_rank_and_resumes(out, tmp_path):
    """SIGTERM reaches rank zero only (the launcher's process); the other rank stops with it."""
    ddp = ("trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    pause, log = tmp_path / "paused", tmp_path / "run.log"
    proc = cli(out, *EXPERT, *ddp, log=log, pause_file=pause)
    wait_for(pause, proc, log)
    os.kill(proc.pid, signal.SIGTERM)
    pause.unlink()
    code, text = finish(proc, log)
    assert code == PREEMPTED_EXIT_CODE, text[-3000:]
    saved = torch.load(last_ckpt(out), weights_only=True)
    assert saved["global_step"] == PAUSE_STEP + 1 and len(saved["rng_state"]["torch"]) == 2  # both ranks' RNG
    assert not target(out).exists()
    code, text = finish(cli(out, *EXPERT, *ddp, log=tmp_path / "rerun.log"), tmp_path / "rerun.log")
    assert code == 0, text[-3000:]
    assert json.loads((target(out) / "manifest.json").read_text())["steps"] == STEPS


# ---------------------------------------------------------------------------------------------
# a rank that fails under DDP
# ---------------------------------------------------------------------------------------------


def test_a_failing_rank_leaves_no_artifact_and_the_run_resumes(out, tmp_path):
    ddp = ("trainer.strategy=ddp_notebook", "trainer.devices=2", "trainer.logger=none")
    straight = tmp_path / "straight"
    shutil.copytree(out, straight)
    expert.train_expert(expert_cfg(straight, *ddp), "math", data_dirs(straight))

    with pytest.raises(Exception, match="simulated crash on rank 1"):
        expert.train_expert(expert_cfg(out, *ddp), "math", data_dirs(out), callbacks=[CrashAtStep(PAUSE_STEP, rank=1)])
    assert not target(out).exists() and not leftovers(out)  # rank zero wrote nothing half-way
    assert torch.load(last_ckpt(out), weights_only=True)["global_step"] == PAUSE_STEP
    expert.train_expert(expert_cfg(out, *ddp), "math", data_dirs(out), callbacks=[FirstStep(tmp_path / "first")])
    assert (tmp_path / "first").read_text() == str(PAUSE_STEP)
    # Each rank's RNG state was saved and restored, so even the dropout masks are the same.
    assert_same_adapter(adapter(out), adapter(straight))


# ---------------------------------------------------------------------------------------------
# a NaN loss
# ---------------------------------------------------------------------------------------------


class SnapshotCheckpoint(L.Callback):
    """The bytes of last.ckpt as they are when each micro-batch starts."""

    def __init__(self, path: Path) -> None:
        self.path, self.bytes = path, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.path.is_file():
            self.bytes = self.path.read_bytes()


def test_a_diverging_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(out, capsys, monkeypatch):
    snapshot = SnapshotCheckpoint(last_ckpt(out))
    build = expert.build_trainer
    monkeypatch.setattr(expert, "build_trainer", lambda *a, callbacks=None, **k: build(*a, callbacks=[snapshot], **k))
    # lr=1e30: the first step sends the LoRA weights to ~1e30, the second forward overflows to NaN.
    code = main(["expert", f"output_dir={out}", *TEST_OVERRIDES, *EXPERT, "expert.lr=1e30"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "the training loss is nan" in err and "last checkpoint (from the last good step) was kept" in err
    assert "Lower the learning rate" in err and "Traceback" not in err
    assert last_ckpt(out).read_bytes() == snapshot.bytes  # not overwritten after the NaN
    saved = torch.load(last_ckpt(out), weights_only=True)
    assert saved["global_step"] == 1 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    assert not target(out).exists()


def test_nan_error_is_raised_before_the_optimizer_step(out):
    with pytest.raises(NonFiniteLossError, match="global step 2"):
        expert.train_expert(expert_cfg(out, "expert.lr=1e30"), "math", data_dirs(out))


# ---------------------------------------------------------------------------------------------
# a full disk: a clear error, and the previous artifact intact
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def finished(out) -> dict[str, bytes]:
    """``out`` with a finished math expert; returns its files' bytes."""
    expert.train_expert(expert_cfg(out), "math", data_dirs(out))
    return files(target(out))


def test_disk_full_while_checkpointing(out, finished, monkeypatch):
    """A real kernel-level failure (RLIMIT_FSIZE: writes past 64 KiB fail with EFBIG), as root too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(OutputWriteError) as info:
            expert.train_expert(expert_cfg(out, "force=true"), "math", data_dirs(out))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(info.value)
    assert str(last_ckpt(out)) in message and "File too large" in message
    assert "previous checkpoint there, if any, is unchanged" in message
    assert f"under {last_ckpt(out).parent}" in message and "output_dir" in message
    assert files(target(out)) == finished
    assert not leftovers(out)


def test_disk_full_while_writing_the_artifact(out, finished, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target(out).parent / "manifest.json"))

    monkeypatch.setattr(expert, "write_metadata", no_space)
    with pytest.raises(OutputWriteError) as info:
        expert.train_expert(expert_cfg(out, "force=true"), "math", data_dirs(out))
    message = str(info.value)
    assert "No space left on device" in message and f"under {target(out).parent}" in message
    assert f"previous artifact at {target(out)}, if any, is unchanged" in message
    assert files(target(out)) == finished
    assert not leftovers(out)


def test_failed_swap_puts_the_previous_artifact_back(out, finished, monkeypatch):
    replace = os.replace

    def fail_into_target(src, dst):
        if Path(dst) == target(out) and ".tmp" in Path(src).name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", fail_into_target)
    with pytest.raises(OutputWriteError, match="No space left on device"):
        expert.train_expert(expert_cfg(out, "force=true"), "math", data_dirs(out))
    assert files(target(out)) == finished
    assert not leftovers(out)


def test_unwritable_output_dir_is_named_with_the_fix(out, finished, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(last_ckpt(out).parent))

    monkeypatch.setattr(artifacts.tempfile, "mkstemp", read_only)
    # Other settings (not force=true, which would redo the data too): the expert is retrained.
    code = main(["expert", f"output_dir={out}", *TEST_OVERRIDES, *EXPERT, "expert.lr=2e-4"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Read-only file system" in err and "output_dir" in err and "Traceback" not in err
    assert files(target(out)) == finished


# ---------------------------------------------------------------------------------------------
# a second run over finished work
# ---------------------------------------------------------------------------------------------


def test_runtime_only_settings_reuse_the_artifact(out, finished):
    stamp = (target(out) / "manifest.json").stat().st_mtime_ns
    expert.train_expert(expert_cfg(out, "expert.checkpoint_every_n_steps=5"), "math", data_dirs(out))
    assert (target(out) / "manifest.json").stat().st_mtime_ns == stamp


def test_changed_data_is_never_reused(out, finished):
    before = json.loads((target(out) / "manifest.json").read_text())
    train = data_dirs(out)["math"] / "train.jsonl"
    rows = train.read_text().splitlines()
    first = json.loads(rows[0])
    rows[0] = json.dumps({**first, "output": first["output"] + " (edited)"})
    train.write_text("\n".join(rows) + "\n")
    expert.train_expert(expert_cfg(out), "math", data_dirs(out))
    after = json.loads((target(out) / "manifest.json").read_text())
    assert after["key"] != before["key"]
    assert after["data"]["math"]["train"] == artifacts.sha256_file(train) != before["data"]["math"]["train"]
    # Trained afresh: the old run's checkpoints were discarded, not resumed (a resume keeps run.json).
    assert json.loads((last_ckpt(out).parents[1] / "run.json").read_text())["key"] == after["key"]


def test_router_is_redone_when_an_expert_changed(out, finished):
    cfg = make_config("router", out, "router.experts=[math]")
    mixse = router.run(cfg)
    key = json.loads((mixse / "manifest.json").read_text())["key"]
    stamp = (mixse / "manifest.json").stat().st_mtime_ns
    assert router.run(cfg) == mixse and (mixse / "manifest.json").stat().st_mtime_ns == stamp  # same: skipped

    expert.train_expert(expert_cfg(out, "expert.lr=1e-3"), "math", data_dirs(out))  # the expert changes
    router.run(cfg)
    manifest = json.loads((mixse / "manifest.json").read_text())
    assert manifest["key"] != key
    meta = json.loads((mixse / "mixse.json").read_text())
    assert meta["experts"][0]["sha256"] == adapter_hash(target(out))  # built from the new expert
