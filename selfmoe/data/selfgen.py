"""Self-specialization data: the base model writes a domain's training set (PAPER §1.1).

1. Brainstorming: a domain header plus ``brainstorm_demos`` random seeds as "Task 1..k", then the
   open header "Task k+1:"; the model continues the list (temperature 1.0, top-p 0.98). Every
   complete task it writes is a candidate instruction; candidates pass the instruction filters
   (length, format, seed copy, exact and ROUGE-L near-duplicates) until the target count is met.
2. Responses: ``response_demos`` random seed pairs as demonstrations under a "you are a <domain>
   expert" system line, then the new instruction; greedy decoding, cut at the next demo marker;
   responses pass their own length/format checks.

Every drop is counted by reason, so the manifest says what each filter removed. A prompt that
cannot fit the model's context with its generation, even with a single demo, is skipped or
left-truncated (``data.overlong``) and counted; empty generations are counted per stage.

The generator is called with every prompt of a step at once (a brainstorming round of
``brainstorm_batches_per_round`` batches, or all the responses due), so a
:class:`~selfmoe.data.sharded.ShardedGenerator` can spread the batches over ranks. Everything
here is deterministic given the generator's outputs, which is what makes the sharded run
independent of the world size and a journaled run resumable.
"""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from selfmoe.config import DataConfig, DomainConfig
from selfmoe.data.filters import InstructionFilter, check_response
from selfmoe.data.generation import Completion, TextGenerator
from selfmoe.data.parsing import clean_response, parse_tasks
from selfmoe.data.prompts import RESPONSE_STOPS, brainstorm_prompt, response_prompt
from selfmoe.data.schema import Example
from selfmoe.errors import ConfigError

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class SelfGenResult:
    items: list[Example]
    rejected: list[Example] = field(default_factory=list)  # answered, then dropped (meta["drop"])
    counts: Counter[str] = field(default_factory=Counter)
    prompts_shortened: int = 0
    prompts_overlong: Counter[str] = field(default_factory=Counter)  # by stage: did not fit the context
    empty_generations: Counter[str] = field(default_factory=Counter)  # by stage: the model wrote nothing
    overlong_policy: str = "skip"
    instructions_cut: int = 0  # brainstormed tasks cut at a response-format marker
    brainstorm_batches: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def stats(self) -> dict[str, Any]:
        return {
            "kept": len(self.items),
            "counts": dict(sorted(self.counts.items())),
            "prompts_shortened": self.prompts_shortened,
            "prompts_overlong": dict(sorted(self.prompts_overlong.items())),
            "overlong_policy": self.overlong_policy,
            "empty_generations": dict(sorted(self.empty_generations.items())),
            "instructions_cut": self.instructions_cut,
            "brainstorm_batches": self.brainstorm_batches,
            "generated_tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else 0.0,
        }


def domain_seed(seed: int, domain: str) -> int:
    """A per-domain RNG seed that does not depend on Python's randomised str hash."""
    return seed * 1_000_003 + zlib.crc32(domain.encode())


def _fit(
    build: Callable[[list[Example]], str], demos: list[Example], gen: TextGenerator, budget: int
) -> tuple[str, int, int]:
    """Render with as many demos as fit in ``budget`` prompt tokens; returns (prompt, demos used, tokens)."""
    for n in range(len(demos), 1, -1):  # one demo is the floor, fit or not
        prompt = build(demos[:n])
        tokens = gen.count_tokens(prompt)
        if tokens <= budget:
            return prompt, n, tokens
    prompt = build(demos[:1])
    return prompt, 1, gen.count_tokens(prompt)


def self_generate(
    gen: TextGenerator,
    domain: DomainConfig,
    seeds: Sequence[Example],
    data: DataConfig,
    *,
    target: int,
    seed: int,
    progress: Progress | None = None,
) -> SelfGenResult:
    """Generate until ``target`` items survive every filter (or brainstorming stalls)."""
    if not seeds:
        raise ValueError("self-generation needs at least one seed example")
    return _SelfGeneration(gen, domain, list(seeds), data, seed=seed, progress=progress).run(target)


class _SelfGeneration:
    """One domain's generation run: alternates brainstorming batches and response batches.

    Responses are requested as soon as a batch's worth of instructions is pending, and only as
    many as are still needed, so items dropped at the response stage are made up for by more
    brainstorming instead of leaving the set short.
    """

    def __init__(self, gen, domain, seeds, data, *, seed, progress) -> None:
        self.gen, self.domain, self.seeds, self.data, self.progress = gen, domain, seeds, data, progress
        self.rng = random.Random(domain_seed(seed, domain.name))
        self.result = SelfGenResult(items=[])
        checks = domain.checks
        self.keep = InstructionFilter(
            [s.instruction for s in seeds],
            rouge_threshold=data.rouge_threshold,
            min_words=checks.min_instruction_words,
            max_words=checks.max_instruction_words,
            pattern=checks.instruction_pattern,
        )
        self.pending: list[str] = []
        self.answered = 0
        self.result.overlong_policy = data.overlong
        self.context = data.context_length or getattr(gen, "context_length", None)
        for key in ("max_new_tokens_brainstorm", "max_new_tokens_response"):
            if self.context is not None and getattr(data, key) >= self.context:
                raise ConfigError(
                    f"data.{key}={getattr(data, key)} leaves no room for a prompt in the model's context of "
                    f"{self.context} tokens: lower it, or set data.context_length if the model's is wrong."
                )

    def _limit(self, max_new: int) -> int | None:
        """The most prompt tokens that leave ``max_new`` tokens of the context free (None: unknown context)."""
        return None if self.context is None else self.context - max_new

    def _truncation(self, max_new: int) -> dict[str, int]:
        """The generate() kwargs of the overlong policy; every prompt of a call gets the same ones."""
        limit = self._limit(max_new)
        return {"truncate_to": limit} if limit is not None and self.data.overlong == "truncate" else {}

    def _prompt(
        self, build: Callable[[list[Example]], str], demos: list[Example], stage: str, max_new: int
    ) -> tuple[str | None, int]:
        """(prompt, demos used); the prompt is None when it does not fit and the policy is skip.

        Demos are dropped to fit ``data.max_prompt_tokens`` and the context, one demo being the
        floor; a prompt still too long for the context is counted as overlong.
        """
        limit = self._limit(max_new)
        budget = self.data.max_prompt_tokens if limit is None else min(self.data.max_prompt_tokens, limit)
        prompt, used, tokens = _fit(build, demos, self.gen, budget)
        self.result.prompts_shortened += used < len(demos)
        if limit is not None and tokens > limit:
            self.result.prompts_overlong[stage] += 1
            if self.data.overlong == "skip":
                return None, used
        return prompt, used

    def run(self, target: int) -> SelfGenResult:
        data, result = self.data, self.result
        tokens0, seconds0 = self.gen.throughput.tokens, self.gen.throughput.seconds
        max_batches = data.max_brainstorm_batches or 20 * math.ceil(target / data.batch_size) + data.max_idle_batches
        idle = 0
        # A model that cannot follow the format ends the phase instead of looping forever.
        while len(result.items) < target and result.brainstorm_batches < max_batches and idle < data.max_idle_batches:
            needed = target - len(result.items)
            if len(self.pending) < needed:
                # A round of several batches keeps several ranks busy; near the target it shrinks,
                # so the last round does not brainstorm far more than is still missing.
                batches = min(
                    data.brainstorm_batches_per_round,
                    math.ceil((needed - len(self.pending)) / data.batch_size),
                    max_batches - result.brainstorm_batches,
                )
                idle = 0 if self._brainstorm(batches) else idle + 1
            if len(self.pending) >= min(needed, data.batch_size):
                self._respond(needed)
        if self.pending and len(result.items) < target:
            self._respond(target - len(result.items))
        result.counts["over_target"] += len(self.pending)
        result.counts.update({k: v for k, v in self.keep.counts.items() if k != "kept"})
        result.tokens = self.gen.throughput.tokens - tokens0
        result.seconds = self.gen.throughput.seconds - seconds0
        return result

    def _report(self, stage: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(stage, done, total)

    def _brainstorm(self, batches: int) -> int:
        """One round of ``batches`` brainstorming batches; returns how many new instructions passed the filters."""
        data, result = self.data, self.result
        k = min(data.brainstorm_demos, len(self.seeds))
        prompts, firsts = [], []
        for _ in range(data.batch_size * batches):
            demos = self.rng.sample(self.seeds, k)
            build = lambda d: brainstorm_prompt(self.domain, d)  # noqa: E731
            prompt, used = self._prompt(build, demos, "brainstorm", data.max_new_tokens_brainstorm)
            if prompt is not None:
                prompts.append(prompt)
                firsts.append(used + 1)  # the prompt ends with the open header "Task {used + 1}:"
        outs = self.gen.generate(
            prompts,
            max_new_tokens=data.max_new_tokens_brainstorm,
            do_sample=True,
            temperature=data.temperature,
            top_p=data.top_p,
            seed=self.rng.randrange(1 << 31),
            **self._truncation(data.max_new_tokens_brainstorm),
        )
        before = len(self.pending)
        for out, first in zip(outs, firsts, strict=True):
            if not out.text.strip():
                result.empty_generations["brainstorm"] += 1
                continue
            parsed = parse_tasks(out.text, first_number=first, complete=out.complete)
            result.counts["malformed"] += parsed.malformed
            result.counts["partial"] += parsed.partial
            for text in parsed.items:
                # A task that drifts into the response format ("### Response: ...") is cut there:
                # what precedes the marker is the task, the rest would leak into the SFT prompt.
                cut = clean_response(text, stop_markers=RESPONSE_STOPS)
                result.instructions_cut += cut != text
                if self.keep(cut) is None:
                    self.pending.append(cut)
        result.brainstorm_batches += batches
        self._report("brainstorm", self.keep.counts["kept"], self.keep.counts["kept"])
        return len(self.pending) - before

    def _respond(self, needed: int) -> None:
        """Answer up to ``needed`` pending instructions (greedy, few-shot) in one call of several batches."""
        data, result = self.data, self.result
        take, self.pending = self.pending[:needed], self.pending[needed:]
        n_demos = min(data.response_demos, len(self.seeds))
        prompts: list[str | None] = []
        for text in take:
            demos = self.rng.sample(self.seeds, n_demos)
            build = lambda d, t=text: response_prompt(self.domain, d, t)  # noqa: E731
            prompts.append(self._prompt(build, demos, "response", data.max_new_tokens_response)[0])
        outs = iter(
            self.gen.generate(
                [p for p in prompts if p is not None],
                max_new_tokens=data.max_new_tokens_response,
                do_sample=False,
                stop_strings=RESPONSE_STOPS,
                **self._truncation(data.max_new_tokens_response),
            )
        )
        # Items are numbered in instruction order, skipped ones included, so ids never depend on
        # which prompts happened to be overlong.
        for text, prompt in zip(take, prompts, strict=True):
            self._record(text, None if prompt is None else next(outs))
        self._report("respond", len(result.items), len(result.items) + len(self.pending))

    def _record(self, instruction: str, out: Completion | None) -> None:
        """Check one answer and file it as an item or a rejected one (``out`` None: prompt skipped)."""
        result, checks = self.result, self.domain.checks
        if out is None:
            response, reason = "", "prompt_overlong"
        else:
            if not out.text.strip():
                result.empty_generations["response"] += 1
            response = clean_response(out.text, stop_markers=RESPONSE_STOPS)
            reason = None if out.complete else "response_truncated"
            reason = reason or check_response(
                response,
                min_words=checks.min_response_words,
                max_words=checks.max_response_words,
                pattern=checks.response_pattern,
            )
        item = Example(
            id=f"{self.domain.name}/gen-{self.answered:06d}",
            domain=self.domain.name,
            instruction=instruction,
            output=response,
            source="generated",
            meta={"drop": reason} if reason else {},
        )
        self.answered += 1
        if reason:
            result.counts[reason] += 1
            result.rejected.append(item)
        else:
            result.items.append(item)


def split_train_val(items: Sequence[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle split; at least one val item whenever there are two or more items."""
    order = list(items)
    random.Random(seed).shuffle(order)
    n_val = 0 if val_fraction == 0 or len(order) < 2 else max(1, round(len(order) * val_fraction))
    return order[n_val:], order[:n_val]
