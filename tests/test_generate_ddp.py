"""Sharded generation: the same items at any world size.

Fast tests run self-generation on thread "ranks" with a backend whose outputs are a pure
function of each batch; slow ones run the tiny model under Lightning's ``ddp_notebook`` (in
process) and ``ddp`` (the CLI in a subprocess) with 2 CPU ranks and compare the files with
the single-process session fixture's, byte for byte.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from conftest import TEST_OVERRIDES, make_config, run_selfmoe
from fake_generation import DATA, DOMAIN, SEEDS, PureBackend, ThreadGroup

from selfmoe.artifacts import Layout
from selfmoe.data.selfgen import SelfGenResult, self_generate
from selfmoe.data.sharded import LocalCollective, ShardedGenerator, plan
from selfmoe.phases import generate

TARGET = 14


def run_world(world: int, data=DATA, target: int = TARGET) -> tuple[list[SelfGenResult], list[PureBackend]]:
    """Self-generation on ``world`` thread ranks; every rank's result and backend."""
    backends = [PureBackend() for _ in range(world)]

    def rank_main(collective):
        gen = ShardedGenerator(backends[collective.rank], batch_size=data.batch_size, collective=collective)
        return self_generate(gen, DOMAIN, SEEDS, data, target=target, seed=0)

    return ThreadGroup(world).run(rank_main), backends


def comparable(result: SelfGenResult, *, tokens: bool = True) -> dict:
    """What must not depend on the world size (or, ``tokens=False``, on replaying batches)."""
    stats = result.stats()
    del stats["seconds"], stats["tokens_per_second"]  # wall time
    if not tokens:
        del stats["generated_tokens"]  # replayed batches are not generated again
    return {"items": result.items, "rejected": result.rejected, "stats": stats}


@pytest.fixture(scope="module")
def single():
    (result,), (backend,) = run_world(1)
    return result, backend


def test_the_reference_run_uses_several_batches_per_call(single):
    result, backend = single
    assert len(result.items) == TARGET and result.rejected  # some responses fail the format check
    assert result.brainstorm_batches > 3
    sampled = [kw["seed"] for _, kw in backend.calls if kw["do_sample"]]
    assert len(sampled) == result.brainstorm_batches and len(set(sampled)) == len(sampled)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_items_do_not_depend_on_the_world_size(single, world):
    reference, ref_backend = single
    results, backends = run_world(world)
    for result in results:  # every rank ends with the whole, identical result
        assert comparable(result) == comparable(reference)
    # Every batch was generated exactly once, by one of the ranks, and the work was spread.
    calls = [(prompts, repr(sorted(kw.items()))) for b in backends for prompts, kw in b.calls]
    assert Counter(calls) == Counter((p, repr(sorted(kw.items()))) for p, kw in ref_backend.calls)
    assert all(b.calls for b in backends)


def test_plan_cuts_batches_in_order_and_seeds_each():
    prompts = [f"p{i}" for i in range(7)]
    sampled = plan(prompts, 3, {"do_sample": True, "seed": 10, "max_new_tokens": 5})
    assert [r.prompts for r in sampled] == [("p0", "p1", "p2"), ("p3", "p4", "p5"), ("p6",)]
    assert [r.options["seed"] for r in sampled] == [10, 11, 12]
    greedy = plan(prompts, 3, {"do_sample": False, "seed": 0})
    assert [r.options["seed"] for r in greedy] == [0, 0, 0]
    assert len({r.id for r in sampled + greedy}) == 6


def test_local_generator_passes_batches_through():
    backend = PureBackend()
    gen = ShardedGenerator(backend, batch_size=2, collective=LocalCollective())
    prompts = ["a b c\nTask 2:\n", "d e\nTask 2:\n", "f\nTask 2:\n"]
    outs = gen.generate(prompts, do_sample=True, seed=5, max_new_tokens=9)
    assert [p for ps, _ in backend.calls for p in ps] == prompts
    first = PureBackend().generate(prompts[:2], do_sample=True, seed=5, max_new_tokens=9)
    second = PureBackend().generate(prompts[2:], do_sample=True, seed=6, max_new_tokens=9)  # seed + batch index
    assert outs == [*first, *second]
    assert gen.batches == {"generated": 2, "replayed": 0}
    assert gen.throughput.tokens == sum(c.num_tokens for c in outs)
    assert gen.generate([], do_sample=False) == []


def test_a_failing_rank_fails_the_call_on_every_rank():
    backends = [PureBackend(), PureBackend(fail_after=1)]

    def rank_main(collective):
        gen = ShardedGenerator(backends[collective.rank], batch_size=DATA.batch_size, collective=collective)
        return self_generate(gen, DOMAIN, SEEDS, DATA, target=TARGET, seed=0)

    with pytest.raises(RuntimeError, match="simulated crash"):
        ThreadGroup(2).run(rank_main)


# --- the tiny model under Lightning's DDP on 2 CPU processes --------------------------------

FILES = ("train.jsonl", "val.jsonl", "raw.jsonl", "seeds.jsonl")


def same_files(a, b) -> None:
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
def test_ddp_notebook_two_ranks_equal_one_rank(outputs, tiny_outputs):
    """In process (fork), 2 ranks, several batches per brainstorming round: the fixture's files."""
    reference = Layout.for_model(tiny_outputs, "tiny").data("math")
    target = Layout.for_model(outputs, "tiny").data("math")
    shutil.rmtree(target)
    ddp = ["trainer.strategy=ddp_notebook", "trainer.devices=2", "trainer.accelerator=cpu"]
    generate.run(make_config("generate", outputs, "domain=math", *ddp))
    same_files(reference, target)
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["generation"]["world_size"] == 2
    assert manifest["generation"]["batches"]["replayed"] == 0
    assert sorted(p.name for p in target.iterdir()) == sorted(generate.DATA_FILES)  # the journal went with it


@pytest.mark.slow
def test_more_batches_per_round_are_world_size_independent_on_the_tiny_model(outputs):
    """A run whose rounds have 2 batches (each rank busy): 1 rank and 2 ranks give the same files."""
    target = Layout.for_model(outputs, "tiny").data("math")
    extra = ["domain=math", "data.brainstorm_batches_per_round=2", "data.batch_size=8", "data.num_examples=12"]
    generate.run(make_config("generate", outputs, *extra, "force=true"))
    one = outputs / "one-rank"
    shutil.copytree(target, one)
    ddp = ["trainer.strategy=ddp_notebook", "trainer.devices=2", "trainer.accelerator=cpu"]
    generate.run(make_config("generate", outputs, *extra, *ddp, "force=true"))
    same_files(one, target)
    one_stats = json.loads((one / "manifest.json").read_text())["generation"]
    two_stats = json.loads((target / "manifest.json").read_text())["generation"]
    assert one_stats["batches"] == two_stats["batches"] and one_stats["counts"] == two_stats["counts"]


@pytest.mark.slow
def test_real_ddp_through_the_cli_equals_one_rank(outputs, tiny_outputs):
    """`python -m selfmoe generate trainer.strategy=ddp trainer.devices=2`: the fixture's files."""
    reference = Layout.for_model(tiny_outputs, "tiny").data("math")
    target = Layout.for_model(outputs, "tiny").data("math")
    shutil.rmtree(target)
    args = [f"output_dir={outputs}", *TEST_OVERRIDES, "domain=math", "trainer.accelerator=cpu"]
    proc = run_selfmoe("generate", *args, "trainer.strategy=ddp", "trainer.devices=2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_files(reference, target)
    assert json.loads((target / "manifest.json").read_text())["generation"]["world_size"] == 2
    assert sorted(p.name for p in target.iterdir()) == sorted(generate.DATA_FILES)


def test_config_rejects_bad_generation_settings():
    from selfmoe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.overlong"):
        make_config("generate", "out", "data.overlong=drop")
    with pytest.raises(ConfigError, match=r"data\.brainstorm_batches_per_round"):
        make_config("generate", "out", "data.brainstorm_batches_per_round=0")
