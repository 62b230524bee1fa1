"""Vocabulary: a token <-> id map whose ids are sorted by descending frequency."""

import collections
import json
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

UNK = "<unk>"
EOS = "<eos>"

_FORMAT = "train.Vocab"
_VERSION = 1


class Vocab:
  """A vocabulary whose ids are sorted by descending frequency.

  Id 0 is the most frequent token of the text the vocabulary was built from, and `counts[i]` is
  the count of token `i`, so `counts` is non-increasing (the samplers, the D-softmax and the
  adaptive softmax of `softmax_alts` rely on this order). Ties are broken by the token string in
  Unicode code-point order, so the ids do not depend on the order of the text.

  Special tokens:

  - `<unk>` always exists. Every token that is not in the vocabulary (unseen, or cut by
    `max_size` / `min_count`) encodes to it. Its count is its own count in the text plus the
    counts of the cut tokens, and it takes its place in the order by that count, like any other
    token. A `<unk>` that was never seen and absorbed nothing has count 0 and therefore the last
    id.
  - `<eos>` (end of sentence; the word-level readers add one per line) is an ordinary token that
    is present only if it occurs in the text. `eos_id` is None otherwise (character-level
    corpora, where the newline character is a token of its own).

  Neither special token is ever cut by `max_size` or `min_count`.

  Attributes:
    tokens: tuple of the V token strings; `tokens[i]` is the token of id i.
    counts: `[V]` int64 array (read-only), the count of each id.
    unk_id: the id of `<unk>`.
    eos_id: the id of `<eos>`, or None when the vocabulary has none.
  """

  def __init__(self, tokens: Sequence[str], counts):
    """Makes a vocabulary from tokens already in id order.

    Use `Vocab.build` or `Vocab.from_counts` to build one from text.

    Args:
      tokens: the V distinct token strings, in id order; must contain `<unk>`.
      counts: `[V]` non-negative integers, non-increasing.

    Raises:
      ValueError: if the tokens are not distinct strings, `<unk>` is missing, or the counts are
        not a non-increasing sequence of non-negative integers of the same length.
    """
    tokens = tuple(tokens)
    counts = np.asarray(counts)
    if not all(isinstance(t, str) for t in tokens):
      raise ValueError("`tokens` must all be strings.")
    if counts.shape != (len(tokens),):
      raise ValueError(
          f"`counts` must have shape ({len(tokens)},) to match `tokens`; got {counts.shape}.")
    if counts.size and not np.issubdtype(counts.dtype, np.integer):
      raise ValueError(f"`counts` must be integers; got dtype {counts.dtype}.")
    counts = counts.astype(np.int64)
    if np.any(counts < 0):
      raise ValueError("`counts` must be non-negative.")
    if np.any(np.diff(counts) > 0):
      raise ValueError("`counts` must be non-increasing (ids sorted by descending frequency).")
    index = {t: i for i, t in enumerate(tokens)}
    if len(index) != len(tokens):
      duplicates = sorted(t for t, n in collections.Counter(tokens).items() if n > 1)
      raise ValueError(f"`tokens` must be distinct; repeated: {duplicates[:10]}.")
    if UNK not in index:
      raise ValueError(f"`tokens` must contain {UNK!r}.")
    counts.setflags(write=False)
    self._tokens = tokens
    self._counts = counts
    self._index = index

  @classmethod
  def build(cls, tokens: Iterable[str], *, max_size: int | None = None,
            min_count: int = 1) -> "Vocab":
    """Builds a vocabulary from a stream of tokens.

    Args:
      tokens: the tokens of the text, e.g. whitespace-separated words with one `<eos>` per line,
        or the characters of a string.
      max_size: the largest vocabulary size, `<unk>` and `<eos>` included; the least frequent
        tokens beyond it are cut. None keeps every token.
      min_count: tokens seen fewer times are cut.

    Returns:
      The `Vocab`; cut tokens encode to `<unk>`, whose count absorbs theirs.
    """
    return cls.from_counts(collections.Counter(tokens), max_size=max_size, min_count=min_count)

  @classmethod
  def from_counts(cls, counts: Mapping[str, int], *, max_size: int | None = None,
                  min_count: int = 1) -> "Vocab":
    """Builds a vocabulary from token counts, as `Vocab.build` does from the tokens.

    Args:
      counts: maps each token string to its count (a positive integer).
      max_size: the largest vocabulary size, `<unk>` and `<eos>` included; None for no limit.
      min_count: tokens with a smaller count are cut.

    Returns:
      The `Vocab`.

    Raises:
      ValueError: if `max_size` cannot hold the special tokens, `min_count < 1`, or a count is
        not a positive integer.
    """
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) \
        or min_count < 1:
      raise ValueError(f"`min_count` must be an integer >= 1; got {min_count!r}.")
    for token, count in counts.items():
      if not isinstance(token, str):
        raise ValueError(f"tokens must be strings; got {token!r}.")
      if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"the count of {token!r} must be a positive integer; got {count!r}.")
    specials = [UNK] + ([EOS] if EOS in counts else [])
    if max_size is not None and (
        isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer))
        or max_size < len(specials)):
      raise ValueError(
          f"`max_size` must be an integer >= {len(specials)} (the special tokens {specials}); "
          f"got {max_size!r}.")
    ordinary = sorted(((t, int(c)) for t, c in counts.items() if t not in specials),
                      key=lambda tc: (-tc[1], tc[0]))
    kept = [(t, c) for t, c in ordinary if c >= min_count]
    if max_size is not None:
      kept = kept[:max_size - len(specials)]
    num_cut = sum(c for _, c in ordinary) - sum(c for _, c in kept)
    entries = kept + [(UNK, int(counts.get(UNK, 0)) + num_cut)]
    if EOS in counts:
      entries.append((EOS, int(counts[EOS])))
    entries.sort(key=lambda tc: (-tc[1], tc[0]))
    return cls([t for t, _ in entries], np.array([c for _, c in entries], dtype=np.int64))

  @property
  def tokens(self) -> tuple[str, ...]:
    return self._tokens

  @property
  def counts(self) -> np.ndarray:
    return self._counts

  @property
  def unk_id(self) -> int:
    return self._index[UNK]

  @property
  def eos_id(self) -> int | None:
    return self._index.get(EOS)

  def __len__(self) -> int:
    return len(self._tokens)

  def __contains__(self, token) -> bool:
    return token in self._index

  def __eq__(self, other) -> bool:
    if not isinstance(other, Vocab):
      return NotImplemented
    return self._tokens == other._tokens and np.array_equal(self._counts, other._counts)

  __hash__ = None

  def __repr__(self) -> str:
    head = ", ".join(repr(t) for t in self._tokens[:5])
    more = ", ..." if len(self) > 5 else ""
    return f"Vocab(size={len(self)}, tokens=({head}{more}))"

  def index(self, token: str) -> int:
    """Returns the id of `token`, or `unk_id` when it is not in the vocabulary."""
    return self._index.get(token, self._index[UNK])

  def encode(self, tokens: Iterable[str]) -> np.ndarray:
    """Maps tokens to ids; tokens not in the vocabulary map to `unk_id`.

    Args:
      tokens: `[T]` token strings (a `str` is a sequence of characters).

    Returns:
      `[T]` int32 ids.
    """
    unk = self._index[UNK]
    get = self._index.get
    return np.fromiter((get(t, unk) for t in tokens), dtype=np.int32)

  def decode(self, ids) -> list[str]:
    """Maps ids back to tokens.

    Args:
      ids: `[T]` integer ids in `[0, V)`.

    Returns:
      The T token strings.

    Raises:
      ValueError: if `ids` is not a 1-D integer sequence or an id is outside `[0, V)`.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
      raise ValueError(f"`ids` must be [T] integers; got shape {ids.shape}, dtype {ids.dtype}.")
    bad = (ids < 0) | (ids >= len(self))
    if np.any(bad):
      raise ValueError(
          f"`ids` must be in [0, {len(self)}); got {int(ids[np.argmax(bad)])}.")
    return [self._tokens[i] for i in ids.tolist()]

  def save(self, path: str | os.PathLike) -> None:
    """Writes the vocabulary as UTF-8 JSON: `{"format", "version", "tokens", "counts"}`."""
    data = {"format": _FORMAT, "version": _VERSION, "tokens": list(self._tokens),
            "counts": self._counts.tolist()}
    with open(path, "w", encoding="utf-8") as f:
      json.dump(data, f, ensure_ascii=False)
      f.write("\n")

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Vocab":
    """Reads a vocabulary written by `save`; the result equals the saved one exactly.

    Raises:
      ValueError: if the file is not a vocabulary written by `save`.
    """
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"`{path}` is not a vocabulary file: {e}") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
      raise ValueError(f"`{path}` is not a vocabulary file (no \"format\": {_FORMAT!r}).")
    if data.get("version") != _VERSION:
      raise ValueError(
          f"`{path}` has vocabulary format version {data.get('version')!r}; expected {_VERSION}.")
    return cls(data["tokens"], np.array(data["counts"], dtype=np.int64))
