"""Tests of the differentiated softmax against a full softmax with a block-diagonal matrix."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_alts

# (V, bands): words sum to V, dims to H.
CASES = [
    (1, ((1, 6),)),
    (2, ((1, 4), (1, 2))),
    (3, ((1, 5), (2, 1))),
    (17, ((2, 4), (5, 3), (10, 1))),
    (1000, ((50, 5), (250, 2), (700, 1))),
]


def _inputs(key, layer, num_rows, hidden_size, vocab_size, dtype=jnp.float32):
  """Random params (shaped as `init` makes them), hidden and targets, drawn with numpy."""
  rng = np.random.default_rng(vocab_size)
  shapes = jax.eval_shape(lambda k: layer.init(k, hidden_size, vocab_size), key)
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), dtype), shapes)
  hidden = jnp.asarray(2.0 * rng.normal(size=(num_rows, hidden_size)), dtype)
  targets = jnp.asarray(rng.integers(0, vocab_size, size=num_rows), jnp.int32)
  return params, hidden, targets


def _reference(params, hidden, bands):
  """log softmax(W h + b) in float64 with W the block-diagonal [V, H] matrix of the bands."""
  vocab_size, hidden_size = sum(w for w, _ in bands), sum(d for _, d in bands)
  matrix = np.zeros((vocab_size, hidden_size))
  row = col = 0
  for (words, dim), weights in zip(bands, params.weights):
    matrix[row:row + words, col:col + dim] = np.asarray(weights, np.float64)
    row, col = row + words, col + dim
  logits = np.asarray(hidden, np.float64) @ matrix.T + np.asarray(params.bias, np.float64)
  return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


@pytest.mark.parametrize("vocab_size,bands", CASES)
def test_normalized_and_consistent(key, vocab_size, bands):
  hidden_size = sum(d for _, d in bands)
  layer = softmax_alts.differentiated(np.arange(vocab_size, 0, -1), bands)
  params, hidden, targets = _inputs(key, layer, 6, hidden_size, vocab_size)
  chex.assert_shape(list(params.weights), [(w, d) for w, d in bands])
  log_probs = np.asarray(layer.log_probs(params, hidden))
  log_prob = np.asarray(layer.log_prob(params, hidden, targets))
  loss = np.asarray(layer.loss(params, hidden, targets))
  assert log_probs.shape == (6, vocab_size) and log_prob.shape == loss.shape == (6,)
  np.testing.assert_allclose(np.logaddexp.reduce(log_probs, axis=1), 0.0, atol=1e-5)
  np.testing.assert_allclose(log_prob, log_probs[np.arange(6), np.asarray(targets)],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(loss, -log_prob)
  reference = _reference(params, hidden, bands)
  np.testing.assert_allclose(log_probs, reference, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(log_prob, reference[np.arange(6), np.asarray(targets)],
                             rtol=1e-5, atol=1e-5)


def test_single_band_is_the_full_softmax(key):
  layer = softmax_alts.differentiated(np.ones(30), ((30, 8),))
  params, hidden, targets = _inputs(key, layer, 5, 8, 30)
  full = softmax_alts.full()
  full_params = full.init(key, 8, 30)._replace(w=params.weights[0], b=params.bias)
  np.testing.assert_allclose(layer.loss(params, hidden, targets),
                             full.loss(full_params, hidden, targets), rtol=1e-5, atol=1e-5)


def test_init(key):
  layer = softmax_alts.differentiated(np.ones(300), ((20, 64), (280, 16)))
  params = layer.init(key, 80, 300)
  chex.assert_shape(list(params.weights) + [params.bias], [(20, 64), (280, 16), (300,)])
  assert 0.9 / 8 < np.abs(params.weights[0]).max() <= 1 / 8  # +-1/sqrt(dim_j)
  assert 0.9 / 4 < np.abs(params.weights[1]).max() <= 1 / 4
  np.testing.assert_array_equal(params.bias, 0.0)


@pytest.mark.parametrize("bands,match", [
    (((2, 4), (5, 3)), "bands.*sum to V = .*17.*sum 7"),
    (((10, 4), (10, 3)), "bands.*sum 20"),
    ((), "bands.*at least one"),
    (((17, 0),), "bands.*positive"),
    (((17, 2.0),), "bands.*positive"),
    ((17, 4), "bands.*pairs"),
])
def test_bad_bands(bands, match):
  with pytest.raises(ValueError, match=match):
    softmax_alts.differentiated(np.ones(17), bands)


def test_bad_config(key):
  layer = softmax_alts.differentiated(np.ones(17), ((2, 4), (15, 2)))
  with pytest.raises(ValueError, match="hidden_size.*bands.*6.*got 8"):
    layer.init(key, 8, 17)
  with pytest.raises(ValueError, match="vocab_size.*17.*got 18"):
    layer.init(key, 6, 18)
  params = layer.init(key, 6, 17)
  with pytest.raises(ValueError, match="hidden.*H = 6"):
    layer.loss(params, jnp.zeros((3, 5)), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="counts"):
    softmax_alts.differentiated(np.ones((17, 1)), ((17, 4),))
