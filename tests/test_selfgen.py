"""Self-generation driven by a scripted fake model (exact counts and ids), the train/val split, and
the real TextGenerator on a tiny model checked against a hand-written greedy loop."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest
import torch
from conftest import GENERATION_CORPUS as CORPUS
from conftest import SMALL_TINY

from selfmoe.config import BrainstormConfig, ChecksConfig, DataConfig, DomainConfig
from selfmoe.data.generation import Completion, TextGenerator, Throughput
from selfmoe.data.prompts import RESPONSE_STOPS, brainstorm_prompt, response_prompt
from selfmoe.data.schema import Example
from selfmoe.data.selfgen import self_generate, split_train_val
from selfmoe.models.tiny import make_tiny

DOMAIN = DomainConfig(
    name="toy",
    brainstorm=BrainstormConfig(header="Write arithmetic tasks.", requirements=["One answer each."], topics=["sums"]),
    response_system="You are a toy expert.",
    checks=ChecksConfig(min_instruction_words=3, max_instruction_words=50, response_pattern="answer is"),
)
# Three seeds of exactly seven words each, so every prompt with the same number of demos has the
# same length in words (the fake model's token count).
SEEDS = [
    Example(id=f"toy/s{i}", domain="toy", instruction=text, output=f"The answer is {answer}.")
    for i, (text, answer) in enumerate(
        [
            ("Add the numbers two and three together.", 5),
            ("Multiply the numbers four and six together.", 24),
            ("Subtract the number one from number nine.", 8),
        ],
        start=1,
    )
]
HEADER = re.compile(r"Task (\d+):\n\Z")


def _instruction_of(prompt: str) -> str:
    return prompt.rsplit("### Instruction:\n", 1)[1].rsplit("\n\n### Response:\n", 1)[0]


class FakeGenerator:
    """Duck-types TextGenerator: scripted brainstorm continuations and responses, tokens = words."""

    def __init__(
        self,
        brainstorm: Callable[[int, int, str], tuple[str, bool]],
        respond: Callable[[str], tuple[str, bool]],
    ) -> None:
        self.brainstorm, self.respond = brainstorm, respond
        self.throughput = Throughput()
        self.calls: list[tuple[list[str], dict]] = []
        self.batches = 0

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_strings: Sequence[str] = (),
        truncate_to: int | None = None,
    ) -> list[Completion]:
        kwargs = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "stop_strings": tuple(stop_strings),
            "truncate_to": truncate_to,
        }
        self.calls.append((list(prompts), kwargs))
        if do_sample:
            outs = []
            for i, prompt in enumerate(prompts):
                match = HEADER.search(prompt)
                assert match, "a brainstorm prompt ends with an open task header"
                outs.append(self.brainstorm(self.batches, i, match.group(1)))
            self.batches += 1
        else:
            outs = [self.respond(_instruction_of(p)) for p in prompts]
        done = [Completion(text=t, complete=c, num_tokens=len(t)) for t, c in outs]
        self.throughput.tokens += sum(c.num_tokens for c in done)
        self.throughput.seconds += 0.5
        return done

    def prompts(self, sampled: bool) -> list[str]:
        return [p for ps, kw in self.calls if kw["do_sample"] == sampled for p in ps]


# --- the scripted run ---------------------------------------------------------------------

A = "What is two plus two today?"
B = "How many legs do three cats have?"
C = "Name the largest planet in our solar system."
D = "Compute seven times eight and add one."
E = "List three primes below ten please."
BRAINSTORM = [
    [  # batch 1: first number is brainstorm_demos + 1 = 3
        (f"{A}\n\nTask 4:\n{B}\n\nTask 5:\n", True),  # two items, dangling header ignored
        (
            # a copy of a seed, then a near duplicate of B
            f"{SEEDS[0].instruction}\n\nTask 4:\nHow many legs do three cats have in total?\n\n"
            "Task 5:\nHi there\n\n"  # too short
            "Task 6:\nWhat is the total cost of five",  # cut by the token limit: partial
            False,
        ),
    ],
    [  # batch 2
        (f"{C}\n\nTask 9:\nout of order", True),  # C, then a malformed tail
        (f"{D}\n\nTask 4:\n{E}\n\nTask 5:\n", True),
    ],
]
RESPONSES = {
    A: ("The answer is 4.\n\n### Instruction:\nWhat is 5 + 5?", True),  # cut at the stop marker
    B: ("Three cats have twelve legs.", True),  # no "answer is": bad format
    C: ("The answer is Jupiter, which is", False),  # hit max_new_tokens
    D: ("7 * 8 = 56 and 56 + 1 = 57.\nThe answer is 57.\n\n### Response:\nmore", True),
    E: ("The answer is 2, 3, 5 and 7.", True),
}


def _scripted(batch: int, index: int, first: str) -> tuple[str, bool]:
    assert first == "3"
    return BRAINSTORM[batch][index]


DATA = DataConfig(
    batch_size=2,
    brainstorm_demos=2,
    response_demos=2,
    temperature=0.9,
    top_p=0.95,
    max_new_tokens_brainstorm=64,
    max_new_tokens_response=32,
    max_prompt_tokens=10_000,
)


@pytest.fixture(scope="module")
def scripted():
    gen = FakeGenerator(_scripted, lambda instruction: RESPONSES[instruction])
    result = self_generate(gen, DOMAIN, SEEDS, DATA, target=3, seed=0)
    return gen, result


def test_scripted_items(scripted):
    _, result = scripted
    assert [(e.id, e.instruction, e.output) for e in result.items] == [
        ("toy/gen-000000", A, "The answer is 4."),
        ("toy/gen-000003", D, "7 * 8 = 56 and 56 + 1 = 57.\nThe answer is 57."),
        ("toy/gen-000004", E, "The answer is 2, 3, 5 and 7."),
    ]
    assert all(e.domain == "toy" and e.source == "generated" and e.meta == {} for e in result.items)
    assert [(e.id, e.instruction, e.meta) for e in result.rejected] == [
        ("toy/gen-000001", B, {"drop": "response_bad_format"}),
        ("toy/gen-000002", C, {"drop": "response_truncated"}),
    ]


def test_scripted_stats(scripted):
    _, result = scripted
    tokens = sum(len(t) for batch in BRAINSTORM for t, _ in batch) + sum(len(t) for t, _ in RESPONSES.values())
    assert result.stats() == {
        "kept": 3,
        "counts": {
            "copies_seed": 1,
            "malformed": 1,
            "near_duplicate": 1,
            "over_target": 0,
            "partial": 1,
            "response_bad_format": 1,
            "response_truncated": 1,
            "too_short": 1,
        },
        "prompts_shortened": 0,
        "prompts_overlong": {},
        "overlong_policy": "skip",
        "empty_generations": {},
        "instructions_cut": 0,
        "brainstorm_batches": 2,
        "generated_tokens": tokens,
        "seconds": 2.5,  # 2 brainstorm + 3 response calls, 0.5 s each
        "tokens_per_second": round(tokens / 2.5, 1),
    }


def test_scripted_calls(scripted):
    gen, _ = scripted
    # brainstorm 1, respond [A, B], brainstorm 2, respond [C, D], respond [E]
    shape = [(kw["do_sample"], len(ps)) for ps, kw in gen.calls]
    assert shape == [(True, 2), (False, 2), (True, 2), (False, 2), (False, 1)]
    pairs = list(itertools.permutations(SEEDS, 2))
    brainstorm_ok = {brainstorm_prompt(DOMAIN, list(p)) for p in pairs}
    for prompts, kw in gen.calls:
        if kw["do_sample"]:
            assert (kw["temperature"], kw["top_p"], kw["max_new_tokens"], kw["stop_strings"]) == (0.9, 0.95, 64, ())
            assert all(p in brainstorm_ok for p in prompts)
        else:
            assert (kw["max_new_tokens"], kw["stop_strings"]) == (32, RESPONSE_STOPS)
            for p in prompts:
                assert p in {response_prompt(DOMAIN, list(pair), _instruction_of(p)) for pair in pairs}
    assert [_instruction_of(p) for p in gen.prompts(sampled=False)] == [A, B, C, D, E]
    seeds = [kw["seed"] for _, kw in gen.calls if kw["do_sample"]]
    assert len(set(seeds)) == 2  # a fresh sampling seed per brainstorm batch


def test_scripted_run_is_deterministic(scripted):
    gen, result = scripted
    gen2 = FakeGenerator(_scripted, lambda instruction: RESPONSES[instruction])
    again = self_generate(gen2, DOMAIN, SEEDS, DATA, target=3, seed=0)
    assert again.items == result.items and again.counts == result.counts
    assert gen2.calls == gen.calls
    gen3 = FakeGenerator(_scripted, lambda instruction: RESPONSES[instruction])
    self_generate(gen3, DOMAIN, SEEDS, DATA, target=3, seed=1)
    assert gen3.calls != gen.calls  # other demos / sampling seeds


# --- a format-following fake: enough distinct tasks for any target ------------------------

POOL = [
    "Compute the area of a rectangle four by five.",
    "Find the perimeter of a square with side seven.",
    "How many minutes are there in three hours?",
    "Convert twelve feet into inches for the carpenter.",
    "What is the average of ten, twenty and thirty?",
    "A shop sells pens for two dollars; cost of nine pens?",
    "Divide eighty candies equally among sixteen children.",
    "Estimate the square root of fifty to one decimal.",
    "Sarah walks six kilometres daily; total in one week?",
    "Double the product of eleven and twelve.",
    "Which is larger: three fifths or five eighths?",
    "Count the prime numbers between twenty and forty.",
]


def _pool_fake(respond: Callable[[str], tuple[str, bool]] | None = None) -> FakeGenerator:
    pool = iter(POOL)

    def brainstorm(batch: int, index: int, first: str) -> tuple[str, bool]:
        n = int(first)
        return f"{next(pool)}\n\nTask {n + 1}:\n{next(pool)}\n\nTask {n + 2}:\n", True

    return FakeGenerator(brainstorm, respond or (lambda instruction: ("The answer is 1.", True)))


@pytest.mark.parametrize("target", [1, 4, 5])
def test_reaches_target_with_ids_in_order(target):
    gen = _pool_fake()
    result = self_generate(gen, DOMAIN, SEEDS, DATA, target=target, seed=0)
    assert len(result.items) == target
    assert [e.id for e in result.items] == [f"toy/gen-{i:06d}" for i in range(target)]
    assert [e.instruction for e in result.items] == POOL[:target]
    # Brainstorming yields 4 per batch of 2 prompts; the extras are counted, not answered.
    batches = -(-target // 4)
    assert result.brainstorm_batches == batches
    assert result.counts["over_target"] == 4 * batches - target
    assert len(gen.prompts(sampled=False)) == target


def test_response_drops_are_made_up_by_more_brainstorming():
    bad = {POOL[1], POOL[2]}
    gen = _pool_fake(lambda ins: ("no idea" if ins in bad else "The answer is 1.", True))
    result = self_generate(gen, DOMAIN, SEEDS, DATA, target=4, seed=0)
    assert [e.instruction for e in result.items] == [POOL[0], POOL[3], POOL[4], POOL[5]]
    assert [e.id for e in result.items] == ["toy/gen-000000", "toy/gen-000003", "toy/gen-000004", "toy/gen-000005"]
    assert result.counts["response_bad_format"] == 2
    assert result.brainstorm_batches == 2 and result.counts["over_target"] == 2


@pytest.mark.parametrize("patience", [1, 3])
def test_stops_after_max_idle_batches(patience):
    gen = FakeGenerator(lambda b, i, first: (f"lol\n\nTask {int(first) + 1}:\nhmm ok", True), lambda ins: ("x", True))
    result = self_generate(gen, DOMAIN, SEEDS, replace(DATA, max_idle_batches=patience), target=3, seed=0)
    assert result.items == [] and result.rejected == []
    assert result.brainstorm_batches == patience
    assert len(gen.calls) == patience and all(kw["do_sample"] for _, kw in gen.calls)
    assert result.counts["too_short"] == patience * DATA.batch_size * 2


def test_max_brainstorm_batches_caps_the_run():
    gen = FakeGenerator(lambda b, i, first: ("lol", True), lambda ins: ("x", True))
    data = DataConfig(**{**DATA.__dict__, "max_brainstorm_batches": 2})
    result = self_generate(gen, DOMAIN, SEEDS, data, target=3, seed=0)
    assert result.brainstorm_batches == 2 and result.counts["too_short"] == 4


def test_long_prompts_get_fewer_demos():
    budget = len(brainstorm_prompt(DOMAIN, SEEDS[:2]).split())  # any 2 seeds: same word count
    assert len(brainstorm_prompt(DOMAIN, SEEDS).split()) > budget
    data = DataConfig(**{**DATA.__dict__, "brainstorm_demos": 3, "response_demos": 3, "max_prompt_tokens": budget})
    gen = _pool_fake()
    result = self_generate(gen, DOMAIN, SEEDS, data, target=2, seed=0)
    assert len(result.items) == 2
    brainstorm = gen.prompts(sampled=True)
    assert len(brainstorm) == 2 and all(p.endswith("\nTask 3:\n") and "Task 2:\n" in p for p in brainstorm)
    assert all(len(p.split()) <= budget for p in brainstorm)
    responses = gen.prompts(sampled=False)
    demos = [p.count("### Instruction:\n") - 1 for p in responses]
    assert all(1 <= d <= 3 and (d == 1 or len(p.split()) <= budget) for d, p in zip(demos, responses, strict=True))
    # The fit is greedy: one more demo ("### Instruction:" 7 words, "### Response:" 4 words) would not fit.
    assert all(len(p.split()) + 2 + 7 + 2 + 4 > budget for d, p in zip(demos, responses, strict=True) if d < 3)
    assert demos and min(demos) < 3
    assert result.prompts_shortened == 2 + sum(d < 3 for d in demos)


def test_needs_seeds():
    with pytest.raises(ValueError, match="at least one seed"):
        self_generate(_pool_fake(), DOMAIN, [], DATA, target=1, seed=0)


# --- split_train_val ---------------------------------------------------------------------


def _items(n: int) -> list[Example]:
    return [Example(id=f"toy/gen-{i:06d}", domain="toy", instruction=f"q{i}", output=f"a{i}") for i in range(n)]


@pytest.mark.parametrize(
    ("n", "fraction", "n_val"),
    [(20, 0.15, 3), (100, 0.05, 5), (10, 0.05, 1), (2, 0.05, 1), (1, 0.5, 0), (0, 0.5, 0), (20, 0.0, 0), (7, 0.5, 4)],
)
def test_split_sizes(n, fraction, n_val):
    train, val = split_train_val(_items(n), fraction, seed=0)
    assert len(val) == n_val and len(train) == n - n_val
    assert {e.id for e in train}.isdisjoint({e.id for e in val})
    assert sorted(e.id for e in train + val) == [e.id for e in _items(n)]


def test_split_is_seeded():
    items = _items(30)
    train, val = split_train_val(items, 0.2, seed=4)
    assert split_train_val(items, 0.2, seed=4) == (train, val)
    order = list(items)
    random.Random(4).shuffle(order)
    assert val == order[:6] and train == order[6:]
    assert split_train_val(items, 0.2, seed=5) != (train, val)


# --- the real TextGenerator on a tiny model -------------------------------------------------

PROMPTS = ["the cat", "### Instruction:\nWhat is 2 + 2?\n\n### Response:\n"]  # different lengths


@pytest.fixture(scope="module")
def generator():
    cfg = replace(SMALL_TINY, pretrain_steps=150, pretrain_batch_size=8)
    model, tok, _ = make_tiny(CORPUS, cfg)
    return TextGenerator(model, tok)


def _greedy(gen: TextGenerator, prompt: str, max_new_tokens: int) -> list[int]:
    """Reference: argmax decoding by hand, one full forward pass per token, no padding, no cache."""
    return _greedy_ids(gen, gen.tokenizer(prompt)["input_ids"], max_new_tokens)


def _greedy_ids(gen: TextGenerator, ids: list[int], max_new_tokens: int) -> list[int]:
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = gen.model(torch.tensor([ids + new])).logits[0, -1]
            new.append(int(logits.argmax()))
            if new[-1] == gen.tokenizer.eos_token_id:
                break
    return new


def test_greedy_batch_equals_single_and_reference(generator):
    tok = generator.tokenizer
    lengths = [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert lengths[0] < lengths[1]  # the first prompt is left-padded in the batch
    batch = generator.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    alone = [generator.generate([p], max_new_tokens=12, do_sample=False)[0] for p in PROMPTS]
    assert batch == alone
    for prompt, out in zip(PROMPTS, batch, strict=True):
        ref = _greedy(generator, prompt, 12)
        assert tok.eos_token_id not in ref
        assert out == Completion(text=tok.decode(ref), complete=False, num_tokens=12)  # hit max_new_tokens
    assert batch[1].text.startswith("The answer is 4.")  # the model did learn its corpus


def test_eos_ends_a_completion(generator):
    tok = generator.tokenizer
    prompt = "### Instruction:\nWhat is 3 + 3?\n\n### Response:\nThe answer is 6."
    ref = _greedy(generator, prompt, 12)
    assert ref[-1] == tok.eos_token_id and len(ref) < 12
    (out,) = generator.generate([prompt], max_new_tokens=12, do_sample=False)
    assert out == Completion(text=tok.decode(ref[:-1]), complete=True, num_tokens=len(ref))
    batch = generator.generate([prompt, PROMPTS[0]], max_new_tokens=12, do_sample=False)
    assert batch[0] == out and batch[1].complete is False


def test_stop_string_cuts_generation(generator):
    tok = generator.tokenizer
    ref = _greedy(generator, PROMPTS[0], 12)
    stop = tok.decode(ref[1:3])
    assert stop.strip() and stop not in tok.decode(ref[:2]) and stop not in PROMPTS[0]
    (out,) = generator.generate([PROMPTS[0]], max_new_tokens=12, do_sample=False, stop_strings=[stop])
    assert out == Completion(text=tok.decode(ref[:3]), complete=True, num_tokens=3)
    assert out.text.endswith(stop)
    # In a batch the other prompt goes on to the token limit, unaffected.
    other = _greedy(generator, PROMPTS[1], 12)
    assert stop not in tok.decode(other)
    batch = generator.generate(PROMPTS, max_new_tokens=12, do_sample=False, stop_strings=[stop])
    assert (batch[0].text, batch[0].complete) == (out.text, True)
    assert batch[1] == Completion(text=tok.decode(other), complete=False, num_tokens=12)


def test_stop_string_token_count_in_a_batch(generator):
    stop = generator.tokenizer.decode(_greedy(generator, PROMPTS[0], 12)[1:3])
    batch = generator.generate(PROMPTS, max_new_tokens=12, do_sample=False, stop_strings=[stop])
    assert batch[0].num_tokens == 3


def test_sampling_is_seeded_and_leaves_global_rng_alone(generator):
    state = torch.random.get_rng_state()
    first = generator.generate(PROMPTS, max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.98, seed=3)
    again = generator.generate(PROMPTS, max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.98, seed=3)
    assert first == again
    assert torch.equal(state, torch.random.get_rng_state())
    others = {
        tuple(c.text for c in generator.generate(PROMPTS, max_new_tokens=12, do_sample=True, seed=s))
        for s in range(4, 8)
    }
    assert len(others | {tuple(c.text for c in first)}) > 1


def test_throughput_counts_generated_tokens(generator):
    before = generator.throughput.tokens, generator.throughput.seconds
    outs = generator.generate(PROMPTS, max_new_tokens=5, do_sample=False)
    assert generator.throughput.tokens - before[0] == sum(c.num_tokens for c in outs) == 10
    assert generator.throughput.seconds > before[1]
    assert generator.count_tokens(PROMPTS[0]) == len(generator.tokenizer(PROMPTS[0])["input_ids"])


def test_task_drifting_into_the_response_format_is_cut_at_the_marker():
    """A brainstormed task followed by "### Response: ..." keeps only the task."""
    task = "Pat has 9 pens and gives away 4. How many pens are left now?"

    def brainstorm(batch, index, first):
        return (f"{task}\n\n### Response:\nThe answer is 5.", True) if (batch, index) == (0, 0) else ("", True)

    gen = FakeGenerator(brainstorm, lambda ins: ("Nine minus four is five. The answer is 5.", True))
    result = self_generate(gen, DOMAIN, SEEDS, replace(DATA, max_idle_batches=1), target=1, seed=0)
    assert [e.instruction for e in result.items] == [task]
    assert result.instructions_cut == 1 and result.stats()["instructions_cut"] == 1


# --- prompts too long for the context; empty generations ------------------------------------

LONG = "Compute the total " + " ".join(["and then add one more apple"] * 5) + " to the basket."


def _overlong_setup(policy: str) -> tuple[DataConfig, int, int]:
    """A context where a 1-demo response prompt fits for POOL tasks but not for LONG (tokens = words)."""
    short = len(response_prompt(DOMAIN, SEEDS[:1], POOL[0]).split())
    assert all(len(response_prompt(DOMAIN, SEEDS[:1], t).split()) <= short for t in POOL[:4])
    assert len(response_prompt(DOMAIN, SEEDS[:1], LONG).split()) > short
    context = 32 + short
    data = replace(
        DATA, context_length=context, overlong=policy, max_new_tokens_response=32, max_new_tokens_brainstorm=8
    )
    assert len(brainstorm_prompt(DOMAIN, SEEDS[:2]).split()) <= context - 8  # brainstorm prompts fit
    return data, context - 32, context - 8


def _long_fake() -> FakeGenerator:
    tasks = iter([POOL[0], LONG, POOL[1], POOL[2], POOL[3], POOL[4]])

    def brainstorm(batch: int, index: int, first: str) -> tuple[str, bool]:
        n = int(first)
        return f"{next(tasks)}\n\nTask {n + 1}:\n{next(tasks)}\n\nTask {n + 2}:\n", True

    return FakeGenerator(brainstorm, lambda instruction: ("The answer is 1.", True))


def test_overlong_response_prompts_are_skipped_and_counted():
    data, _, _ = _overlong_setup("skip")
    gen = _long_fake()
    result = self_generate(gen, DOMAIN, SEEDS, data, target=3, seed=0)
    assert [(e.id, e.instruction) for e in result.items] == [
        ("toy/gen-000000", POOL[0]),
        ("toy/gen-000002", POOL[1]),
        ("toy/gen-000003", POOL[2]),
    ]
    assert [(e.id, e.instruction, e.output, e.meta) for e in result.rejected] == [
        ("toy/gen-000001", LONG, "", {"drop": "prompt_overlong"})
    ]
    assert LONG not in [_instruction_of(p) for p in gen.prompts(sampled=False)]  # never sent to the model
    stats = result.stats()
    assert stats["prompts_overlong"] == {"response": 1} and stats["overlong_policy"] == "skip"
    assert stats["counts"]["prompt_overlong"] == 1
    assert stats["prompts_shortened"] > 0  # the context budget also dropped demos
    assert all(kw["truncate_to"] is None for _, kw in gen.calls)


def test_overlong_prompts_are_truncated_when_configured():
    data, response_limit, brainstorm_limit = _overlong_setup("truncate")
    gen = _long_fake()
    result = self_generate(gen, DOMAIN, SEEDS, data, target=3, seed=0)
    assert [e.instruction for e in result.items] == [POOL[0], LONG, POOL[1]]  # answered from its truncated prompt
    assert result.stats()["prompts_overlong"] == {"response": 1}
    assert "prompt_overlong" not in result.counts
    for _, kw in gen.calls:  # the generator cuts each prompt to its context share, keeping the end
        assert kw["truncate_to"] == (brainstorm_limit if kw["do_sample"] else response_limit)


def test_overlong_brainstorm_prompts_are_skipped_until_the_run_gives_up():
    short = len(brainstorm_prompt(DOMAIN, SEEDS[:1]).split())
    data = replace(DATA, context_length=DATA.max_new_tokens_brainstorm + short - 1, max_idle_batches=2)
    gen = _pool_fake()
    result = self_generate(gen, DOMAIN, SEEDS, data, target=2, seed=0)
    assert result.items == [] and gen.prompts(sampled=True) == []
    assert result.prompts_overlong == {"brainstorm": 2 * DATA.batch_size}


def test_no_room_for_the_generation_is_a_config_error():
    from selfmoe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.max_new_tokens_brainstorm=64 leaves no room"):
        self_generate(_pool_fake(), DOMAIN, SEEDS, replace(DATA, context_length=64), target=1, seed=0)


def test_empty_generations_are_counted_and_never_break_the_schema(tmp_path):
    from selfmoe.data.schema import read_jsonl, write_jsonl

    def brainstorm(batch: int, index: int, first: str) -> tuple[str, bool]:
        if (batch, index) == (0, 0):
            return f"{POOL[0]}\n\nTask {int(first) + 1}:\n{POOL[1]}", True
        return (" \n ", True) if index == 0 else ("", False)

    gen = FakeGenerator(brainstorm, lambda ins: ("", True) if ins == POOL[0] else ("The answer is 3.", True))
    result = self_generate(gen, DOMAIN, SEEDS, replace(DATA, max_idle_batches=2), target=2, seed=0)
    assert [e.instruction for e in result.items] == [POOL[1]]
    assert [(e.instruction, e.output, e.meta) for e in result.rejected] == [(POOL[0], "", {"drop": "empty_response"})]
    # batch 0: one empty; then two idle batches of two empty generations each
    assert result.empty_generations == {"brainstorm": 5, "response": 1}
    assert result.counts["malformed"] == 0  # an empty generation is not a parse failure
    write_jsonl(tmp_path / "raw.jsonl", [*result.items, *result.rejected])
    assert read_jsonl(tmp_path / "raw.jsonl") == [*result.items, *result.rejected]


def test_truncate_to_keeps_the_end_of_the_prompt(generator):
    tok = generator.tokenizer
    prompt = PROMPTS[1]
    ids = tok(prompt)["input_ids"]
    limit = len(ids) - 4
    (out,) = generator.generate([prompt], max_new_tokens=6, do_sample=False, truncate_to=limit)
    kept = [ids[0], *ids[-(limit - 1) :]]  # BOS, then the last tokens
    assert ids[0] == tok.bos_token_id
    ref = _greedy_ids(generator, kept, 6)
    assert out.text == tok.decode(ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref)
    batch = generator.generate([prompt, PROMPTS[0]], max_new_tokens=6, do_sample=False, truncate_to=limit)
    assert batch[0] == out and batch[1] == generator.generate([PROMPTS[0]], max_new_tokens=6, do_sample=False)[0]
    assert generator.context_length == SMALL_TINY.max_position


def test_the_phase_counts_overlong_prompts_in_the_manifest(outputs):
    """The tiny model with a context too small for whole brainstorming prompts: truncated, counted."""
    import json

    from conftest import make_config

    from selfmoe.artifacts import Layout
    from selfmoe.phases import generate

    cfg = make_config("generate", outputs, "domain=math", "data.num_examples=4", "force=true")
    context = cfg.data.max_new_tokens_brainstorm + 120  # a brainstorming prompt is longer than 120 tokens
    extra = [f"data.context_length={context}", "data.overlong=truncate", "data.max_new_tokens_response=64"]
    generate.run(make_config("generate", outputs, "domain=math", "data.num_examples=4", "force=true", *extra))
    stats = json.loads((Layout.for_model(outputs, "tiny").data("math") / "manifest.json").read_text())["generation"]
    assert stats["overlong_policy"] == "truncate"
    assert stats["prompts_overlong"]["brainstorm"] == stats["brainstorm_batches"] * cfg.data.batch_size
    assert stats["kept"] > 0
