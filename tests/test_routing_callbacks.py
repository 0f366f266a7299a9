"""Routing statistics and views: pure sums against hand computations, the callbacks inside a real
Lightning fit on CPU against a token-by-token reference, and the HTML/PNG writers."""

from __future__ import annotations

import html
import io
import json
import math
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import matplotlib.image as mpimg
import pytest
import torch
from matplotlib.colors import to_rgb
from torch.utils.data import DataLoader

from callbacks.routing import (
    RoutingStatsCallback,
    TokenRoutingCallback,
    _reduce_sum,
    finalize,
    routing_summary,
    token_texts,
)
from selfmoe.plots import (
    DPI,
    expert_colors,
    heatmap_figsize,
    token_routing_html,
    token_routing_png,
    token_strip_figsize,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Record:
    probs: torch.Tensor
    gates: torch.Tensor


def H(*p: float) -> float:
    """Entropy in nats, written out."""
    return -sum(x * math.log(x) for x in p if x > 0)


def assert_nested_close(actual, expected, path="", rel=1e-6, abs_=1e-9):
    """Compare JSON-like structures; floats approximately, everything else exactly."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), path
        for k in expected:
            assert_nested_close(actual[k], expected[k], f"{path}.{k}", rel, abs_)
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_nested_close(a, e, f"{path}[{i}]", rel, abs_)
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=rel, abs=abs_), path
    else:
        assert actual == expected, path


# ---------------------------------------------------------------------------------------------
# routing_summary / finalize on hand-made records
# ---------------------------------------------------------------------------------------------

# 2 layers, 3 experts, 2 sequences: seq 0 (domain 1) has 3 real tokens, seq 1 (domain 0) has 2
# real tokens and one padding position whose (garbage) routing must be ignored.
PROBS = [
    [  # layer 0
        [[0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]],
        [[0.6, 0.2, 0.2], [0.3, 0.3, 0.4], [0.9, 0.05, 0.05]],
    ],
    [  # layer 1
        [[0.4, 0.4, 0.2], [0.25, 0.25, 0.5], [0.5, 0.25, 0.25]],
        [[0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [1.0, 0.0, 0.0]],
    ],
]
GATES = [
    [  # layer 0: top-1
        [[0.5, 0, 0], [0, 0.7, 0], [0, 0, 0.8]],
        [[0.6, 0, 0], [0, 0, 0.4], [0.9, 0, 0]],
    ],
    [  # layer 1: top-2
        [[0.4, 0.4, 0], [0.25, 0, 0.5], [0.5, 0.25, 0]],
        [[0, 0.3, 0.5], [0, 0.6, 0.3], [1.0, 0, 0]],
    ],
]
MASK = [[1, 1, 1], [1, 1, 0]]
DOMAIN = [1, 0]


def hand_records() -> list[Record]:
    return [Record(torch.tensor(p), torch.tensor(g)) for p, g in zip(PROBS, GATES, strict=True)]


def test_summary_and_finalize_match_a_hand_computation():
    sums = routing_summary(hand_records(), torch.tensor(MASK), torch.tensor(DOMAIN), num_domains=2)
    stats = finalize(sums)

    # layer 0 gate mass: e0 0.5+0.6, e1 0.7, e2 0.8+0.4 (total 3.0); layer 1: 1.15, 1.55, 1.3 (total 4.0)
    layer_load = [[1.1 / 3, 0.7 / 3, 1.2 / 3], [1.15 / 4, 1.55 / 4, 1.3 / 4]]
    torch.testing.assert_close(stats["layer_load"], torch.tensor(layer_load), check_dtype=False)
    torch.testing.assert_close(
        stats["load"], torch.tensor([(1.1 / 3 + 1.15 / 4) / 2, (0.7 / 3 + 1.55 / 4) / 2, (1.2 / 3 + 1.3 / 4) / 2])
    )

    # domain 0 = seq 1: layer 0 [0.6, 0, 0.4] / 1.0, layer 1 [0, 0.9, 0.8] / 1.7
    # domain 1 = seq 0: layer 0 [0.5, 0.7, 0.8] / 2.0, layer 1 [1.15, 0.65, 0.5] / 2.3
    domain_matrix = [
        [(0.6 + 0) / 2, (0 + 0.9 / 1.7) / 2, (0.4 + 0.8 / 1.7) / 2],
        [(0.25 + 1.15 / 2.3) / 2, (0.35 + 0.65 / 2.3) / 2, (0.4 + 0.5 / 2.3) / 2],
    ]
    torch.testing.assert_close(stats["domain_matrix"], torch.tensor(domain_matrix))
    torch.testing.assert_close(stats["domain_matrix"].sum(1), torch.ones(2))

    real_tokens = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    entropies = [H(*PROBS[layer][b][t]) for layer in range(2) for b, t in real_tokens]
    assert float(stats["entropy"]) == pytest.approx(sum(entropies) / 10)
    assert float(stats["tokens"]) == 5
    assert stats["domain_tokens"].tolist() == [2, 3]


def test_padding_changes_nothing_and_empty_domains_are_nan():
    records = hand_records()
    # Scramble the padding position's routing: the stats must not move.
    scrambled = [Record(r.probs.clone(), r.gates.clone()) for r in records]
    for r in scrambled:
        r.probs[1, 2] = torch.tensor([0.0, 0.0, 1.0])
        r.gates[1, 2] = torch.tensor([0.0, 0.0, 1.0])
    mask, domain = torch.tensor(MASK), torch.tensor(DOMAIN)
    a = finalize(routing_summary(records, mask, domain, num_domains=3))
    b = finalize(routing_summary(scrambled, mask, domain, num_domains=3))
    for key in ("layer_load", "load", "entropy", "tokens"):
        torch.testing.assert_close(a[key], b[key])
    torch.testing.assert_close(a["domain_matrix"], b["domain_matrix"], equal_nan=True)
    assert torch.isnan(a["domain_matrix"][2]).all()  # no tokens of domain 2
    assert a["domain_tokens"].tolist() == [2, 3, 0]


def test_sums_add_up_across_batches_and_ranks():
    """Two batches summed == one batch holding both; a 2-rank all-reduce only doubles counts."""
    records, mask, domain = hand_records(), torch.tensor(MASK), torch.tensor(DOMAIN)
    one = routing_summary(records, mask, domain, 2)
    first = routing_summary([Record(r.probs[:1], r.gates[:1]) for r in records], mask[:1], domain[:1], 2)
    second = routing_summary([Record(r.probs[1:], r.gates[1:]) for r in records], mask[1:], domain[1:], 2)
    for key in one:
        torch.testing.assert_close(first[key] + second[key], one[key])

    calls = []

    def reduce(tensor, reduce_op):
        calls.append(reduce_op)
        return tensor * 2  # what a sum over two ranks holding the same sums gives

    doubled = _reduce_sum(SimpleNamespace(strategy=SimpleNamespace(reduce=reduce)), one)
    assert calls == ["sum"]
    a, b = finalize(one), finalize(doubled)
    for key in ("layer_load", "load", "domain_matrix", "entropy"):
        torch.testing.assert_close(a[key], b[key])
    assert float(b["tokens"]) == 10 and b["domain_tokens"].tolist() == [4, 6]


def test_unrecorded_and_stale_records_are_not_counted(tmp_path):
    cb = RoutingStatsCallback(tmp_path, domains=["a", "b"])
    cb.domains = ["a", "b"]
    mixse = SimpleNamespace(records=[None, None])
    batch = {"attention_mask": torch.tensor(MASK), "domain": torch.tensor(DOMAIN)}
    cb._accumulate("train", SimpleNamespace(mixse=mixse), batch)
    assert cb._sums["train"] is None  # nothing recorded yet
    mixse.records = hand_records()
    cb._accumulate("train", SimpleNamespace(mixse=mixse), batch)
    cb._accumulate("train", SimpleNamespace(mixse=mixse), batch)  # same records again: a step without a forward
    assert float(cb._sums["train"]["tokens"]) == 5
    assert cb._sums["train"]["tokens"].dtype == torch.float64  # accumulated in float64 on CPU/CUDA


@pytest.mark.gpu
def test_accumulation_does_not_sync_with_the_host_on_cuda(tmp_path):
    cuda = torch.device("cuda")
    cb = RoutingStatsCallback(tmp_path)
    cb.domains = ["a", "b"]
    mask, domain = torch.tensor(MASK, device=cuda), torch.tensor(DOMAIN, device=cuda)
    on_gpu = [Record(r.probs.to(cuda), r.gates.to(cuda)) for r in hand_records()]
    mixse = SimpleNamespace(records=None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the hot path raises
    try:
        for _ in range(3):
            mixse.records = [Record(r.probs, r.gates) for r in on_gpu]  # fresh records, as each forward makes
            cb._accumulate("train", SimpleNamespace(mixse=mixse), {"attention_mask": mask, "domain": domain})
    finally:
        torch.cuda.set_sync_debug_mode(0)
    got = finalize(cb._sums["train"])
    want = finalize(routing_summary(hand_records(), torch.tensor(MASK), torch.tensor(DOMAIN), num_domains=2))
    for key in ("layer_load", "load", "domain_matrix", "entropy"):
        torch.testing.assert_close(got[key].cpu().float(), want[key])
    assert float(got["tokens"]) == 15


# ---------------------------------------------------------------------------------------------
# the callbacks inside a real Lightning fit
# ---------------------------------------------------------------------------------------------

EXPERTS = ["coding", "knowledge", "math"]
DOMAINS = ["coding", "math"]
NUM_LAYERS = 2
VOCAB = 512
PAD = 0


class FakeMiXSE:
    """Deterministic per-token routing from a fixed table: (layer, token id) -> router logits.

    The padding id routes hard to expert 0, so stats that counted padding would be visibly off.
    """

    def __init__(self, k: int = 1) -> None:
        gen = torch.Generator().manual_seed(0)
        self.table = torch.randn(NUM_LAYERS, VOCAB, len(EXPERTS), generator=gen) * 2
        self.table[:, PAD] = torch.tensor([8.0, -8.0, -8.0])
        self.k = k
        self.experts = list(EXPERTS)
        self.record = False
        self.records: list[Record | None] = [None] * NUM_LAYERS  # like MiXSE before its first recorded forward
        self.seen_record: list[bool] = []

    def routing(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, ..., N) probs and top-k gates (not renormalised) for these ids."""
        probs = self.table[:, input_ids].softmax(-1)
        top = probs.topk(self.k, dim=-1).indices
        gates = torch.zeros_like(probs).scatter(-1, top, probs.gather(-1, top))
        return probs, gates

    def route(self, input_ids: torch.Tensor) -> None:
        self.seen_record.append(self.record)
        if self.record:
            probs, gates = self.routing(input_ids)
            self.records = [Record(p.detach(), g.detach()) for p, g in zip(probs, gates, strict=True)]


class ToyModel(torch.nn.Module):
    def __init__(self, mixse: FakeMiXSE) -> None:
        super().__init__()
        self.mixse = mixse
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.mixse.route(input_ids)
        return (self.w - 1).pow(2).sum()


class ToyLit(L.LightningModule):
    def __init__(self, fail_at_step: int | None = None) -> None:
        super().__init__()
        self.model = ToyModel(FakeMiXSE())
        self.fail_at_step = fail_at_step

    @property
    def mixse(self) -> FakeMiXSE:
        return self.model.mixse

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at_step:
            raise RuntimeError("boom")
        return self.model(batch["input_ids"], batch["attention_mask"])

    def validation_step(self, batch, batch_idx):
        self.model(batch["input_ids"], batch["attention_mask"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_examples(n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(2, 7, (1,), generator=gen))
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        out.append({"ids": ids, "domain": i % len(DOMAINS)})
    return out


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(r["ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r["ids"])] = torch.tensor(r["ids"])
        mask[i, : len(r["ids"])] = 1
    domain = torch.tensor([r["domain"] for r in rows])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.clone(), "domain": domain}


class ToyData(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.domains = list(DOMAINS)
        self.train, self.val = make_examples(10, seed=1), make_examples(7, seed=2)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=4, shuffle=False, collate_fn=collate)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=3, shuffle=False, collate_fn=collate)


def reference_stats(mixse: FakeMiXSE, examples: list[dict]) -> dict:
    """routing.json's stage entry computed token by token in plain Python (no batching, no padding)."""
    n, d = len(EXPERTS), len(DOMAINS)
    layer_mass = [[0.0] * n for _ in range(NUM_LAYERS)]
    domain_mass = [[[0.0] * n for _ in range(d)] for _ in range(NUM_LAYERS)]
    entropy, tokens, domain_tokens = 0.0, 0, [0] * d
    for ex in examples:
        for tok in ex["ids"]:
            probs, gates = mixse.routing(torch.tensor(tok))
            tokens += 1
            domain_tokens[ex["domain"]] += 1
            for layer in range(NUM_LAYERS):
                entropy += H(*probs[layer].tolist())
                for e in range(n):
                    layer_mass[layer][e] += float(gates[layer, e])
                    domain_mass[layer][ex["domain"]][e] += float(gates[layer, e])
    layer_load = [[m / sum(row) for m in row] for row in layer_mass]
    domain_matrix = [
        [sum(domain_mass[layer][dd][e] / sum(domain_mass[layer][dd]) for layer in range(NUM_LAYERS)) / NUM_LAYERS
         for e in range(n)]
        for dd in range(d)
    ]  # fmt: skip
    return {
        "experts": EXPERTS,
        "domains": DOMAINS,
        "num_layers": NUM_LAYERS,
        "layer_load": layer_load,
        "load": [sum(layer_load[layer][e] for layer in range(NUM_LAYERS)) / NUM_LAYERS for e in range(n)],
        "domain_matrix": domain_matrix,
        "entropy": entropy / (tokens * NUM_LAYERS),
        "tokens": tokens,
        "domain_tokens": domain_tokens,
    }


def make_trainer(tmp_path: Path, callbacks: list, max_epochs: int = 2) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=2,  # sanity batches must not leak into the val stats
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )


@pytest.fixture(scope="module")
def tokenizer():
    from selfmoe.models.tiny import build_tokenizer

    corpus = ["def add(a, b): return a + b", "What is 12 times 7? Answer: 84", "The capital of France is Paris."] * 4
    tok = build_tokenizer(corpus, vocab_size=300)
    assert len(tok) <= VOCAB
    return tok


def png_shape(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = mpimg.imread(io.BytesIO(data), format="png")
    return image.shape[:2]


def test_callbacks_in_a_real_fit(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "routing"
    stats_cb = RoutingStatsCallback(out)
    prompts = ["def add(a, b): return a + b", "<b>What</b> is 12 times 7?"]
    token_cb = TokenRoutingCallback(prompts, tokenizer, out / "tokens")
    model, data = ToyLit(), ToyData()
    trainer = make_trainer(tmp_path, [stats_cb, token_cb])
    reduce_ops = []
    real_reduce = trainer.strategy.reduce
    monkeypatch.setattr(
        trainer.strategy,
        "reduce",
        lambda t, *a, **kw: reduce_ops.append((t.numel(), a, kw)) or real_reduce(t, *a, **kw),
    )
    trainer.fit(model, datamodule=data)

    mixse = model.mixse
    assert mixse.record is False  # restored
    assert all(mixse.seen_record)  # recording was on in every training, validation and token-view forward
    # One all-reduce of all packed sums per stage and epoch (2 train + 2 val; sanity check skipped).
    # (Lightning itself reduces a few scalars through the same method.)
    packed = NUM_LAYERS * len(EXPERTS) * (1 + len(DOMAINS)) + 2 + len(DOMAINS)
    assert [(n, kw) for n, _, kw in reduce_ops if n > 1] == [(packed, {"reduce_op": "sum"})] * 4

    expected = {"train": reference_stats(mixse, data.train), "val": reference_stats(mixse, data.val)}
    saved = json.loads((out / "routing.json").read_text())
    assert_nested_close(saved, expected)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["router/entropy"] == pytest.approx(expected["val"]["entropy"])
    assert metrics["router/train_entropy"] == pytest.approx(expected["train"]["entropy"])
    for e, name in enumerate(EXPERTS):
        assert metrics[f"router/load/{name}"] == pytest.approx(expected["val"]["load"][e])
        assert metrics[f"router/train_load/{name}"] == pytest.approx(expected["train"]["load"][e])

    size = heatmap_figsize(len(DOMAINS), len(EXPERTS), n_panels=2)
    assert png_shape(out / "routing_domain_matrix.png") == (round(size[1] * DPI), round(size[0] * DPI))
    size = heatmap_figsize(NUM_LAYERS, len(EXPERTS), n_panels=2)
    assert png_shape(out / "routing_layer_load.png") == (round(size[1] * DPI), round(size[0] * DPI))

    # token views: one span per token, coloured by the top layer-mean gate of that token
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        _, gates = mixse.routing(torch.tensor(ids))
        top = gates.mean(0).argmax(-1).tolist()
        spans = parse_spans((out / "tokens" / f"tokens_{i}.html").read_text())
        assert [s["expert"] for s in spans] == [EXPERTS[t] for t in top]
        assert "".join(s["text"] for s in spans) == tokenizer.decode(ids, skip_special_tokens=False)
        texts = token_texts(tokenizer, ids)
        assert png_shape(out / "tokens" / f"tokens_{i}.png") == tuple(
            round(v * DPI) for v in reversed(token_strip_figsize(texts, EXPERTS))
        )


def test_validate_alone_writes_val_stats_and_restores_record(tmp_path):
    model, data = ToyLit(), ToyData()
    model.mixse.record = True  # a previous True must survive too
    out = tmp_path / "routing"
    make_trainer(tmp_path, [RoutingStatsCallback(out)]).validate(model, datamodule=data)
    assert model.mixse.record is True
    saved = json.loads((out / "routing.json").read_text())
    assert set(saved) == {"val"}
    assert_nested_close(saved["val"], reference_stats(model.mixse, data.val))


def test_record_is_restored_when_training_fails(tmp_path):
    model = ToyLit(fail_at_step=1)
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(tmp_path, [RoutingStatsCallback(tmp_path / "routing")]).fit(model, datamodule=ToyData())
    assert model.mixse.record is False


# ---------------------------------------------------------------------------------------------
# HTML and PNG token views
# ---------------------------------------------------------------------------------------------


class SpanParser(HTMLParser):
    """Collect the token spans (class "tok") with their expert, style, tooltip and text."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict] = []
        self.tags: list[str] = []
        self._open: dict | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "tok":
            self._open = {"expert": attrs["data-expert"], "style": attrs["style"], "title": attrs["title"], "text": ""}

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(self._open)
            self._open = None

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data


def parse_spans(page: str) -> list[dict]:
    parser = SpanParser()
    parser.feed(page)
    assert "script" not in parser.tags
    return parser.spans


def test_token_html_escapes_and_colours_each_token():
    tokens = ["<script>", "alert('x&y')", "</script>", ' "q"\n']
    experts = ["coding", "know<ledge>", "math"]
    gates = torch.tensor([[0.9, 0, 0], [0, 0.35, 0], [0, 0, 0.6], [0.2, 0.0, 0.5]])
    page = token_routing_html(tokens, experts, gates, title="<b>t</b>")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<b>t</b>" not in page and "know<ledge>" not in page

    spans = parse_spans(page)
    assert len(spans) == len(tokens) == page.count('class="tok"')
    colours = expert_colors(len(experts))
    for span, token, row in zip(spans, tokens, gates.tolist(), strict=True):
        top = max(range(len(experts)), key=lambda j: row[j])
        assert span["text"] == token  # unescaped by the parser: the original text, intact
        assert span["expert"] == experts[top]
        rgb = tuple(round(255 * c) for c in to_rgb(colours[top]))
        assert span["style"] == f"background-color: rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {row[top]:.3f})"
        assert span["title"].split("\n") == [f"{name}: {g:.3f}" for name, g in zip(experts, row, strict=True)]
    assert html.escape("know<ledge>") in page  # legend, escaped


def test_token_png_is_a_valid_image_of_the_expected_size():
    tokens = ["$x$", " costs", " \\$5", "\n", " and", *[f" w{i}" for i in range(40)]]
    gates = torch.rand(len(tokens), 4, generator=torch.Generator().manual_seed(0))
    data = token_routing_png(tokens, ["a", "b", "c", "d"], gates)
    assert data.startswith(PNG_SIGNATURE)
    image = mpimg.imread(io.BytesIO(data), format="png")
    width, height = token_strip_figsize(tokens, ["a", "b", "c", "d"])
    assert image.shape[:2] == (round(height * DPI), round(width * DPI))
    assert height > token_strip_figsize(tokens[:3], ["a", "b", "c", "d"])[1]  # 40+ tokens wrap onto several lines


def test_views_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="tokens"):
        token_routing_html(["a", "b"], ["x", "y"], torch.zeros(3, 2))
    with pytest.raises(ValueError, match="shape"):
        token_routing_png(["a"], ["x", "y"], torch.zeros(1, 3))
