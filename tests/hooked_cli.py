"""``python tests/hooked_cli.py <phase> key=value ...``: the CLI, with a pause for fault tests.

With ``SELFMOE_TEST_PAUSE_AT_STEP=k`` and ``SELFMOE_TEST_PAUSE_FILE=path``, training stops at the
first micro-batch after optimizer step ``k`` (so mid-epoch, with step ``k``'s checkpoint written
when checkpoints are taken every step), writes ``path`` and waits until the test deletes it
(at most two minutes): the test then kills or signals a process that is reliably mid-training.
Under the real ``ddp`` strategy every rank re-runs this script, so every rank pauses.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import lightning as L

PAUSE_TIMEOUT_S = 120


class PauseAtStep(L.Callback):
    def __init__(self, step: int, marker: Path) -> None:
        self.step = step
        self.marker = marker
        self.paused = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.paused or trainer.global_step != self.step:
            return
        self.paused = True
        if trainer.is_global_zero:
            self.marker.write_text(str(os.getpid()))
        else:
            time.sleep(0.5)  # let rank zero write the marker first
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while self.marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def install_pause() -> None:
    step = os.environ.get("SELFMOE_TEST_PAUSE_AT_STEP")
    if step is None:
        return
    from selfmoe.phases import expert, router

    pause = PauseAtStep(int(step), Path(os.environ["SELFMOE_TEST_PAUSE_FILE"]))
    for phase in (expert, router):
        original = phase.build_trainer

        def build_trainer(*args, _original=original, callbacks=None, **kwargs):
            return _original(*args, callbacks=[*(callbacks or []), pause], **kwargs)

        phase.build_trainer = build_trainer


if __name__ == "__main__":
    install_pause()
    from selfmoe.__main__ import main

    sys.exit(main())
