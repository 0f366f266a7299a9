"""The optimizer step is the global batch's, whatever the world size and the accumulation.

Module level, on a toy Llama and toy data whose examples have very different response lengths
(so a per-micro-batch mean would differ from the global token mean): the router and a LoRA
expert trained on 2 ranks (``ddp_notebook``, gloo) equal 1 process accumulating 2 micro-batches,
and equal 1 process with micro batch = global batch. The global batch composition itself is
checked for any world size. Tolerance: atol 1e-6 on fp32 weights (only the order of float
additions differs: DDP's all-reduce vs. accumulation in ``.grad``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from selfmoe.config import grad_accumulation, load_config
from selfmoe.data.batching import EpochPermutation, GlobalBatchSampler
from selfmoe.data.datamodule import SFTDataModule
from selfmoe.data.prompts import sft_prompt
from selfmoe.data.schema import Example, write_jsonl
from selfmoe.models.mixse import RouterSettings, build_mixse, read_expert
from selfmoe.models.tiny import build_tokenizer
from selfmoe.training.expert import ExpertLitModule
from selfmoe.training.router import RouterLitModule
from selfmoe.training.sft import trainable_parameters
from selfmoe.training.trainer import build_trainer
from tests.conftest import FirstStep

TARGETS = ["q_proj", "v_proj", "down_proj"]
DOMAINS = ["math", "reasoning"]  # configured domain names; the toy content is letters vs digits
ATOL = 1e-6
GLOBAL_BATCH = 4


def toy_examples(domain: str, n: int, offset: int = 0) -> list[Example]:
    """Responses from 1 to ~25 words, so micro-batches hold very different token counts."""
    rows = []
    for i in range(offset, offset + n):
        words = 1 + (i * 7) % 25
        if domain == "math":
            text = " ".join(chr(97 + (i + j) % 5) * 3 for j in range(words))
        else:
            text = " ".join(str((i * j) % 10) for j in range(words))
        rows.append(Example(id=f"{domain}/{i}", domain=domain, instruction=f"Continue {i}.", output=text))
    return rows


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Data dirs (11 train examples per domain: a short last global batch), tokenizer, base config."""
    root = tmp_path_factory.mktemp("toy")
    dirs = {}
    for d in DOMAINS:
        write_jsonl(root / d / "train.jsonl", toy_examples(d, 11))
        write_jsonl(root / d / "val.jsonl", toy_examples(d, 3, offset=100))
        dirs[d] = root / d
    corpus = [sft_prompt(e, "alpaca") + e.output for d in DOMAINS for e in toy_examples(d, 11)]
    tok = build_tokenizer(corpus, 300)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    experts = []
    for i, d in enumerate(DOMAINS):
        model = base(config)
        torch.manual_seed(10 + i)  # after base(), which seeds: two different random experts
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(root / "experts" / d)
        experts.append(read_expert(d, root / "experts" / d))
    return {"dirs": dirs, "tok": tok, "config": config, "experts": experts, "root": root}


def base(config: LlamaConfig) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def train(
    toy,
    tmp_path: Path,
    kind: str,
    *,
    devices: int,
    micro: int,
    aux: float = 0.0,
    top_k: int | None = None,
    callbacks: list[L.Callback] | None = None,
    every_n_steps: int = 0,
    resume: bool = False,
    num_workers: int = 0,
) -> dict[str, torch.Tensor]:
    """Fit a router or an expert for 2 epochs (or resume its run); return its trainable weights."""
    section = "router" if kind == "router" else "expert"
    cfg = load_config(
        section,
        [
            "trainer.accelerator=cpu",
            f"trainer.devices={devices}",
            f"trainer.strategy={'ddp_notebook' if devices > 1 else 'auto'}",
            "trainer.logger=none",
            "trainer.progress_bar=false",
            f"{section}.global_batch_size={GLOBAL_BATCH}",
            f"{section}.micro_batch_size={micro}",
            f"{section}.epochs=2",
            f"{section}.lr=5e-2",
            f"{section}.warmup_ratio=0.0",
            f"router.experts=[{','.join(DOMAINS)}]",
            f"router.top_k={'null' if top_k is None else top_k}",
            f"router.aux_loss_coef={aux}",
            "expert.lora.dropout=0.0",  # each rank draws its own dropout masks: only exact without
        ],
    )
    L.seed_everything(0)
    if kind == "router":
        model = build_mixse(base(toy["config"]), toy["experts"], RouterSettings(top_k=top_k))
        module = RouterLitModule(model, cfg.router)
        optim = cfg.router
    else:
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
        model = get_peft_model(base(toy["config"]), lora)
        module = ExpertLitModule(model, cfg.expert)
        optim = cfg.expert
    dm = SFTDataModule(
        toy["dirs"],
        toy["tok"],
        template="alpaca",
        max_length=256,
        micro_batch_size=optim.micro_batch_size,
        global_batch_size=optim.global_batch_size,
        balance=kind == "router",
        num_workers=num_workers,
    )
    dm.setup()
    initial = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    run_dir = tmp_path / f"{kind}-{devices}x{micro}-aux{aux}-top{top_k}"
    trainer = build_trainer(
        cfg,
        run_dir,
        max_epochs=2,
        accumulate=grad_accumulation(cfg),
        checkpoint_every_n_steps=every_n_steps,
        callbacks=callbacks,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.fit(module, datamodule=dm, ckpt_path=last if resume else None, weights_only=True)
    trained = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    assert any(not torch.allclose(initial[n], trained[n]) for n in trained), "nothing trained"
    return trained


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("kind", ["router", "expert"])
def test_two_ranks_accumulation_and_one_big_batch_take_the_same_steps(toy, tmp_path, kind):
    accumulating = train(toy, tmp_path, kind, devices=1, micro=2)  # 2 micro-batches per step
    assert_same_weights(train(toy, tmp_path, kind, devices=1, micro=GLOBAL_BATCH), accumulating)
    assert_same_weights(train(toy, tmp_path, kind, devices=2, micro=2), accumulating)  # 1 per rank per step


def test_router_load_balancing_term_does_not_depend_on_the_world_size(toy, tmp_path):
    """The aux term is a mean over the step's micro-batches: the same micro-batches at any world size,
    but (documented) not the same objective as one micro-batch of the whole global batch."""
    accumulating = train(toy, tmp_path, "router", devices=1, micro=2, aux=1.0, top_k=1)
    assert_same_weights(train(toy, tmp_path, "router", devices=2, micro=2, aux=1.0, top_k=1), accumulating)
    one_batch = train(toy, tmp_path, "router", devices=1, micro=GLOBAL_BATCH, aux=1.0, top_k=1)
    assert any(not torch.allclose(accumulating[n], one_batch[n], rtol=0, atol=ATOL) for n in one_batch)


class CrashAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize(("devices", "num_workers"), [(1, 0), (2, 0), (1, 2)])
def test_router_resumes_mid_epoch_exactly(toy, tmp_path, devices, num_workers):
    """12 steps (6 per epoch); a crash after step 8 and a resume from its checkpoint end where a straight run
    ends. With loader workers, batches are fetched ahead of training: the saved position is what trained."""
    run = {"devices": devices, "micro": 2, "every_n_steps": 1, "num_workers": num_workers}
    straight = train(toy, tmp_path / "straight", "router", **run)
    with pytest.raises(Exception, match="simulated crash"):
        train(toy, tmp_path / "crashed", "router", **run, callbacks=[CrashAtStep(8)])
    resumed = train(toy, tmp_path / "crashed", "router", **run, resume=True, callbacks=[FirstStep(tmp_path / "first")])
    assert (tmp_path / "first").read_text() == "8"  # it did resume (a fresh run would end the same way)
    assert_same_weights(resumed, straight)


class FirstStepLoss(L.Callback):
    """The logged train/loss right after the first optimizer step."""

    loss: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1 and self.loss is None:
            self.loss = float(trainer.callback_metrics["train/loss"])


def test_logged_train_loss_is_the_global_batch_token_mean(toy, tmp_path):
    """Computed here by hand: per-example summed NLL of the first global batch, over its tokens."""
    dm = SFTDataModule(toy["dirs"], toy["tok"], template="alpaca", max_length=256, micro_batch_size=4)
    dm.setup()
    first = next(iter(dm.train_dataloader()))["step"]
    assert first == {
        "epoch": 0,
        "step": 0,
        "micro": 0,
        "accumulation": 1,
        "tokens": first["tokens"],
        "micro_batches": 1,
    }
    order = dm.train_sampler.sampler.order(0)[:GLOBAL_BATCH]
    L.seed_everything(0)
    model = get_peft_model(base(toy["config"]), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in order:
            f = dm.datasets["train"][i]
            logits = model(input_ids=torch.tensor([f.input_ids])).logits[0, :-1]
            labels = torch.tensor(f.labels[1:])
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            tokens += int((labels != -100).sum())
    assert tokens == first["tokens"]
    probe = FirstStepLoss()
    train(toy, tmp_path, "expert", devices=1, micro=2, callbacks=[probe])  # 2 micro-batches of unequal length
    assert probe.loss == pytest.approx(total / tokens, rel=1e-5)


@pytest.mark.parametrize("n", [1, 7, 8, 13])
@pytest.mark.parametrize(("world", "micro"), [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1)])
def test_global_batches_are_the_same_at_any_world_size(n, world, micro):
    tokens = [3 * i + 1 for i in range(n)]
    g = 4

    def steps(world: int, micro: int) -> list[tuple[list[int], int, int]]:
        samplers = [
            GlobalBatchSampler(
                EpochPermutation(n, seed=3),
                tokens,
                global_batch_size=g,
                micro_batch_size=micro,
                world_size=world,
                rank=r,
            )
            for r in range(world)
        ]
        for s in samplers:
            s.sampler.set_epoch(1)
        streams = [list(s) for s in samplers]
        assert len({len(s) for s in streams}) == 1 and len(streams[0]) == len(samplers[0])
        out = []
        acc = samplers[0].accumulation
        for step in range(len(streams[0]) // acc):
            micro_batches = [streams[r][step * acc + k] for r in range(world) for k in range(acc)]
            plans = [mb[0][1] for mb in micro_batches]
            assert len({(p["step"], p["tokens"], p["micro_batches"]) for p in plans}) == 1
            indices = sorted(i for mb in micro_batches for i, _ in mb if i is not None)
            assert plans[0]["tokens"] == sum(tokens[i] for i in indices)
            assert plans[0]["micro_batches"] == sum(1 for mb in micro_batches if mb[0][0] is not None)
            out.append((indices, plans[0]["tokens"], plans[0]["micro_batches"]))
        return out

    reference = steps(1, g)
    got = steps(world, micro)
    assert [s[:2] for s in got] == [s[:2] for s in reference]
    assert sorted(i for s in got for i in s[0]) == list(range(n))  # every example once per epoch
