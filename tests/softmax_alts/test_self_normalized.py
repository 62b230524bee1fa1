"""Tests of the self-normalized softmax and its test-time unnormalized score."""

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


def _np_reference(params, hidden, targets, alpha):
  """`-log softmax(z)[t] + alpha * (log Z)^2` in float64 numpy."""
  z = np.asarray(hidden, np.float64) @ np.asarray(params.w, np.float64).T
  z = z + np.asarray(params.b, np.float64)[None, :]
  m = z.max(axis=1)
  log_z = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
  z_t = z[np.arange(z.shape[0]), np.asarray(targets)]
  return log_z - z_t + alpha * log_z ** 2, z_t, log_z


@pytest.mark.parametrize("vocab_size,chunk_size", [(1, None), (2, None), (2, 1), (3, None),
                                                   (17, None), (17, 3), (1000, None),
                                                   (1000, 64)])
def test_loss_and_exact_log_probs(key, vocab_size, chunk_size):
  alpha = 0.3
  params, hidden, targets = _inputs(key, 5, 8, vocab_size)
  layer = softmax_alts.self_normalized(alpha, chunk_size=chunk_size)

  @jax.jit
  def outputs(params, hidden, targets):
    return (layer.log_probs(params, hidden), layer.log_prob(params, hidden, targets),
            layer.loss(params, hidden, targets),
            softmax_alts.unnormalized_score(params, hidden, targets))

  log_probs, log_prob, loss, score = outputs(params, hidden, targets)
  chex.assert_shape(log_probs, (5, vocab_size))
  np.testing.assert_allclose(jax.nn.logsumexp(log_probs, axis=1), 0.0, atol=1e-5)
  np.testing.assert_allclose(log_prob, log_probs[jnp.arange(5), targets], atol=1e-5)
  expected_loss, z_t, log_z = _np_reference(params, hidden, targets, alpha)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(log_prob, z_t - log_z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(score, z_t, rtol=1e-5, atol=1e-5)


def test_alpha_zero_is_full_softmax(key):
  params, hidden, targets = _inputs(key, 6, 4, 30)
  loss = jax.jit(softmax_alts.self_normalized(0.0).loss)(params, hidden, targets)
  np.testing.assert_allclose(loss, jax.jit(softmax_alts.full().loss)(params, hidden, targets),
                             rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [5, 16])
def test_chunked_gradient_equals_unchunked(key, chunk_size):
  params, hidden, targets = _inputs(key, 6, 4, 37)

  def grads(layer):
    objective = lambda p, h: jnp.sum(layer.loss(p, h, targets))
    return jax.jit(jax.grad(objective, argnums=(0, 1)))(params, hidden)

  chex.assert_trees_all_close(grads(softmax_alts.self_normalized(0.5, chunk_size=chunk_size)),
                              grads(softmax_alts.self_normalized(0.5)), atol=1e-5, rtol=1e-5)


def test_jit_equals_eager_and_vmap_equals_batched(key):
  params, hidden, targets = _inputs(key, 8, 5, 12)
  layer = softmax_alts.self_normalized(0.1)
  eager = layer.loss(params, hidden, targets)
  np.testing.assert_allclose(jax.jit(layer.loss)(params, hidden, targets), eager, rtol=1e-6)
  batched = jax.jit(jax.vmap(layer.loss, in_axes=(None, 0, 0)))(
      params, hidden.reshape(2, 4, 5), targets.reshape(2, 4))
  np.testing.assert_allclose(batched.reshape(8), eager, rtol=1e-5)
  scores = jax.jit(jax.vmap(softmax_alts.unnormalized_score, in_axes=(None, 0, 0)))(
      params, hidden.reshape(2, 4, 5), targets.reshape(2, 4))
  np.testing.assert_allclose(scores.reshape(8),
                             jax.jit(softmax_alts.unnormalized_score)(params, hidden, targets),
                             rtol=1e-6)


def test_training_drives_log_z_to_zero(key):
  """With the penalty, SGD makes the unnormalized score a usable log-probability."""
  params, hidden, targets = _inputs(key, 64, 8, 40)
  params = params._replace(b=params.b + 3.0)  # log Z starts far from 0.

  def train(alpha):
    layer = softmax_alts.self_normalized(alpha)

    @jax.jit
    def step(p, _):
      grad = jax.grad(lambda p: jnp.mean(layer.loss(p, hidden, targets)))(p)
      return jax.tree.map(lambda a, g: a - 0.5 * g, p, grad), None

    return jax.lax.scan(step, params, None, length=200)[0]

  @jax.jit
  def evaluate(trained):
    log_z = softmax_alts.log_normalizer(trained, hidden)
    gap = softmax_alts.unnormalized_score(trained, hidden, targets) - softmax_alts.full(
    ).log_prob(trained, hidden, targets)
    return log_z, gap

  for alpha, bound in ((1.0, 0.5), (0.0, None)):
    log_z, gap = evaluate(train(alpha))
    np.testing.assert_allclose(gap, log_z, rtol=1e-4, atol=1e-4)
    if bound is not None:
      assert float(jnp.mean(jnp.abs(log_z))) < bound
    else:
      assert float(jnp.mean(jnp.abs(log_z))) > 5.0


def test_bad_inputs(key):
  params, hidden, targets = _inputs(key, 4, 3, 10)
  for bad in (-0.1, "0.1", None, True):
    with pytest.raises(ValueError, match="alpha"):
      softmax_alts.self_normalized(bad)
  with pytest.raises(ValueError, match="chunk_size"):
    softmax_alts.self_normalized(0.1, chunk_size=0)
  layer = softmax_alts.self_normalized(0.1)
  with pytest.raises(ValueError, match="id 12.*vocab_size = 10"):
    layer.loss(params, hidden, targets.at[0].set(12))
  with pytest.raises(ValueError, match="id -2.*vocab_size = 10"):
    softmax_alts.unnormalized_score(params, hidden, targets.at[0].set(-2))
  loss = jax.jit(layer.loss)(params, hidden, targets.at[1].set(10))
  assert np.isnan(loss[1]) and np.all(np.isfinite(loss[jnp.array([0, 2, 3])]))
  score = jax.jit(softmax_alts.unnormalized_score)(params, hidden, targets.at[3].set(99))
  assert np.isnan(score[3]) and np.all(np.isfinite(score[:3]))
  with pytest.raises(ValueError, match="hidden"):
    layer.loss(params, hidden[:, :2], targets)
