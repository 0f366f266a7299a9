"""The Trainer factory: loggers selectable in config, checkpoints, accumulation from world size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger

from callbacks.checkpointing import ResumeCheckpoint
from selfmoe.config import grad_accumulation, load_config
from selfmoe.errors import ConfigError
from selfmoe.training.checkpoint_io import AtomicCheckpointIO
from selfmoe.training.trainer import build_logger, build_trainer


def cfg_with(*overrides):
    return load_config("expert", ["trainer.progress_bar=false", *overrides])


def test_csv_logger_is_the_default(tmp_path):
    logger = build_logger(cfg_with(), tmp_path)
    assert isinstance(logger, CSVLogger)
    assert Path(logger.log_dir) == tmp_path / "logs"


def test_no_logger(tmp_path):
    assert build_logger(cfg_with("trainer.logger=none"), tmp_path) is False


@pytest.mark.parametrize(("kind", "module"), [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_optional_loggers_are_selectable_or_say_what_to_install(tmp_path, monkeypatch, kind, module):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = cfg_with(f"trainer.logger={kind}")
    if importlib.util.find_spec(module) is None and not (
        kind == "tensorboard" and importlib.util.find_spec("tensorboardX")
    ):
        with pytest.raises(ConfigError, match=rf"pip install 'selfmoe\[{kind}\]'"):
            build_logger(cfg, tmp_path)
    else:
        logger = build_logger(cfg, tmp_path)
        assert type(logger).__name__.lower().startswith(kind)


def test_trainer_settings_come_from_config(tmp_path):
    cfg = cfg_with("expert.global_batch_size=32", "expert.micro_batch_size=4")
    trainer = build_trainer(cfg, tmp_path, max_epochs=2, accumulate=grad_accumulation(cfg), checkpoint_every_n_steps=5)
    assert trainer.accumulate_grad_batches == 8  # 32 / (4 x 1 device)
    assert trainer.max_epochs == 2
    (ckpt,) = [cb for cb in trainer.callbacks if isinstance(cb, ResumeCheckpoint)]
    assert trainer.checkpoint_callback is ckpt  # Lightning adds no ModelCheckpoint of its own
    assert ckpt.path == tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.every_n_steps == 5
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
