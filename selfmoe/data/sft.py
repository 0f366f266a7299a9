"""Supervised fine-tuning features: prompt template + response, loss on the response only.

The prompt and the response are tokenized separately and concatenated, so the boundary is
exact: every prompt token gets label ``IGNORE_INDEX`` and every response token (plus EOS) is
learned. Over-long examples keep their prompt and lose the end of the response; an example
whose prompt alone fills ``max_length`` is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from selfmoe.data.prompts import sft_prompt
from selfmoe.data.schema import Example

IGNORE_INDEX = -100  # torch cross-entropy's ignore_index, which HF causal LMs use


@dataclass(frozen=True)
class Features:
    input_ids: list[int]
    labels: list[int]
    domain: int  # index into the DataModule's domain list (routing statistics use it)


def tokenize_example(
    example: Example, tokenizer: PreTrainedTokenizerBase, *, template: str, max_length: int, domain: int = 0
) -> Features | None:
    """Features for one example, or None when its prompt alone does not fit."""
    prompt = sft_prompt(example, template, tokenizer)
    # A chat template writes its own BOS; the Alpaca text needs the tokenizer to add it.
    prompt_ids = tokenizer(prompt, add_special_tokens=template != "chat")["input_ids"]
    response_ids = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) >= max_length:
        return None
    response_ids = response_ids[: max_length - len(prompt_ids)]
    return Features(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        domain=domain,
    )


def loss_tokens(features: Features) -> int:
    """Response tokens that enter the loss: HF shifts labels left, so the first label never counts."""
    return sum(label != IGNORE_INDEX for label in features.labels[1:])


class SFTDataset(Dataset):
    """Tokenized examples, in memory (self-generated sets are thousands of rows, not millions)."""

    def __init__(self, features: Sequence[Features]) -> None:
        self.features = list(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> Features:
        return self.features[index]


def collate(batch: Sequence[Features], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss. No features: a (0, 0) batch."""
    width = max((len(f.input_ids) for f in batch), default=0)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, f in enumerate(batch):
        n = len(f.input_ids)
        input_ids[row, :n] = torch.tensor(f.input_ids)
        labels[row, :n] = torch.tensor(f.labels)
        attention_mask[row, :n] = 1
    domains = torch.tensor([f.domain for f in batch], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "domain": domains}
