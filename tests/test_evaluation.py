"""Evaluation through lm-eval: the adapter against plain HFLM, the smoke suite end to end, the
safety and offline checks, the routing recorder against a direct computation, and the tables."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from peft import LoraConfig, PeftModel, get_peft_model

from evaluation import TASKS_DIR
from evaluation.code_exec import pass_at_1, passes
from evaluation.lm import SelfMoELM
from evaluation.overlap import find_overlap, normalize
from evaluation.results import markdown_table, mean_std, summary_rows, task_score
from evaluation.routing import RoutingRecorder, routing_pass, sample_text
from evaluation.suites import load_tasks, preflight, shot_groups, suite_tasks, task_manager
from evaluation.targets import build_target, check_available, parse_target
from selfmoe.artifacts import Layout
from selfmoe.data.schema import Example, write_jsonl
from selfmoe.errors import ConfigError, OfflineError, SelfMoEError
from selfmoe.models.base import load_base, model_id
from selfmoe.models.graphed import Buckets, GraphedLM
from selfmoe.models.mixse import RouterSettings, build_mixse, read_expert, save_mixse
from tests.conftest import make_config

DOMAINS = ["knowledge", "reasoning", "math", "coding"]
UNSAFE = ("eval.confirm_run_unsafe_code=true",)


def eval_config(outputs: Path, *overrides: str):
    return make_config("eval", outputs, "eval.batch_size=4", *overrides)


@pytest.fixture(scope="module")
def eval_outputs(tmp_path_factory, tiny_outputs) -> Path:
    """tiny_outputs plus random (non-zero) experts for every domain, an instance LoRA, a MiXSE with a
    random router, and the TIES/DARE merges: every target, without training (fast, deterministic)."""
    import shutil

    from selfmoe.phases import merge

    out = tmp_path_factory.mktemp("eval") / "outputs"
    shutil.copytree(tiny_outputs, out)
    cfg = eval_config(out)
    layout = Layout.for_model(out, cfg.model.name)
    for i, name in enumerate([*DOMAINS, "all"]):
        torch.manual_seed(10 + i)
        base, _ = load_base(cfg)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(cfg.model.lora_targets), init_lora_weights=False)
        peft = get_peft_model(base, lora)
        for p in peft.parameters():  # keep the experts small: the tiny model stays in its regime
            if p.requires_grad:
                p.data.mul_(0.3)
        peft.save_pretrained(layout.expert(name))
    base, _ = load_base(cfg)
    model = build_mixse(base, [read_expert(d, layout.expert(d)) for d in DOMAINS], RouterSettings())
    torch.manual_seed(3)
    model.mixse.router.weight.data.normal_(0, 0.5)
    dirs = {d: layout.expert(d) for d in DOMAINS}
    save_mixse(model, layout.root / "mixse", base_model=model_id(cfg), expert_dirs=dirs)
    merge.run(make_config("merge", out))
    return out


def requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


PAIRS = [
    ("Question: What is 5 + 7?\nAnswer:", " 12"),
    ("The capital of France is", " Paris"),
    ("def add(a, b):", " return"),
]


# --- the adapter --------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["base", "expert:math"])
def test_adapter_loglikelihoods_equal_plain_hflm(eval_outputs, target):
    cfg = eval_config(eval_outputs)
    ours = SelfMoELM(target=target, cfg=cfg, batch_size=2).loglikelihood(requests(PAIRS))
    base, tok = load_base(cfg)
    if target != "base":
        base = PeftModel.from_pretrained(base, str(Layout.for_model(eval_outputs, "tiny").expert("math")))
    plain = HFLM(pretrained=base.eval(), tokenizer=tok, batch_size=2, device="cpu", max_length=cfg.model.max_length)
    reference = plain.loglikelihood(requests(PAIRS))
    assert ours == reference  # same model, same lm-eval code path: bit-identical
    if target != "base":  # and the expert really changes the model
        assert ours != SelfMoELM(target="base", cfg=cfg, batch_size=2).loglikelihood(requests(PAIRS))


class CountingRunner(GraphedLM):
    """The scoring runner's bucketing, run eagerly on the CPU, counting its calls."""

    calls = 0

    def __call__(self, input_ids, *, copy=True):
        self.calls += 1
        return super().__call__(input_ids, copy=copy)


def test_scoring_goes_through_the_graph_runner_only_when_switched_on(eval_outputs, monkeypatch):
    import evaluation.lm

    made = []

    def runner(model, enabled, batch_size):
        if not enabled:
            return None
        # Length buckets of 8: the three requests pad to other lengths than their batches have.
        made.append(CountingRunner(model, buckets=Buckets(8, batch_size=batch_size), pad_when_eager=True))
        return made[-1]

    monkeypatch.setattr(evaluation.lm, "scoring_runner", runner)
    on = SelfMoELM(target="mixse", cfg=eval_config(eval_outputs, "eval.cuda_graphs=true"), batch_size=2)
    off = SelfMoELM(target="mixse", cfg=eval_config(eval_outputs, "eval.cuda_graphs=false"), batch_size=2)
    assert on.scorer is made[0] and off.scorer is None and len(made) == 1
    assert on.scorer.buckets.batch_size == 2
    got, want = on.loglikelihood(requests(PAIRS)), off.loglikelihood(requests(PAIRS))
    assert made[0].calls == 2  # three requests in batches of two
    # Padding only changes GEMM shapes, so float32 rounding is all that may differ.
    assert [g for _, g in got] == [g for _, g in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-5)
    # Generation is lm-eval's own: it never goes through the runner.
    on.generate_until([Instance("generate_until", {}, ("1 + 1 =", {"max_gen_toks": 3, "until": ["\n"]}), 0)])
    assert made[0].calls == 2


def test_adapter_builds_from_model_args_string(eval_outputs, monkeypatch):
    """The lm-eval way: ``model_args`` parsed by lm-eval, config composed from a preset + overrides."""
    monkeypatch.chdir(eval_outputs.parent)
    lm = SelfMoELM.create_from_arg_string(f"target=mixse,model=tiny,overrides=output_dir={eval_outputs}")
    assert lm.built.is_mixse and lm.built.provenance["router"]["top_k"] == 1
    lm2 = SelfMoELM.create_from_arg_string(f"target=mixse@top_k=2@mode=random,overrides=output_dir={eval_outputs}")
    assert lm2.built.model.mixse.settings.top_k == 2 and lm2.built.model.mixse.settings.mode == "random"


def test_merge_target_is_base_plus_merged_delta(eval_outputs):
    from selfmoe.models.merging import load_merged

    cfg = eval_config(eval_outputs)
    built = build_target(cfg, parse_target("merge:ties", cfg))
    base, _ = load_base(cfg)
    deltas, meta = load_merged(Layout.for_model(eval_outputs, "tiny").root / "merges" / "ties")
    assert meta["method"] == "ties" and meta["params"]["density"] == cfg.merge.density
    name = "model.layers.0.self_attn.q_proj"
    expected = base.get_submodule(name).weight + deltas[name]
    torch.testing.assert_close(built.model.get_submodule(name).weight, expected, rtol=0, atol=1e-6)
    assert deltas[name].abs().sum() > 0


def test_target_strings_are_checked():
    cfg = make_config("eval", "unused")
    assert parse_target("expert:math", cfg).label == "math expert"
    assert parse_target("mixse", cfg).arg == cfg.router.name
    assert parse_target("mixse:mixse-top2@top_k=2", cfg).settings == {"top_k": 2}
    assert parse_target("merge:dare", cfg).label == "DARE merging"
    for bad in ["expert:cooking", "merge:magic", "basis", "base:x", "expert:math@top_k=2", "mixse@depth=3"]:
        with pytest.raises(ConfigError):
            parse_target(bad, cfg)


def test_missing_target_names_the_command(tmp_path):
    cfg = eval_config(tmp_path)
    with pytest.raises(SelfMoEError, match=r"make expert DOMAIN=coding"):
        check_available(cfg, [parse_target("expert:coding", cfg)])
    with pytest.raises(SelfMoEError, match=r"make baselines"):
        check_available(cfg, [parse_target("merge:ties", cfg)])


# --- the smoke suite end to end -----------------------------------------------------------------


def test_smoke_suite_end_to_end(eval_outputs, monkeypatch):
    from evaluation.runner import RESULTS, eval_root, run

    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    cfg = eval_config(eval_outputs, *UNSAFE, "eval.targets=[base,expert:math,merge:ties,mixse]", "eval.limit=6",
                      "eval.routing_docs=4")  # fmt: skip
    summary = run(cfg)
    root = eval_root(cfg)
    docs = {t: json.loads((root / t / "smoke" / RESULTS).read_text()) for t in ["base", "expert-math", "mixse"]}
    for doc in docs.values():
        assert doc["suite"] == "smoke" and doc["limit"] == 6 and doc["seeds"] == [1234]
        assert doc["lm_eval_version"] and set(doc["tasks"]) == {"smoke_mc", "smoke_arith", "smoke_code"}
        assert doc["tasks"]["smoke_arith"]["num_fewshot"] == 3 and doc["tasks"]["smoke_arith"]["version"] == 1.0
        # one lm-eval call per shot setting: 0-shot (mc + code) and 3-shot (arith)
        assert sorted((r["num_fewshot"], tuple(r["tasks"])) for r in doc["runs"]) == [
            (0, ("smoke_mc", "smoke_code")),
            (3, ("smoke_arith",)),
        ]
        for run_ in doc["runs"]:  # the table's numbers are lm-eval's own
            for task in run_["tasks"]:
                metric = doc["tasks"][task]["metric"]
                assert doc["tasks"][task]["scores"] == [run_["results"][task][metric]]
                assert run_["n-shot"][task] == run_["num_fewshot"]
    mc = [json.loads(line) for line in (root / "base" / "smoke" / "samples.jsonl").read_text().splitlines()]
    assert sum(s["task"] == "smoke_mc" for s in mc) == 6
    # the table: rows in target order, cells = 100 x the stored means, avg = mean over tasks
    text = summary.read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["base", "math expert", "TIES merging", "MiXSE"]
    base = docs["base"]["tasks"]
    cells = [f"{100 * base[t]['mean']:.1f}" for t in ("smoke_mc", "smoke_arith", "smoke_code")]
    avg = sum(base[t]["mean"] for t in base) / 3
    assert lines[2] == "| base | " + " | ".join(cells) + f" | {100 * avg:.1f} |"
    # routing figure for MiXSE only, with every benchmark as a row
    routing = json.loads((root / "mixse" / "smoke" / "routing.json").read_text())
    assert set(routing["tasks"]) == {"smoke_mc", "smoke_arith", "smoke_code"} and routing["experts"] == DOMAINS
    assert (root / "mixse" / "smoke" / "routing.png").read_bytes()[:4] == b"\x89PNG"
    assert not (root / "base" / "smoke" / "routing.json").exists()
    for entry in routing["tasks"].values():
        assert math.isclose(sum(entry["probs"]["overall"]), 1.0, rel_tol=1e-6) and entry["tokens"] > 0
    # a second run reuses the results (same key) instead of evaluating again
    stamp = (root / "base" / "smoke" / RESULTS).stat().st_mtime_ns
    run(cfg)
    assert (root / "base" / "smoke" / RESULTS).stat().st_mtime_ns == stamp


def test_report_collects_tables_and_figures(eval_outputs, monkeypatch):
    from evaluation.report import build_report
    from evaluation.runner import run

    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    cfg = eval_config(eval_outputs, *UNSAFE, "eval.targets=[base,mixse]", "eval.limit=3", "eval.routing_docs=2")
    run(cfg)
    report = build_report(cfg)
    text = report.read_text()
    assert "### Suite `smoke`" in text and "| MiXSE |" in text and "## Provenance" in text
    figures = [line.split("(")[1].rstrip(")\n") for line in text.splitlines() if line.startswith("![")]
    assert "figures/routing-mixse-smoke.png" in figures
    for rel in figures:
        assert (report.parent / rel).read_bytes()[:4] == b"\x89PNG"


# --- safety and offline checks ------------------------------------------------------------------


def test_code_tasks_are_refused_before_any_model_is_built(eval_outputs, monkeypatch):
    import evaluation.runner as runner

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the code opt-in check")

    monkeypatch.setattr(runner, "build_target", no_model)
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(SelfMoEError, match="confirm_run_unsafe_code=true and HF_ALLOW_CODE_EVAL=1"):
        runner.run(eval_config(eval_outputs, "eval.targets=[base]"))
    with pytest.raises(SelfMoEError, match="HF_ALLOW_CODE_EVAL=1") as err:  # one switch is not enough
        runner.run(eval_config(eval_outputs, "eval.targets=[base]", *UNSAFE))
    assert "confirm_run_unsafe_code" not in str(err.value)
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    with pytest.raises(SelfMoEError, match="confirm_run_unsafe_code=true"):
        runner.run(eval_config(eval_outputs, "eval.targets=[base]"))


def test_code_execution_needs_the_environment_switch(monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(SelfMoEError, match="HF_ALLOW_CODE_EVAL=1"):
        passes("assert True")


def test_smoke_code_task_scores_reference_solutions(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    rows = [json.loads(line) for line in (TASKS_DIR / "smoke" / "data" / "code_test.jsonl").read_text().splitlines()]
    good = [r["prompt"] + r["canonical_solution"] + "\n" + r["test"] + f"\ncheck({r['entry_point']})" for r in rows]
    assert pass_at_1(good) == 1.0
    wrong = [r["prompt"] + "    return None\n" + "\n" + r["test"] + f"\ncheck({r['entry_point']})" for r in rows]
    assert pass_at_1(wrong) == 0.0
    assert not passes("while True:\n    pass", timeout=1.0)  # killed at the timeout


def test_hub_task_offline_fails_early_naming_the_dataset(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_config("eval", "unused", "eval.scale=full", "eval.suite=paper")
    manager = task_manager(cfg)
    with pytest.raises(OfflineError) as err:
        load_tasks(manager, ["gsm8k_cot"])
    message = str(err.value)
    assert "openai/gsm8k" in message and "eval.include_paths" in message and "HF_DATASETS_OFFLINE" in message
    with pytest.raises(ConfigError, match="unknown lm-eval task"):
        load_tasks(manager, ["no_such_task"])


def test_local_mirror_of_a_standard_task(shared_data, tmp_path):
    """gsm8k_cot itself (prompt, few-shot, filters) reading a local copy of its dataset."""
    import lm_eval

    stock = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k-cot.yaml"
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "gsm8k_cot_local.yaml").write_text(
        f"include: {stock}\ntask: gsm8k_cot_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {shared_data / 'gsm8k' / 'test.jsonl'}\n"
    )
    cfg = make_config("eval", "unused", f"eval.include_paths=[{mirror}]")
    task = load_tasks(task_manager(cfg), ["gsm8k_cot_local"])["gsm8k_cot_local"]
    docs = list(task.test_docs())
    assert len(docs) == 1319 and task.config.num_fewshot == 8
    assert task.doc_to_text(docs[0]).startswith("Q: Janet")


def test_shot_groups_and_suites():
    cfg = make_config("eval", "unused", "eval.scale=full", "eval.suite=paper")
    name, tasks = suite_tasks(cfg)
    assert name == "paper"
    assert shot_groups(tasks) == {0: ["mmlu", "humaneval"], 3: ["bbh_cot_fewshot"], 8: ["gsm8k_cot"]}
    assert suite_tasks(make_config("eval", "unused"))[0] == "smoke"  # the tiny preset's scale
    forgetting = make_config("eval", "unused", "eval.scale=full", "eval.suite=forgetting")
    assert {t.task for t in suite_tasks(forgetting)[1]} >= {"mbpp", "nq_open", "triviaqa", "hellaswag", "piqa"}


def test_preflight_loads_the_smoke_suite(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    cfg = make_config("eval", "unused", *UNSAFE)
    loaded = preflight(cfg, task_manager(cfg), shot_groups(suite_tasks(cfg)[1]))
    sizes = {n: len(list(t.test_docs())) for n, t in loaded.items()}
    assert sizes == {"smoke_mc": 16, "smoke_arith": 16, "smoke_code": 8}


# --- routing ------------------------------------------------------------------------------------


def test_routing_recorder_equals_a_direct_computation(eval_outputs):
    cfg = eval_config(eval_outputs)
    built = build_target(cfg, parse_target("mixse", cfg))
    model, tok = built.model, built.tokenizer
    texts = {"a": ["Question: What is 5 + 7?\nAnswer: 12", "Hi"], "b": ["def add(a, b):\n    return a + b"]}
    recorder = routing_pass(model, tok, texts, batch_size=2, max_length=64)  # "Hi" is padded in its batch
    got = recorder.result()
    model.mixse.record = True
    for task, items in texts.items():  # reference: one unpadded text at a time, averaged by hand
        per_layer, top1, tokens = 0, 0, 0
        for text in items:
            ids = tok(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            probs = torch.stack([r.probs[0].double() for r in model.mixse.records])  # (L, T, N)
            per_layer = per_layer + probs.sum(1)
            top1 = top1 + torch.nn.functional.one_hot(probs.argmax(-1), 4).sum(1)
            tokens += ids.shape[1]
        assert got[task]["tokens"] == tokens
        torch.testing.assert_close(
            torch.tensor(got[task]["probs"]["layers"], dtype=torch.float64), per_layer / tokens, atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor(got[task]["probs"]["overall"], dtype=torch.float64),
            (per_layer / tokens).mean(0),
            atol=1e-6,
            rtol=0,
        )
        assert got[task]["top1"]["layers"] == (top1.double() / tokens).tolist()


def test_recorder_ignores_masked_tokens():
    from selfmoe.models.mixse import RoutingRecord

    rec = RoutingRecorder(["x", "y"], 1)
    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]])
    rec.add("t", [RoutingRecord(probs, probs)], torch.tensor([[1, 1, 0]]))
    out = rec.result()["t"]
    assert out["tokens"] == 2 and out["probs"]["overall"] == pytest.approx([0.55, 0.45])
    assert out["top1"]["overall"] == [0.5, 0.5]


def test_sample_text_per_request_type():
    mc = {"arguments": [["Q: 2+2?\nA:", " 3"], ["Q: 2+2?\nA:", " 4"]], "target": 1}
    assert sample_text(mc) == "Q: 2+2?\nA: 4"
    gen = {"arguments": [["Q: 2+2?\nA:", {"until": ["\n"]}]], "resps": [[" 4"]], "target": " 4"}
    assert sample_text(gen) == "Q: 2+2?\nA: 4"
    assert sample_text({"arguments": [["a whole document"]]}) == "a whole document"


# --- tables and overlap -------------------------------------------------------------------------


def test_summary_rows_mean_std_and_markdown():
    docs = [
        {"label": "base", "target": "base", "seeds": [0, 1, 2],
         "tasks": {"a": {"scores": [0.5, 0.6, 0.7]}, "b": {"scores": [0.1, 0.1, 0.4]}}},
        {"label": "MiXSE", "target": "mixse", "seeds": [0, 1, 2], "tasks": {"a": {"scores": [0.8, 0.8, 0.8]}}},
    ]  # fmt: skip
    rows = summary_rows(docs, ["a", "b"])
    assert rows[0]["tasks"]["a"]["mean"] == pytest.approx(0.6) and rows[0]["tasks"]["a"]["std"] == pytest.approx(0.1)
    # avg per seed: 0.3, 0.35, 0.55 -> mean 0.4, sample std 0.1322876
    assert rows[0]["avg"]["mean"] == pytest.approx(0.4) and rows[0]["avg"]["std"] == pytest.approx(0.1322876, abs=1e-6)
    assert rows[1]["avg"] is None and rows[1]["tasks"]["b"] is None
    table = markdown_table(rows, ["a", "b"], {"a": "A (0-shot)"})
    assert table.splitlines()[0] == "| method | A (0-shot) | b | avg |"
    assert table.splitlines()[2] == "| base | 60.0 ± 10.00 | 20.0 ± 17.32 | 40.0 ± 13.23 |"
    assert table.splitlines()[3] == "| MiXSE | 80.0 ± 0.00 | n/a | n/a |"
    assert mean_std([0.5]) == (0.5, None)


def test_task_score_prefers_configured_metric_and_averages_unaggregated_groups():
    res = {
        "results": {"g": {"alias": "g"}, "s1": {"acc,none": 0.5, "acc_stderr,none": 0.1}, "s2": {"acc,none": 1.0}},
        "group_subtasks": {"g": ["s1", "s2"]},
    }
    assert task_score(res, "s1", None) == (0.5, "acc,none")
    assert task_score(res, "g", "acc,none") == (0.75, "acc,none")
    with pytest.raises(KeyError):
        task_score(res, "s1", "exact_match,none")


def test_seed_overlap_reports_items_equal_to_seeds(tmp_path):
    seeds = {normalize("Natalia sold clips to 48 of her friends in April."): "math/gsm8k-1"}
    samples = {
        "gsm8k": [
            {"doc_id": 0, "doc": {"question": "Natalia sold clips to 48 of her friends in April", "answer": "72"}},
            {"doc_id": 1, "doc": {"question": "A different question about apples and oranges", "answer": "3"}},
        ],
        "mc": [{"doc_id": 5, "doc": {"question": "Q: natalia  sold clips to 48 of her friends in april. A:"}}],
    }
    hits = find_overlap(samples, seeds)
    assert hits == [
        {"task": "gsm8k", "doc_id": 0, "seed": "math/gsm8k-1"},
        {"task": "mc", "doc_id": 5, "seed": "math/gsm8k-1"},
    ]


def test_seed_overlap_reads_the_recorded_seeds(tmp_path):
    from evaluation.overlap import seed_texts

    cfg = make_config("eval", tmp_path)
    path = Layout.for_model(tmp_path, "tiny").data("math")
    path.mkdir(parents=True)
    write_jsonl(path / "seeds.jsonl", [Example("s1", "math", "How many legs do three spiders have in total?", "24")])
    assert seed_texts(cfg) == {"how many legs do three spiders have in total": "math/s1"}


def test_stock_cli_entry_point_registers_the_model():
    import subprocess
    import sys

    code = "import evaluation.cli; from lm_eval.api.registry import get_model; print(get_model('selfmoe').__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, check=True)
    assert out.stdout.strip() == "SelfMoELM"


# --- across ranks -------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_under_real_ddp_equals_one_process(eval_outputs, tmp_path):
    """`python -m selfmoe eval trainer=ddp` on 2 CPU ranks (Lightning Fabric launches them): the
    (target, shot setting) units are split over the ranks and rank zero writes results that equal
    a one-process run's."""
    import shutil

    from evaluation.runner import RESULTS
    from tests.conftest import TEST_OVERRIDES, run_selfmoe

    runs = {}
    for name, extra in (("one", []), ("two", ["trainer.strategy=ddp", "trainer.devices=2"])):
        out = tmp_path / name
        shutil.copytree(eval_outputs, out, ignore=shutil.ignore_patterns("eval"))
        args = [f"output_dir={out}", *TEST_OVERRIDES, *UNSAFE, "eval.targets=[base,mixse]", "eval.limit=4",
                "eval.routing_docs=2", "eval.batch_size=4", "trainer.accelerator=cpu", *extra]  # fmt: skip
        proc = run_selfmoe("eval", *args, HF_ALLOW_CODE_EVAL="1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = out / "tiny" / "eval"
    for target in ("base", "mixse"):
        one, two = (json.loads((runs[n] / target / "smoke" / RESULTS).read_text()) for n in ("one", "two"))
        assert {t: e["scores"] for t, e in two["tasks"].items()} == {t: e["scores"] for t, e in one["tasks"].items()}
        assert two["key"] == one["key"]
        samples = [(runs[n] / target / "smoke" / "samples.jsonl").read_text() for n in ("one", "two")]
        assert samples[0] == samples[1]
    routing = [json.loads((runs[n] / "mixse" / "smoke" / "routing.json").read_text()) for n in ("one", "two")]
    assert routing[0] == routing[1]
    assert (runs["two"] / "summary.md").read_text() == (runs["one"] / "summary.md").read_text()
