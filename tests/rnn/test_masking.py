"""NaN-safe masking: what a padded step holds never reaches the outputs nor any gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnn
from tests.rnn._util import assert_trees_close, scalar_loss, setup

LENGTHS = jnp.array([7, 3, 0])
OPTIONS = {
    "plain": {},
    "reverse": {"reverse": True},
    "remat_reverse": {"remat": True, "reverse": True},
    "remat_time_major": {"remat": True, "time_major": True},
}


def _poisoned(xs, lengths):
  """`xs` with NaN at every padded step, and with zeros there."""
  padded = jnp.arange(xs.shape[1])[None, :] >= lengths[:, None]
  nan = jnp.where(padded[..., None], jnp.full_like(xs, jnp.nan), xs)
  zero = jnp.where(padded[..., None], jnp.zeros_like(xs), xs)
  return nan, zero


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("grad", ["autodiff", "manual"])
@pytest.mark.parametrize("name", ["lstm", "gru", "user"])
def test_nan_in_padded_steps_reaches_no_gradient(name, grad, option, key):
  cell, params, xs, state = setup(name, key)
  opts = dict(OPTIONS[option])
  time_major = opts.pop("time_major", False)
  nan_xs, zero_xs = _poisoned(xs, LENGTHS)

  def loss(p, x, s):
    x = jnp.swapaxes(x, 0, 1) if time_major else x
    ys, final = rnn.unroll(cell, p, x, s, lengths=LENGTHS, grad=grad, time_major=time_major,
                           **opts)
    return scalar_loss(ys, final)

  value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  value, grads = value_and_grad(params, nan_xs, state)
  ref_value, ref_grads = value_and_grad(params, zero_xs, state)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  np.testing.assert_array_equal(value, ref_value)
  assert_trees_close(grads, ref_grads, atol=0.0)


def test_nan_in_padded_steps_with_truncation_and_the_parallel_scan(key):
  cell, params, xs, state = setup("min_gru", key)
  nan_xs, zero_xs = _poisoned(xs, LENGTHS)
  step_loss = lambda y, t: jnp.sum(jnp.sin(y))
  for run in (
      lambda p, x: rnn.truncated(cell, p, x, state, step_loss, k1=2, k2=4, lengths=LENGTHS)[0],
      lambda p, x: scalar_loss(*rnn.unroll(cell, p, x, state, lengths=LENGTHS, parallel=True,
                                           reverse=True)),
  ):
    grads = jax.grad(run, argnums=(0, 1))(params, nan_xs)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert_trees_close(grads, jax.grad(run, argnums=(0, 1))(params, zero_xs), atol=0.0)
