"""Self-Instruct-style filters for generated instructions and responses.

The paper describes no filtering (PAPER.md §1.1 step 4, left as future work); we add the
usual Self-Instruct checks, each configurable and each counted so the pipeline can report how
many items it dropped and why:

- instructions: empty / too short / too long (word counts), optional format regex, copies a
  seed (exact after :func:`normalize`, or ROUGE-L >= threshold), exact duplicate of an
  accepted instruction, near duplicate (ROUGE-L >= threshold) of an accepted instruction;
- responses: empty / too short / too long, optional format regex.

ROUGE-L here is exactly ``rouge_score``'s: ``RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure``
with its default tokenizer and no stemming. Comparing each of 5,000 candidates per domain
against every accepted one is ~12M LCS computations, far too slow in pure Python, so
:class:`RougeLIndex` tokenizes each text once, finds candidates through an inverted index,
discards pairs whose exact upper bound (multiset token overlap) cannot reach the threshold,
and computes the LCS of the survivors with a bit-parallel algorithm. The result is identical
to brute force; tests check this.
"""

from __future__ import annotations

import collections
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np
from rouge_score import scoring
from rouge_score import tokenize as rouge_tokenize

__all__ = [
    "InstructionFilter",
    "RougeLIndex",
    "check_response",
    "normalize",
    "rouge_tokens",
]

# Scores are floats computed by rouge_score's formula (2PR/(P+R)), which can differ from the
# exact 2*LCS/(|a|+|b|) in the last bits. Upper bounds are compared with this much slack so
# that rounding can never prune a pair that brute force would count.
_BOUND_SLACK = 1e-9


def normalize(text: str) -> str:
    """Canonical form for exact-duplicate checks: lowercase, whitespace collapsed, surrounding punctuation removed.

    "Punctuation" means any Unicode punctuation or symbol character (a superset of
    :data:`string.punctuation`), so ``"What is 2+2?"`` and ``"  what is 2+2 "`` are equal.
    """
    collapsed = " ".join(text.lower().split())
    start, end = 0, len(collapsed)
    while start < end and _is_trim_char(collapsed[start]):
        start += 1
    while end > start and _is_trim_char(collapsed[end - 1]):
        end -= 1
    return collapsed[start:end]


def _is_trim_char(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch)[0] in "PS"


def rouge_tokens(text: str) -> list[str]:
    """``rouge_score``'s default tokenization (lowercase alphanumeric runs, no stemming)."""
    return rouge_tokenize.tokenize(text, None)


def _rouge_f(lcs: int, len_target: int, len_prediction: int) -> float:
    """F-measure exactly as ``rouge_scorer._score_lcs`` computes it (same float operations)."""
    if lcs == 0:
        return 0.0
    return scoring.fmeasure(lcs / len_prediction, lcs / len_target)


class _Postings:
    """A growable pair of int arrays (document id, token count in that document) for one token."""

    __slots__ = ("counts", "docs", "size")

    def __init__(self) -> None:
        self.docs = np.empty(4, dtype=np.int64)
        self.counts = np.empty(4, dtype=np.int64)
        self.size = 0

    def append(self, doc: int, count: int) -> None:
        if self.size == len(self.docs):
            # Doubling keeps appends amortised O(1) while queries read contiguous arrays.
            self.docs = np.concatenate([self.docs, np.empty_like(self.docs)])
            self.counts = np.concatenate([self.counts, np.empty_like(self.counts)])
        self.docs[self.size] = doc
        self.counts[self.size] = count
        self.size += 1


class RougeLIndex:
    """Near-duplicate search by ROUGE-L F-measure (rouge-score's definition and tokenizer).

    Each indexed text is tokenized once and stored as per-token bit masks (for a bit-parallel
    LCS) and in an inverted index (token -> texts containing it, with counts). A query only
    scores texts that share a token with it and whose overlap bound
    ``2 * |multiset intersection| / (|a| + |b|)`` (which is >= the true F, since
    LCS <= intersection <= min(|a|, |b|)) can reach what is being looked for. Results are
    identical to scoring every pair with ``rouge_score``.
    """

    def __init__(self, threshold: float, texts: Iterable[str] = ()) -> None:
        """Index ``texts``; ``threshold`` is the F-measure at or above which a pair is a near duplicate."""
        self.threshold = float(threshold)
        self._vocab: dict[str, int] = {}
        self._postings: list[_Postings] = []
        self._masks: list[dict[int, int]] = []  # per text: token id -> bit mask of its positions
        self._lengths = np.zeros(16, dtype=np.int64)
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self._masks)

    def add(self, text: str) -> None:
        """Index one more text."""
        self._add_tokens(rouge_tokens(text))

    def max_score(self, text: str) -> float:
        """Highest ROUGE-L F-measure between ``text`` and any indexed text (0.0 if none)."""
        return self._max_score_tokens(rouge_tokens(text))

    def is_near_duplicate(self, text: str) -> bool:
        """Whether some indexed text scores ROUGE-L F >= ``threshold`` against ``text``."""
        return self._is_near_duplicate_tokens(rouge_tokens(text))

    # The token-level methods let InstructionFilter tokenize a candidate once for two indexes.

    def _add_tokens(self, tokens: list[str]) -> None:
        doc = len(self._masks)
        masks: dict[int, int] = {}
        for pos, token in enumerate(tokens):
            tid = self._vocab.get(token)
            if tid is None:
                tid = self._vocab[token] = len(self._postings)
                self._postings.append(_Postings())
            masks[tid] = masks.get(tid, 0) | (1 << pos)
        for tid, mask in masks.items():
            self._postings[tid].append(doc, mask.bit_count())
        self._masks.append(masks)
        if doc == len(self._lengths):
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
        self._lengths[doc] = len(tokens)

    def _candidates(self, tokens: list[str], min_bound: float) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Indexed texts whose overlap bound is >= ``min_bound``, best bound first.

        Returns (doc ids, their bounds, the query as token ids with unknown tokens left out:
        a token no indexed text has cannot be part of any LCS).
        """
        counts: dict[int, int] = {}
        query_ids: list[int] = []
        for token in tokens:
            tid = self._vocab.get(token)
            if tid is not None:
                counts[tid] = counts.get(tid, 0) + 1
                query_ids.append(tid)
        empty = np.empty(0, dtype=np.int64)
        if not counts:
            return empty, np.empty(0, dtype=np.float64), query_ids
        docs_parts, weight_parts = [], []
        for tid, count in counts.items():
            postings = self._postings[tid]
            docs_parts.append(postings.docs[: postings.size])
            weight_parts.append(np.minimum(postings.counts[: postings.size], count))
        n_docs = len(self._masks)
        overlap = np.bincount(np.concatenate(docs_parts), np.concatenate(weight_parts), minlength=n_docs)
        bound = 2.0 * overlap / (self._lengths[:n_docs] + len(tokens))
        docs = np.flatnonzero((overlap > 0) & (bound >= min_bound))
        if len(docs) == 0:
            return empty, np.empty(0, dtype=np.float64), query_ids
        order = np.argsort(-bound[docs], kind="stable")
        return docs[order], bound[docs[order]], query_ids

    def _lcs(self, doc: int, query_ids: list[int]) -> int:
        # Bit-parallel LCS (Hyyrö 2004): one big-int update per query token instead of a row
        # of the DP table; bit i of v is 0 where the LCS gained a match at document position i.
        masks = self._masks[doc]
        length = int(self._lengths[doc])
        full = (1 << length) - 1
        v = full
        for tid in query_ids:
            u = v & masks.get(tid, 0)
            v = ((v + u) | (v - u)) & full
        return length - v.bit_count()

    def _score(self, doc: int, query_ids: list[int], query_len: int) -> float:
        return _rouge_f(self._lcs(doc, query_ids), int(self._lengths[doc]), query_len)

    def _max_score_tokens(self, tokens: list[str]) -> float:
        docs, bounds, query_ids = self._candidates(tokens, 0.0)
        best = 0.0
        for doc, bound in zip(docs.tolist(), bounds.tolist(), strict=True):
            if bound + _BOUND_SLACK < best:
                break  # bounds are sorted, so no later text can beat ``best``
            best = max(best, self._score(doc, query_ids, len(tokens)))
        return best

    def _is_near_duplicate_tokens(self, tokens: list[str]) -> bool:
        if not self.threshold > 0.0:
            # Every pair scores >= 0 (texts without common tokens score exactly 0, which the
            # inverted index never visits), so any indexed text is a match; NaN matches nothing.
            return bool(self._masks) and self.threshold <= 0.0
        docs, _, query_ids = self._candidates(tokens, self.threshold - _BOUND_SLACK)
        return any(self._score(doc, query_ids, len(tokens)) >= self.threshold for doc in docs.tolist())


def _word_count(text: str) -> int:
    return len(text.split())


class InstructionFilter:
    """Accept or reject generated instructions one at a time, Self-Instruct style.

    Call it on each candidate in generation order: it returns ``None`` when the candidate is
    accepted (it then joins the pool later candidates are compared against) or the reason it
    was dropped. Reasons, checked in this order: ``"empty"``, ``"too_short"``, ``"too_long"``,
    ``"bad_format"``, ``"copies_seed"``, ``"duplicate"``, ``"near_duplicate"``. ``counts``
    tallies every reason plus ``"kept"``; ``accepted`` lists the accepted texts in order.
    """

    def __init__(
        self,
        seeds: Sequence[str],
        *,
        rouge_threshold: float = 0.7,
        min_words: int = 3,
        max_words: int = 300,
        pattern: str | None = None,
    ) -> None:
        """Compare candidates against ``seeds`` and each other; ``pattern`` is a regex every kept text must contain."""
        self.rouge_threshold = rouge_threshold
        self.min_words = min_words
        self.max_words = max_words
        # Compiled up front so a bad pattern fails at configuration time, not mid-generation.
        self.pattern = re.compile(pattern, re.S) if pattern is not None else None
        self._seed_norms = {normalize(s) for s in seeds}
        self._seed_index = RougeLIndex(rouge_threshold, seeds)
        self._pool_norms: set[str] = set()
        self._pool_index = RougeLIndex(rouge_threshold)
        self.accepted: list[str] = []
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, text: str) -> str | None:
        """Check one candidate: ``None`` if accepted (and added to the pool), else the drop reason."""
        reason = self._reason(text)
        self.counts[reason or "kept"] += 1
        return reason

    def _reason(self, text: str) -> str | None:
        if not text.strip():
            return "empty"
        words = _word_count(text)
        if words < self.min_words:
            return "too_short"
        if words > self.max_words:
            return "too_long"
        if self.pattern is not None and self.pattern.search(text) is None:
            return "bad_format"
        norm = normalize(text)
        tokens = rouge_tokens(text)
        if norm in self._seed_norms or self._seed_index._is_near_duplicate_tokens(tokens):
            return "copies_seed"
        if norm in self._pool_norms:
            return "duplicate"
        if self._pool_index._is_near_duplicate_tokens(tokens):
            return "near_duplicate"
        self._pool_norms.add(norm)
        self._pool_index._add_tokens(tokens)
        self.accepted.append(text)
        return None


def check_response(text: str, *, min_words: int = 1, max_words: int = 1000, pattern: str | None = None) -> str | None:
    """Check one generated response: ``None`` if usable, else the drop reason.

    Reasons, in order: ``"empty_response"``, ``"response_too_short"``, ``"response_too_long"``
    (word counts), ``"response_bad_format"`` (``pattern`` given and ``re.search(pattern, text, re.S)``
    finds nothing; e.g. a coding response must contain ``def``).
    """
    if not text.strip():
        return "empty_response"
    words = _word_count(text)
    if words < min_words:
        return "response_too_short"
    if words > max_words:
        return "response_too_long"
    if pattern is not None and re.search(pattern, text, re.S) is None:
        return "response_bad_format"
    return None
