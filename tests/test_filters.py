"""Instruction/response filters and the ROUGE-L index, checked against rouge_score and brute force."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from selfmoe.data.filters import InstructionFilter, RougeLIndex, check_response, normalize, rouge_tokens

FAST = settings(max_examples=200, deadline=None)
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def reference_f(a: str, b: str) -> float:
    return SCORER.score(a, b)["rougeL"].fmeasure


def random_texts(rng: random.Random, n: int, vocab: int, max_len: int, punct: bool = False) -> list[str]:
    words = [f"w{i}" for i in range(vocab)]
    out = []
    for _ in range(n):
        toks = rng.choices(words, k=rng.randint(0, max_len))
        if punct and toks:
            toks[rng.randrange(len(toks))] += rng.choice(["?", ",", "!", " --"])
        out.append(" ".join(toks))
    return out


# ---------------------------------------------------------------- normalize


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  What is  2+2?\n", "what is 2+2"),
        ("**Hello, World!**", "hello, world"),
        ("«Quoted»", "quoted"),
        ("...", ""),
        ("", ""),
        ("a\tb\nc", "a b c"),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


# ---------------------------------------------------------------- RougeLIndex vs rouge_score

PAIRS = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat on the mat", "a cat was sitting on a mat"),
    ("What is 2+2?", "what is 2 + 2"),
    ("Write a function that sorts a list.", "Sort a list by writing a function."),
    ("one two three", "four five six"),
    ("", "something"),
    ("!!!", "???"),
    ("Café naïve résumé", "cafe naive resume"),
    ("x " * 40, "x " * 3),
    ("a b a b a b c", "b a b a c c"),
]


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_max_score_matches_rouge_score(a, b):
    assert RougeLIndex(0.7, [a]).max_score(b) == reference_f(a, b)
    assert RougeLIndex(0.7, [b]).max_score(a) == reference_f(b, a)
    # Several indexed texts: the max over them.
    others = [p for pair in PAIRS for p in pair]
    assert RougeLIndex(0.7, others).max_score(b) == max(reference_f(o, b) for o in others)


def test_empty_index():
    index = RougeLIndex(0.7)
    assert len(index) == 0
    assert index.max_score("anything at all") == 0.0
    assert not index.is_near_duplicate("anything at all")


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.9, 1.0])
def test_pruned_search_equals_brute_force(threshold):
    rng = random.Random(1234 + int(threshold * 10))
    # A small vocabulary makes many high-overlap pairs, so pruning decisions near the
    # threshold are actually exercised.
    corpus = random_texts(rng, 120, vocab=12, max_len=14, punct=True)
    queries = random_texts(rng, 120, vocab=12, max_len=14, punct=True) + corpus[:10]
    index = RougeLIndex(threshold, corpus)
    hits = 0
    for q in queries:
        scores = [reference_f(t, q) for t in corpus]
        assert index.max_score(q) == max(scores)
        expected = any(s >= threshold for s in scores)
        assert index.is_near_duplicate(q) == expected
        hits += expected
    assert 0 < hits < len(queries)  # both outcomes occurred


def test_incremental_add_equals_bulk():
    rng = random.Random(7)
    texts = random_texts(rng, 60, vocab=30, max_len=20)
    bulk = RougeLIndex(0.6, texts)
    inc = RougeLIndex(0.6)
    for t in texts:
        inc.add(t)
    for q in random_texts(rng, 40, vocab=30, max_len=20):
        assert bulk.max_score(q) == inc.max_score(q)
        assert bulk.is_near_duplicate(q) == inc.is_near_duplicate(q)


def test_long_texts_bit_parallel_lcs():
    rng = random.Random(3)
    a, b = random_texts(rng, 2, vocab=8, max_len=300)
    assert RougeLIndex(0.5, [a]).max_score(b) == reference_f(a, b)


def test_threshold_edge_values():
    assert RougeLIndex(0.0, ["abc"]).is_near_duplicate("xyz")  # every pair scores >= 0
    assert not RougeLIndex(1.01, ["a b c"]).is_near_duplicate("a b c")  # above 1 disables
    assert RougeLIndex(1.0, ["A b, c!"]).is_near_duplicate("a b c")  # same tokens score exactly 1


def test_rouge_tokens_match_rouge_score():
    assert rouge_tokens("Hello, World! It's 2024.") == SCORER._tokenizer.tokenize("Hello, World! It's 2024.")


# ---------------------------------------------------------------- InstructionFilter

SEEDS = [
    "What is the capital of France?",
    "Explain how photosynthesis converts light into chemical energy in plants.",
]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   \n\t", "empty"),
        ("Hi there", "too_short"),
        (" ".join(["word"] * 11), "too_long"),
        ("What is the capital of France?", "copies_seed"),
        ("  what is the capital of france ", "copies_seed"),  # exact after normalize
        ("Explain how photosynthesis converts light into chemical energy in green plants.", "copies_seed"),
    ],
)
def test_each_instruction_reason(text, reason):
    f = InstructionFilter(SEEDS, rouge_threshold=0.7, min_words=3, max_words=10 if reason == "too_long" else 300)
    assert f(text) == reason
    assert f.counts == Counter({reason: 1})


def test_bad_format():
    f = InstructionFilter(SEEDS, pattern=r"\nA\..*\nB\..*\nC\..*\nD\.")
    assert f("Which planet is largest? A. Mars B. Venus C. Jupiter D. Earth") == "bad_format"
    assert f("Which planet is largest?\nA. Mars\nB. Venus\nC. Jupiter\nD. Earth") is None


def test_duplicate_and_near_duplicate():
    f = InstructionFilter(SEEDS, rouge_threshold=0.7)
    first = "Write a Python function that reverses a string without slicing."
    assert f(first) is None
    assert f("WRITE a python function that reverses a string without slicing") == "duplicate"
    assert f("Write a Python function which reverses a string without using slicing.") == "near_duplicate"
    assert f("Compute the area of a circle with radius 3 cm.") is None
    assert f.accepted == [first, "Compute the area of a circle with radius 3 cm."]


def test_reason_order():
    # Too short wins over copying a seed; format wins over duplicates.
    f = InstructionFilter(["Add two numbers"], min_words=4, pattern="numbers")
    assert f("Add two numbers") == "too_short"
    g = InstructionFilter(["Add two numbers please now"], pattern="zzz")
    assert g("Add two numbers please now") == "bad_format"
    # A seed copy differing only in case and final punctuation is caught by the normalized check.
    h = InstructionFilter(["Sum the list of integers given"])
    assert h("Sum the list of integers given.") == "copies_seed"


def test_counts_after_sequence():
    f = InstructionFilter(SEEDS, rouge_threshold=0.7, min_words=3, max_words=12, pattern=r"\?$")
    candidates = [
        "What is the boiling point of water at sea level?",  # kept
        "",  # empty
        "Why?",  # too_short
        "Why " * 13 + "?",  # too_long
        "Describe the water cycle in detail.",  # bad_format (no final '?')
        "What is the capital of France?",  # copies_seed
        "what is the boiling point of water at sea level?",  # duplicate
        "What is the boiling point of pure water at sea level?",  # near_duplicate
        "How many legs does a spider have?",  # kept
        "How many legs does a spider have?",  # duplicate
    ]
    reasons = [f(c) for c in candidates]
    assert reasons == [
        None,
        "empty",
        "too_short",
        "too_long",
        "bad_format",
        "copies_seed",
        "duplicate",
        "near_duplicate",
        None,
        "duplicate",
    ]
    assert f.counts == Counter(
        kept=2, empty=1, too_short=1, too_long=1, bad_format=1, copies_seed=1, duplicate=2, near_duplicate=1
    )
    assert sum(f.counts.values()) == len(candidates)


def _brute_force_filter(seeds, candidates, threshold, min_words, max_words):
    seed_norms = {normalize(s) for s in seeds}
    pool: list[str] = []
    reasons = []
    for c in candidates:
        n = len(c.split())
        if not c.strip():
            r = "empty"
        elif n < min_words:
            r = "too_short"
        elif n > max_words:
            r = "too_long"
        elif normalize(c) in seed_norms or any(reference_f(s, c) >= threshold for s in seeds):
            r = "copies_seed"
        elif normalize(c) in {normalize(p) for p in pool}:
            r = "duplicate"
        elif any(reference_f(p, c) >= threshold for p in pool):
            r = "near_duplicate"
        else:
            r = None
            pool.append(c)
        reasons.append(r)
    return reasons


def test_filter_equals_brute_force_on_random_texts():
    rng = random.Random(99)
    seeds = random_texts(rng, 10, vocab=25, max_len=10)
    candidates = random_texts(rng, 250, vocab=25, max_len=10, punct=True)
    candidates += [c.upper() + " !" for c in candidates[:20]]  # exact duplicates after normalize
    f = InstructionFilter(seeds, rouge_threshold=0.6, min_words=2, max_words=9)
    got = [f(c) for c in candidates]
    assert got == _brute_force_filter(seeds, candidates, 0.6, 2, 9)
    assert {"kept", "near_duplicate", "duplicate", "copies_seed", "too_short", "too_long"} <= set(f.counts)


_WORDS = st.sampled_from(["alpha", "beta", "gamma", "Alpha", "beta?", "...", "ß", "日本", "", "\n", "  "])
_CANDIDATES = st.one_of(st.text(max_size=40), st.lists(_WORDS, max_size=8).map(" ".join))


@FAST
@given(st.lists(_CANDIDATES, max_size=25), st.lists(_CANDIDATES, max_size=3), st.floats(0.05, 1.0))
def test_filter_properties(candidates, seeds, threshold):
    f = InstructionFilter(seeds, rouge_threshold=threshold, min_words=2, max_words=6)
    for c in candidates:
        reason = f(c)
        assert reason is None or isinstance(reason, str)
    assert sum(f.counts.values()) == len(candidates)
    assert f.counts["kept"] == len(f.accepted)
    norms = [normalize(a) for a in f.accepted]
    assert len(set(norms)) == len(norms)
    seed_norms = {normalize(s) for s in seeds}
    for a in f.accepted:
        assert 2 <= len(a.split()) <= 6
        assert normalize(a) not in seed_norms
    # Accepted texts are pairwise below the threshold (checked with rouge_score itself).
    for i, a in enumerate(f.accepted):
        for b in f.accepted[:i]:
            assert reference_f(b, a) < threshold


# ---------------------------------------------------------------- check_response


@pytest.mark.parametrize(
    ("text", "kwargs", "reason"),
    [
        ("", {}, "empty_response"),
        (" \n ", {}, "empty_response"),
        ("Paris", {"min_words": 2}, "response_too_short"),
        ("a b c d", {"max_words": 3}, "response_too_long"),
        ("The answer is 4.", {"pattern": r"def \w+\("}, "response_bad_format"),
        ("def f(x):\n    return x", {"pattern": r"def \w+\(.*return"}, None),  # re.S: '.' spans lines
        ("The answer is B.", {}, None),
    ],
)
def test_check_response(text, kwargs, reason):
    assert check_response(text, **kwargs) == reason


@FAST
@given(st.text(), st.integers(0, 5), st.integers(0, 50))
def test_check_response_never_raises(text, lo, hi):
    reason = check_response(text, min_words=lo, max_words=hi)
    if reason is None:
        assert lo <= len(text.split()) <= hi
