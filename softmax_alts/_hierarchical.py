"""Hierarchical softmax: a binary tree of logistic decisions over the vocabulary."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softmax_alts._base import (OutputLayer, RowLoss, RowSparse, check_targets, check_where,
                                init_function, layer_functions)
from softmax_alts._lse import accumulation_dtype, common_dtype, logits
from softmax_alts._trees import Tree, check_tree


class HierarchicalParams(NamedTuple):
  """Parameters of the hierarchical softmax: one logistic unit per internal node.

  Attributes:
    nodes: `[V-1, H]` the node vectors u_n.
    bias: `[V-1]` the node biases c_n.
  """

  nodes: jax.Array
  bias: jax.Array


def _check_params(params: HierarchicalParams, hidden, num_nodes: int) -> None:
  """Raises `ValueError` if the shapes of `params` and `hidden` disagree (at trace time)."""
  if jnp.shape(params.nodes) != (num_nodes, jnp.shape(hidden)[1]):
    raise ValueError(f"`params.nodes` must be [V-1, H] = [{num_nodes}, {jnp.shape(hidden)[1]}] "
                     f"(the tree's nodes, the width of `hidden`); got {jnp.shape(params.nodes)}.")
  if jnp.shape(params.bias) != (num_nodes,):
    raise ValueError(f"`params.bias` must be [V-1] = [{num_nodes}]; "
                     f"got {jnp.shape(params.bias)}.")


def _path_log_prob(hidden, vectors, bias_rows, sign) -> jax.Array:
  """log p of each target from the rows of its path's nodes.

  Args:
    hidden: `[N, H]`.
    vectors: `[N, D, H]` the node vectors along each target's path.
    bias_rows: `[N, D]` their biases.
    sign: `[N, D]` the branch signs, 0 past the path's end (those entries add nothing).

  Returns:
    `[N]` sum_d log sigmoid(s_d * (u_{n_d} . h + c_{n_d})), in at least float32.
  """
  common, dtype = common_dtype(vectors, hidden), accumulation_dtype(vectors, hidden)
  scores = jnp.einsum("ndh,nh->nd", vectors.astype(common), hidden.astype(common),
                      preferred_element_type=dtype) + bias_rows.astype(dtype)
  terms = jnp.where(sign != 0, jax.nn.log_sigmoid(sign.astype(dtype) * scores), 0)
  return jnp.sum(terms, axis=1)


def _levels(tree: Tree):
  """Static plan to compute log p of every internal node, top down, one tree level at a time.

  Returns:
    A list over depths d = 1, 2, .. of `(parent_position_d, parent_d, sign_d)`: for the
    internal nodes at depth d (in id order), the position of each one's parent among the nodes
    at depth d-1, the parent's id and the branch sign; and `(position, last_node, last_sign)`
    to read each word's log p from its last internal node: `position[w]` is the flat position
    of `last_node[w]` in the depth-ordered concatenation of the levels.
  """
  vocab_size, depth = tree.paths.shape
  num_nodes = vocab_size - 1
  node_depth = np.zeros(num_nodes, np.int64)
  node_parent = np.zeros(num_nodes, np.int64)
  node_sign = np.zeros(num_nodes, np.int64)
  for d in range(depth):
    active = tree.lengths > d
    node_depth[tree.paths[active, d]] = d
    if d >= 1:
      node_parent[tree.paths[active, d]] = tree.paths[active, d - 1]
      node_sign[tree.paths[active, d]] = tree.signs[active, d - 1]
  levels_nodes = [np.nonzero(node_depth == d)[0] for d in range(int(node_depth.max(initial=0)) + 1)]
  position = np.zeros(num_nodes, np.int64)  # flat position in the depth-ordered concatenation
  offset = 0
  local = np.zeros(num_nodes, np.int64)  # position within its own level
  for nodes in levels_nodes:
    position[nodes] = offset + np.arange(nodes.shape[0])
    local[nodes] = np.arange(nodes.shape[0])
    offset += nodes.shape[0]
  levels = []
  for nodes in levels_nodes[1:]:
    parents = node_parent[nodes]
    levels.append((local[parents].astype(np.int32), parents.astype(np.int32),
                   node_sign[nodes].astype(np.int8)))
  if depth == 0:  # a single word: no internal node
    empty = np.zeros(vocab_size, np.int64)
    return levels, (empty.astype(np.int32), empty.astype(np.int32), empty.astype(np.int8))
  words = np.arange(vocab_size)
  last_node = tree.paths[words, tree.lengths - 1]
  last_sign = tree.signs[words, tree.lengths - 1]
  return levels, (position[last_node].astype(np.int32), last_node.astype(np.int32),
                  last_sign.astype(np.int8))


def hierarchical(tree: Tree) -> OutputLayer:
  """Hierarchical softmax: log p(w|h) is a sum of logistic branch decisions down the tree.

  With the path of w through internal nodes n_1 .. n_L taking branches s_1 .. s_L in {+1, -1},

    log p(w | h) = sum_{d=1}^{L} log sigmoid(s_d * (u_{n_d} . h + c_{n_d})),

  which is normalized over the V leaves by construction. The loss gathers only the target's
  path, so it costs O(N * D * H) instead of the full softmax's O(N * V * H), where D is the
  depth of the tree (static shapes pad every path to it): ceil(log2 V) for a balanced tree; a
  Huffman tree has shorter paths on average (close to the entropy of the counts, in bits) but a
  longer longest path. The gradient w.r.t. the `[V-1, H]` node table touches at most N * D
  rows: `sparse_loss_and_grads(layer, params, hidden, targets)` returns it as those rows only
  and `apply_row_update` scatters the step into the table, so a training step need not read or
  write the whole table. `log_probs` computes the V - 1 node scores once (one `[N, H] x [H, V-1]`
  GEMM) and then the log probability of every node top down, one tree level at a time:
  O(N * V * H + N * V).

  Example:
    >>> layer = hierarchical(huffman_tree(counts))
    >>> params = layer.init(key, hidden_size, len(counts))
    >>> loss = layer.loss(params, hidden, targets).mean()

  Args:
    tree: a `Tree` over the V words (`balanced_tree(V)` or `huffman_tree(counts)`).

  Returns:
    An `OutputLayer` with `HierarchicalParams(nodes [V-1, H], bias [V-1])`. `loss` is the exact
    NLL `[N]` (its `key` is unused), `log_prob` `[N]`, `log_probs` `[N, V]`.

  References:
    Morin and Bengio, "Hierarchical Probabilistic Neural Network Language Model", 2005.
    https://proceedings.mlr.press/r5/morin05a.html
    Mikolov, Sutskever, Chen, Corrado and Dean, "Distributed Representations of Words and
    Phrases and their Compositionality", 2013. https://arxiv.org/abs/1310.4546
  """
  check_tree(tree)
  num_words = tree.vocab_size
  num_nodes = tree.num_nodes
  paths = np.asarray(tree.paths, np.int32)
  signs = np.asarray(tree.signs, np.int8)
  levels, (word_position, word_last_node, word_last_sign) = _levels(tree)

  @init_function
  def init(key, hidden_size: int, vocab_size: int, dtype) -> HierarchicalParams:
    """Node vectors uniform in +-1/sqrt(H) (as a PyTorch `Linear`), biases zero."""
    if vocab_size != num_words:
      raise ValueError(f"`vocab_size` must equal the tree's number of words {num_words}; "
                       f"got {vocab_size}.")
    if hidden_size < 1:
      raise ValueError(f"`hidden_size` must be >= 1; got {hidden_size}.")
    bound = float(hidden_size) ** -0.5
    nodes = jax.random.uniform(key, (num_nodes, hidden_size), dtype, -bound, bound)
    return HierarchicalParams(nodes=nodes, bias=jnp.zeros((num_nodes,), dtype))

  def check(params: HierarchicalParams, hidden) -> int:
    _check_params(params, hidden, num_nodes)
    return num_words

  def path_log_prob(params: HierarchicalParams, hidden, targets) -> jax.Array:
    node_ids = jnp.asarray(paths)[targets]                                # [N, D]
    return _path_log_prob(hidden, params.nodes[node_ids], params.bias[node_ids],
                          jnp.asarray(signs)[targets])

  def all_log_probs(params: HierarchicalParams, hidden) -> jax.Array:
    num_rows = hidden.shape[0]
    dtype = accumulation_dtype(hidden, params.nodes)
    if num_words == 1:
      return jnp.zeros((num_rows, 1), dtype)
    scores = logits(hidden, params.nodes, params.bias)                   # [N, V-1]
    level = jnp.zeros((num_rows, 1), dtype)                               # the root: log 1
    node_log_probs = [level]
    for parent_position, parent, sign in levels:
      branch = jnp.asarray(sign).astype(dtype)[None, :] * scores[:, parent]
      level = level[:, parent_position] + jax.nn.log_sigmoid(branch)
      node_log_probs.append(level)
    node_log_probs = jnp.concatenate(node_log_probs, axis=1)             # [N, V-1], by depth
    last_sign = jnp.asarray(word_last_sign).astype(dtype)[None, :]
    return node_log_probs[:, word_position] + jax.nn.log_sigmoid(
        last_sign * scores[:, word_last_node])

  loss, log_prob, log_probs = layer_functions(check, path_log_prob, all_log_probs)

  def rows(params: HierarchicalParams, hidden, targets, *, key=None, where=None,
           negatives=None) -> RowLoss:
    """`loss` as a function of the node rows on the targets' paths (see `_sparse.py`)."""
    del key  # exact: nothing is sampled
    if negatives is not None:
      raise ValueError("`negatives` are for the sampling losses; the hierarchical softmax "
                       "samples nothing.")
    _check_params(params, hidden, num_nodes)
    where = check_where(where, hidden.shape[0])
    valid = check_targets(targets, num_words, hidden.shape[0], where=where)
    use = valid if where is None else valid & where
    targets = jnp.where(use, targets, 0).astype(jnp.int32)
    node_ids = jnp.asarray(paths)[targets]                                # [N, D]
    sign = jnp.asarray(signs)[targets]                                    # [N, D]
    on_path = (sign != 0) & use[:, None]  # padding, bad and masked targets read no row

    def values(hidden, table_rows, bias_rows):
      (vectors,), (bias_rows,) = table_rows, bias_rows
      return -_path_log_prob(hidden, vectors, bias_rows, sign)

    return RowLoss(ids=(node_ids,), keep=(on_path,), values=values, valid=valid, where=where)

  return OutputLayer(init=init, loss=loss, log_prob=log_prob, log_probs=log_probs,
                     row_sparse=RowSparse(loss=loss, rows=rows))
