"""Tests of the vocabulary trees: balanced depths, Huffman optimality, valid prefix-free codes."""

import heapq
import math

import numpy as np
import pytest

import softmax_alts
from softmax_alts._trees import check_tree


def _codes(tree):
  """Each word's branch sequence as a string of '0' (+1) and '1' (-1)."""
  return ["".join("0" if s > 0 else "1" for s in tree.signs[w, :tree.lengths[w]])
          for w in range(tree.vocab_size)]


def _assert_valid(tree, vocab_size):
  assert tree.paths.shape == tree.signs.shape == (vocab_size, tree.depth)
  assert tree.lengths.shape == (vocab_size,)
  assert tree.num_nodes == vocab_size - 1
  assert tree.paths.dtype == np.int32 and tree.signs.dtype == np.int8
  assert tree.depth == (tree.lengths.max() if vocab_size > 1 else 0)
  inside = np.arange(tree.depth)[None, :] < tree.lengths[:, None]
  np.testing.assert_array_equal(tree.signs[~inside], 0)
  np.testing.assert_array_equal(tree.paths[~inside], 0)
  assert set(np.unique(tree.signs[inside]).tolist()) <= {-1, 1}
  if vocab_size > 1:
    np.testing.assert_array_equal(tree.paths[:, 0], 0)  # the root is node 0
    assert set(np.unique(tree.paths[inside]).tolist()) == set(range(vocab_size - 1))
  # Codes are unique and prefix-free: after sorting, no code is a prefix of the next one.
  codes = sorted(_codes(tree))
  assert len(set(codes)) == vocab_size
  for a, b in zip(codes, codes[1:]):
    assert not b.startswith(a)
  # Kraft equality for a full binary tree: sum 2^-length = 1.
  np.testing.assert_allclose(np.sum(2.0 ** -tree.lengths.astype(np.float64)), 1.0)
  # The node at each step is a function of the code prefix, one node per prefix: the paths
  # are those of one tree.
  node_of_prefix = {}
  for w, code in enumerate(_codes(tree)):
    for d in range(tree.lengths[w]):
      assert node_of_prefix.setdefault(code[:d], tree.paths[w, d]) == tree.paths[w, d]
  assert len(set(node_of_prefix.values())) == len(node_of_prefix) == vocab_size - 1
  check_tree(tree)


def _huffman_cost(counts):
  """The optimal sum_w counts[w] * length[w]: the total weight of the merges, by a heap."""
  heap = [float(c) for c in counts]
  heapq.heapify(heap)
  total = 0.0
  while len(heap) > 1:
    merged = heapq.heappop(heap) + heapq.heappop(heap)
    total += merged
    heapq.heappush(heap, merged)
  return total


@pytest.mark.parametrize("vocab_size", [1, 2, 3, 4, 5, 17, 64, 1000])
def test_balanced_depths(vocab_size):
  tree = softmax_alts.balanced_tree(vocab_size)
  _assert_valid(tree, vocab_size)
  low, high = math.floor(math.log2(vocab_size)), math.ceil(math.log2(vocab_size))
  assert tree.depth == high
  assert set(np.unique(tree.lengths).tolist()) <= {low, high}
  # The shallow leaves are the low (frequent) ids.
  assert np.all(np.diff(tree.lengths) >= 0)


@pytest.mark.parametrize("counts", [
    [7], [3, 1], [5, 3, 2, 1, 1], [1, 1, 1, 1], [0, 0, 0], [10, 0, 0, 0, 3],
    [2.5, 0.5, 0.25], list(range(40, 0, -1)), "zipf", "random", "ties"])
def test_huffman_is_optimal(counts):
  rng = np.random.default_rng(0)
  if counts == "zipf":
    counts = np.round(1e5 / np.arange(1, 1001))
  elif counts == "random":
    counts = rng.integers(0, 50, size=300)
  elif counts == "ties":
    counts = np.repeat([9, 4, 4, 1], 25)
  counts = np.asarray(counts)
  tree = softmax_alts.huffman_tree(counts)
  _assert_valid(tree, len(counts))
  np.testing.assert_allclose(np.sum(counts * tree.lengths), _huffman_cost(counts), rtol=1e-12)


def test_huffman_gives_frequent_words_short_codes():
  counts = np.round(1e6 / np.arange(1, 5001) ** 1.1)
  tree = softmax_alts.huffman_tree(counts)
  assert np.all(np.diff(tree.lengths) >= 0)  # ids in descending frequency
  assert tree.lengths[0] < tree.lengths[-1]
  # Expected code length is within one bit of the entropy (Shannon's bound).
  p = counts / counts.sum()
  entropy = -np.sum(p * np.log2(p))
  assert entropy <= np.sum(p * tree.lengths) < entropy + 1


def test_huffman_does_not_need_sorted_counts():
  counts = np.array([1, 50, 3, 20, 7])
  tree = softmax_alts.huffman_tree(counts)
  _assert_valid(tree, 5)
  np.testing.assert_allclose(np.sum(counts * tree.lengths), _huffman_cost(counts))
  assert tree.lengths[1] == tree.lengths.min()


def test_single_word():
  for tree in (softmax_alts.balanced_tree(1), softmax_alts.huffman_tree([4])):
    assert tree.paths.shape == (1, 0) and tree.num_nodes == 0
    np.testing.assert_array_equal(tree.lengths, [0])


@pytest.mark.parametrize("counts,match", [
    ([[1, 2], [3, 4]], "1-D"), ([], "at least one"), ([3, -1, 2], "non-negative"),
    ([1.0, np.nan], "finite"), (["a", "b"], "numbers")])
def test_huffman_rejects_bad_counts(counts, match):
  with pytest.raises(ValueError, match=match):
    softmax_alts.huffman_tree(counts)


@pytest.mark.parametrize("vocab_size", [0, -3, 2.0, True])
def test_balanced_rejects_bad_size(vocab_size):
  with pytest.raises(ValueError, match="vocab_size"):
    softmax_alts.balanced_tree(vocab_size)


def test_check_tree_rejects_broken_trees():
  tree = softmax_alts.balanced_tree(4)  # paths [[0,1],[0,1],[0,2],[0,2]]
  signs = tree.signs.copy()
  signs[1, 1] = signs[0, 1]  # two words on the same branch, none on the other
  with pytest.raises(ValueError, match="exactly one child"):
    check_tree(tree._replace(signs=signs))
  paths = tree.paths.copy()
  paths[0, 1] = 3  # a node id out of range
  with pytest.raises(ValueError, match="node ids"):
    check_tree(tree._replace(paths=paths))
  lengths = tree.lengths.copy()
  lengths[0] = 1  # word 0 stops at the root, on the branch its sibling subtree uses
  with pytest.raises(ValueError):
    check_tree(tree._replace(lengths=lengths))
  with pytest.raises(ValueError, match="num_nodes"):
    check_tree(tree._replace(num_nodes=4))
  with pytest.raises(ValueError, match="Tree"):
    check_tree((tree.paths, tree.signs, tree.lengths, tree.num_nodes))
