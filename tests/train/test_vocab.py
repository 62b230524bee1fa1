"""Tests for `train.Vocab`: frequency order, special tokens, cuts, encoding and the file format."""

import json

import numpy as np
import pytest

import train


def test_ids_sorted_by_descending_count_ties_by_string():
  tokens = "b a c a b a d <eos> c <eos> e".split()
  vocab = train.Vocab.build(tokens)
  # a:3; b, c, <eos>: 2 (code-point order: '<' < 'b' < 'c'); d, e: 1; <unk> unseen: 0, last.
  assert vocab.tokens == ("a", "<eos>", "b", "c", "d", "e", "<unk>")
  np.testing.assert_array_equal(vocab.counts, [3, 2, 2, 2, 1, 1, 0])
  assert vocab.counts.dtype == np.int64
  assert len(vocab) == 7
  assert vocab.eos_id == 1
  assert vocab.unk_id == 6


def test_order_does_not_depend_on_text_order():
  tokens = "x y z y z z w".split()
  assert train.Vocab.build(tokens) == train.Vocab.build(tokens[::-1])


def test_seen_unk_takes_its_place_by_count():
  vocab = train.Vocab.build("<unk> the <unk> cat <unk> the".split())
  assert vocab.tokens == ("<unk>", "the", "cat")
  np.testing.assert_array_equal(vocab.counts, [3, 2, 1])
  assert vocab.eos_id is None


def test_min_count_cuts_to_unk_and_adds_counts():
  tokens = ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"] + ["e"] + ["<unk>"] + ["<eos>"]
  vocab = train.Vocab.build(tokens, min_count=2)
  # d, e cut: <unk> = 1 + 2 = 3 ties with b and sorts before it ('<' < 'b'); <eos> kept at 1.
  assert vocab.tokens == ("a", "<unk>", "b", "c", "<eos>")
  np.testing.assert_array_equal(vocab.counts, [5, 3, 3, 2, 1])
  assert int(vocab.counts.sum()) == len(tokens)
  np.testing.assert_array_equal(vocab.encode(["d", "e", "a", "zzz"]), [1, 1, 0, 1])


def test_max_size_counts_the_specials_and_keeps_them():
  tokens = ["a"] * 6 + ["b"] * 5 + ["c"] * 4 + ["d"] * 4 + ["<eos>"]
  vocab = train.Vocab.build(tokens, max_size=4)
  # Room for 2 ordinary words besides <unk> and <eos>: a, b; c and d (4 + 4) go to <unk>.
  assert len(vocab) == 4
  assert vocab.tokens == ("<unk>", "a", "b", "<eos>")
  np.testing.assert_array_equal(vocab.counts, [8, 6, 5, 1])


def test_max_size_boundary_ties_cut_by_string():
  vocab = train.Vocab.build(["q", "p", "r"], max_size=3)  # all count 1; keeps p, q; r cut
  assert vocab.tokens == ("<unk>", "p", "q")
  np.testing.assert_array_equal(vocab.counts, [1, 1, 1])


def test_encode_decode_round_trip():
  text = "the cat sat on the mat <eos>".split()
  vocab = train.Vocab.build(text)
  ids = vocab.encode(text)
  assert ids.dtype == np.int32
  assert ids.shape == (7,)
  assert ids[0] == ids[4] == vocab.index("the") == 0
  assert vocab.decode(ids) == text
  assert vocab.decode(vocab.encode(["dog", "cat"])) == ["<unk>", "cat"]
  assert vocab.encode([]).shape == (0,)


def test_encode_characters_of_a_string():
  vocab = train.Vocab.build("hello\nworld\n")
  assert vocab.tokens[:3] == ("l", "\n", "o")  # '\n' sorts before 'o' at count 2
  assert "".join(vocab.decode(vocab.encode("hello\n"))) == "hello\n"
  assert vocab.decode(vocab.encode("hex")) == ["h", "e", "<unk>"]


def test_decode_rejects_out_of_range_ids():
  vocab = train.Vocab.build("a b".split())
  with pytest.raises(ValueError, match=r"\[0, 3\); got 3"):
    vocab.decode([0, 3])
  with pytest.raises(ValueError, match="integers"):
    vocab.decode([0.5])


def test_save_load_round_trip(tmp_path):
  tokens = ["é", "a b", "\n", "\"", "<eos>", "<unk>", "x"] * 3 + ["é", "x", "a b"] + ["x"]
  vocab = train.Vocab.build(tokens)
  path = tmp_path / "vocab.json"
  vocab.save(path)
  loaded = train.Vocab.load(path)
  assert loaded == vocab
  assert loaded.tokens == vocab.tokens
  np.testing.assert_array_equal(loaded.counts, vocab.counts)
  assert loaded.counts.dtype == np.int64
  data = json.loads(path.read_text(encoding="utf-8"))
  assert data["tokens"] == list(vocab.tokens)
  assert data["counts"] == [5, 4, 4, 3, 3, 3, 3]


def test_load_rejects_other_files(tmp_path):
  path = tmp_path / "other.json"
  path.write_text(json.dumps({"tokens": ["<unk>"], "counts": [0]}), encoding="utf-8")
  with pytest.raises(ValueError, match="not a vocabulary file"):
    train.Vocab.load(path)
  path.write_text("not json", encoding="utf-8")
  with pytest.raises(ValueError, match="not a vocabulary file"):
    train.Vocab.load(path)


def test_counts_are_read_only():
  vocab = train.Vocab.build("a a b".split())
  with pytest.raises(ValueError):
    vocab.counts[0] = 7
  np.testing.assert_array_equal(vocab.counts, [2, 1, 0])


@pytest.mark.parametrize("tokens, counts, match", [
    (["a", "<unk>"], [1, 2], "non-increasing"),
    (["a", "a", "<unk>"], [2, 1, 0], "distinct"),
    (["a", "b"], [2, 1], "<unk>"),
    (["a", "<unk>"], [1], "shape"),
    (["a", "<unk>"], [1, -1], "non-negative"),
])
def test_constructor_checks(tokens, counts, match):
  with pytest.raises(ValueError, match=match):
    train.Vocab(tokens, counts)


def test_bad_cut_arguments():
  with pytest.raises(ValueError, match="min_count"):
    train.Vocab.build(["a"], min_count=0)
  with pytest.raises(ValueError, match=r"max_size.*>= 2"):
    train.Vocab.build(["a", "<eos>"], max_size=1)
  with pytest.raises(ValueError, match="positive integer"):
    train.Vocab.from_counts({"a": 0})
