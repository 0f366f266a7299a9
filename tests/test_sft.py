"""SFT features (response-only labels), the collator, the HF loss they produce, and the DataModule."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from selfmoe.config import TinyConfig
from selfmoe.data.datamodule import SFTDataModule
from selfmoe.data.prompts import sft_prompt
from selfmoe.data.schema import Example, write_jsonl
from selfmoe.data.sft import IGNORE_INDEX, Features, collate, tokenize_example
from selfmoe.errors import DataError
from selfmoe.models.tiny import build_model, build_tokenizer

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nAdd 2 and 3.\n\n### Response:\nThe answer is 5.",
    "Multiply 4 by 6. The answer is 24. What is the capital of France? Paris.",
] * 3
EX = Example(id="t/1", domain="toy", instruction="Add 2 and 3.", output="2 + 3 = 5. The answer is 5.")
EX_INPUT = Example(id="t/2", domain="toy", instruction="Multiply.", input="4 and 6", output="The answer is 24.")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS, 300)


@pytest.fixture(scope="module")
def model(tok):
    cfg = TinyConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, seed=3)
    return build_model(cfg, tok).eval()


def _reference(example: Example, tok) -> tuple[list[int], list[int]]:
    prompt = tok(sft_prompt(example, "alpaca"))["input_ids"]
    response = tok(example.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt, response


# --- tokenize_example -------------------------------------------------------------------------


@pytest.mark.parametrize("example", [EX, EX_INPUT])
def test_tokenize_example_labels_only_the_response(tok, example):
    prompt, response = _reference(example, tok)
    assert prompt[0] == tok.bos_token_id and len(response) > 2
    f = tokenize_example(example, tok, template="alpaca", max_length=512, domain=3)
    assert f is not None
    assert f.input_ids == prompt + response
    assert f.labels == [IGNORE_INDEX] * len(prompt) + response
    assert f.domain == 3
    assert tok.decode(f.input_ids, skip_special_tokens=True) == sft_prompt(example, "alpaca") + example.output


def test_truncation_keeps_the_prompt(tok):
    prompt, response = _reference(EX, tok)
    limit = len(prompt) + 2
    f = tokenize_example(EX, tok, template="alpaca", max_length=limit)
    assert f is not None
    assert f.input_ids == prompt + response[:2]
    assert f.labels == [IGNORE_INDEX] * len(prompt) + response[:2]
    assert tok.eos_token_id not in f.input_ids  # the cut response has lost its end
    exact = tokenize_example(EX, tok, template="alpaca", max_length=len(prompt) + len(response))
    assert exact is not None and exact.input_ids == prompt + response  # fits exactly: nothing cut


def test_prompt_that_fills_max_length_is_skipped(tok):
    prompt, _ = _reference(EX, tok)
    assert tokenize_example(EX, tok, template="alpaca", max_length=len(prompt)) is None
    assert tokenize_example(EX, tok, template="alpaca", max_length=len(prompt) - 5) is None
    one = tokenize_example(EX, tok, template="alpaca", max_length=len(prompt) + 1)
    assert one is not None and one.labels[-1] != IGNORE_INDEX and len(one.input_ids) == len(prompt) + 1


def test_chat_template_prompt_gets_no_second_bos(tok):
    t = copy.deepcopy(tok)  # keep the module-level tokenizer without a chat template
    t.chat_template = "<s>{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    text = sft_prompt(EX, "chat", t)
    assert text == "<s>[user] Add 2 and 3.\n[assistant] "
    f = tokenize_example(EX, t, template="chat", max_length=512)
    prompt = t(text, add_special_tokens=False)["input_ids"]
    assert prompt[0] == t.bos_token_id and prompt[1] != t.bos_token_id
    assert f is not None and f.input_ids[: len(prompt)] == prompt
    assert f.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)


# --- collate -----------------------------------------------------------------------------


def test_collate_pads_right_and_masks():
    batch = [Features([5, 6, 7], [-100, 6, 7], 0), Features([8, 9, 10, 11, 12], [-100, -100, 10, 11, 12], 1)]
    out = collate(batch, pad_token_id=2)
    assert out["input_ids"].tolist() == [[5, 6, 7, 2, 2], [8, 9, 10, 11, 12]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]
    assert out["domain"].tolist() == [0, 1]
    assert all(t.dtype == torch.long for t in out.values())


def test_hf_loss_is_response_only_cross_entropy(tok, model):
    feats = [tokenize_example(e, tok, template="alpaca", max_length=512) for e in (EX, EX_INPUT)]
    batch = collate(feats, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    # Reference: next-token cross-entropy at the positions that predict a response token (or EOS),
    # computed from the prompt lengths, not from the labels.
    terms = []
    for row, example in enumerate((EX, EX_INPUT)):
        prompt, response = _reference(example, tok)
        ids = prompt + response
        logits = out.logits[row]
        for pos in range(len(prompt) - 1, len(ids) - 1):  # logits at pos predict token pos + 1
            terms.append(F.cross_entropy(logits[pos : pos + 1].float(), torch.tensor([ids[pos + 1]])))
    reference = torch.stack(terms).mean()
    assert len(terms) == sum(len(_reference(e, tok)[1]) for e in (EX, EX_INPUT))
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-6)
    # And it is not the all-token loss: the prompt really is ignored.
    all_tokens = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=all_tokens).loss
    assert abs(full.item() - reference.item()) > 1e-3


# --- SFTDataModule ---------------------------------------------------------------------------


def _examples(domain: str, n: int, start: int = 0) -> list[Example]:
    return [
        Example(
            id=f"{domain}/gen-{i:06d}",
            domain=domain,
            instruction=f"Question {i} about {domain}: add {i} and {i + 1}.",
            output=f"The answer is {2 * i + 1}.",
        )
        for i in range(start, start + n)
    ]


def _data_dir(root: Path, domain: str, n_train: int, n_val: int) -> Path:
    d = root / domain
    write_jsonl(d / "train.jsonl", _examples(domain, n_train))
    write_jsonl(d / "val.jsonl", _examples(domain, n_val, start=1000))
    return d


@pytest.fixture
def dirs(tmp_path) -> dict[str, Path]:
    # Given out of name order on purpose: domain indices follow the given order (router.experts).
    return {"math": _data_dir(tmp_path, "math", 7, 2), "coding": _data_dir(tmp_path, "coding", 3, 1)}


def _dm(dirs, tok, **kwargs) -> SFTDataModule:
    kwargs = {"template": "alpaca", "max_length": 256, "micro_batch_size": 2, **kwargs}
    return SFTDataModule(dirs, tok, **kwargs)


def test_datamodule_sizes_and_domains(dirs, tok):
    dm = _dm(dirs, tok)
    dm.setup("fit")
    assert dm.domains == ["math", "coding"]
    assert len(dm.datasets["train"]) == 10 and len(dm.datasets["val"]) == 3
    assert [f.domain for f in dm.datasets["train"].features] == [0] * 7 + [1] * 3
    assert [f.domain for f in dm.datasets["val"].features] == [0, 0, 1]
    expected_first = tokenize_example(_examples("math", 1)[0], tok, template="alpaca", max_length=256)
    assert dm.datasets["train"][0] == expected_first
    assert dm.skipped_too_long == 0

    val = list(dm.val_dataloader())
    assert [b["domain"].tolist() for b in val] == [[0, 0], [1]]
    batch = val[0]
    assert batch["input_ids"].shape[0] == 2
    lengths = batch["attention_mask"].sum(1).tolist()
    for row, n in enumerate(lengths):  # right padding, padding out of the loss
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_datamodule_counts_too_long(dirs, tok):
    train = _examples("coding", 3) + _examples("math", 7)
    val = _examples("coding", 1, start=1000) + _examples("math", 2, start=1000)
    prompt_len = {e.id: len(_reference(e, tok)[0]) for e in train + val}
    limit = sorted(prompt_len.values())[6]
    too_long = {i for i, n in prompt_len.items() if n >= limit}
    assert 0 < len(too_long) < len(prompt_len)
    dm = _dm(dirs, tok, max_length=limit)
    dm.setup()
    assert dm.skipped_too_long == len(too_long)
    assert len(dm.datasets["train"]) == sum(e.id not in too_long for e in train)
    assert len(dm.datasets["val"]) == sum(e.id not in too_long for e in val)


def test_balance_downsamples_deterministically(dirs, tok):
    rows = _dm(dirs, tok, balance=True, seed=1).read_split("train")
    assert {d: len(r) for d, r in rows.items()} == {"coding": 3, "math": 3}
    all_math = {e.id for e in _examples("math", 7)}
    picked = [e.id for e in rows["math"]]
    assert len(set(picked)) == 3 and set(picked) <= all_math
    assert [e.id for e in rows["coding"]] == [e.id for e in _examples("coding", 3)]  # smallest: untouched
    again = _dm(dirs, tok, balance=True, seed=1).read_split("train")
    assert [e.id for e in again["math"]] == picked
    others = {tuple(e.id for e in _dm(dirs, tok, balance=True, seed=s).read_split("train")["math"]) for s in range(8)}
    assert len(others) > 1  # the seed decides which items
    assert len(_dm(dirs, tok, balance=True).read_split("val")["math"]) == 2  # val is never downsampled
    unbalanced = _dm(dirs, tok).read_split("train")
    assert [e.id for e in unbalanced["math"]] == [e.id for e in _examples("math", 7)]


def test_empty_train_file_names_it(dirs, tok):
    (dirs["math"] / "train.jsonl").write_text("")
    with pytest.raises(DataError) as info:
        _dm(dirs, tok).setup()
    assert str(dirs["math"] / "train.jsonl") in str(info.value)


def test_missing_file_names_it(dirs, tok):
    (dirs["coding"] / "val.jsonl").unlink()
    with pytest.raises(DataError) as info:
        _dm(dirs, tok).setup()
    assert str(dirs["coding"] / "val.jsonl") in str(info.value)


def test_broken_line(dirs, tok):
    path = dirs["math"] / "train.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = '{"id": "math/broken", "instruction": "no output field"\n'
    lines[4] = json.dumps({"id": "math/x", "instruction": "no output"}) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(DataError) as info:
        _dm(dirs, tok).setup()
    message = str(info.value)
    assert str(path) in message and "line 3" in message and "line 5" in message
    dm = _dm(dirs, tok, on_bad_line="skip")
    rows = dm.read_split("train")
    assert [e.id for e in rows["math"]] == [e.id for i, e in enumerate(_examples("math", 7)) if i not in (2, 4)]
    dm.setup()
    assert len(dm.datasets["train"]) == 3 + 5


def test_train_sampler_order(dirs, tok):
    dm = _dm(dirs, tok, seed=5, micro_batch_size=10)
    dm.setup()

    def order(module: SFTDataModule, epoch: int) -> list[int]:
        permutation = module.train_dataloader().batch_sampler.sampler
        permutation.set_epoch(epoch)  # what Lightning calls each epoch
        return list(permutation)

    n = len(dm.datasets["train"])
    first = order(dm, 0)
    assert sorted(first) == list(range(n))
    # DistributedSampler's order (what it was before global batches): randperm seeded with seed + epoch.
    assert first == torch.randperm(n, generator=torch.Generator().manual_seed(5 + 0)).tolist()
    assert order(dm, 0) == first
    other = _dm(dirs, tok, seed=5, micro_batch_size=10)
    other.setup()
    assert order(other, 0) == first and order(other, 1) == order(dm, 1)
    assert order(dm, 1) != first
    reseeded = _dm(dirs, tok, seed=6, micro_batch_size=10)
    reseeded.setup()
    assert order(reseeded, 0) != first


def test_train_batches_follow_the_sampler(dirs, tok):
    dm = _dm(dirs, tok, seed=5, micro_batch_size=4)
    dm.setup()
    loader = dm.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(2)
    indices = list(loader.batch_sampler.sampler)
    batches = list(loader)
    assert [len(b["domain"]) for b in batches] == [4, 4, 2]
    domains = [d for b in batches for d in b["domain"].tolist()]
    assert domains == [dm.datasets["train"][i].domain for i in indices]
    val_loader = dm.val_dataloader()
    assert list(val_loader.sampler) == [0, 1, 2]  # validation is not shuffled
