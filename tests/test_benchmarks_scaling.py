"""The scaling harness (benchmarks.scaling): its arithmetic by hand, and a real 1- and 2-rank gloo run.

Nothing here asserts speed: CPU numbers from tiny shapes say only that the harness runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import scaling


def test_efficiency_is_per_gpu_rate_over_the_one_gpu_rate() -> None:
    # 1000 tok/s per GPU alone; 950 at 2 GPUs, 840 at 8: 0.95 and 0.84 by hand.
    eff = scaling.efficiency({1: 1000.0, 2: 950.0, 8: 840.0})
    assert eff == pytest.approx({1: 1.0, 2: 0.95, 8: 0.84})
    assert scaling.efficiency({2: 950.0}) == {2: None}  # no W=1 baseline, no ratio


def test_summary_targets_by_hand() -> None:
    runs = {
        1: {"e2": {"tokens_per_s_per_gpu": 100.0}, "e3": {"tokens_per_s_per_gpu": 50.0}, "e5": {"tokens_per_s": 10.0}},
        2: {"e2": {"tokens_per_s_per_gpu": 91.0}, "e3": {"tokens_per_s_per_gpu": 44.0}, "e5": {"tokens_per_s": 19.0}},
        4: {"skipped": "world size 4 needs 4 GPUs; 2 available"},
        8: {"e2": {"tokens_per_s_per_gpu": 85.0}, "e3": {"tokens_per_s_per_gpu": 42.0}, "e5": {"tokens_per_s": 70.0}},
    }
    s = scaling.summarise(runs)
    assert set(s["e2"]) == {"1", "2", "8"}  # the skipped size is left out
    assert s["e2"]["2"]["efficiency"] == pytest.approx(0.91) and s["e2"]["2"]["met"] is True  # ≥ 0.90
    assert s["e2"]["8"]["efficiency"] == pytest.approx(0.85) and s["e2"]["8"]["met"] is True  # ≥ 0.85
    assert s["e3"]["2"]["efficiency"] == pytest.approx(0.88) and s["e3"]["2"]["met"] is False
    assert s["e3"]["8"]["efficiency"] == pytest.approx(0.84) and s["e3"]["8"]["met"] is False
    assert s["e2"]["1"]["target"] is None and s["e2"]["1"]["met"] is None
    # generation: 19/10 = 1.9 ≥ 0.9 x 2 = 1.8 (met); 70/10 = 7.0 < 0.9 x 8 = 7.2 (missed)
    assert s["e5"]["2"]["scaling"] == pytest.approx(1.9) and s["e5"]["2"]["target"] == pytest.approx(1.8)
    assert s["e5"]["2"]["met"] is True
    assert s["e5"]["8"]["scaling"] == pytest.approx(7.0) and s["e5"]["8"]["met"] is False


def test_world_larger_than_the_machine_is_skipped_with_a_note() -> None:
    cfg = scaling.ScalingConfig(settings=scaling.Settings(device="cpu"))
    too_many = scaling.available("cpu") + 1
    out = scaling.run_world(cfg, too_many)
    assert "skipped" in out and f"world size {too_many}" in out["skipped"]


@pytest.mark.slow
def test_quick_cpu_run_at_one_and_two_ranks(tmp_path: Path) -> None:
    if scaling.available("cpu") < 2:
        pytest.skip("needs 2 CPU cores for 2 gloo ranks")
    out = tmp_path / "scaling.json"
    scaling.main(["--device", "cpu", "--quick", "--gpus", "1,2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["nccl_nvls_enable"] == "0"
    assert set(data["runs"]) == {"1", "2"}
    for w in ("1", "2"):
        run = data["runs"][w]
        assert run["world_size"] == int(w) and run["backend"] == "gloo"
        for part in ("e2", "e3"):
            r = run[part]
            assert r["global_batch"] == int(w) * r["micro_batch"]  # weak scaling
            assert len(r["median_ms_per_rank"]) == int(w)
            assert r["median_ms"] > 0 and r["tokens_per_s_per_gpu"] > 0
            assert r["tokens_per_s_total"] == pytest.approx(int(w) * r["tokens_per_s_per_gpu"])
        assert run["e2"]["trainable_params"] > 0 and run["e3"]["lora_params"] > 0
        g = run["e5"]
        assert g["completions"] == g["prompts"] and g["generated_tokens"] > 0 and g["tokens_per_s"] > 0
    for part in ("e2", "e3"):
        assert data["summary"][part]["1"]["efficiency"] == pytest.approx(1.0)
        assert data["summary"][part]["2"]["efficiency"] > 0
    assert data["summary"]["e5"]["2"]["scaling"] > 0
