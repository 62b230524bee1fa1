"""Tests of the hierarchical softmax against a float64 walk down the tree."""

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_alts

VOCAB_SIZES = [1, 2, 3, 17, 1000]


def _tree(kind, vocab_size):
  if kind == "balanced":
    return softmax_alts.balanced_tree(vocab_size)
  counts = np.random.default_rng(vocab_size).integers(1, 100, size=vocab_size)
  return softmax_alts.huffman_tree(np.sort(counts * 100 // np.arange(1, vocab_size + 1))[::-1])


def _inputs(key, layer, num_rows, hidden_size, vocab_size, dtype=jnp.float32):
  """Random params (shaped as `init` makes them), hidden and targets, drawn with numpy."""
  rng = np.random.default_rng(vocab_size)
  shapes = jax.eval_shape(lambda k: layer.init(k, hidden_size, vocab_size), key)
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), dtype), shapes)
  hidden = jnp.asarray(2.0 * rng.normal(size=(num_rows, hidden_size)), dtype)
  targets = jnp.asarray(rng.integers(0, vocab_size, size=num_rows), jnp.int32)
  return params, hidden, targets


def _reference(tree, params, hidden):
  """log p(w|h) for every w, summed along each path in float64."""
  nodes = np.asarray(params.nodes, np.float64)
  bias = np.asarray(params.bias, np.float64)
  h = np.asarray(hidden, np.float64)
  out = np.zeros((h.shape[0], tree.vocab_size))
  for w in range(tree.vocab_size):
    for d in range(tree.lengths[w]):
      n, s = tree.paths[w, d], tree.signs[w, d]
      out[:, w] += -np.logaddexp(0.0, -s * (h @ nodes[n] + bias[n]))  # log sigmoid
  return out


@pytest.mark.parametrize("kind", ["balanced", "huffman"])
@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_normalized_and_consistent(key, kind, vocab_size):
  tree = _tree(kind, vocab_size)
  layer = softmax_alts.hierarchical(tree)
  params, hidden, targets = _inputs(key, layer, 6, 8, vocab_size)
  log_probs = np.asarray(layer.log_probs(params, hidden))
  log_prob = np.asarray(layer.log_prob(params, hidden, targets))
  loss = np.asarray(layer.loss(params, hidden, targets))
  assert log_probs.shape == (6, vocab_size) and log_prob.shape == loss.shape == (6,)
  rows, ids = np.arange(6), np.asarray(targets)
  np.testing.assert_allclose(np.logaddexp.reduce(log_probs, axis=1), 0.0, atol=1e-5)
  np.testing.assert_allclose(log_prob, log_probs[rows, ids], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(loss, -log_prob)
  reference = _reference(tree, params, hidden)
  np.testing.assert_allclose(log_probs, reference, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(log_prob, reference[rows, ids], rtol=1e-5, atol=1e-5)


def test_single_word_has_probability_one(key):
  layer = softmax_alts.hierarchical(softmax_alts.balanced_tree(1))
  params, hidden, targets = _inputs(key, layer, 3, 4, 1)
  chex.assert_shape(params.nodes, (0, 4))
  np.testing.assert_array_equal(layer.log_probs(params, hidden), np.zeros((3, 1)))
  np.testing.assert_array_equal(layer.loss(params, hidden, targets), np.zeros(3))
  params = layer.init(key, 4, 1)
  assert params.nodes.shape == (0, 4) and params.bias.shape == (0,)


def _sizes(jaxpr):
  """The size of every intermediate array, nested jaxprs (jit, custom rules) included."""
  for eqn in jaxpr.eqns:
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _sizes(sub)
    yield from (int(np.prod(v.aval.shape)) for v in eqn.outvars)


def test_loss_touches_only_the_paths(key):
  """The loss's cost is O(N D H): no [N, V-1] score matrix is ever built."""
  vocab_size, num_rows, hidden_size = 1000, 16, 4  # D = 10; N (V-1) > (V-1) H > N D H
  layer = softmax_alts.hierarchical(softmax_alts.balanced_tree(vocab_size))
  params, hidden, targets = _inputs(key, layer, num_rows, hidden_size, vocab_size)
  sizes = lambda fn, *args: list(_sizes(jax.make_jaxpr(fn)(*args).jaxpr))
  forward = sizes(lambda p, h: layer.loss(p, h, targets), params, hidden)
  assert max(forward) == num_rows * 10 * hidden_size  # the gathered path vectors
  # The gradient of the node table is [V-1, H] (a scatter of the touched rows); nothing is
  # [N, V-1].
  loss_grad = jax.grad(lambda p, h: layer.loss(p, h, targets).sum(), argnums=(0, 1))
  assert max(sizes(loss_grad, params, hidden)) == (vocab_size - 1) * hidden_size
  assert max(sizes(layer.log_probs, params, hidden)) >= num_rows * (vocab_size - 1)


def test_init(key):
  layer = softmax_alts.hierarchical(softmax_alts.balanced_tree(300))
  params = layer.init(key, 64, 300)
  assert params.nodes.shape == (299, 64) and params.bias.shape == (299,)
  assert params.nodes.dtype == jnp.float32
  bound = 1 / 8  # 1 / sqrt(H)
  assert np.abs(params.nodes).max() <= bound and np.abs(params.nodes).max() > 0.9 * bound
  np.testing.assert_array_equal(params.bias, 0.0)
  assert layer.init(key, 4, 300, dtype=jnp.bfloat16).nodes.dtype == jnp.bfloat16


def test_bad_config(key):
  layer = softmax_alts.hierarchical(softmax_alts.balanced_tree(17))
  with pytest.raises(ValueError, match="vocab_size.*17.*got 16"):
    layer.init(key, 4, 16)
  params, _, targets = _inputs(key, layer, 3, 4, 17)
  with pytest.raises(ValueError, match="params.nodes"):
    layer.loss(params, jnp.zeros((3, 5)), targets)
  with pytest.raises(ValueError, match="hidden"):
    layer.loss(params, jnp.zeros((3,)), targets)
  with pytest.raises(ValueError, match="Tree"):
    softmax_alts.hierarchical(np.zeros((4, 2)))
