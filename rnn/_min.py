"""minGRU and minLSTM: gates that read only the input, so the recurrence is linear in the state.

`h_t = a_t * h_{t-1} + b_t` with `a_t`, `b_t` computed from `x_t` alone: the cell's `linear` field
gives `(a, b)` for any number of steps at once, from which the step, the hand-derived BPTT's
point-wise part and the parallel-in-time unroll (`jax.lax.associative_scan`) are all built.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnn._cells import (Cell, Pointwise, _affine, _check_size, _precision, state_dtype,
                        torch_init, zeros_state)


class MinParams(NamedTuple):
  w_ih: jax.Array  # [2H, D] (minGRU: z, h~) or [3H, D] (minLSTM: f, i, h~)
  b_ih: jax.Array | None  # [2H] or [3H]


class MinState(NamedTuple):
  hidden: jax.Array  # [..., H]


class MinConfig(NamedTuple):
  hidden_size: int
  bias: bool
  dtype: Any
  param_dtype: Any


def linear_pointwise(linear) -> Pointwise:
  """The `Pointwise` parts of a cell whose state follows `h_t = a_t * h_{t-1} + b_t`."""

  def update(params, xw_t, state_tm1):
    a_t, b_t = linear(params, xw_t)
    h_t = a_t * state_tm1.hidden + b_t
    return state_tm1._replace(hidden=h_t), h_t

  return Pointwise(update, recurrent_weight=lambda params: None)


def _min_cell(hidden_size, gates, linear, bias, dtype, param_dtype) -> Cell:
  _check_size(hidden_size, "hidden_size")
  config = MinConfig(hidden_size, bool(bias), *_precision(dtype, param_dtype))
  g = gates * hidden_size

  def init(key, input_size: int) -> MinParams:
    _check_size(input_size, "input_size")
    shapes = [(g, input_size), (g,) if config.bias else None]
    return MinParams(*torch_init(key, shapes, hidden_size, config.param_dtype))

  def initial_state(params, batch_shape=()) -> MinState:
    return zeros_state(MinState, batch_shape, (hidden_size,), state_dtype(config, params))

  def project(params, xs):
    return _affine(xs, params.w_ih, params.b_ih, config.dtype)

  pointwise = linear_pointwise(linear)
  return Cell(init, initial_state, project, pointwise.step, hidden_size, config, pointwise,
              linear)


def min_gru(hidden_size: int, *, bias: bool = True, dtype=None, param_dtype=jnp.float32) -> Cell:
  """minGRU: a GRU whose gate and candidate read only the input.

  ```
  z_t = sigmoid(W_z x_t + b_z),   h~_t = W_h x_t + b_h      # w_ih = [W_z; W_h]
  h_t = (1 - z_t) * h_{t-1} + z_t * h~_t
  ```

  The recurrence is linear in `h`, so `rnn.unroll(..., parallel=True)` solves it with
  `jax.lax.associative_scan` in O(log T) depth, to the same result as the scan.

  Args:
    hidden_size: H.
    bias: learn `b_ih`; `False`: it is `None`.
    dtype: the computation dtype; `None`: promoted from the inputs' and the parameters'.
    param_dtype: the dtype `init` stores the parameters in.

  Returns:
    A `Cell` with `MinParams(w_ih [2H, D], b_ih [2H])` and `MinState(hidden)`, and `linear`.

  References:
    Feng, Tung, Ahmed, Bengio and Hajimirsadeghi, Were RNNs all we needed?, 2024.
      https://arxiv.org/abs/2410.01201
  """
  h = hidden_size

  def linear(params, xw):
    z = jax.nn.sigmoid(xw[..., :h])
    return 1.0 - z, z * xw[..., h:]

  return _min_cell(hidden_size, 2, linear, bias, dtype, param_dtype)


def min_lstm(hidden_size: int, *, bias: bool = True, dtype=None, param_dtype=jnp.float32) -> Cell:
  """minLSTM: an LSTM whose gates read only the input, normalized so that they sum to one.

  ```
  f_t = sigmoid(W_f x_t + b_f),   i_t = sigmoid(W_i x_t + b_i),   h~_t = W_h x_t + b_h
  f'_t = f_t / (f_t + i_t),   i'_t = i_t / (f_t + i_t)
  h_t = f'_t * h_{t-1} + i'_t * h~_t
  ```

  Linear in `h` as minGRU, so `rnn.unroll(..., parallel=True)` applies alike.

  Args:
    hidden_size, bias, dtype, param_dtype: as `rnn.min_gru`.

  Returns:
    A `Cell` with `MinParams(w_ih [3H, D], b_ih [3H])` (gates f, i, h~) and `MinState(hidden)`,
    and `linear`.

  References:
    Feng, Tung, Ahmed, Bengio and Hajimirsadeghi, Were RNNs all we needed?, 2024.
      https://arxiv.org/abs/2410.01201
  """
  h = hidden_size

  def linear(params, xw):
    f, i = jnp.split(jax.nn.sigmoid(xw[..., :2 * h]), 2, axis=-1)
    total = f + i
    return f / total, i / total * xw[..., 2 * h:]

  return _min_cell(hidden_size, 3, linear, bias, dtype, param_dtype)
