"""`python -m selfmoe eval` (`make eval`): lm-eval over the targets; see :mod:`evaluation.runner`.

On several devices (``trainer=ddp trainer.devices=N``, ``GPUS=N``, several nodes) Lightning
Fabric launches the ranks (re-running the command per rank, or joining torchrun/SLURM), and the
runner deals each rank whole (target, shot setting) units: lm-eval runs single-process per rank
on its own device, and rank zero gathers the parts and writes the results. Experiments call the
runner inside a process group that training already set up.
"""

from __future__ import annotations

from pathlib import Path

from selfmoe.config import Config, world_size
from selfmoe.phases.common import reporting_write_errors

KEPT = "Results already written are complete files; targets without results.json are evaluated on the rerun."


def run(cfg: Config) -> Path:
    from evaluation.runner import eval_root

    with reporting_write_errors(eval_root(cfg), KEPT):
        return _evaluate(cfg)


def _evaluate(cfg: Config) -> Path:
    from evaluation.runner import run as evaluate

    if world_size(cfg.trainer) == 1:
        return evaluate(cfg)
    import lightning as L

    from selfmoe.data.sharded import TorchCollective
    from selfmoe.training.trainer import placement

    # Fabric only launches the ranks and places them; lm-eval and the model dtype do the rest.
    fabric = L.Fabric(**{**placement(cfg.trainer), "precision": "32-true"})
    fabric.launch()
    collective = TorchCollective(fabric.global_rank, fabric.world_size)
    return evaluate(cfg, collective=collective, device=str(fabric.device))
