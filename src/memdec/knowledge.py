"""Knowledge-heavy positions: names and numbers that recur between the memory and held-out text.

The kNN signal is built for facts a model can only know from the domain corpus: a character's
name, a place, a date. The paper reports such long-tail tokens separately; here the subset is
defined from token ids alone, so it is the same for every model that shares the tokenizer:

- a *name* is a capitalised word in the middle of a sentence (its first token starts with a
  space and an upper-case letter, or follows a lone space token, and the token before it does
  not end a sentence), together
  with the letter-only tokens that continue it (``" Went" "worth"``); the pronoun "I" is not one;
- a *number* is a run of tokens that each hold a digit;
- a name or number *recurs* when the same token sequence occurs as a name or number in the
  memory's token stream (the datastore's corpus).

``recurring_positions`` marks every position of the held-out stream whose next token belongs to
a recurring name or number; the evaluation reports perplexity over those positions beside the
whole-corpus figure. Everything is vectorised over positions; only distinct words are hashed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import load_token_stream
from .store import MANIFEST, open_datastore

SENTENCE_END = ('.', '!', '?', '"', "'", '\u201d', '\u2019', ':', ';')


@dataclass(frozen=True)
class TokenClasses:
    """Per-vocabulary-id flags, bool [V] each, from the decoded text of every single token."""

    cap_start: np.ndarray  # " Word": a space, then an upper-case letter
    upper_first: np.ndarray  # "Word": an upper-case letter first (a name start after a lone " " token)
    space: np.ndarray  # exactly " " (tokenizers that split the space from a rare word)
    letters: np.ndarray  # letters only, no leading space: can continue a word
    digit: np.ndarray  # holds a digit
    ends_sentence: np.ndarray  # ends with sentence punctuation or a line break (after stripping spaces)
    is_i: np.ndarray  # the pronoun " I"


def token_classes(tokenizer) -> TokenClasses:
    """Classify every token id of ``tokenizer`` by its decoded text."""
    vocab = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(vocab)], clean_up_tokenization_spaces=False)
    cap_start = np.array([len(t) > 1 and t[0] == " " and t[1].isupper() for t in texts])
    upper_first = np.array([t[:1].isupper() for t in texts])
    space = np.array([t == " " for t in texts])
    letters = np.array([t.isalpha() for t in texts])
    digit = np.array([any(c.isdigit() for c in t) for t in texts])
    ends = np.array(
        [(t.rstrip(" ").endswith(SENTENCE_END) or t.endswith("\n")) if t.strip(" ") else False for t in texts]
    )
    is_i = np.array([t == " I" for t in texts])
    for special in tokenizer.all_special_ids:
        if special < vocab:
            ends[special] = True
            cap_start[special] = upper_first[special] = letters[special] = digit[special] = False
    return TokenClasses(cap_start, upper_first, space, letters, digit, ends, is_i)


def word_spans(tokens: np.ndarray, classes: TokenClasses) -> tuple[np.ndarray, np.ndarray]:
    """Names and numbers of a token stream, as (starts, ends) int64 [W]: tokens[s:e] is one word.

    tokens: int [N]. A name starts at a mid-sentence capitalised token and runs over the
    letter-only tokens after it; a number is a maximal run of digit tokens.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    idx = np.arange(n)
    prev_ends = np.ones(n, dtype=bool)
    prev_ends[1:] = classes.ends_sentence[tokens[:-1]]
    before_space = np.zeros(n, dtype=bool)  # "x", " ", "Word": the space token stands for the word's own space
    before_space[2:] = classes.space[tokens[1:-1]] & ~classes.ends_sentence[tokens[:-2]]
    name_start = (classes.cap_start[tokens] & ~prev_ends | classes.upper_first[tokens] & before_space) & ~classes.is_i[
        tokens
    ]
    digit = classes.digit[tokens]
    number_start = digit & np.concatenate([[True], ~digit[:-1]])
    start = name_start | number_start
    # a word runs from its start over continuation tokens, up to the next start or non-continuation
    cont = np.where(digit, np.concatenate([[False], digit[:-1]]), classes.letters[tokens])
    breaks = np.append(idx[start | ~cont], n)
    starts = idx[start]
    ends = breaks[np.searchsorted(breaks, starts, side="right")]
    return starts.astype(np.int64), ends.astype(np.int64)


def _word_keys(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[bytes]:
    tokens = np.ascontiguousarray(tokens, dtype="<i4")
    return [tokens[s:e].tobytes() for s, e in zip(starts, ends)]


def recurring_positions(
    tokens: np.ndarray, memory_tokens: np.ndarray, tokenizer, classes: TokenClasses | None = None
) -> np.ndarray:
    """bool [N-1]: True at position p when tokens[p+1] lies in a name or number that also occurs in memory.

    tokens: int [N], the held-out stream; memory_tokens: int [M], the datastore's stream.
    Aligned with the nll arrays of ``evaluate.score_tokens`` (nll[p] = -log p(tokens[p+1])).
    """
    classes = classes or token_classes(tokenizer)
    known = set(_word_keys(memory_tokens, *word_spans(memory_tokens, classes)))
    starts, ends = word_spans(tokens, classes)
    hit = np.array([key in known for key in _word_keys(tokens, starts, ends)], dtype=bool)
    covered = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.add.at(covered, starts[hit], 1)
    np.add.at(covered, ends[hit], -1)
    mask = np.cumsum(covered[:-1]) > 0  # [N]: token i lies in a recurring word
    return mask[1:]


def memory_token_stream(spec: str, tokenizer, max_tokens: int | None = None, text_field: str = "text") -> np.ndarray:
    """The memory's tokens: a datastore folder's stored stream, or any corpus spec tokenized (``text_field``:
    the JSONL / dataset field that holds the text)."""
    if (Path(spec) / MANIFEST).is_file():
        return np.asarray(open_datastore(spec).tokens)

    return load_token_stream(spec, tokenizer, max_tokens, text_field)
