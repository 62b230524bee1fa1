"""Tests for `train.read_corpus` on small folders made here, and on the real corpora if present."""

import pathlib

import numpy as np
import pytest

import train

DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"

TRAIN = "the cat sat\n\nthe dog  sat on the mat\n"  # an empty line; a double space
VALID = "the cat ran\n"
TEST = "a dog sat"  # no final newline: still a line, still one <eos>


def _write(folder: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  for name, text in files.items():
    (folder / name).write_text(text, encoding="utf-8")
  return folder


def _reference_words(text: str) -> list[str]:
  """PyTorch's word_language_model tokenisation: `line.split() + ['<eos>']` for every line."""
  return [w for line in text.splitlines() for w in line.split() + ["<eos>"]]


@pytest.mark.parametrize("names", train._corpus.LAYOUTS)
def test_word_level_layouts(tmp_path, names):
  folder = _write(tmp_path / "corpus", dict(zip(names, (TRAIN, VALID, TEST))))
  corpus = train.read_corpus(folder)
  vocab = corpus.vocab
  # train: the 3, sat 2, <eos> 3 (the empty line adds one), cat dog on mat 1, <unk> unseen.
  assert vocab.tokens == ("<eos>", "the", "sat", "cat", "dog", "mat", "on", "<unk>")
  np.testing.assert_array_equal(vocab.counts, [3, 3, 2, 1, 1, 1, 1, 0])
  assert vocab.decode(corpus.train) == _reference_words(TRAIN)
  assert vocab.decode(corpus.valid) == ["the", "cat", "<unk>", "<eos>"]  # 'ran' unseen
  assert vocab.decode(corpus.test) == ["<unk>", "dog", "sat", "<eos>"]  # 'a' unseen
  for ids in corpus.splits().values():
    assert ids.dtype == np.int32
  assert list(corpus.splits()) == ["train", "valid", "test"]
  assert corpus.level == "word"
  assert corpus.sources == dict(zip(("train", "valid", "test"), names))


def test_word_counts_match_pytorch_reference_on_crlf_and_blank_lines(tmp_path):
  text = "x y\r\n\r\n  \r\nz x\r\n"
  folder = _write(tmp_path / "c", {"train.txt": text, "valid.txt": "x\n", "test.txt": "y\n"})
  corpus = train.read_corpus(folder)
  expected = ["x", "y", "<eos>", "<eos>", "<eos>", "z", "x", "<eos>"]
  assert corpus.vocab.decode(corpus.train) == expected
  assert _reference_words(text) == expected


def test_char_level_folder(tmp_path):
  folder = _write(tmp_path / "c", {"train.txt": "abba\nab\n", "valid.txt": "ba\nc", "test.txt": "a"})
  corpus = train.read_corpus(folder, level="char")
  vocab = corpus.vocab
  assert vocab.tokens == ("a", "b", "\n", "<unk>")
  np.testing.assert_array_equal(vocab.counts, [3, 3, 2, 0])
  assert vocab.eos_id is None
  assert "".join(vocab.decode(corpus.train)) == "abba\nab\n"
  assert vocab.decode(corpus.valid) == ["b", "a", "\n", "<unk>"]
  assert corpus.level == "char"


def test_single_file_char_split_by_fractions(tmp_path):
  text = "".join("abcdefghij"[i % 7] for i in range(200)) + "\n"  # 201 characters
  path = tmp_path / "input.txt"
  path.write_text(text, encoding="utf-8")
  for source in (path, tmp_path):  # the file, or a folder holding only input.txt
    corpus = train.read_corpus(source, level="char")
    # floor(0.9 * 201) = 180, floor(0.05 * 201) = 10, the rest 11.
    assert [ids.size for ids in corpus.splits().values()] == [180, 10, 11]
    decoded = "".join("".join(corpus.vocab.decode(ids)) for ids in corpus.splits().values())
    assert decoded.replace("<unk>", "\n") == text  # '\n' only in the test part: <unk>
    assert "\n" not in corpus.vocab
    assert corpus.sources["valid"] == "input.txt tokens [180, 190) of 201"


def test_single_file_word_level_custom_fractions(tmp_path):
  path = tmp_path / "text.txt"
  path.write_text("a b c d\ne f g h\n", encoding="utf-8")  # 10 tokens with the two <eos>
  corpus = train.read_corpus(path, fractions=(0.6, 0.2, 0.2))
  decoded = [corpus.vocab.decode(ids) for ids in corpus.splits().values()]
  assert decoded == [["a", "b", "c", "d", "<eos>", "e"], ["<unk>", "<unk>"], ["<unk>", "<eos>"]]


def test_explicit_splits_train_on_valid(tmp_path):
  folder = _write(tmp_path / "wikitext", {"valid.txt": TRAIN, "test.txt": VALID})
  for names in [("valid", "test"), ("valid.txt", "test.txt")]:
    corpus = train.read_corpus(folder, train_split=names[0], test_split=names[1])
    assert corpus.valid is None
    assert list(corpus.splits()) == ["train", "test"]
    assert corpus.vocab.decode(corpus.train) == _reference_words(TRAIN)
    assert corpus.vocab.decode(corpus.test) == ["the", "cat", "<unk>", "<eos>"]
    assert corpus.sources == {"train": "valid.txt", "test": "test.txt"}


def test_explicit_split_names_follow_the_layout(tmp_path):
  folder = _write(tmp_path / "ptb", {"ptb.valid.txt": TRAIN, "ptb.test.txt": VALID})
  corpus = train.read_corpus(folder, train_split="valid", valid_split="test")
  assert corpus.sources == {"train": "ptb.valid.txt", "valid": "ptb.test.txt"}
  assert corpus.test is None
  assert corpus.vocab.decode(corpus.valid) == ["the", "cat", "<unk>", "<eos>"]


def test_vocabulary_cut_options(tmp_path):
  folder = _write(tmp_path / "c", {"train.txt": TRAIN, "valid.txt": VALID, "test.txt": TEST})
  corpus = train.read_corpus(folder, min_count=2)
  assert corpus.vocab.tokens == ("<unk>", "<eos>", "the", "sat")
  np.testing.assert_array_equal(corpus.vocab.counts, [4, 3, 3, 2])
  corpus = train.read_corpus(folder, max_size=3)
  assert corpus.vocab.tokens == ("<unk>", "<eos>", "the")
  assert len(corpus.vocab) == 3


def test_error_missing_path(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    train.read_corpus(tmp_path / "nowhere")


def test_error_missing_split_lists_found_files(tmp_path):
  folder = _write(tmp_path / "c", {"valid.txt": VALID, "test.txt": TEST, "notes.md": "x"})
  with pytest.raises(ValueError, match=r"lacks the split file\(s\) train.txt; found: notes.md, "
                     r"test.txt, valid.txt"):
    train.read_corpus(folder)
  with pytest.raises(ValueError, match=r"`test_split='tset'`: no such split file.*found: "
                     r"notes.md, test.txt, valid.txt"):
    train.read_corpus(folder, train_split="valid", test_split="tset")
  with pytest.raises(ValueError, match="`train_split` is required"):
    train.read_corpus(folder, test_split="test")


def test_error_unknown_layout(tmp_path):
  folder = _write(tmp_path / "c", {"a.txt": TRAIN})
  with pytest.raises(ValueError, match="no known layout.*found: a.txt"):
    train.read_corpus(folder)
  with pytest.raises(ValueError, match="found: no files"):
    train.read_corpus(_write(tmp_path / "empty", {}))


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_error_empty_file(tmp_path, text):
  folder = _write(tmp_path / "c", {"train.txt": TRAIN, "valid.txt": text, "test.txt": TEST})
  with pytest.raises(ValueError, match=r"valid.txt` is empty \(no words\)"):
    train.read_corpus(folder)
  (folder / "valid.txt").write_text("", encoding="utf-8")
  with pytest.raises(ValueError, match=r"valid.txt` is empty \(no characters\)"):
    train.read_corpus(folder, level="char")


@pytest.mark.parametrize("text, level", [("a a\na\n", "word"), ("aaaa", "char")])
def test_error_one_word_type(tmp_path, text, level):
  folder = _write(tmp_path / "c", {"train.txt": text, "valid.txt": "a\n", "test.txt": "a\n"})
  with pytest.raises(ValueError, match=r"1 distinct token\(s\) besides <eos> \(\['a'\]\)"):
    train.read_corpus(folder, level=level)


def test_error_unknown_level(tmp_path):
  with pytest.raises(ValueError, match=r"`level` must be one of \('word', 'char'\); got 'byte'"):
    train.read_corpus(tmp_path, level="byte")


def test_error_single_file_too_short_or_bad_fractions(tmp_path):
  path = tmp_path / "input.txt"
  path.write_text("abcdefghi", encoding="utf-8")
  with pytest.raises(ValueError, match="9 tokens, too few"):
    train.read_corpus(path, level="char")
  with pytest.raises(ValueError, match="summing to 1"):
    train.read_corpus(path, level="char", fractions=(0.5, 0.5, 0.5))
  with pytest.raises(ValueError, match="need a folder"):
    train.read_corpus(path, train_split="input.txt")


def test_error_not_utf8(tmp_path):
  folder = tmp_path / "c"
  _write(folder, {"valid.txt": VALID, "test.txt": TEST})
  (folder / "train.txt").write_bytes(b"caf\xe9\n")
  with pytest.raises(ValueError, match="not UTF-8"):
    train.read_corpus(folder)


def _need(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    pytest.skip(f"real corpus `{path}` is absent (the shared data folder next to the repository "
                "holds it; see its README.md)")
  return path


def _line_count(path: pathlib.Path) -> int:
  with open(path, encoding="utf-8") as f:
    return sum(1 for _ in f)


def test_real_ptb():
  folder = _need(DATA / "ptb")
  corpus = train.read_corpus(folder, train_split="valid", test_split="test")
  lines = {"train": _line_count(folder / "ptb.valid.txt"), "test": _line_count(folder / "ptb.test.txt")}
  assert lines == {"train": 3370, "test": 3761}
  # Words stated in the data README, plus one <eos> per line.
  assert corpus.train.size == 70_390 + 3370 == 73_760
  assert corpus.test.size == 78_669 + 3761 == 82_430
  assert len(corpus.vocab) == 6_021 + 1  # the distinct words (<unk> among them) and <eos>
  assert int(np.sum(corpus.train == corpus.vocab.eos_id)) == 3370
  assert int(corpus.vocab.counts.sum()) == corpus.train.size
  assert corpus.vocab.tokens[:3] == ("the", "<unk>", "<eos>")


def test_real_wikitext2_train_on_valid():
  folder = _need(DATA / "wikitext-2")
  corpus = train.read_corpus(folder, train_split="valid", test_split="test")
  assert corpus.train.size == 213_886 + _line_count(folder / "valid.txt") == 217_646
  assert corpus.test.size == 241_211 + _line_count(folder / "test.txt") == 245_569
  assert len(corpus.vocab) == 13_776 + 1
  test_words = {w for line in (folder / "test.txt").read_text(encoding="utf-8").splitlines()
                for w in line.split()}
  assert len(test_words) == 14_142
  unseen = test_words - set(corpus.vocab.tokens)
  assert len(unseen) == 18_327 - 13_776  # the README's union, less the training words
  decoded = corpus.vocab.decode(corpus.test)
  assert sum(w == "<unk>" for w in decoded) == int(np.sum(corpus.test == corpus.vocab.unk_id))
  assert set(decoded) <= set(corpus.vocab.tokens)


def test_real_tinyshakespeare_char_level():
  folder = _need(DATA / "tinyshakespeare")
  corpus = train.read_corpus(folder, level="char")
  sizes = [ids.size for ids in corpus.splits().values()]
  assert sum(sizes) == 1_115_394
  assert sizes == [1_003_854, 55_769, 55_771]  # floor(0.9 T), floor(0.05 T), the rest
  assert len(corpus.vocab) == 65 + 1  # 65 characters, all in the training part, and <unk>
  assert corpus.vocab.counts[corpus.vocab.unk_id] == 0
  text = (folder / "input.txt").read_text(encoding="utf-8")
  assert "".join(corpus.vocab.decode(corpus.test)) == text[-55_771:]
