"""Tests of the candidate samplers: their distributions, expected counts and checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import softmax_alts
from softmax_alts._samplers import _alias_table

V = 50
COUNTS = np.round(1000.0 / np.arange(1, V + 1) ** 1.1)


def _probs(name):
  if name == "uniform":
    return np.full(V, 1.0 / V)
  if name == "log_uniform":
    ids = np.arange(V)
    return (np.log(ids + 2.0) - np.log(ids + 1.0)) / np.log(V + 1.0)
  weights = COUNTS ** 0.75
  return weights / weights.sum()


def _sampler(name, unique):
  if name == "uniform":
    return softmax_alts.uniform(V, unique=unique)
  if name == "log_uniform":
    return softmax_alts.log_uniform(V, unique=unique)
  return softmax_alts.unigram(COUNTS, power=0.75, unique=unique)


def _draws(sampler, key, num_samples, num_draws, targets=None):
  keys = jax.random.split(key, num_draws)
  return np.asarray(jax.jit(jax.vmap(lambda k: sampler.sample(k, num_samples, targets)))(keys))


NAMES = ["uniform", "log_uniform", "unigram"]


@pytest.mark.parametrize("name", NAMES)
def test_log_probs(name):
  for unique in (False, True):
    sampler = _sampler(name, unique)
    assert sampler.vocab_size == V and sampler.unique == unique
    np.testing.assert_allclose(np.exp(sampler.log_probs()), _probs(name), rtol=1e-5)


def test_unigram_power_and_zero_counts():
  counts = np.array([8.0, 4.0, 0.0, 1.0])
  for power in (0.0, 0.5, 1.0):
    expected = np.where(counts > 0, counts ** power, 0.0)
    np.testing.assert_allclose(np.exp(softmax_alts.unigram(counts, power=power).log_probs()),
                               expected / expected.sum(), rtol=1e-6)
  sampler = softmax_alts.unigram(counts)
  ids = _draws(sampler, jax.random.key(3), 5, 200)
  assert not np.any(ids == 2)  # A zero count is never drawn.
  np.testing.assert_array_equal(sampler.expected_count(jnp.array([2]), 5), 0.0)


@pytest.mark.parametrize("probs", [np.array([1.0]), np.array([0.5, 0.5]),
                                   np.array([0.7, 0.0, 0.2, 0.1]), _probs("log_uniform")])
def test_alias_table_is_exact(probs):
  threshold, alias = _alias_table(probs)
  size = probs.shape[0]
  implied = threshold.astype(np.float64) / size
  np.add.at(implied, alias, (1.0 - threshold.astype(np.float64)) / size)
  np.testing.assert_allclose(implied, probs, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_with_replacement_chi_square_and_expected_count(key, name):
  """20000 i.i.d. draws: frequencies match p (chi-square), and E[count] = k p matches them."""
  sampler = _sampler(name, unique=False)
  num_samples, num_draws = 10, 2000
  ids = np.asarray(jax.jit(lambda k: sampler.sample(k, num_samples * num_draws))(key))
  assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < V
  observed = np.bincount(ids, minlength=V)
  assert stats.chisquare(observed, num_samples * num_draws * _probs(name)).pvalue > 1e-3
  # Draws are i.i.d., so 2000 batches of 10 are these 20000 draws in rows of 10.
  mean_count = observed / num_draws
  expected = np.asarray(sampler.expected_count(jnp.arange(V), num_samples))
  np.testing.assert_allclose(expected, num_samples * _probs(name), rtol=1e-5)
  standard_error = np.sqrt(num_samples * _probs(name) * (1 - _probs(name)) / num_draws)
  assert np.all(np.abs(mean_count - expected) < 5 * standard_error)


@pytest.mark.parametrize("name", ["uniform", "log_uniform"])
def test_without_replacement_expected_count_matches_monte_carlo(key, name):
  num_samples, num_draws = 10, 4000
  sampler = _sampler(name, unique=True)
  ids = _draws(sampler, key, num_samples, num_draws)
  assert ids.shape == (num_draws, num_samples)
  assert all(len(set(row)) == num_samples for row in ids.tolist())
  inclusion = np.bincount(ids.ravel(), minlength=V) / num_draws
  expected = np.asarray(sampler.expected_count(jnp.arange(V), num_samples))
  np.testing.assert_allclose(expected.sum(), num_samples, rtol=1e-5)
  if name == "uniform":  # Exact: k / V.
    np.testing.assert_allclose(expected, num_samples / V, rtol=1e-6)
    standard_error = np.sqrt(expected * (1 - expected) / num_draws)
    assert np.all(np.abs(inclusion - expected) < 5 * standard_error)
  else:
    # TensorFlow's estimator -expm1(t log1p(-p)) with one t for all ids: close, not exact.
    np.testing.assert_allclose(expected, inclusion, atol=0.04)
    p = _probs(name)
    num_tries = np.log1p(-expected[0]) / np.log1p(-p[0])
    np.testing.assert_allclose(expected, -np.expm1(num_tries * np.log1p(-p)), rtol=1e-4)


@pytest.mark.parametrize("unique", [False, True])
def test_in_batch(key, unique):
  targets = jnp.array([3, 7, 3, 0, 9, 3, 7, 1], jnp.int32)
  sampler = softmax_alts.in_batch(10, unique=unique)
  num_samples, num_draws = 6, 4000
  if unique:
    ids = _draws(sampler, key, num_samples, num_draws, targets)
  else:  # I.i.d. draws: one call, in rows of num_samples.
    ids = np.asarray(jax.jit(lambda k: sampler.sample(k, num_samples * num_draws, targets))(
        key)).reshape(num_draws, num_samples)
  assert set(np.unique(ids)) <= set(np.asarray(targets).tolist())
  multiplicity = np.bincount(np.asarray(targets), minlength=10)
  expected = np.asarray(sampler.expected_count(jnp.arange(10), num_samples, targets))
  np.testing.assert_allclose(expected, num_samples * multiplicity / 8, rtol=1e-6)
  mean_count = np.bincount(ids.ravel(), minlength=10) / num_draws
  np.testing.assert_allclose(mean_count, expected, atol=0.08)
  np.testing.assert_allclose(np.exp(sampler.log_probs(targets)), multiplicity / 8, rtol=1e-6)
  if unique:  # Every batch position at most once: all 8 positions when num_samples = 8.
    all_positions = np.sort(np.asarray(sampler.sample(key, 8, targets)))
    np.testing.assert_array_equal(all_positions, np.sort(np.asarray(targets)))


def test_sample_is_jittable_with_static_shapes(key):
  targets = jnp.array([1, 2, 2, 4], jnp.int32)
  samplers = [_sampler(n, u) for n in NAMES for u in (False, True)] + [
      softmax_alts.in_batch(V, unique=u) for u in (False, True)]
  for i, sampler in enumerate(samplers):
    if i in (1, 2):  # Eager dispatch is slow to compile: one of each kind of draw.
      eager = sampler.sample(key, 3, targets)
      np.testing.assert_array_equal(jax.jit(sampler.sample, static_argnums=1)(key, 3, targets),
                                    eager)
    shape = jax.eval_shape(lambda k, t, s=sampler: s.sample(k, 3, t), key, targets)
    assert shape.shape == (3,) and shape.dtype == jnp.int32
    counts = sampler.expected_count(jnp.array([[0, 1], [2, 4]]), 3, targets)
    assert counts.shape == (2, 2) and counts.dtype == jnp.float32


def test_bad_inputs(key):
  for bad in (0, -2, 1.5, True):
    with pytest.raises(ValueError, match="num_samples.*positive int"):
      softmax_alts.uniform(V).sample(key, bad)
    with pytest.raises(ValueError, match="vocab_size.*positive int"):
      softmax_alts.log_uniform(bad)
  with pytest.raises(ValueError, match="num_samples.*at most 50"):
    softmax_alts.uniform(V, unique=True).sample(key, 51)
  with pytest.raises(ValueError, match="num_samples.*at most 2"):
    softmax_alts.unigram(np.array([1.0, 0.0, 3.0]), unique=True).sample(key, 3)
  with pytest.raises(ValueError, match="counts.*\\[V\\]"):
    softmax_alts.unigram(np.ones((3, 2)))
  with pytest.raises(ValueError, match="counts.*non-negative"):
    softmax_alts.unigram(np.array([1.0, -1.0]))
  with pytest.raises(ValueError, match="counts.*positive"):
    softmax_alts.unigram(np.zeros(4))
  for bad in (-0.5, "1", None):
    with pytest.raises(ValueError, match="power.*non-negative"):
      softmax_alts.unigram(COUNTS, power=bad)
  sampler = softmax_alts.in_batch(V, unique=True)
  with pytest.raises(ValueError, match="targets"):
    sampler.sample(key, 2)
  with pytest.raises(ValueError, match="num_samples.*at most 3"):
    sampler.sample(key, 4, jnp.array([1, 2, 3]))
