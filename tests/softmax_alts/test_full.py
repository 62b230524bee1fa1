"""Tests of the full softmax, unchunked and blocked over the vocabulary."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_alts
from tests.softmax_alts._util import full_inputs


SCALE = 2.0


def _inputs(key, num_rows, hidden_size, vocab_size, dtype=jnp.float32):
  return full_inputs(key, num_rows, hidden_size, vocab_size, scale=SCALE, dtype=dtype)


def _np_log_softmax(params, hidden):
  z = np.asarray(hidden, np.float64) @ np.asarray(params.w, np.float64).T
  z = z + np.asarray(params.b, np.float64)[None, :]
  m = z.max(axis=1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


# Every V with and without chunks; chunk sizes that divide V, that do not, and that exceed it.
CASES = [(1, None), (1, 3), (2, 3), (3, None), (17, None), (17, 7), (17, 256), (1000, None),
         (1000, 250)]


@pytest.mark.parametrize("vocab_size,chunk_size", CASES)
def test_normalized_and_consistent(key, vocab_size, chunk_size):
  params, hidden, targets = _inputs(key, 5, 8, vocab_size)
  layer = softmax_alts.full(chunk_size=chunk_size)

  @jax.jit
  def outputs(params, hidden, targets):
    return (layer.log_probs(params, hidden), layer.log_prob(params, hidden, targets),
            layer.loss(params, hidden, targets))

  log_probs, log_prob, loss = outputs(params, hidden, targets)
  chex.assert_shape(log_probs, (5, vocab_size))
  chex.assert_shape([log_prob, loss], (5,))
  np.testing.assert_allclose(jax.nn.logsumexp(log_probs, axis=1), 0.0, atol=1e-5)
  np.testing.assert_allclose(log_prob, log_probs[jnp.arange(5), targets], atol=1e-5)
  np.testing.assert_allclose(loss, -log_prob, rtol=1e-6, atol=1e-6)
  reference = _np_log_softmax(params, hidden)
  np.testing.assert_allclose(log_probs, reference, atol=1e-4)
  np.testing.assert_allclose(loss, -reference[np.arange(5), np.asarray(targets)],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab_size,chunk_size", [(17, 1), (17, 5), (17, 40), (1000, 300)])
def test_chunked_gradient_equals_unchunked(key, vocab_size, chunk_size):
  params, hidden, targets = _inputs(key, 6, 8, vocab_size)
  weights = jnp.linspace(0.5, 1.5, 6)

  def objective(layer):
    return lambda p, h: jnp.sum(weights * layer.loss(p, h, targets))

  expected = jax.jit(jax.grad(objective(softmax_alts.full()), argnums=(0, 1)))(params, hidden)
  actual = jax.jit(jax.grad(objective(softmax_alts.full(chunk_size=chunk_size)),
                            argnums=(0, 1)))(params, hidden)
  chex.assert_trees_all_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_gradient_matches_autodiff_of_log_softmax(key):
  params, hidden, targets = _inputs(key, 4, 6, 50)

  def reference(p, h):
    z = h @ p.w.T + p.b[None, :]
    return -jnp.sum(jax.nn.log_softmax(z)[jnp.arange(4), targets])

  expected = jax.jit(jax.grad(reference, argnums=(0, 1)))(params, hidden)
  for layer in (softmax_alts.full(strategy="stream"), softmax_alts.full(strategy="materialize"),
                softmax_alts.full(chunk_size=7)):
    actual = jax.jit(jax.grad(lambda p, h: jnp.sum(layer.loss(p, h, targets)),
                              argnums=(0, 1)))(params, hidden)
    chex.assert_trees_all_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size,strategy", [(None, "stream"), (None, "materialize"),
                                                 (1500, None)])
def test_large_vocab_matches_log_softmax(key, chunk_size, strategy):
  """V = 5000 spans several stream blocks (of 2048 rows by default), one overlapping."""
  params, hidden, targets = _inputs(key, 4, 6, 5000)
  targets = targets.at[0].set(4999).at[1].set(2047).at[2].set(2048)

  def reference(p, h):
    z = h @ p.w.T + p.b[None, :]
    return -jax.nn.log_softmax(z)[jnp.arange(4), targets]

  layer = softmax_alts.full(chunk_size=chunk_size, strategy=strategy)
  weights = jnp.array([0.3, 1.0, -0.5, 2.0])
  value_and_grad = lambda f: jax.jit(jax.value_and_grad(
      lambda p, h: jnp.sum(weights * f(p, h)), argnums=(0, 1)))
  expected_value, expected_grad = value_and_grad(reference)(params, hidden)
  value, grad = value_and_grad(lambda p, h: layer.loss(p, h, targets))(params, hidden)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  chex.assert_trees_all_close(grad, expected_grad, atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(layer.log_prob)(params, hidden, targets),
                             -reference(params, hidden), rtol=1e-5)


def test_log_normalizer(key):
  params, hidden, _ = _inputs(key, 4, 6, 30)
  reference = np.log(np.exp(np.asarray(hidden @ params.w.T + params.b[None, :],
                                       np.float64)).sum(axis=1))
  for chunk_size in (None, 8):
    log_z = jax.jit(lambda p, h, c=chunk_size: softmax_alts.log_normalizer(p, h, chunk_size=c))
    np.testing.assert_allclose(log_z(params, hidden), reference, rtol=1e-5)


def test_init(key):
  params = softmax_alts.full().init(key, 16, 40)
  assert isinstance(params, softmax_alts.FullParams)
  chex.assert_shape(params.w, (40, 16))
  chex.assert_shape(params.b, (40,))
  np.testing.assert_array_equal(params.b, 0.0)
  assert 0.1 < float(jnp.std(params.w)) * 4.0 < 2.0  # std about 1 / sqrt(H) = 0.25
  assert softmax_alts.full().init(key, 4, 3, dtype=jnp.bfloat16).w.dtype == jnp.bfloat16


def test_chunked_memory_never_holds_all_logits():
  num_rows, hidden_size, vocab_size, chunk_size = 256, 32, 100_000, 1024
  logits_bytes = num_rows * vocab_size * 4
  params = softmax_alts.FullParams(
      jax.ShapeDtypeStruct((vocab_size, hidden_size), jnp.float32),
      jax.ShapeDtypeStruct((vocab_size,), jnp.float32))
  hidden = jax.ShapeDtypeStruct((num_rows, hidden_size), jnp.float32)
  targets = jax.ShapeDtypeStruct((num_rows,), jnp.int32)

  def temp_bytes(chunk):
    layer = softmax_alts.full(chunk_size=chunk)
    grad = jax.grad(lambda p, h, t: jnp.mean(layer.loss(p, h, t)), argnums=(0, 1))
    return jax.jit(grad).lower(params, hidden, targets).compile().memory_analysis(
    ).temp_size_in_bytes

  assert temp_bytes(None) >= logits_bytes
  assert temp_bytes(chunk_size) < logits_bytes / 4


def test_bad_inputs(key):
  params, hidden, targets = _inputs(key, 4, 3, 10)
  layer = softmax_alts.full()
  with pytest.raises(ValueError, match="hidden"):
    layer.loss(params, hidden[0], targets)
  with pytest.raises(ValueError, match="hidden.*H = 3"):
    layer.loss(params, hidden[:, :2], targets)
  with pytest.raises(ValueError, match="integer"):
    layer.loss(params, hidden, targets.astype(jnp.float32))
  with pytest.raises(ValueError, match="targets.*N = 4"):
    layer.loss(params, hidden, targets[:3])
  with pytest.raises(ValueError, match="targets.*\\[N\\]"):
    layer.loss(params, hidden, targets[:, None])
  with pytest.raises(ValueError, match="params.b"):
    layer.loss(params._replace(b=params.b[:5]), hidden, targets)
  for bad in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match="chunk_size.*positive int"):
      softmax_alts.full(chunk_size=bad)
    with pytest.raises(ValueError, match="block_rows.*positive int"):
      softmax_alts.full(block_rows=bad)
  with pytest.raises(ValueError, match="strategy.*'stream', 'materialize'.*got 'fast'"):
    softmax_alts.full(strategy="fast")
  with pytest.raises(ValueError, match="chunk_size.*not 'materialize'"):
    softmax_alts.full(chunk_size=8, strategy="materialize")
  with pytest.raises(ValueError, match="vocab_size"):
    layer.init(key, 4, 0)
  with pytest.raises(ValueError, match="hidden_size"):
    layer.init(key, -1, 5)


def test_default_strategy_by_backend_and_size():
  assert jax.default_backend() == "cpu"  # the suite runs on CPU
  assert softmax_alts.default_strategy(16, 1000) == "materialize"  # small logits
  assert softmax_alts.default_strategy(1024, 100_000) == "stream"  # beyond the cache budget
  assert softmax_alts.default_strategy(16, 1000, ranges=True) == "stream"  # skips other ranges
