"""`python -m selfmoe merge` (`make baselines`): the weight-merging baselines of PAPER §1.4.

For each method in ``merge.methods`` (linear, ties, dare, dare_ties) the experts' true weight
deltas ``s·B·A`` are merged module by module (:mod:`selfmoe.models.merging`) and saved as
``outputs/<model>/merges/<method>/`` = ``merged.safetensors`` (ΔW per module) + ``merge.json`` +
``config.yaml`` + ``manifest.json``. Evaluation applies them to a fresh base (``merge:<method>``).
Instance merging, the other baseline, is the expert of ``domain=all``.
"""

from __future__ import annotations

import time
from pathlib import Path

from selfmoe.artifacts import Layout
from selfmoe.config import Config
from selfmoe.models.base import model_id
from selfmoe.models.merging import DTYPES, MERGE_JSON, MERGED_FILE, MergeSpec, merge_adapters, save_merged
from selfmoe.models.mixse import adapter_hash
from selfmoe.phases.common import artifact_key, is_done, log, reporting_write_errors, write_metadata
from selfmoe.phases.router import expert_dirs

MERGE_FILES = (MERGED_FILE, MERGE_JSON, "config.yaml", "manifest.json")


def spec_of(cfg: Config, method: str) -> MergeSpec:
    """The merging hyperparameters ``method`` uses, from ``merge.*`` (the rest stay unset)."""
    m = cfg.merge
    if method == "linear":
        return MergeSpec(method, weights=m.weights)
    if method == "ties":
        return MergeSpec(method, density=m.density, scale=m.scale)
    if method == "dare":
        return MergeSpec(method, weights=m.weights, drop_p=m.drop_rate, seed=cfg.seed)
    return MergeSpec(method, drop_p=m.drop_rate, scale=m.scale, seed=cfg.seed)


def run(cfg: Config, methods: list[str] | None = None) -> dict[str, Path]:
    """Build (or find up to date) each merge; returns {method: artifact dir}."""
    base_id = model_id(cfg)
    experts = cfg.merge.experts if cfg.merge.experts is not None else cfg.router.experts
    dirs = expert_dirs(cfg, base_id, experts)
    layout = Layout.for_model(cfg.output_dir, cfg.model.name)
    hashes = {d: adapter_hash(p) for d, p in dirs.items()}
    out = {}
    for method in methods or cfg.merge.methods:
        spec = spec_of(cfg, method)
        target = layout.root / "merges" / method
        key = artifact_key(cfg, ("merge.dtype",), base=base_id, experts=hashes, spec=repr(spec))
        out[method] = target
        if is_done(target, key, cfg, f"{method} merge", MERGE_FILES):
            continue
        started = time.time()
        log.info("merging %d experts (%s) with %s", len(dirs), ", ".join(dirs), method)
        deltas, meta = merge_adapters(dirs, spec, base_model=base_id, dtype=DTYPES[cfg.merge.dtype])
        kept = f"The previous merge at {target}, if any, is unchanged; without a manifest it is rebuilt next time."
        with reporting_write_errors(target.parent, kept):
            save_merged(target, deltas, meta, dtype=cfg.merge.dtype)
            seconds = round(time.time() - started, 2)
            write_metadata(
                target, cfg, {"kind": "merge", "key": key, "base_model": base_id, **meta, "seconds": seconds}
            )
    return out
