"""Binary trees over the vocabulary for the hierarchical softmax: balanced and Huffman."""

from typing import NamedTuple

import numpy as np


class Tree(NamedTuple):
  """A full binary tree whose leaves are the V words, stored as root-to-leaf paths.

  Internal nodes are numbered `0 .. V-2` with the root at 0 (for V > 1). Word `w` is reached
  from the root by the nodes `paths[w, :lengths[w]]`, taking at node `paths[w, d]` the branch
  `signs[w, d]`: +1 for the first child (probability sigmoid(s)), -1 for the second
  (probability sigmoid(-s)), where s is that node's score. Entries past `lengths[w]` are
  padding: node 0 and sign 0.

  Attributes:
    paths: `[V, D]` int32 internal-node ids, root first; D is the depth of the deepest leaf.
    signs: `[V, D]` int8 branch signs, +1 or -1, and 0 for padding.
    lengths: `[V]` int32 path lengths (the depth of each leaf; 0 when V = 1).
    num_nodes: the number of internal nodes, V - 1.
  """

  paths: np.ndarray
  signs: np.ndarray
  lengths: np.ndarray
  num_nodes: int

  @property
  def vocab_size(self) -> int:
    """V, the number of leaves."""
    return self.paths.shape[0]

  @property
  def depth(self) -> int:
    """D, the length of the longest path."""
    return self.paths.shape[1]


def _tree_from_parents(leaf_parent: np.ndarray, leaf_sign: np.ndarray,
                       node_parent: np.ndarray, node_sign: np.ndarray) -> Tree:
  """Builds root-first paths from child-to-parent links.

  Args:
    leaf_parent: `[V]` the internal node above each word (-1 when V = 1).
    leaf_sign: `[V]` the branch (+1 or -1) from that node to the word.
    node_parent: `[V-1]` the internal node above each internal node (-1 for the root, node 0).
    node_sign: `[V-1]` the branch from the parent to each internal node.

  Returns:
    The `Tree`.
  """
  vocab_size = leaf_parent.shape[0]
  # Walk up from every leaf at once; each step is one vectorized numpy pass.
  lengths = np.zeros(vocab_size, np.int32)
  current = leaf_parent.copy()
  while (current >= 0).any():
    active = current >= 0
    lengths += active
    current = np.where(active, node_parent[np.maximum(current, 0)], -1)
  depth = int(lengths.max(initial=0))
  # Leaf-first columns, then each row reversed within its own length.
  up_paths = np.zeros((vocab_size, depth), np.int32)
  up_signs = np.zeros((vocab_size, depth), np.int8)
  current, sign = leaf_parent.copy(), leaf_sign.astype(np.int8)
  for step in range(depth):
    up_paths[:, step] = np.maximum(current, 0)
    up_signs[:, step] = np.where(current >= 0, sign, 0)
    safe = np.maximum(current, 0)
    current = np.where(current >= 0, node_parent[safe], -1)
    sign = node_sign[safe].astype(np.int8)
  column = lengths[:, None] - 1 - np.arange(depth)[None, :]
  inside = column >= 0
  column = np.maximum(column, 0)
  paths = np.where(inside, np.take_along_axis(up_paths, column, axis=1), 0).astype(np.int32)
  signs = np.where(inside, np.take_along_axis(up_signs, column, axis=1), 0).astype(np.int8)
  return Tree(paths=paths, signs=signs, lengths=lengths, num_nodes=vocab_size - 1)


def balanced_tree(vocab_size: int) -> Tree:
  """A complete binary tree over `vocab_size` words: every path has length floor or ceil log2 V.

  The nodes are laid out as a binary heap (node i has children 2i+1 and 2i+2); word w is heap
  node V-1+w, so that the shallower leaves go to the low, frequent ids.

  Args:
    vocab_size: V >= 1.

  Returns:
    A `Tree` of depth ceil(log2 V) whose leaf depths are floor(log2 V) or ceil(log2 V).

  References:
    Morin and Bengio, "Hierarchical Probabilistic Neural Network Language Model", 2005.
    https://proceedings.mlr.press/r5/morin05a.html
  """
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
    raise ValueError(f"`vocab_size` must be an int >= 1; got {vocab_size!r}.")
  if vocab_size < 1:
    raise ValueError(f"`vocab_size` must be an int >= 1; got {vocab_size}.")
  vocab_size = int(vocab_size)
  heap = np.arange(2 * vocab_size - 1)
  parent = np.where(heap > 0, (heap - 1) // 2, -1)
  sign = np.where(heap % 2 == 1, 1, -1)
  num_nodes = vocab_size - 1
  return _tree_from_parents(parent[num_nodes:], sign[num_nodes:],
                            parent[:num_nodes], sign[:num_nodes])


def _check_counts(counts, name: str = "counts") -> np.ndarray:
  """Returns `counts` as a float64 numpy vector, or raises `ValueError`."""
  values = np.asarray(counts)
  if values.ndim != 1:
    raise ValueError(f"`{name}` must be 1-D [V]; got shape {values.shape}.")
  if values.shape[0] == 0:
    raise ValueError(f"`{name}` must hold at least one word; got an empty array.")
  if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
    raise ValueError(f"`{name}` must be numbers; got dtype {values.dtype}.")
  values = values.astype(np.float64)
  if not np.isfinite(values).all():
    raise ValueError(f"`{name}` must be finite; got {values[~np.isfinite(values)][0]}.")
  if (values < 0).any():
    raise ValueError(f"`{name}` must be non-negative; got {values[values < 0][0]} at index "
                     f"{int(np.argmax(values < 0))}.")
  return values


def huffman_tree(counts) -> Tree:
  """The Huffman tree of the word counts, as word2vec builds it: frequent words get short paths.

  Repeatedly merges the two lightest subtrees (two sorted queues, leaves first on ties, which
  also keeps the longest path short), so that sum_w counts[w] * lengths[w] is minimal. The
  lighter of the two merged subtrees takes the +1 branch (word2vec's code 0).

  Args:
    counts: `[V]` non-negative word counts (or frequencies), V >= 1.

  Returns:
    A `Tree` with V - 1 internal nodes whose paths are the Huffman codes.

  References:
    Mikolov, Sutskever, Chen, Corrado and Dean, "Distributed Representations of Words and
    Phrases and their Compositionality", 2013. https://arxiv.org/abs/1310.4546
    Huffman, "A Method for the Construction of Minimum-Redundancy Codes", 1952.
  """
  values = _check_counts(counts)
  vocab_size = values.shape[0]
  num_nodes = vocab_size - 1
  # Leaves in increasing count; among equal counts the higher (rarer) id is merged first.
  order = np.lexsort((-np.arange(vocab_size), values))
  leaf_counts = values[order].tolist()
  node_counts = [0.0] * num_nodes
  # Children of internal node k (k in creation order; the root is created last); a leaf is
  # stored as -1 - word.
  first, second = [0] * num_nodes, [0] * num_nodes
  leaf_ids = (-1 - order).tolist()
  next_leaf = next_node = 0
  for k in range(num_nodes):
    for children in (first, second):
      if next_leaf < vocab_size and (next_node >= k
                                     or leaf_counts[next_leaf] <= node_counts[next_node]):
        children[k] = leaf_ids[next_leaf]
        node_counts[k] += leaf_counts[next_leaf]
        next_leaf += 1
      else:
        children[k] = next_node
        node_counts[k] += node_counts[next_node]
        next_node += 1
  leaf_parent = np.full(vocab_size, -1, np.int64)
  leaf_sign = np.zeros(vocab_size, np.int64)
  node_parent = np.full(num_nodes, -1, np.int64)
  node_sign = np.zeros(num_nodes, np.int64)
  children = np.stack([np.asarray(first, np.int64), np.asarray(second, np.int64)], axis=1)
  children = children.reshape(num_nodes, 2)
  # Renumber so that the root is node 0 and every parent precedes its children.
  new_id = num_nodes - 1 - np.arange(num_nodes)
  for branch, sign in ((0, 1), (1, -1)):
    child = children[:, branch]
    is_leaf = child < 0
    leaf_parent[-1 - child[is_leaf]] = new_id[is_leaf]
    leaf_sign[-1 - child[is_leaf]] = sign
    node_parent[new_id[child[~is_leaf]]] = new_id[~is_leaf]
    node_sign[new_id[child[~is_leaf]]] = sign
  return _tree_from_parents(leaf_parent, leaf_sign, node_parent, node_sign)


def check_tree(tree: Tree, name: str = "tree") -> None:
  """Raises `ValueError` unless `tree` is a full binary tree whose leaves are the V words.

  Checks the shapes and dtypes, that the node ids are in `[0, V-1)` and the signs are +-1 inside
  each path and 0 past it, that every internal node sits at one depth under one parent, and
  that each of its two branches leads to exactly one child. These make the leaf probabilities
  sum to one.

  Args:
    tree: the `Tree` to check.
    name: the argument's name, for messages.
  """
  if not isinstance(tree, Tree):
    raise ValueError(f"`{name}` must be a Tree (from balanced_tree or huffman_tree); "
                     f"got {type(tree).__name__}.")
  paths, signs, lengths = (np.asarray(a) for a in (tree.paths, tree.signs, tree.lengths))
  if paths.ndim != 2 or paths.shape[0] < 1 or signs.shape != paths.shape:
    raise ValueError(f"`{name}.paths` and `{name}.signs` must both be [V, D] with V >= 1; got "
                     f"shapes {paths.shape} and {signs.shape}.")
  vocab_size, depth = paths.shape
  if lengths.shape != (vocab_size,):
    raise ValueError(f"`{name}.lengths` must be [V] = [{vocab_size}]; got {lengths.shape}.")
  if tree.num_nodes != vocab_size - 1:
    raise ValueError(f"`{name}.num_nodes` must be V - 1 = {vocab_size - 1}; "
                     f"got {tree.num_nodes}.")
  if not all(np.issubdtype(a.dtype, np.integer) for a in (paths, signs, lengths)):
    raise ValueError(f"`{name}` arrays must be integer; got {paths.dtype}, {signs.dtype}, "
                     f"{lengths.dtype}.")
  if vocab_size == 1:
    if (lengths != 0).any():
      raise ValueError(f"`{name}` with one word must have length 0; got {lengths.tolist()}.")
    return
  if (lengths < 1).any() or (lengths > depth).any():
    raise ValueError(f"`{name}.lengths` must be in [1, {depth}]; got min {lengths.min()} "
                     f"and max {lengths.max()}.")
  inside = np.arange(depth)[None, :] < lengths[:, None]
  if ((paths < 0) | (paths >= vocab_size - 1))[inside].any():
    raise ValueError(f"`{name}.paths` must hold node ids in [0, {vocab_size - 1}).")
  if (~((signs == 1) | (signs == -1)))[inside].any() or (signs[~inside] != 0).any():
    raise ValueError(f"`{name}.signs` must be +1 or -1 inside each path and 0 past it.")
  num_nodes = vocab_size - 1
  # Each internal node: one depth, one parent and one branch (checked column by column).
  node_depth = np.full(num_nodes, -1)
  node_parent = np.full(num_nodes, -1)
  node_sign = np.zeros(num_nodes, np.int64)
  for d in range(depth):
    active = lengths > d
    ids = paths[active, d]
    node_depth[ids] = d
    if d >= 1:
      node_parent[ids] = paths[active, d - 1]
      node_sign[ids] = signs[active, d - 1]
  for d in range(depth):
    active = lengths > d
    ids = paths[active, d]
    if (node_depth[ids] != d).any():
      raise ValueError(f"`{name}`: every internal node must sit at a single depth.")
    if d >= 1 and ((node_parent[ids] != paths[active, d - 1])
                   | (node_sign[ids] != signs[active, d - 1])).any():
      raise ValueError(f"`{name}`: an internal node is reached by two different branches.")
  if (node_depth < 0).any():
    raise ValueError(f"`{name}`: internal node {int(np.argmax(node_depth < 0))} is on no path.")
  # Every branch (parent, sign) leads to exactly one child: an internal node or a word.
  words = np.arange(vocab_size)
  branch_of_leaf = 2 * paths[words, lengths - 1] + (signs[words, lengths - 1] > 0)
  not_root = node_parent >= 0
  if not_root.sum() != num_nodes - 1:
    raise ValueError(f"`{name}` must have exactly one root.")
  branch_of_node = 2 * node_parent[not_root] + (node_sign[not_root] > 0)
  uses = np.bincount(np.concatenate([branch_of_leaf, branch_of_node]), minlength=2 * num_nodes)
  if (uses != 1).any():
    raise ValueError(f"`{name}`: every branch of every internal node must lead to exactly one "
                     f"child (a word's path is a prefix of another, or a branch is empty).")
