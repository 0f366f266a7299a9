"""Prompt rendering against exact, hand-written strings; the tiny model's pretraining corpus."""

from __future__ import annotations

import copy

import pytest

from selfmoe.config import BrainstormConfig, DomainConfig, load_config
from selfmoe.data.prompts import RESPONSE_STOPS, brainstorm_prompt, pretraining_corpus, response_prompt, sft_prompt
from selfmoe.data.schema import Example, read_jsonl
from selfmoe.data.seeds import SEEDS_DIR
from selfmoe.models.tiny import build_tokenizer

DOMAIN = DomainConfig(
    name="toy",
    description="toy arithmetic",
    brainstorm=BrainstormConfig(
        header="  You are asked to come up with toy arithmetic tasks.\n",
        requirements=["Each task has one numerical answer.", "Use English."],
        topics=["sums", "products"],
    ),
    response_system="You are a toy expert. End with the answer.\n",
)
DEMOS = [
    Example(id="toy/1", domain="toy", instruction="Add 2 and 3.", output="2 + 3 = 5.\nThe answer is 5."),
    Example(
        id="toy/2",
        domain="toy",
        instruction="Multiply the two numbers.",
        input="4 and 6",
        output="4 * 6 = 24.\nThe answer is 24.",
    ),
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["Add 2 and 3.", "Multiply the two numbers."] * 4, 300)


def test_brainstorm_prompt_exact():
    expected = (
        "You are asked to come up with toy arithmetic tasks.\n"
        "\n"
        "Here are the requirements:\n"
        "1. Each task has one numerical answer.\n"
        "2. Use English.\n"
        "\n"
        "Topics: sums, products.\n"
        "\n"
        "List of tasks:\n"
        "\n"
        "Task 1:\n"
        "Add 2 and 3.\n"
        "\n"
        "Task 2:\n"
        "Multiply the two numbers.\n"
        "\n"
        "4 and 6\n"
        "\n"
        "Task 3:\n"
    )
    prompt = brainstorm_prompt(DOMAIN, DEMOS)
    assert prompt == expected
    assert prompt.endswith("Task 3:\n") and not prompt.endswith("\n\n")


def test_brainstorm_prompt_without_topics():
    domain = copy.deepcopy(DOMAIN)
    domain.brainstorm.topics = []
    expected = (
        "You are asked to come up with toy arithmetic tasks.\n\n"
        "Here are the requirements:\n1. Each task has one numerical answer.\n2. Use English.\n\n"
        "List of tasks:\n\nTask 1:\nAdd 2 and 3.\n\nTask 2:\n"
    )
    assert brainstorm_prompt(domain, DEMOS[:1]) == expected


def test_response_prompt_exact():
    expected = (
        "You are a toy expert. End with the answer.\n"
        "\n"
        "### Instruction:\n"
        "Add 2 and 3.\n"
        "\n"
        "### Response:\n"
        "2 + 3 = 5.\n"
        "The answer is 5.\n"
        "\n"
        "### Instruction:\n"
        "Multiply the two numbers.\n"
        "\n"
        "4 and 6\n"
        "\n"
        "### Response:\n"
        "4 * 6 = 24.\n"
        "The answer is 24.\n"
        "\n"
        "### Instruction:\n"
        "What is 7 minus 2?\n"
        "\n"
        "### Response:\n"
    )
    assert response_prompt(DOMAIN, DEMOS, "  What is 7 minus 2?\n") == expected
    # Each demonstration starts with a stop marker, so a model that goes on past its answer is cut there.
    assert all(stop in expected for stop in RESPONSE_STOPS)


def test_response_prompt_demos_are_stripped_like_the_query():
    padded = [
        Example(
            id=e.id,
            domain=e.domain,
            instruction=f"  {e.instruction}\n",
            input=e.input and f"{e.input}\n",
            output=f"{e.output}\n",
        )
        for e in DEMOS
    ]
    assert response_prompt(DOMAIN, padded, "What is 7 minus 2?") == response_prompt(DOMAIN, DEMOS, "What is 7 minus 2?")


ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Add 2 and 3.\n"
    "\n"
    "### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Multiply the two numbers.\n"
    "\n"
    "### Input:\n"
    "4 and 6\n"
    "\n"
    "### Response:\n"
)


def test_sft_prompt_alpaca_body():
    """Everything up to the final "### Response:" line (the trailing newline count is tested below)."""
    padded = Example(id="x", domain="toy", instruction="  Add 2 and 3.\n", output="5")
    assert sft_prompt(padded, "alpaca").rstrip("\n") + "\n" == ALPACA_NO_INPUT
    assert sft_prompt(DEMOS[1], "alpaca") == ALPACA_INPUT
    whitespace_input = Example(id="y", domain="toy", instruction="Add 2 and 3.", input="  \n", output="5")
    assert sft_prompt(whitespace_input, "alpaca").rstrip("\n") + "\n" == ALPACA_NO_INPUT


def test_sft_prompt_alpaca_exact():
    assert sft_prompt(DEMOS[0], "alpaca") == ALPACA_NO_INPUT
    assert sft_prompt(DEMOS[1], "alpaca") == ALPACA_INPUT


def test_sft_prompt_chat(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    assert sft_prompt(DEMOS[0], "chat", tok) == "<|user|>\nAdd 2 and 3.</s>\n<|assistant|>\n"
    assert sft_prompt(DEMOS[1], "chat", tok) == "<|user|>\nMultiply the two numbers.\n\n4 and 6</s>\n<|assistant|>\n"


def test_sft_prompt_chat_needs_a_template(tokenizer):
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError, match="chat template"):
        sft_prompt(DEMOS[0], "chat", tokenizer)
    with pytest.raises(ValueError, match="chat template"):
        sft_prompt(DEMOS[0], "chat", None)
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        sft_prompt(DEMOS[0], "vicuna")


# --- pretraining corpus ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg():
    return load_config("generate")


def test_pretraining_corpus_is_deterministic(cfg):
    first = pretraining_corpus(cfg)
    assert first == pretraining_corpus(cfg)
    reseeded = copy.deepcopy(cfg)
    reseeded.tiny.seed = cfg.tiny.seed + 1
    other = pretraining_corpus(reseeded)
    assert other != first and sorted(other) != sorted(first)  # other demo picks, not only another order


def test_pretraining_corpus_contents(cfg):
    docs = pretraining_corpus(cfg, docs_per_kind=4)
    start = 0
    for name in sorted(cfg.domains):
        domain = cfg.domains[name]
        seeds = read_jsonl(SEEDS_DIR / f"{name}.jsonl")
        assert len(seeds) <= domain.seeds.count  # so every shipped seed is used
        part = docs[start : start + 8 + len(seeds)]
        start += 8 + len(seeds)
        brainstorm, responses, alpaca = part[:4], part[4:8], part[8:]
        head = domain.brainstorm.header.strip()
        k = cfg.data.brainstorm_demos + 3
        for doc in brainstorm:
            assert doc.startswith(head + "\n\nHere are the requirements:\n1. ")
            # k seeds: Task 1..k-1 as demos, and Task k filled in with the last one.
            assert f"\nTask {k - 1}:\n" in doc and f"\nTask {k}:\n" in doc and f"Task {k + 1}:" not in doc
            assert any(doc.endswith(f"Task {k}:\n" + s.instruction.strip()) for s in seeds)
        for doc in responses:
            assert doc.startswith(domain.response_system.strip() + "\n\n### Instruction:\n")
            assert doc.count("### Instruction:\n") == cfg.data.response_demos + 1
            assert any(doc.endswith(f"### Instruction:\n{s.instruction}\n\n### Response:\n{s.output}") for s in seeds)
        # Every shipped seed, in the Alpaca form the experts are trained on, followed by its output.
        assert sorted(alpaca) == sorted(sft_prompt(s, "alpaca") + s.output for s in seeds)
        for s in seeds:
            assert (
                "Below is an instruction that describes a task. Write a response that appropriately completes "
                f"the request.\n\n### Instruction:\n{s.instruction}\n\n### Response:\n"
            ) in sft_prompt(s, "alpaca") + s.output
    assert start == len(docs)
