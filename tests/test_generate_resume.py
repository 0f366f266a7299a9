"""Resuming an interrupted generation from its journal: nothing lost, nothing generated twice.

Fast tests crash a run of the pure fake backend (on one or several thread ranks) and resume it,
at the same or another world size. Slow ones SIGKILL the CLI mid-generation and rerun it, and
fail one rank of a 2-process ``ddp_notebook`` run: the rerun's files equal an uninterrupted
run's byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, TEST_OVERRIDES, make_config
from fake_generation import DATA, DOMAIN, SEEDS, PureBackend, ThreadGroup
from test_generate_ddp import TARGET, comparable, same_files

from selfmoe.artifacts import Layout
from selfmoe.data.generation import Completion, TextGenerator
from selfmoe.data.journal import HEADER, BatchJournal
from selfmoe.data.selfgen import self_generate
from selfmoe.data.sharded import ShardedGenerator
from selfmoe.phases import generate


def entries(directory) -> list:
    return sorted(p for p in directory.glob("*.json") if p.name != HEADER)


def run(world: int, journal_dir, *, key: str = "k", fail: dict[int, int] | None = None, fresh: bool = False):
    """Self-generation on ``world`` thread ranks with a journal; ``fail`` = {rank: batches before it crashes}."""
    backends = [PureBackend(fail_after=(fail or {}).get(r)) for r in range(world)]
    gens = []

    def rank_main(collective):
        gen = ShardedGenerator(
            backends[collective.rank],
            batch_size=DATA.batch_size,
            collective=collective,
            journal=BatchJournal(journal_dir, key),
            fresh=fresh,
        )
        gens.append(gen)
        return self_generate(gen, DOMAIN, SEEDS, DATA, target=TARGET, seed=0)

    results = ThreadGroup(world).run(rank_main)
    return results[0], backends, next(g for g in gens if g.rank == 0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    result, (backend,), _ = run(1, tmp_path_factory.mktemp("journal") / "partial")
    return result, len(backend.calls)


@pytest.mark.parametrize(("crash_world", "crash", "resume_world"), [(1, {0: 5}, 1), (2, {1: 1}, 1), (1, {0: 4}, 3)])
def test_a_crashed_run_resumes_from_its_journal(tmp_path, uninterrupted, crash_world, crash, resume_world):
    reference, total = uninterrupted
    journal = tmp_path / "partial"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crash_world, journal, fail=crash)
    done = len(entries(journal))
    assert 0 < done < total
    result, backends, gen = run(resume_world, journal)
    assert comparable(result, tokens=False) == comparable(reference, tokens=False)
    assert gen.batches == {"replayed": done, "generated": total - done}
    assert sum(len(b.calls) for b in backends) == total - done  # no batch generated twice


def test_a_journal_of_other_settings_is_discarded(tmp_path, uninterrupted, caplog):
    reference, total = uninterrupted
    journal = tmp_path / "partial"
    with pytest.raises(RuntimeError):
        run(1, journal, key="old", fail={0: 5})
    assert len(entries(journal)) == 5
    with caplog.at_level(logging.WARNING, logger="selfmoe"):
        result, _, gen = run(1, journal, key="new")
    assert "discarding the partial generation" in caplog.text and "other settings" in caplog.text
    assert gen.batches == {"generated": total, "replayed": 0}
    assert comparable(result, tokens=False) == comparable(reference, tokens=False)
    assert json.loads((journal / HEADER).read_text())["key"] == "new"


def test_fresh_discards_the_journal(tmp_path, uninterrupted, caplog):
    _, total = uninterrupted
    journal = tmp_path / "partial"
    with pytest.raises(RuntimeError):
        run(1, journal, fail={0: 5})
    with caplog.at_level(logging.WARNING, logger="selfmoe"):
        _, _, gen = run(1, journal, fresh=True)
    assert "force=true" in caplog.text
    assert gen.batches == {"generated": total, "replayed": 0}


def test_unreadable_entries_are_generated_again(tmp_path, uninterrupted):
    reference, total = uninterrupted
    journal = tmp_path / "partial"
    with pytest.raises(RuntimeError):
        run(1, journal, fail={0: 5})
    broken, renamed, *_ = entries(journal)
    broken.write_text('{"id": "trunc')  # what a non-atomic writer could leave
    renamed.rename(journal / ("0" * 64 + ".json"))  # an entry under the wrong name
    (journal / ".x.json.123.tmp").write_text("half")  # a temp file of a killed atomic write
    result, _, gen = run(1, journal)
    assert comparable(result, tokens=False) == comparable(reference, tokens=False)
    assert gen.batches == {"replayed": 3, "generated": total - 3}


def test_journal_round_trip(tmp_path):
    journal = BatchJournal(tmp_path / "j", "key")
    assert journal.load() == {}
    outs = [Completion("a\nb ü", True, 3), Completion("", False, 0)]
    journal.put("abc", outs)
    assert BatchJournal(tmp_path / "j", "key").load() == {"abc": outs}
    with pytest.raises(ValueError):
        Completion.from_dict({"text": 1, "complete": True, "num_tokens": 1})


# --- the CLI, killed and rerun; a failing rank ----------------------------------------------

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def wait_for_entries(journal, proc, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not entries(journal) if journal.is_dir() else True:
        assert proc.poll() is None, "the run ended before it journaled a batch"
        assert time.monotonic() < deadline, "no journal entry appeared"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_mid_generation_then_rerun_equals_an_uninterrupted_run(outputs, tiny_outputs, tmp_path):
    reference = Layout.for_model(tiny_outputs, "tiny").data("math")
    target = Layout.for_model(outputs, "tiny").data("math")
    shutil.rmtree(target)
    journal = target / generate.PARTIAL_DIR
    cmd = [sys.executable, "-m", "selfmoe", "generate", f"output_dir={outputs}", *TEST_OVERRIDES, "domain=math"]
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_entries(journal, proc)
        finally:
            proc.kill()  # SIGKILL: no handler, no cleanup
            proc.wait()
    assert proc.returncode == -9
    done = len(entries(journal))
    assert not (target / "manifest.json").exists() and not (target / "train.jsonl").exists()

    rerun = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    same_files(reference, target)
    batches = json.loads((target / "manifest.json").read_text())["generation"]["batches"]
    total = json.loads((reference / "manifest.json").read_text())["generation"]["batches"]["generated"]
    assert batches == {"replayed": done, "generated": total - done} and done > 0
    assert "resuming generation" in " ".join(rerun.stderr.split())
    assert sorted(p.name for p in target.iterdir()) == sorted(generate.DATA_FILES)  # the journal is gone


@pytest.mark.slow
def test_a_rank_failing_mid_run_leaves_no_artifact_and_the_run_resumes(outputs, tiny_outputs, monkeypatch):
    reference = Layout.for_model(tiny_outputs, "tiny").data("math")
    target = Layout.for_model(outputs, "tiny").data("math")
    shutil.rmtree(target)
    real = TextGenerator.generate
    calls = {"n": 0}

    def flaky(self, prompts, **kwargs):  # runs in the forked ranks, each with its own count
        calls["n"] += 1
        if torch.distributed.get_rank() == 1 and calls["n"] == 2:  # rank 1 gets response batches only
            raise RuntimeError("rank 1 fails")
        return real(self, prompts, **kwargs)

    monkeypatch.setattr(TextGenerator, "generate", flaky)
    ddp = ["domain=math", "trainer.strategy=ddp_notebook", "trainer.devices=2", "trainer.accelerator=cpu"]
    with pytest.raises(Exception, match="rank 1 fails"):
        generate.run(make_config("generate", outputs, *ddp))
    done = len(entries(target / generate.PARTIAL_DIR))
    assert done >= 2
    assert sorted(p.name for p in target.iterdir()) == [generate.PARTIAL_DIR]  # nothing half-written
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(TextGenerator, "generate", real)
    generate.run(make_config("generate", outputs, *ddp))
    same_files(reference, target)
    batches = json.loads((target / "manifest.json").read_text())["generation"]["batches"]
    assert batches["replayed"] == done
