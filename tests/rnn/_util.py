"""Shared cells and helpers for the rnn tests, and a cell of a user's own, written here outside the
package to the `rnn.Cell` contract."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import rnn


class TraceParams(NamedTuple):
  kernel: jax.Array  # [2H, D]
  recurrent: jax.Array  # [2H, H]
  bias: jax.Array  # [2H]
  decay: jax.Array  # [H], read by the point-wise part itself


class TraceState(NamedTuple):
  hidden: jax.Array  # [..., H]
  trace: jax.Array  # [..., H], a decaying sum of the hidden states


def trace_cell(h: int) -> rnn.Cell:
  """A user's cell: a gated update with a second state leaf and an output that is not `hidden`.

  ```
  f, c = sigmoid, tanh of (x_t @ kernel.T + h_{t-1} @ recurrent.T + bias)
  h_t = f * h_{t-1} + (1 - f) * c
  trace_t = sigmoid(decay) * trace_{t-1} + h_t
  y_t = [h_t, trace_t]
  ```

  Its params and state use names of its own (no `w_ih`, no `w_hh`): the `Pointwise` parts say
  where the recurrent weight and the bias are.
  """

  def init(key, input_size):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return TraceParams(jax.random.normal(k1, (2 * h, input_size)) / input_size ** 0.5,
                       jax.random.normal(k2, (2 * h, h)) / h ** 0.5,
                       0.1 * jax.random.normal(k3, (2 * h,)), jax.random.normal(k4, (h,)))

  def initial_state(params, batch_shape=()):
    zeros = jnp.zeros(tuple(batch_shape) + (h,), params.kernel.dtype)
    return TraceState(zeros, zeros)

  def project(params, xs):
    return xs @ params.kernel.T

  def update(params, a_t, state_tm1):
    f = jax.nn.sigmoid(a_t[..., :h])
    hidden = f * state_tm1.hidden + (1 - f) * jnp.tanh(a_t[..., h:])
    decay = jax.nn.sigmoid(params.decay).reshape((1,) * (hidden.ndim - 1) + (h,))
    trace = decay * state_tm1.trace + hidden
    return TraceState(hidden, trace), jnp.concatenate([hidden, trace], axis=-1)

  pointwise = rnn.Pointwise(update, recurrent_weight=lambda p: p.recurrent,
                            bias=lambda p: p.bias)
  return rnn.Cell(init, initial_state, project, pointwise.step, 2 * h, pointwise=pointwise)


CELLS = {
    "tanh": lambda h: rnn.simple(h),
    "irnn": lambda h: rnn.simple(h, activation=jax.nn.relu),
    "lstm": lambda h: rnn.lstm(h),
    "lstmp": lambda h: rnn.lstm(h, proj_size=h - 3),
    "gru": lambda h: rnn.gru(h),
    "gru_cho": lambda h: rnn.gru(h, reset_after=False),
    "user": trace_cell,
    "min_gru": lambda h: rnn.min_gru(h),
    "min_lstm": lambda h: rnn.min_lstm(h),
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
