"""Shared cells and helpers for the rnn tests."""

import jax
import jax.numpy as jnp
import numpy as np

import rnn

CELLS = {
    "tanh": lambda h: rnn.simple(h),
    "irnn": lambda h: rnn.simple(h, activation=jax.nn.relu),
    "lstm": lambda h: rnn.lstm(h),
    "lstmp": lambda h: rnn.lstm(h, proj_size=h - 3),
    "gru": lambda h: rnn.gru(h),
    "gru_cho": lambda h: rnn.gru(h, reset_after=False),
}


def setup(name, key, *, batch=3, steps=7, features=5, hidden=8, dtype=jnp.float32):
  """A cell, its params, inputs and a non-zero initial state."""
  cell = CELLS[name](hidden)
  k1, k2, k3 = jax.random.split(key, 3)
  params = jax.tree.map(lambda a: a.astype(dtype), cell.init(k1, features))
  xs = jax.random.normal(k2, (batch, steps, features), dtype)
  state = cell.initial_state(params, (batch,))
  noise = jax.random.split(k3, len(jax.tree.leaves(state)))
  state = jax.tree.unflatten(jax.tree.structure(state), [
      0.3 * jax.random.normal(k, s.shape, dtype) for k, s in zip(noise, jax.tree.leaves(state))])
  return cell, params, xs, state


def scalar_loss(ys, final):
  """A loss that weighs every output and every final-state entry differently."""
  total = jnp.sum(jnp.sin(ys) * ys)
  for leaf in jax.tree.leaves(final):
    total = total + jnp.sum(jnp.cos(leaf))
  return total


def assert_trees_close(a, b, *, atol, rtol=0.0):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)
