"""Test doubles for sharded generation: a backend whose outputs are a pure function of each
prompt and decoding options, and a collective whose "ranks" are threads of one process."""

from __future__ import annotations

import hashlib
import random
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from selfmoe.config import BrainstormConfig, ChecksConfig, DataConfig, DomainConfig
from selfmoe.data.generation import Completion
from selfmoe.data.schema import Example

DOMAIN = DomainConfig(
    name="toy",
    brainstorm=BrainstormConfig(header="Write tasks.", requirements=["One answer each."], topics=["words"]),
    response_system="You are a toy expert.",
    checks=ChecksConfig(min_instruction_words=3, max_instruction_words=60, response_pattern="answer is"),
)
SEEDS = [
    Example(id=f"toy/s{i}", domain="toy", instruction=f"Seed task number {w} about apples.", output="The answer is 1.")
    for i, w in enumerate(["one", "two", "three", "four", "five"])
]
DATA = DataConfig(
    batch_size=3,
    brainstorm_demos=2,
    response_demos=2,
    brainstorm_batches_per_round=3,
    max_new_tokens_brainstorm=64,
    max_new_tokens_response=32,
    max_prompt_tokens=10_000,
    max_idle_batches=3,
)
WORDS = [f"w{i}" for i in range(400)]
HEADER = re.compile(r"Task (\d+):\n\Z")


def _rng(*parts: Any) -> random.Random:
    return random.Random(hashlib.sha256(repr(parts).encode()).digest())


class PureBackend:
    """Duck-types TextGenerator: each completion depends only on its prompt and the batch's options.

    Sampled completions also depend on the batch's seed and the prompt's position in the batch,
    as a real sampler's would. Records every batch it was asked for.
    """

    def __init__(self, fail_after: int | None = None, empty_every: int = 0) -> None:
        self.calls: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        self.fail_after = fail_after
        self.empty_every = empty_every
        self.context_length: int | None = None

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompts: Sequence[str], **options: Any) -> list[Completion]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append((tuple(prompts), dict(options)))
        return [self._one(i, p, options) for i, p in enumerate(prompts)]

    def _one(self, i: int, prompt: str, options: dict[str, Any]) -> Completion:
        if options["do_sample"]:
            rng = _rng(prompt, options["seed"], i)
            if self.empty_every and rng.randrange(self.empty_every) == 0:
                return Completion(text="", complete=True, num_tokens=1)
            first = int(HEADER.search(prompt).group(1))
            tasks = [" ".join(rng.sample(WORDS, 6)) for _ in range(rng.randrange(1, 4))]
            text = f"\n\nTask {first + 1}:\n".join(tasks) + f"\n\nTask {first + len(tasks)}:\n"
            return Completion(text=text, complete=True, num_tokens=len(text.split()))
        rng = _rng(prompt)
        answer = "no idea" if rng.random() < 0.2 else f"The answer is {rng.randrange(100)}."
        return Completion(text=answer, complete=True, num_tokens=len(answer.split()))


class ThreadGroup:
    """``world_size`` thread "ranks" exchanging objects through a barrier."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=60)
        self._slots: list[Any] = [None] * world_size

    def member(self, rank: int) -> ThreadCollective:
        return ThreadCollective(self, rank)

    def run(self, fn: Callable[[ThreadCollective], Any]) -> list[Any]:
        """``fn(collective)`` on every rank at once; every rank's result (or its exception re-raised)."""
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException] = []

        def main(rank: int) -> None:
            try:
                results[rank] = fn(self.member(rank))
            except BaseException as exc:  # re-raised in the caller
                errors.append(exc)
                self._barrier.abort()  # the other ranks stop waiting, as a dead process group would

        threads = [threading.Thread(target=main, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return results


class ThreadCollective:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def _exchange(self, obj: Any) -> list[Any]:
        self.group._slots[self.rank] = obj
        self.group._barrier.wait()
        out = list(self.group._slots)
        self.group._barrier.wait()  # nobody overwrites a slot before every rank has read it
        return out

    def broadcast(self, obj: Any) -> Any:
        return self._exchange(obj)[0]

    def all_gather(self, obj: Any) -> list[Any]:
        return self._exchange(obj)

    def barrier(self) -> None:
        self.group._barrier.wait()
