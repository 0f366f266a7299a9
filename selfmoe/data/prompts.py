"""Prompt rendering: brainstorming, response generation and the SFT (training) template.

The wording per domain lives in ``configs/domain/<name>.yaml``; the layout of each prompt lives
in the jinja templates beside this module. Nothing here knows about a particular domain.
"""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from selfmoe.data.parsing import format_task_list
from selfmoe.data.schema import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from selfmoe.config import Config, DomainConfig

TEMPLATES = Path(__file__).with_name("templates")
# Markers that end one demonstration in the response prompt: generation is stopped and cut there.
RESPONSE_STOPS = ("### Instruction", "### Response")


@cache
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        keep_trailing_newline=True,
        autoescape=False,
        undefined=jinja2.StrictUndefined,
    )


def _render(name: str, **kwargs) -> str:
    return _env().get_template(name).render(**kwargs)


def task_text(example: Example) -> str:
    """How a seed appears as one task in a brainstorming list."""
    return example.instruction.strip() + (f"\n\n{example.input.strip()}" if example.input.strip() else "")


def brainstorm_prompt(domain: DomainConfig, demos: list[Example]) -> str:
    """Header + requirements + topics, then ``demos`` as Task 1..k and the open header of Task k+1."""
    return _render(
        "brainstorm.j2",
        header=domain.brainstorm.header.strip(),
        requirements=domain.brainstorm.requirements,
        topics=domain.brainstorm.topics,
        tasks=format_task_list([task_text(d) for d in demos]),
    )


def response_prompt(domain: DomainConfig, demos: list[Example], instruction: str) -> str:
    """System line, ``demos`` as instruction/response pairs, then the new instruction."""
    return _render("response.j2", system=domain.response_system.strip(), demos=demos, instruction=instruction.strip())


def sft_prompt(example: Example, template: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The training/eval prompt for ``example`` (the response follows it directly)."""
    if template == "alpaca":
        return _render("alpaca.j2", instruction=example.instruction.strip(), input=example.input.strip())
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("model.template=chat needs a tokenizer with a chat template; use model.template=alpaca")
        content = task_text(example)
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown template {template!r}")


def pretraining_corpus(cfg: Config, docs_per_kind: int = 48) -> list[str]:
    """Text the tiny model is pretrained on: the shipped seeds rendered in every prompt format.

    Deterministic in ``cfg.tiny.seed``. Each domain contributes full brainstorming lists (so the
    model learns to continue "Task k:"), few-shot response prompts with their answers, and the
    Alpaca form of every seed.
    """
    from selfmoe.data.seeds import load_seeds

    rng = random.Random(cfg.tiny.seed)
    docs: list[str] = []
    for name in sorted(cfg.domains):
        domain = cfg.domains[name]
        seeds = load_seeds(
            name, domain.seeds.local, count=domain.seeds.count, seed=cfg.seed, on_bad_line=cfg.data.on_bad_line
        )
        k = min(len(seeds), cfg.data.brainstorm_demos + 3)
        for _ in range(docs_per_kind):
            picked = rng.sample(seeds, k)
            head = brainstorm_prompt(domain, picked[:-1])
            docs.append(head + task_text(picked[-1]))
        n_demos = min(len(seeds) - 1, cfg.data.response_demos)
        for _ in range(docs_per_kind):
            picked = rng.sample(seeds, n_demos + 1)
            docs.append(response_prompt(domain, picked[:-1], picked[-1].instruction) + picked[-1].output)
        docs.extend(sft_prompt(s, "alpaca") + s.output for s in seeds)
    return docs
