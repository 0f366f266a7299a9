"""The expert phase end to end on the tiny model: artifacts, PEFT compatibility, resume, skip."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import make_config
from peft import PeftModel
from safetensors.torch import load_file

from selfmoe.artifacts import Layout
from selfmoe.data.schema import read_jsonl
from selfmoe.data.sft import collate, tokenize_example
from selfmoe.models.base import load_base
from selfmoe.models.lora_train import lean_layers
from selfmoe.phases import expert, generate
from selfmoe.phases.expert import EXPERT_FILES
from selfmoe.phases.generate import DATA_FILES


def expert_cfg(outputs, *overrides):
    return make_config("expert", outputs, "domain=math", *overrides)


class Capture(L.Callback):
    """Keeps the trained in-memory model, to compare with what was saved."""

    def on_fit_end(self, trainer, pl_module):
        self.model = pl_module.model


class CrashAtEpoch(L.Callback):
    """Simulates a crash at the start of an epoch (after the previous epoch's checkpoint)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def heldout_nll(model, tokenizer, rows, template="alpaca", max_length=2048) -> float:
    """Token-averaged response NLL over ``rows``, computed independently of the training code."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ex in rows:
            f = tokenize_example(ex, tokenizer, template=template, max_length=max_length)
            batch = collate([f], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum")
            total += nll.item()
            count += int((labels != -100).sum())
    return total / count


def data_dirs(cfg):
    layout = Layout.for_model(cfg.output_dir, cfg.model.name)
    return {d: layout.data(d) for d in cfg.domain_names}


def test_generated_data_artifact(tiny_outputs):
    cfg = make_config("generate", tiny_outputs, "domain=math")
    target = Layout.for_model(tiny_outputs, "tiny").data("math")
    assert sorted(p.name for p in target.iterdir()) == sorted(DATA_FILES)
    manifest = json.loads((target / "manifest.json").read_text())
    train, val = read_jsonl(target / "train.jsonl"), read_jsonl(target / "val.jsonl")
    assert len(train) + len(val) == manifest["train"] + manifest["val"] == cfg.data.num_examples == 24
    assert {e.id for e in train}.isdisjoint(e.id for e in val)
    seeds = read_jsonl(target / "seeds.jsonl")
    assert manifest["seed_ids"] == [s.id for s in seeds]
    seed_texts = {s.instruction for s in seeds}
    assert all(e.instruction not in seed_texts and e.output.strip() for e in train + val)
    counts = manifest["generation"]["counts"]
    raw = read_jsonl(target / "raw.jsonl")
    dropped = [e for e in raw if e.meta.get("drop")]
    assert len(raw) - len(dropped) == 24
    for reason in {e.meta["drop"] for e in dropped}:
        assert counts[reason] == sum(e.meta["drop"] == reason for e in dropped)
    assert manifest["generation"]["tokens_per_second"] > 0


def test_expert_trains_saves_and_reloads_with_plain_peft(outputs):
    cfg = expert_cfg(outputs)
    capture = Capture()
    target = expert.train_expert(cfg, "math", data_dirs(cfg), callbacks=[capture])
    assert sorted(p.name for p in target.iterdir()) == sorted(EXPERT_FILES)
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["base_model"].startswith("tiny@") and manifest["domain"] == "math"
    assert 0 < manifest["trainable_params"] < manifest["total_params"]

    # Only LoRA weights were trainable, and the checkpoint holds nothing else.
    trained = capture.model
    assert all("lora_" in n for n, p in trained.named_parameters() if p.requires_grad)
    ckpt = torch.load(
        Layout.for_model(outputs, "tiny").run("expert-math") / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == manifest["trainable_params"]

    # The adapter loads with plain PEFT, outside this project, and gives identical logits.
    base, tokenizer = load_base(cfg)
    reloaded = PeftModel.from_pretrained(base, str(target))
    assert lean_layers(trained) and not lean_layers(reloaded)  # trained with expert.fused_lora (the default)
    ids = tokenizer(["Tom has 3 apples and buys 4 more.", "What is 2+2?"], return_tensors="pt", padding=True)
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, trained(**ids).logits, rtol=0, atol=0)
        fresh_base, _ = load_base(cfg)
        assert not torch.allclose(fresh_base(**ids).logits, trained(**ids).logits)

    # Training lowered the held-out loss on its own domain (recomputed here, not trusted).
    val = read_jsonl(data_dirs(cfg)["math"] / "val.jsonl")
    before, after = heldout_nll(fresh_base, tokenizer, val), heldout_nll(reloaded, tokenizer, val)
    assert after < before
    m = manifest["metrics"]
    assert m["val_loss_after"] < m["val_loss_before"]
    assert m["val_loss_before"] == pytest.approx(before, rel=1e-4)
    assert m["val_loss_after"] == pytest.approx(after, rel=1e-4)


def test_resume_matches_uninterrupted_run(tmp_path, tiny_outputs):
    import shutil

    runs = {}
    for name in ("straight", "resumed"):
        out = tmp_path / name
        shutil.copytree(tiny_outputs, out)
        cfg = expert_cfg(out)
        if name == "resumed":
            with pytest.raises(RuntimeError, match="simulated crash"):
                expert.train_expert(cfg, "math", data_dirs(cfg), callbacks=[CrashAtEpoch(2)])
            target = Layout.for_model(out, "tiny").expert("math")
            assert not target.exists()  # a crash leaves no artifact
            assert (Layout.for_model(out, "tiny").run("expert-math") / "checkpoints" / "last.ckpt").is_file()
        runs[name] = load_file(expert.train_expert(cfg, "math", data_dirs(cfg)) / "adapter_model.safetensors")
    assert runs["straight"].keys() == runs["resumed"].keys()
    for key, value in runs["straight"].items():
        torch.testing.assert_close(runs["resumed"][key], value, rtol=0, atol=1e-6)


def test_finished_expert_is_reused_and_force_redoes_it(outputs):
    cfg = expert_cfg(outputs)
    target = expert.train_expert(cfg, "math", data_dirs(cfg))
    stamp = (target / "manifest.json").stat().st_mtime_ns
    key = json.loads((target / "manifest.json").read_text())["key"]
    assert expert.train_expert(cfg, "math", data_dirs(cfg)) == target
    assert (target / "manifest.json").stat().st_mtime_ns == stamp
    changed = expert_cfg(outputs, "expert.lr=1e-3")  # other settings are never silently reused
    expert.train_expert(changed, "math", data_dirs(changed))
    assert json.loads((target / "manifest.json").read_text())["key"] != key
    stamp = (target / "manifest.json").stat().st_mtime_ns
    expert.train_expert(expert_cfg(outputs, "expert.lr=1e-3", "force=true"), "math", data_dirs(changed))
    assert (target / "manifest.json").stat().st_mtime_ns != stamp


def test_instance_merging_trains_on_the_union(outputs):
    # A second domain's data, made by the real generator, then domain=all.
    generate.run(make_config("generate", outputs, "domain=reasoning"))
    cfg = make_config("expert", outputs, "domain=all")
    dirs = {d: Layout.for_model(outputs, "tiny").data(d) for d in ("math", "reasoning")}
    target = expert.train_expert(cfg, "all", dirs)
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["domains"] == ["math", "reasoning"]
    expected = sum(len(read_jsonl(p / "train.jsonl")) for p in dirs.values())
    assert manifest["train_examples"] == expected
    assert target == Layout.for_model(outputs, "tiny").expert("all")
