"""The pure pieces of the `gradients` and `memory` benchmark suites, on tiny sizes."""

import numpy as np
import pytest

import jax

from benchmarks import _gradients
from benchmarks import _memory


def test_adding_problem_marks_one_step_in_each_half_and_sums_them(key):
  xs, targets = _gradients.adding_problem(key, 64, 9)
  xs, targets = np.asarray(xs), np.asarray(targets)
  assert xs.shape == (64, 9, 2) and targets.shape == (64,)
  values, markers = xs[..., 0], xs[..., 1]
  assert np.all((values >= 0) & (values < 1))
  assert set(np.unique(markers)) <= {0.0, 1.0}
  # Exactly one mark in the first half (t < 4) and one in the second (t >= 4).
  np.testing.assert_array_equal(markers[:, :4].sum(1), 1)
  np.testing.assert_array_equal(markers[:, 4:].sum(1), 1)
  expected = [values[b, markers[b] == 1].sum() for b in range(64)]
  np.testing.assert_allclose(targets, expected, rtol=1e-6)
  # Both halves' positions are all drawn over many sequences.
  many, _ = _gradients.adding_problem(jax.random.fold_in(key, 1), 2000, 9)
  np.testing.assert_array_equal(np.asarray(many)[..., 1].sum(0) > 0, True)


def test_adding_problem_rejects_a_short_length(key):
  with pytest.raises(ValueError, match="length"):
    _gradients.adding_problem(key, 2, 1)


@pytest.mark.parametrize("lag", [2, 5])
def test_lag_source_recalls_the_key_seen_lag_steps_back(key, lag):
  num_keys, num_noise, length = 3, 4, 23
  mark = num_noise + num_keys
  tokens, recall = _gradients.lag_source(key, 50, length, lag=lag, num_keys=num_keys,
                                         num_noise=num_noise)
  tokens, recall = np.asarray(tokens), np.asarray(recall)
  assert tokens.shape == (50, length + 1) and recall.shape == (50, length)
  assert tokens.min() >= 0 and tokens.max() <= mark
  period = lag + 1
  for b in range(50):
    j = np.flatnonzero(recall[b]) + 1  # indices into tokens of the recalled keys
    assert len(j) >= (length + 1 - lag) // period
    np.testing.assert_array_equal(np.diff(j), period)
    assert j[0] >= lag
    np.testing.assert_array_equal(tokens[b, j], tokens[b, j - lag])
    np.testing.assert_array_equal(tokens[b, j - 1], mark)
    assert np.all((tokens[b, j] >= num_noise) & (tokens[b, j] < mark))
    # Every other MARK is followed by a recall whose key fell before the sequence's start.
    marks = np.flatnonzero(tokens[b, :-1] == mark) + 1
    np.testing.assert_array_equal(np.sort(np.setdiff1d(marks, j)) < lag, True)
    # Between a key and its recall come only noise tokens.
    for k in j:
      assert np.all(tokens[b, k - lag + 1:k - 1] < num_noise)


def test_lag_source_rejects_a_lag_below_two(key):
  with pytest.raises(ValueError, match="lag"):
    _gradients.lag_source(key, 2, 10, lag=1, num_keys=2, num_noise=2)


def test_memory_step_is_the_same_gradient_in_every_variant():
  grads = {}
  for grad, remat in _memory.VARIANTS:
    cell, step = _memory._step(grad, remat, 8)
    params, xs = _memory._inputs(cell, 2, 7, 8, 0)
    loss, grads[(grad, remat)] = jax.jit(step)(params, xs)
    assert np.isfinite(float(loss))
  ref = grads[("autodiff", False)]
  for g in grads.values():
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
