"""Corpus readers for the common language-modelling layouts, word and character level."""

import array
import collections
import dataclasses
import os
import pathlib
from typing import Callable, Mapping

import numpy as np

from train._vocab import EOS, Vocab

LEVELS = ("word", "char")
SPLITS = ("train", "valid", "test")
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)

# The file names of the train, valid and test splits in the layouts `read_corpus` recognises, in
# the order it tries them: PyTorch's word_language_model example (WikiText-2), Mikolov's Penn
# Treebank, and the WikiText archives of Merity et al.
LAYOUTS = (
    ("train.txt", "valid.txt", "test.txt"),
    ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
    ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
)
# A folder holding only this file is read as a single file (Tiny Shakespeare, as in char-rnn).
SINGLE_FILE = "input.txt"


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """A tokenised corpus: a vocabulary and the token ids of each split.

  Attributes:
    vocab: the `Vocab`, built from the training split only.
    train: `[T_train]` int32 ids of the training split.
    valid: `[T_valid]` int32 ids, or None when the corpus has no validation split.
    test: `[T_test]` int32 ids, or None when the corpus has no test split.
    level: "word" or "char".
    sources: maps each present split to where its text came from (a file name, with the token
      range for a split cut from a single file), to be reported next to every number.
  """

  vocab: Vocab
  train: np.ndarray
  valid: np.ndarray | None
  test: np.ndarray | None
  level: str
  sources: Mapping[str, str]

  def splits(self) -> dict[str, np.ndarray]:
    """Returns the present splits by name, in the order train, valid, test."""
    return {name: getattr(self, name) for name in SPLITS if getattr(self, name) is not None}


def read_corpus(path: str | os.PathLike, *, level: str = "word",
                train_split: str | None = None, valid_split: str | None = None,
                test_split: str | None = None,
                fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
                max_size: int | None = None, min_count: int = 1) -> Corpus:
  """Reads a corpus from a folder of split files or from a single text file.

  Layouts:

  - a folder with `train.txt`, `valid.txt`, `test.txt` (WikiText-2 as shipped with PyTorch's
    word_language_model example), `ptb.train.txt`, `ptb.valid.txt`, `ptb.test.txt` (Penn
    Treebank, Mikolov's preprocessing) or `wiki.train.tokens`, `wiki.valid.tokens`,
    `wiki.test.tokens` (the WikiText archives);
  - a single text file, or a folder holding only `input.txt` (Tiny Shakespeare): its token stream
    is cut into contiguous train, valid and test parts of `fractions` of its tokens
    (`floor(0.9 T)` tokens, then `floor(0.05 T)`, then the rest, by default).

  Splits can be named explicitly, e.g. `train_split="valid", test_split="test"` to train on the
  validation file of a folder that holds only `valid.txt` and `test.txt`. A name is a file in
  the folder (`"valid.txt"`), or one of "train", "valid", "test", which means that split's file
  in whichever layout the folder has. When any split is named, only the named splits are read
  and the others are None; `train_split` is then required.

  Tokens:

  - word level: each line is split on whitespace (`str.split()`) and followed by `<eos>`; every
    line adds one `<eos>`, an empty line included, as PyTorch's word_language_model example does
    (`line.split() + ['<eos>']`). A file's last line counts as a line with or without a final
    newline. Words written `<unk>` in the text (Penn Treebank) are the `<unk>` token.
  - char level: every character is a token, the newline included; there is no `<eos>`.

  Files are read as UTF-8 with universal newlines (`\\r\\n` reads as `\\n`). The vocabulary is
  built from the training split only (see `Vocab` for the order and `<unk>`); tokens of the
  other splits that it lacks encode to `<unk>`.

  Args:
    path: a folder or a text file.
    level: "word" or "char".
    train_split: the training split's file name or split name; None to detect the layout.
    valid_split: the validation split's file name or split name.
    test_split: the test split's file name or split name.
    fractions: the train, valid and test fractions of a single file; positive, summing to 1.
    max_size: the largest vocabulary size (`<unk>` and `<eos>` included), or None.
    min_count: training tokens seen fewer times encode to `<unk>`.

  Returns:
    A `Corpus` with int32 id arrays.

  Raises:
    ValueError: if the level is unknown, the path or a split file does not exist (the message
      lists the files found), a file is empty or not UTF-8, a single file is too short to split,
      or the training split has fewer than two distinct tokens besides `<eos>`.
  """
  return read_corpus_named(path, level=level, train_split=train_split, valid_split=valid_split,
                     test_split=test_split, fractions=fractions, max_size=max_size,
                     min_count=min_count, spell=keyword_spelling)


def keyword_spelling(split: str, value=None) -> str:
  """How `read_corpus`'s messages write a split argument, as Python: `train_split='x'`."""
  return f"`{split}_split`" if value is None else f"`{split}_split={str(value)!r}`"


def read_corpus_named(path, *, level, train_split, valid_split, test_split, fractions, max_size,
                min_count, spell: Callable[..., str]) -> Corpus:
  """`read_corpus`, its messages writing the split arguments with `spell(split, value=None)`
  (a command line names them by its flags)."""
  if level not in LEVELS:
    raise ValueError(f"`level` must be one of {LEVELS}; got {level!r}.")
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"corpus path `{path}` does not exist.")
  explicit = {"train": train_split, "valid": valid_split, "test": test_split}
  explicit = {k: v for k, v in explicit.items() if v is not None}
  if path.is_file():
    if explicit:
      raise ValueError(
          f"`{path}` is a single file, cut into splits by `fractions`; the split arguments "
          f"({', '.join(spell(k) for k in explicit)}) need a folder.")
    return _read_single(path, level, fractions, max_size, min_count)
  if not path.is_dir():
    raise ValueError(f"corpus path `{path}` is neither a folder nor a file.")
  if explicit:
    if "train" not in explicit:
      raise ValueError(
          f"{spell('train')} is required when a split is named (the vocabulary is built from "
          f"it); got only {', '.join(spell(k) for k in explicit)}.")
    files = {split: _resolve_split(path, split, name, spell)
             for split, name in explicit.items()}
  else:
    files = _detect_layout(path, spell)
    if files is None:
      return _read_single(path / SINGLE_FILE, level, fractions, max_size, min_count)
  streams = _Tokenizer(level)
  ids = {split: streams.read(file) for split, file in files.items()}
  sources = {split: file.name for split, file in files.items()}
  return _finish(streams, ids, sources, level, max_size, min_count)


def _listing(folder: pathlib.Path) -> str:
  names = sorted(p.name for p in folder.iterdir() if p.is_file())
  if not names:
    return "no files"
  more = f", ... ({len(names)} files)" if len(names) > 20 else ""
  return ", ".join(names[:20]) + more


def _detect_layout(folder: pathlib.Path, spell) -> dict[str, pathlib.Path] | None:
  """Returns the split files of the folder's layout, or None for a lone `input.txt`."""
  present = [[(folder / name).is_file() for name in layout] for layout in LAYOUTS]
  for layout, found in zip(LAYOUTS, present):
    if all(found):
      return {split: folder / name for split, name in zip(SPLITS, layout)}
  partial = [(sum(found), layout, found) for layout, found in zip(LAYOUTS, present) if any(found)]
  if not partial and (folder / SINGLE_FILE).is_file():
    return None
  if partial:
    _, layout, found = max(partial, key=lambda p: p[0])
    missing = [name for name, ok in zip(layout, found) if not ok]
    present = [name for name, ok in zip(layout, found) if ok]
    example = [spell("train", present[0])]
    if len(present) > 1:
      example.append(spell("test", present[-1]))
    raise ValueError(
        f"corpus folder `{folder}` lacks the split file(s) {', '.join(missing)}; found: "
        f"{_listing(folder)}. Name the splits to use, e.g. {' '.join(example)} (with no "
        "validation split, the end of the training split is held out).")
  expected = "; ".join(" / ".join(layout) for layout in LAYOUTS)
  raise ValueError(
      f"corpus folder `{folder}` has no known layout (expected {expected}; or a lone "
      f"{SINGLE_FILE}); found: {_listing(folder)}.")


def _resolve_split(folder: pathlib.Path, split: str, name: str, spell) -> pathlib.Path:
  """Finds the file of an explicitly named split: a file name, or a split name."""
  if not isinstance(name, (str, os.PathLike)) or not str(name):
    raise ValueError(f"{spell(split)} must be a file or split name; got {name!r}.")
  candidate = folder / name
  if candidate.is_file():
    return candidate
  if name in SPLITS:
    column = SPLITS.index(name)
    for layout in LAYOUTS:
      if (folder / layout[column]).is_file():
        return folder / layout[column]
  raise ValueError(
      f"{spell(split, name)}: no such split file in `{folder}`; found: {_listing(folder)}.")


class _Tokenizer:
  """Turns files into streams of provisional ids, one id per distinct token of all the files."""

  def __init__(self, level: str):
    self.level = level
    self.ids = collections.defaultdict()
    self.ids.default_factory = self.ids.__len__  # a new token gets the next id

  def tokens(self) -> list[str]:
    return list(self.ids)

  def read(self, file: pathlib.Path) -> np.ndarray:
    """Returns the provisional ids `[T]` of a file's tokens."""
    out = array.array("q")
    get = self.ids.__getitem__
    try:
      with open(file, encoding="utf-8") as f:
        if self.level == "char":
          out.extend(map(get, f.read()))
          empty = not out
        else:
          eos = get(EOS)
          num_words = 0
          for line in f:
            words = line.split()
            num_words += len(words)
            out.extend(map(get, words))
            out.append(eos)
          empty = num_words == 0
    except UnicodeDecodeError as e:
      raise ValueError(f"`{file}` is not UTF-8 text: {e}") from None
    if empty:
      what = "characters" if self.level == "char" else "words"
      raise ValueError(f"`{file}` is empty (no {what}).")
    return np.frombuffer(out, dtype=np.int64)


def _read_single(file: pathlib.Path, level: str, fractions, max_size, min_count) -> Corpus:
  """Reads one file and cuts its token stream into train, valid and test by `fractions`."""
  fractions = tuple(float(f) for f in fractions)
  if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-9:
    raise ValueError(
        f"`fractions` must be three positive numbers (train, valid, test) summing to 1; got "
        f"{fractions}.")
  streams = _Tokenizer(level)
  stream = streams.read(file)
  total = stream.size
  num_train = int(fractions[0] * total)
  num_valid = int(fractions[1] * total)
  if min(num_train, num_valid, total - num_train - num_valid) < 1:
    raise ValueError(
        f"`{file}` has {total} tokens, too few to cut into train/valid/test by {fractions}.")
  bounds = (0, num_train, num_train + num_valid, total)
  ids, sources = {}, {}
  for split, start, stop in zip(SPLITS, bounds[:-1], bounds[1:]):
    ids[split] = stream[start:stop]
    sources[split] = f"{file.name} tokens [{start}, {stop}) of {total}"
  return _finish(streams, ids, sources, level, max_size, min_count)


def _finish(streams: _Tokenizer, ids, sources, level, max_size, min_count) -> Corpus:
  """Builds the vocabulary from the training ids and maps every split to vocabulary ids."""
  tokens = streams.tokens()
  counts = np.bincount(ids["train"], minlength=len(tokens))
  seen = {t: int(c) for t, c in zip(tokens, counts.tolist()) if c > 0}
  types = sorted(t for t in seen if t != EOS)
  if len(types) < 2:
    raise ValueError(
        f"the training split ({sources['train']}) has {len(types)} distinct token(s) besides "
        f"{EOS} ({types[:1]}); a language model needs at least two.")
  vocab = Vocab.from_counts(seen, max_size=max_size, min_count=min_count)
  lookup = np.array([vocab.index(t) for t in tokens], dtype=np.int32)
  arrays = {split: lookup[ids[split]] for split in ids}
  return Corpus(vocab=vocab, train=arrays["train"], valid=arrays.get("valid"),
                test=arrays.get("test"), level=level, sources=dict(sources))
