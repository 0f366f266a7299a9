"""Scoring forwards through shape buckets (selfmoe/models/graphed.py): padding leaves a causal LM's
logits unchanged, the bucket arithmetic, the static-buffer replay path, and the graphs on a GPU."""

from __future__ import annotations

import pytest
import torch

from benchmarks.shapes import build_model, random_experts
from evaluation.lm import scoring_runner
from selfmoe.models.graphed import Buckets, CapturedForward, GraphedLM, next_power_of_two, pad_into, round_up
from selfmoe.models.mixse import RouterSettings, build_mixse

EXACT = {"rtol": 0.0, "atol": 1e-6}
# (batch, length): with Buckets(length_multiple=8, batch_size=4) these fall into the buckets
# (1, 8), (2, 8), (4, 16), (4, 16), (2, 24), (4, 8).
SHAPES = [(1, 5), (2, 8), (3, 9), (4, 16), (2, 17), (4, 1)]
SMALL = Buckets(length_multiple=8, batch_size=4)


def tiny(seed: int = 0) -> torch.nn.Module:
    return build_model("tiny", "cpu", torch.float32, seed=seed)


def mixse(settings: RouterSettings | None = None) -> torch.nn.Module:
    model = tiny()
    # Mixed ranks and a visible B, so that the experts and the router really move the logits.
    experts = random_experts(model, 2, 4, seed=1, b_std=0.2) + random_experts(model, 1, 8, seed=2, b_std=0.2)
    experts = [type(e)(name=f"x{i}", path=e.path, deltas=e.deltas) for i, e in enumerate(experts)]
    torch.manual_seed(3)
    return build_mixse(model, experts, settings or RouterSettings())


def ids_of(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed + 100 * batch + length))


@torch.no_grad()
def eager(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


class EagerReplay(CapturedForward):
    """A captured forward without CUDA: the static buffers are real, and a replay runs the model eagerly into them."""

    run: object = None

    def replay(self) -> None:
        self.logits.copy_(self.run(self.ids))


class CPUGraphs(GraphedLM):
    """GraphedLM's replay path (buckets, static buffers, LRU) on a CPU, where capture is a plain forward."""

    def replayable(self, input_ids: torch.Tensor) -> bool:
        return self.graphs and self.graph_safe()

    def _capture(self, batch: int, length: int) -> CapturedForward:
        ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        entry = EagerReplay(ids=ids, logits=self.forward(ids))
        entry.run = self.forward
        return entry


# --- the bucket arithmetic --------------------------------------------------------------------


def test_rounding_by_hand():
    assert [round_up(n, 128) for n in (1, 127, 128, 129, 1000, 1024)] == [128, 128, 128, 256, 1024, 1024]
    assert [next_power_of_two(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_buckets_by_hand():
    plain = Buckets()
    assert plain(1, 1) == (1, 128)
    assert plain(3, 129) == (4, 256)
    assert plain(2, 1024) == (2, 1024)
    assert plain(5, 1000) == (8, 1024)
    # A batch size of 6: full batches stay at 6, and a short last batch rounds up to a power of two, at most 6.
    six = Buckets(batch_size=6)
    assert [six(b, 10)[0] for b in (1, 2, 3, 4, 5, 6, 7, 9)] == [1, 2, 4, 4, 6, 6, 8, 16]
    # Never padded past the model's positions: a length beyond them keeps its own.
    short = Buckets(max_length=300)
    assert short(1, 200) == (1, 256)
    assert short(1, 290) == (1, 300)
    assert short(1, 310) == (1, 310)
    assert [SMALL(b, n) for b, n in SHAPES] == [(1, 8), (2, 8), (4, 16), (4, 16), (2, 24), (4, 8)]
    with pytest.raises(ValueError):
        Buckets(length_multiple=0)
    with pytest.raises(ValueError):
        plain(0, 4)


def test_pad_into_overwrites_everything_outside_the_input():
    out = torch.full((3, 5), 7)
    pad_into(out, torch.tensor([[1, 2], [3, 4]]), 0)
    assert out.tolist() == [[1, 2, 0, 0, 0], [3, 4, 0, 0, 0], [0, 0, 0, 0, 0]]


def test_buckets_default_to_the_models_positions():
    assert GraphedLM(tiny()).buckets == Buckets(max_length=512)


# --- padding leaves the logits unchanged ------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        tiny,
        mixse,
        lambda: mixse(RouterSettings(top_k=2, renormalize=True, temperature=0.7)),
        lambda: mixse(RouterSettings(top_k=None, scope="per_layer")),
        lambda: mixse(RouterSettings(input="final_hidden")),
    ],
    ids=["base", "mixse", "mixse-top2", "mixse-dense-per-layer", "mixse-final-hidden"],
)
def test_padded_forward_equals_the_plain_forward(make):
    model = make()
    padded = GraphedLM(model, buckets=SMALL, pad_when_eager=True)
    for b, n in SHAPES:
        ids = ids_of(b, n)
        out = padded(ids)
        assert out.shape == (b, n, 512)
        torch.testing.assert_close(out, eager(model, ids), **EXACT)


def test_replay_path_static_buffers_and_lru():
    model = mixse()
    runner = CPUGraphs(model, buckets=SMALL, max_graphs=3)
    for b, n in SHAPES:
        ids = ids_of(b, n)
        torch.testing.assert_close(runner(ids), eager(model, ids), **EXACT)
    # Six calls in five buckets, at most three kept: (4, 16) was hit twice and captured once.
    assert runner.captures == 5
    assert runner.shapes == [(4, 16), (2, 24), (4, 8)]
    # A shorter input in a bucket a longer one used: the stale ids are replaced by padding, the logits are the same.
    for b, n in [(4, 16), (3, 9), (3, 12)]:
        ids = ids_of(b, n, seed=1)
        torch.testing.assert_close(runner(ids), eager(model, ids), **EXACT)
    assert runner.shapes == [(2, 24), (4, 8), (4, 16)] and runner.captures == 5
    entry = runner._entries[(4, 16)]
    assert entry.ids[3:].eq(0).all() and entry.ids[:3, 12:].eq(0).all()


def test_copy_or_view_of_the_output_buffer():
    model = tiny()
    runner = CPUGraphs(model, buckets=SMALL)
    ids = ids_of(2, 5)
    view = runner(ids, copy=False)
    copied = runner(ids)
    assert view.data_ptr() == runner._entries[(2, 8)].logits.data_ptr()
    assert copied.data_ptr() != view.data_ptr()
    runner(ids_of(2, 6, seed=5), copy=False)  # the next replay overwrites the view, not the copy
    torch.testing.assert_close(copied, eager(model, ids), **EXACT)


def test_moved_weights_recapture():
    model = tiny()
    runner = CPUGraphs(model, buckets=SMALL)
    runner(ids_of(1, 5))
    model.to(torch.float64)
    ids = ids_of(1, 5)
    out = runner(ids)
    assert runner.captures == 2 and out.dtype == torch.float64
    torch.testing.assert_close(out, eager(model, ids), **EXACT)


def test_routing_records_run_eagerly():
    model = mixse()
    runner = CPUGraphs(model, buckets=SMALL)
    model.mixse.record = True
    ids = ids_of(2, 5)
    torch.testing.assert_close(runner(ids), eager(model, ids), **EXACT)
    assert runner.captures == 0  # the records would point into the graph's reused memory
    assert model.mixse.records[0].gates.shape == (2, 5, 3)
    model.mixse.record = False
    runner(ids)
    assert runner.captures == 1


def test_cpu_and_switched_off_run_eagerly():
    model = tiny()
    runner = GraphedLM(model)
    ids = ids_of(2, 5)
    assert not runner.replayable(ids)
    assert runner(ids).shape == (2, 5, 512) and runner.captures == 0
    assert scoring_runner(model, True, 8) is None  # not on a GPU
    assert scoring_runner(model, False, 8) is None


# --- on a GPU: real capture and replay --------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["base", "mixse", "mixse-final-hidden"])
def test_graph_replay_equals_eager_on_gpu(kind):
    model = build_model("tiny", "cuda", torch.float32)
    if kind != "base":
        settings = RouterSettings(input="final_hidden") if kind == "mixse-final-hidden" else RouterSettings()
        torch.manual_seed(3)
        model = build_mixse(model, random_experts(model, 3, 8, seed=1, b_std=0.2), settings)
    runner = GraphedLM(model, buckets=SMALL, max_graphs=3)
    for round_ in range(2):  # the second round replays graphs captured in the first, or recaptures evicted ones
        for b, n in SHAPES:
            ids = ids_of(b, n, seed=round_).cuda()
            out = runner(ids)
            assert out.shape == (b, n, 512)
            torch.testing.assert_close(out, eager(model, ids), rtol=1e-4, atol=1e-4)
    assert runner.captures >= 5 and len(runner.shapes) == 3


@pytest.mark.gpu
def test_scoring_runner_on_gpu_uses_the_evaluation_batch_size():
    model = build_model("tiny", "cuda", torch.bfloat16)
    runner = scoring_runner(model, True, 6)
    assert isinstance(runner, GraphedLM) and runner.buckets == Buckets(batch_size=6, max_length=512)
    assert scoring_runner(model, False, 6) is None
