"""Seed loaders: shipped seeds, the four converters on real or fixture rows, sampling, errors."""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
import types
from pathlib import Path

import pytest

from selfmoe.data.schema import Example
from selfmoe.data.seed_formats import mmlu_instruction
from selfmoe.data.seeds import SeedSource, load_seeds, seed_ids, shipped_seed_source
from selfmoe.errors import DataError, OfflineError

FIXTURES = Path(__file__).parent / "fixtures" / "seeds"
DOMAINS = ("knowledge", "reasoning", "math", "coding")
ALL = 10_000  # more than any source here has: load_seeds then returns every row


def _by_id(examples: list[Example]) -> dict[str, Example]:
    return {e.id: e for e in examples}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run_tests(code: str, tests: list[str], setup: str = "") -> None:
    namespace: dict = {}
    exec(setup, namespace)
    exec(code, namespace)
    for test in tests:
        exec(test, namespace)


def _docstring_description(prompt: str) -> str:
    """The free text of a canonical coding prompt's docstring (before the examples)."""
    body = prompt.split('"""', 1)[1]
    lines = []
    for line in body.splitlines():
        if line.strip().startswith(">>>") or line.strip() in ("Tests:", '"""', ""):
            break
        lines.append(line.strip())
    return "\n".join(lines)


# --------------------------------------------------------------------------- shipped seeds


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[Example]]:
    return {d: load_seeds(d, shipped_seed_source(d), count=16, seed=0) for d in DOMAINS}


@pytest.mark.parametrize("domain", DOMAINS)
def test_shipped_seeds_load(shipped, domain):
    seeds = shipped[domain]
    assert len(seeds) == 16
    ids = seed_ids(seeds)
    assert len(set(ids)) == 16
    assert all(re.fullmatch(rf"{domain}/selfmoe-\d\d", i) for i in ids)
    assert {(e.domain, e.source, e.input) for e in seeds} == {(domain, "selfmoe", "")}
    for e in seeds:
        assert len(e.instruction.split()) <= 80, e.id
        assert len(e.output.split()) <= 120, e.id
    # The pkg:// spelling and an explicit SeedSource agree.
    same = load_seeds(domain, SeedSource(path=f"pkg://seeds/{domain}.jsonl", format="plain"), count=16, seed=0)
    assert same == seeds


def test_shipped_knowledge_format(shipped):
    pattern = re.compile(r"(?P<q>[^\n]+)\nA\. (?P<a>[^\n]+)\nB\. (?P<b>[^\n]+)\nC\. (?P<c>[^\n]+)\nD\. (?P<d>[^\n]+)")
    letters = []
    for e in shipped["knowledge"]:
        m = pattern.fullmatch(e.instruction)
        assert m, e.id
        assert e.instruction == mmlu_instruction(m["q"], [m["a"], m["b"], m["c"], m["d"]])
        answer = re.fullmatch(r"The answer is ([ABCD])\.", e.output)
        assert answer, e.id
        letters.append(answer[1])
        assert e.meta.get("subject")
    # Answers are spread over the letters, so a model cannot learn "always B".
    assert {letters.count(x) for x in "ABCD"} == {4}


def test_shipped_reasoning_format(shipped):
    tasks = set()
    for e in shipped["reasoning"]:
        m = re.fullmatch(r"(?s)(?P<why>.+\S) So the answer is (?P<ans>[^\n]+)\.", e.output)
        assert m, e.id
        assert len(m["why"].split()) >= 5, e.id  # a real rationale, not just the answer
        options = re.findall(r"^(\([A-Z]\))", e.instruction, re.M)
        if options:
            assert m["ans"] in options, e.id
        tasks.add(e.meta["task"])
    assert len(tasks) >= 12


def _reasoning_answer(e: Example) -> str:
    return re.search(r"So the answer is (.+)\.$", e.output)[1]


def test_shipped_reasoning_checkable_answers(shipped):
    """The tasks whose answers a program can compute agree with that program."""
    checked = 0
    for e in shipped["reasoning"]:
        task, answer = e.meta["task"], _reasoning_answer(e)
        if task == "boolean_expressions":
            assert str(eval(e.instruction.removesuffix(" is"))) == answer
        elif task == "multistep_arithmetic_two":
            assert str(eval(e.instruction.removesuffix(" ="))) == answer
        elif task == "word_sorting":
            assert " ".join(sorted(e.instruction.split("List: ")[1].split())) == answer
        elif task == "dyck_languages":
            stack = []
            for tok in e.instruction.split("Input: ")[1].split():
                if tok in "([{<":
                    stack.append(tok)
                else:
                    assert {")": "(", "]": "[", "}": "{", ">": "<"}[tok] == stack.pop()
            closing = {"(": ")", "[": "]", "{": "}", "<": ">"}
            assert " ".join(closing[t] for t in reversed(stack)) == answer
        else:
            continue
        checked += 1
    assert checked == 4


def test_shipped_math_format_and_arithmetic(shipped):
    for e in shipped["math"]:
        lines = e.output.splitlines()
        assert len(lines) >= 2, e.id
        final = re.fullmatch(r"The answer is (-?\d+(?:\.\d+)?)\.", lines[-1])
        assert final, e.id
        float(final[1])
        # Every "a op b = c" the solution states must be true.
        for expr, value in re.findall(r"(\d[\d.]*(?:\s*[-+*/]\s*\d[\d.]*)+)\s*=\s*\$?(\d+(?:\.\d+)?)", e.output):
            assert eval(expr) == pytest.approx(float(value)), (e.id, expr, value)


def test_shipped_coding_seeds_pass_their_tests(shipped):
    for e in shipped["coding"]:
        entry, tests = e.meta["entry_point"], e.meta["tests"]
        assert len(tests) == 3, e.id
        assert all(t.startswith("assert ") for t in tests)
        _run_tests(e.output, tests)
        # The prompt is the entry point's header plus a docstring, and is itself valid Python.
        assert re.search(rf"^def {entry}\(", e.instruction, re.M), e.id
        ast.parse(e.instruction + "\n    pass")
        assert ">>> " + entry in e.instruction


def test_shipped_coding_seeds_match_the_mbpp_converter(shipped, tmp_path):
    """Shipped coding seeds are exactly what the mbpp converter renders from (text, code, tests)."""
    rows = [
        {"task_id": i, "text": _docstring_description(e.instruction), "code": e.output, "test_list": e.meta["tests"]}
        for i, e in enumerate(shipped["coding"])
    ]
    src = SeedSource(path=str(_write_jsonl(tmp_path / "as_mbpp.jsonl", rows)), format="mbpp")
    converted = _by_id(load_seeds("coding", src, count=ALL, seed=0))
    for i, e in enumerate(shipped["coding"]):
        again = converted[f"mbpp/{i}"]
        assert again.instruction == e.instruction, e.id
        assert again.output == e.output
        assert again.meta["entry_point"] == e.meta["entry_point"]


# --------------------------------------------------------------------------- gsm8k (real rows)


def _gsm8k(shared_data: Path) -> SeedSource:
    return SeedSource(path=str(shared_data / "gsm8k" / "train.jsonl"), format="gsm8k", split="train")


def test_gsm8k_converter_first_row(shared_data):
    examples = _by_id(load_seeds("math", _gsm8k(shared_data), count=ALL, seed=0))
    assert len(examples) == 7473
    first = examples["gsm8k/train/0"]
    assert first.instruction.startswith("Natalia sold clips to 48 of her friends in April")
    assert first.output == (
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
        "The answer is 72."
    )
    assert first.domain == "math"
    assert examples["gsm8k/train/1"].output.endswith("she earned 0.2 x 50 = $10.\nThe answer is 10.")
    for e in examples.values():
        assert "<<" not in e.output and "####" not in e.output
        float(re.fullmatch(r"(?s).*\nThe answer is (\S+)\.", e.output)[1])


def test_gsm8k_sampling(shared_data):
    src = _gsm8k(shared_data)
    a = load_seeds("math", src, count=5, seed=1)
    assert len(a) == 5
    assert a == load_seeds("math", src, count=5, seed=1)
    assert seed_ids(a) != seed_ids(load_seeds("math", src, count=5, seed=2))
    raw = (shared_data / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    for e in a:
        index = int(re.fullmatch(r"gsm8k/train/(\d+)", e.id)[1])
        assert e.instruction == json.loads(raw[index])["question"].strip()


# --------------------------------------------------------------------------- bbh (real rows)


def test_bbh_two_subsets_stratified(shared_data):
    bbh = shared_data / "bbh"
    src = SeedSource(path=str(bbh), format="bbh", split="test", subsets=["navigate", "boolean_expressions"])
    picked = load_seeds("reasoning", src, count=5, seed=0)
    tasks = [e.id.split("/")[1] for e in picked]
    assert tasks == ["navigate", "boolean_expressions", "navigate", "boolean_expressions", "navigate"]
    raw = {t: json.loads((bbh / f"{t}.json").read_text())["examples"] for t in set(tasks)}
    for e in picked:
        _, task, index = e.id.split("/")
        row = raw[task][int(index)]
        assert e.instruction == row["input"].strip()
        assert e.output == f"So the answer is {row['target']}."
        assert e.meta == {"task": task}
    assert picked == load_seeds("reasoning", src, count=5, seed=0)
    assert picked != load_seeds("reasoning", src, count=5, seed=1)


def test_bbh_whole_directory_and_single_file(shared_data):
    bbh = shared_data / "bbh"
    every_task = load_seeds("reasoning", SeedSource(path=str(bbh), format="bbh", split="test"), count=27, seed=0)
    assert len({e.meta["task"] for e in every_task}) == 27
    one = load_seeds("reasoning", SeedSource(path=str(bbh / "web_of_lies.json"), format="bbh"), count=3, seed=0)
    assert [e.id.split("/")[1] for e in one] == ["web_of_lies"] * 3
    assert all(e.output in ("So the answer is Yes.", "So the answer is No.") for e in one)


def test_bbh_missing_subset(shared_data):
    src = SeedSource(path=str(shared_data / "bbh"), format="bbh", subsets=["navigate", "no_such_task"])
    with pytest.raises(DataError, match="no_such_task"):
        load_seeds("reasoning", src, count=4, seed=0)


# --------------------------------------------------------------------------- mmlu (fixture rows)


def test_mmlu_converter():
    src = SeedSource(path=str(FIXTURES / "mmlu.jsonl"), format="mmlu", split="auxiliary_train")
    examples = _by_id(load_seeds("knowledge", src, count=ALL, seed=0))
    assert set(examples) == {
        "mmlu/high_school_chemistry/0",
        "mmlu/elementary_mathematics/1",
        "mmlu/high_school_government_and_politics/2",
        "mmlu/3",  # no subject
        "mmlu/anatomy/4",
    }
    first = examples["mmlu/high_school_chemistry/0"]
    assert first.instruction == "What is the chemical symbol for sodium?\nA. S\nB. Na\nC. So\nD. Sd"
    assert first.output == "The answer is B."
    assert first.domain == "knowledge"
    assert examples["mmlu/3"].output == "The answer is D."


def test_mmlu_field_mapping_and_letter_answers(tmp_path):
    rows = [
        {"prompt": "2 + 2 =", "options": ["3", "4", "5", "6"], "label": "B"},
        {"prompt": "Capital of France?", "options": ["Rome", "Madrid", "Paris", "Berlin"], "label": "2"},
    ]
    src = SeedSource(
        path=str(_write_jsonl(tmp_path / "mirror.jsonl", rows)),
        format="mmlu",
        fields={"question": "prompt", "choices": "options", "answer": "label"},
    )
    examples = _by_id(load_seeds("knowledge", src, count=2, seed=0))
    assert examples["mmlu/0"].instruction == "2 + 2 =\nA. 3\nB. 4\nC. 5\nD. 6"
    assert examples["mmlu/0"].output == "The answer is B."
    assert examples["mmlu/1"].output == "The answer is C."
    # Mirrors with one column per option.
    columns = [{"input": "1 + 1 =", "A": "1", "B": "2", "C": "3", "D": "4", "target": "B"}]
    src = SeedSource(
        path=str(_write_jsonl(tmp_path / "cols.jsonl", columns)),
        format="mmlu",
        fields={"question": "input", "choices": "A,B,C,D", "answer": "target"},
    )
    (only,) = load_seeds("knowledge", src, count=1, seed=0)
    assert only.instruction == "1 + 1 =\nA. 1\nB. 2\nC. 3\nD. 4"
    assert only.output == "The answer is B."


def test_mmlu_bad_answer(tmp_path):
    rows = [{"question": "q?", "choices": ["a", "b", "c", "d"], "answer": 7}]
    src = SeedSource(path=str(_write_jsonl(tmp_path / "bad.jsonl", rows)), format="mmlu")
    with pytest.raises(DataError, match=r"line 1: answer must be an index 0-3"):
        load_seeds("knowledge", src, count=1, seed=0)


# --------------------------------------------------------------------------- mbpp (fixture rows)


@pytest.fixture
def mbpp(caplog) -> dict[str, Example]:
    src = SeedSource(path=str(FIXTURES / "mbpp.jsonl"), name="full", format="mbpp")
    with caplog.at_level(logging.WARNING, logger="selfmoe.data.seeds"):
        examples = load_seeds("coding", src, count=ALL, seed=0)
    assert "skipped 1 of 6 rows" in caplog.text
    return _by_id(examples)


def test_mbpp_converter_exact(mbpp):
    assert set(mbpp) == {"mbpp/601", "mbpp/602", "mbpp/603", "mbpp/605", "mbpp/606"}  # 604: no entry point
    e = mbpp["mbpp/601"]
    assert e.instruction == (
        "def max_of_two(a, b):\n"
        '    """Write a function to find the maximum of two numbers.\n'
        "    >>> max_of_two(3, 7)\n"
        "    7\n"
        "    >>> max_of_two(-1, -4)\n"
        "    -1\n"
        "    >>> max_of_two(5, 5)\n"
        "    5\n"
        '    """'
    )
    # \r\n and tabs normalised, trailing whitespace dropped.
    assert e.output == "def max_of_two(a, b):\n    if a > b:\n        return a\n    return b"
    assert e.meta == {
        "entry_point": "max_of_two",
        "tests": ["assert max_of_two(3, 7) == 7", "assert max_of_two(-1, -4) == -1", "assert max_of_two(5, 5) == 5"],
        "task_id": 601,
    }
    assert e.domain == "coding" and e.source == "mbpp"


def test_mbpp_imports_and_other_asserts(mbpp):
    e = mbpp["mbpp/602"]
    assert e.instruction == (
        "import re\n"
        "\n"
        "\n"
        "def long_words(text):\n"
        '    """Write a function to find all words of at least four letters in a string by using regex.\n'
        "    >>> long_words('a quick brown fox')\n"
        "    ['quick', 'brown']\n"
        "    >>> long_words('hi yo')\n"
        "    []\n"
        "\n"
        "    Tests:\n"
        "    assert set(long_words('tree of life')) == set(['tree', 'life'])\n"
        '    """'
    )
    assert e.output == 'import re\ndef long_words(text):\n  return (re.findall(r"\\b\\w{4,}\\b", text))'


def test_mbpp_entry_points_and_signatures(mbpp):
    # The first test calls sorted() before count_even(); is_even is defined but not called.
    helper = mbpp["mbpp/603"]
    assert helper.meta["entry_point"] == "count_even"
    assert "\ndef count_even(nums):\n" in "\n" + helper.instruction
    assert "def is_even" not in helper.instruction
    assert "    >>> count_even([])\n    0\n" in helper.instruction
    assert "    Tests:\n    assert sorted([count_even([1, 2, 4])]) == [2]\n" in helper.instruction
    # A header spread over two lines is kept whole.
    assert mbpp["mbpp/605"].instruction.startswith("def clamp(value,\n          low, high):\n")
    # A one-line function gets its header rebuilt; setup code travels in meta.
    one_liner = mbpp["mbpp/606"]
    assert one_liner.instruction.startswith("def square_area(name):\n")
    assert one_liner.meta["test_setup_code"] == "SIDES = {'small': 2, 'big': 10}"


def test_mbpp_fixture_outputs_pass_their_tests(mbpp):
    for e in mbpp.values():
        _run_tests(e.output, e.meta["tests"], e.meta.get("test_setup_code", ""))
        ast.parse(e.instruction + "\n    pass")


# --------------------------------------------------------------------------- hub (no network)


@pytest.fixture
def online(monkeypatch):
    """Offline switches off, with a fake `datasets` module so nothing touches the network."""
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls: list[tuple] = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"input": f"{name} question {i}", "target": f"{name}-{i}"} for i in range(3)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_bbh_configs_round_robin(online):
    src = SeedSource(path="lukaemon/bbh", split="test", format="bbh", subsets=["navigate", "snarks"])
    picked = load_seeds("reasoning", src, count=4, seed=0)
    assert online == [("lukaemon/bbh", "navigate", "test"), ("lukaemon/bbh", "snarks", "test")]
    assert [e.meta["task"] for e in picked] == ["navigate", "snarks", "navigate", "snarks"]
    for e in picked:
        _, task, index = e.id.split("/")
        assert e.output == f"So the answer is {task}-{index}."


def test_hub_connection_error_is_offline_error(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def load_dataset(path, name=None, split=None):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = SeedSource(path="openai/gsm8k", name="main", split="train", format="gsm8k")
    with pytest.raises(OfflineError, match="openai/gsm8k") as info:
        load_seeds("math", src, count=3, seed=0)
    assert "seed_source=local" in str(info.value)
    assert "domains.math.seeds.hub.path=" in str(info.value)


def test_offline_env_fails_before_importing_datasets(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it would fail with ImportError
    src = SeedSource(path="cais/mmlu", name="all", split="auxiliary_train", format="mmlu")
    with pytest.raises(OfflineError) as info:
        load_seeds("knowledge", src, count=100, seed=0)
    message = str(info.value)
    for part in (
        "cais/mmlu",
        "'all'",
        "auxiliary_train",
        "unreachable",
        "seed_source=local",
        "domains.knowledge.seeds.hub.path=/path/to/local/file",
    ):
        assert part in message


def test_datasets_not_installed(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        load_seeds("math", SeedSource(path="openai/gsm8k", name="main", format="gsm8k"), count=3, seed=0)


# --------------------------------------------------------------------------- errors


def test_missing_local_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_seeds("math", SeedSource(path=str(tmp_path / "nope.jsonl"), format="gsm8k"), count=3, seed=0)
    with pytest.raises(DataError, match="not found"):
        load_seeds("math", SeedSource(path="data/seeds.jsonl", format="gsm8k"), count=3, seed=0)
    with pytest.raises(DataError, match="packaged seed file"):
        load_seeds("math", SeedSource(path="pkg://seeds/nope.jsonl"), count=3, seed=0)


def test_wrong_fields_name_file_line_and_field(tmp_path):
    rows = [{"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}, {"question": "2 + 2?", "solution": "#### 4"}]
    path = _write_jsonl(tmp_path / "mine.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_seeds("math", SeedSource(path=str(path), format="gsm8k"), count=2, seed=0)
    message = str(info.value)
    for part in (str(path), "line 2", "'answer'", "openai/gsm8k rows: question (str), answer"):
        assert part in message


def test_plain_file_broken_lines(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"id": "a", "instruction": "x", "output": "y"}\n{"id": "b", "instruction": "x"}\nnot json\n')
    with pytest.raises(DataError) as info:
        load_seeds("math", SeedSource(path=str(path)), count=2, seed=0)
    message = str(info.value)
    assert str(path) in message and "line 2" in message and "output" in message and "line 3" in message


def test_plain_duplicate_ids(tmp_path):
    rows = [{"id": "same", "instruction": f"q{i}", "output": "a"} for i in range(2)]
    with pytest.raises(DataError, match="duplicate id"):
        load_seeds("math", SeedSource(path=str(_write_jsonl(tmp_path / "d.jsonl", rows))), count=2, seed=0)


def test_plain_forces_domain_and_returns_all_when_short(tmp_path, caplog):
    rows = [{"id": f"x/{i}", "domain": "other", "instruction": f"q{i}", "output": "a"} for i in range(3)]
    src = SeedSource(path=str(_write_jsonl(tmp_path / "p.jsonl", rows)))
    with caplog.at_level(logging.WARNING, logger="selfmoe.data.seeds"):
        got = load_seeds("math", src, count=10, seed=0)
    assert sorted(seed_ids(got)) == ["x/0", "x/1", "x/2"]
    assert {e.domain for e in got} == {"math"}
    assert "fewer than the 10 requested" in caplog.text


def test_empty_source(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable rows"):
        load_seeds("math", SeedSource(path=str(empty)), count=3, seed=0)
    with pytest.raises(DataError, match="no usable rows"):
        load_seeds("math", SeedSource(path=str(empty), format="gsm8k"), count=3, seed=0)
    with pytest.raises(DataError, match="no seed source path"):
        load_seeds("math", SeedSource(path=None), count=3, seed=0)


def test_bad_config(tmp_path):
    path = str(_write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}]))
    with pytest.raises(DataError, match="unknown seed format"):
        load_seeds("math", SeedSource(path=path, format="csv"), count=1, seed=0)
    with pytest.raises(DataError, match="not roles of format 'gsm8k'"):
        load_seeds("math", SeedSource(path=path, format="gsm8k", fields={"solution": "answer"}), count=1, seed=0)
