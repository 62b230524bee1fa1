"""Hand-derived BPTT: a `jax.custom_vjp` over the whole layer, as cuDNN organises it.

The custom_vjp covers the input projection too. The forward pass is one GEMM for every step's
input products (`xs @ W_ih.T`, bias not yet added), then a loop over time that adds the bias
inside the step (where it fuses with the gate arithmetic instead of costing a pass over
`[T, B, G]`) and stores, per step, the state before the step and the gate activations. The
backward pass is the textbook BPTT recursion (Werbos 1990): a reverse loop whose carry is only
the error signal `dL/dstate_t`; each step turns it into the gradient of the gate pre-activations
`dxw_t` and sends it one step back through `W_hh`. The weight gradients are then single GEMMs over
all `T * B` rows at once instead of `T` small products accumulated inside the loop; for the Elman
RNN and the LSTM, whose `dW_hh` and `dW_ih` share the left operand `dxw`, one GEMM gives both:
`dxw.T @ [xs | h_prev]`.

With `remat`, the forward pass stores only the state before each step, and the backward loop
runs each step again, its input product included, so nothing `[T, B, G]` is stored between the
passes (the forward's `xw` and the backward's `dxw` still count in the peak).

The loops index the time axis where it lies (batch-major `[B, T, ...]` by default), so neither
the inputs nor the outputs are transposed, and `reverse` is a reversed index, not a flipped copy.

Per cell the module defines three functions on flat `[B, n]` arrays:

- `forward(rp, state_tm1, xw_t) -> (state_t, y_t, residuals_t)`
- `backward(rp, rpt, residuals_t, state_tm1, dstate_t) -> (dstate_tm1, dxw_t, outs_t)`, where
  `dstate_t` already includes `dL/dy_t`, and `outs_t` holds what the recurrent weight gradients
  need besides `dxw`;
- `finish(rp, dxw, outs, states_tm1, dw_hh) -> d rp`, the GEMMs over all steps (`dw_hh` is given
  when the layer computed it with `dW_ih`).

`rp` holds the recurrent parameters only; `rpt` their transposes, made once per backward pass
so every per-step product contracts the weights' last axis (XLA's fast orientation on CPU).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnn._cells import (Cell, GRUState, LSTMState, SimpleState, _add_bias, _dense, _gru_input_bias,
                        _lstm_gates, _select, _summed_bias)


def _sum_outer(a: jax.Array, b: jax.Array) -> jax.Array:
  """`sum_{t, b} a[t, b, :, None] * b[t, b, None, :]`: one `[G, TB] x [TB, H]` GEMM."""
  a2 = a.reshape(-1, a.shape[-1])
  b2 = b.reshape(-1, b.shape[-1])
  return jax.lax.dot_general(a2, b2, (((0,), (0,)), ((), ())))


def _clip(x, clip_delta):
  return x if clip_delta is None else jnp.clip(x, -clip_delta, clip_delta)


class _Rules(NamedTuple):
  """How one cell kind runs forward and backward, on flat `[B, n]` arrays."""
  recurrent_params: callable  # params -> rp; autodiff carries d rp back to params
  input_bias: callable  # params -> the bias added to `xs @ W_ih.T`, inside the step
  forward: callable
  backward: callable
  finish: callable
  shared_dw: bool  # dW_hh = sum_t dxw_t.T @ h_{t-1}: one GEMM with dW_ih


# ----------------------------------------------------------------------------------------------
# Elman RNN


def _simple_rules(config) -> _Rules:
  act = config.activation

  def forward(rp, state, xw_t):
    (w_hh,) = rp
    a = xw_t + _dense(state.hidden, w_hh)
    h_t = act(a)
    return SimpleState(h_t), h_t, a

  def backward(rp, rpt, a, state_tm1, dstate, clip_delta):
    (w_hh_t,) = rpt
    _, act_vjp = jax.vjp(act, a)
    (da,) = act_vjp(dstate.hidden)
    da = _clip(da, clip_delta)
    return SimpleState(_dense(da, w_hh_t)), da, None

  def finish(rp, dxw, outs, states_tm1, dw_hh):
    return (dw_hh,)

  return _Rules(lambda p: (p.w_hh,), _summed_bias, forward, backward, finish, shared_dw=True)


# ----------------------------------------------------------------------------------------------
# LSTM (optionally with a projection)


def _lstm_rules(config) -> _Rules:
  proj = config.proj_size is not None

  def forward(rp, state, xw_t):
    w_hh, w_hr = rp
    gates = _lstm_gates(xw_t + _dense(state.hidden, w_hh))
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c_t = f * state.cell + i * g
    h_t = o * jnp.tanh(c_t)
    if proj:
      h_t = _dense(h_t, w_hr)
    return LSTMState(h_t, c_t), h_t, gates

  def backward(rp, rpt, gates, state_tm1, dstate, clip_delta):
    w_hh_t, w_hr_t = rpt
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    # The cell state c_t is recomputed from the gates: cheaper to store one [B, 4H] than two.
    c_t = f * state_tm1.cell + i * g
    tanh_c = jnp.tanh(c_t)
    dm = _dense(dstate.hidden, w_hr_t) if proj else dstate.hidden
    dc = dstate.cell + dm * o * (1.0 - tanh_c * tanh_c)
    dz = jnp.concatenate([dc * g * i * (1.0 - i),
                          dc * state_tm1.cell * f * (1.0 - f),
                          dc * i * (1.0 - g * g),
                          dm * tanh_c * o * (1.0 - o)], axis=-1)
    dz = _clip(dz, clip_delta)
    dstate_tm1 = LSTMState(_dense(dz, w_hh_t), dc * f)
    outs = (dstate.hidden, o * tanh_c) if proj else None
    return dstate_tm1, dz, outs

  def finish(rp, dxw, outs, states_tm1, dw_hh):
    return dw_hh, (_sum_outer(*outs) if proj else None)

  return _Rules(lambda p: (p.w_hh, p.w_hr), _summed_bias, forward, backward, finish,
                shared_dw=True)


# ----------------------------------------------------------------------------------------------
# GRU, both forms


def _gru_rules(config) -> _Rules:
  h = config.hidden_size
  reset_after = config.reset_after

  def forward(rp, state, xw_t):
    w_hh, b_hn = rp
    h_tm1 = state.hidden
    x_r, x_z, x_n = jnp.split(xw_t, 3, axis=-1)
    if reset_after:
      hw_r, hw_z, hw_n = jnp.split(_dense(h_tm1, w_hh), 3, axis=-1)
      hn = _add_bias(hw_n, b_hn)
      r, z = jax.nn.sigmoid(x_r + hw_r), jax.nn.sigmoid(x_z + hw_z)
      n = jnp.tanh(x_n + r * hn)
      res = jnp.concatenate([r, z, n, hn], axis=-1)
    else:
      hw_r, hw_z = jnp.split(_dense(h_tm1, w_hh[:2 * h]), 2, axis=-1)
      r, z = jax.nn.sigmoid(x_r + hw_r), jax.nn.sigmoid(x_z + hw_z)
      n = jnp.tanh(x_n + _dense(r * h_tm1, w_hh[2 * h:]))
      res = jnp.concatenate([r, z, n], axis=-1)
    h_t = n + z * (h_tm1 - n)
    return GRUState(h_t), h_t, res

  def backward(rp, rpt, res, state_tm1, dstate, clip_delta):
    h_tm1, dh = state_tm1.hidden, dstate.hidden
    w_hh_t, _ = rpt  # [H, 3H]
    if reset_after:
      r, z, n, hn = jnp.split(res, 4, axis=-1)
    else:
      r, z, n = jnp.split(res, 3, axis=-1)
    dan = _clip(dh * (1.0 - z) * (1.0 - n * n), clip_delta)
    daz = _clip(dh * (h_tm1 - n) * z * (1.0 - z), clip_delta)
    if reset_after:
      dar = _clip(dan * hn * r * (1.0 - r), clip_delta)
      dhw = jnp.concatenate([dar, daz, dan * r], axis=-1)
      dh_tm1 = _dense(dhw, w_hh_t) + dh * z
      return GRUState(dh_tm1), jnp.concatenate([dar, daz, dan], axis=-1), dhw
    d_rh = _dense(dan, w_hh_t[:, 2 * h:])
    dar = _clip(d_rh * h_tm1 * r * (1.0 - r), clip_delta)
    dh_tm1 = _dense(jnp.concatenate([dar, daz], axis=-1), w_hh_t[:, :2 * h]) + d_rh * r + dh * z
    dxw = jnp.concatenate([dar, daz, dan], axis=-1)
    return GRUState(dh_tm1), dxw, r * h_tm1

  def finish(rp, dxw, outs, states_tm1, dw_hh):
    if reset_after:
      return _sum_outer(outs, states_tm1.hidden), jnp.sum(outs[..., 2 * h:], axis=(0, 1))
    dw_rz = _sum_outer(dxw[..., :2 * h], states_tm1.hidden)
    dw_n = _sum_outer(dxw[..., 2 * h:], outs)  # outs: r * h_{t-1}
    return jnp.concatenate([dw_rz, dw_n], axis=0), None

  def recurrent_params(p):
    return p.w_hh, (p.b_hh[2 * h:] if reset_after else None)

  return _Rules(recurrent_params, lambda p: _gru_input_bias(p, reset_after), forward, backward,
                finish, shared_dw=False)


_RULES = {"simple": _simple_rules, "lstm": _lstm_rules, "gru": _gru_rules}


# ----------------------------------------------------------------------------------------------
# The custom_vjp layer


def _transpose(rp):
  """Materialised transposes of the weight matrices (vectors and None pass through)."""
  return jax.tree.map(lambda w: w.T if w.ndim == 2 else w, rp)


def _at(tree, t, axis):
  """Step `t` of every stacked array in `tree` (time on `axis`)."""
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, t, axis, keepdims=False), tree)


def _store(bufs, values, t, axis):
  return jax.tree.map(lambda b, v: jax.lax.dynamic_update_index_in_dim(b, v, t, axis), bufs, values)


def _stacked_zeros(tree, num_steps, axis):
  """Buffers for `num_steps` values shaped like the leaves of `tree`, time on `axis`."""
  return jax.tree.map(lambda v: jnp.zeros(v.shape[:axis] + (num_steps,) + v.shape[axis:], v.dtype),
                      tree)


@functools.lru_cache(maxsize=None)
def _make_layer(rules: _Rules, masked: bool, remat: bool, unroll: int, clip_delta, reverse: bool,
                axis: int):
  """A custom_vjp `f(rp, w_ih, bias, xs, state0, mask [T, B]) -> (ys, final)`.

  `xs` is `[B, T, D]` (`axis=1`) or `[T, B, D]` (`axis=0`), and `ys` has the same layout.
  """

  def run_forward(rp, w_ih, bias, xs, state0, mask):
    num_steps = xs.shape[axis]
    xw = _dense(xs, w_ih)

    def step(state_tm1, t):
      state_t, y_t, res_t = rules.forward(rp, state_tm1, _add_bias(_at(xw, t, axis), bias))
      if masked:
        state_t = _select(mask[t], state_t, state_tm1)
        y_t = jnp.where(mask[t][:, None], y_t, jnp.zeros_like(y_t))
      return state_t, (y_t, state_tm1, None if remat else res_t)

    def body(k, carry):
      state_tm1, bufs = carry
      t = num_steps - 1 - k if reverse else k
      state_t, outs = step(state_tm1, t)
      return state_t, _store(bufs, outs, t, axis)

    bufs = _stacked_zeros(jax.eval_shape(step, state0, 0)[1], num_steps, axis)
    final, (ys, states_tm1, res) = jax.lax.fori_loop(0, num_steps, body, (state0, bufs),
                                                      unroll=unroll)
    return ys, final, states_tm1, res

  @jax.custom_vjp
  def layer(rp, w_ih, bias, xs, state0, mask):
    ys, final, _, _ = run_forward(rp, w_ih, bias, xs, state0, mask)
    return ys, final

  def fwd(rp, w_ih, bias, xs, state0, mask):
    ys, final, states_tm1, res = run_forward(rp, w_ih, bias, xs, state0, mask)
    return (ys, final), (rp, w_ih, bias, xs, mask, states_tm1, res)

  def bwd(saved, cotangents):
    rp, w_ih, bias, xs, mask, states_tm1, res = saved
    dys, dfinal = cotangents
    num_steps = xs.shape[axis]
    rpt = _transpose(rp)

    def step(dstate, t):
      state_tm1 = _at(states_tm1, t, axis)
      if remat:  # the step again, its input products included: nothing [T, B, G] is stored
        xw_t = _add_bias(_dense(_at(xs, t, axis), w_ih), bias)
        _, _, res_t = rules.forward(rp, state_tm1, xw_t)
      else:
        res_t = _at(res, t, axis)
      dstate_new = dstate._replace(hidden=dstate.hidden + _at(dys, t, axis))
      if masked:
        keep = mask[t][:, None]
        passed = jax.tree.map(lambda d: jnp.where(keep, jnp.zeros_like(d), d), dstate)
        dstate_new = jax.tree.map(lambda d: jnp.where(keep, d, jnp.zeros_like(d)), dstate_new)
      dstate_tm1, dxw_t, outs_t = rules.backward(rp, rpt, res_t, state_tm1, dstate_new, clip_delta)
      if masked:
        dstate_tm1 = jax.tree.map(jnp.add, dstate_tm1, passed)
      return dstate_tm1, (dxw_t, outs_t)

    def body(k, carry):
      dstate, bufs = carry
      t = k if reverse else num_steps - 1 - k
      dstate_tm1, outs = step(dstate, t)
      return dstate_tm1, _store(bufs, outs, t, axis)

    bufs = _stacked_zeros(jax.eval_shape(step, dfinal, 0)[1], num_steps, axis)
    dstate0, (dxw, outs) = jax.lax.fori_loop(0, num_steps, body, (dfinal, bufs), unroll=unroll)
    dxw_rows = dxw.reshape(-1, dxw.shape[-1])
    input_size = xs.shape[-1]
    if rules.shared_dw:
      # [dW_ih | dW_hh] = dxw.T @ [xs | h_prev]: one GEMM over all T * B rows.
      rows = jnp.concatenate([xs, states_tm1.hidden], axis=-1)
      dw = jax.lax.dot_general(rows.reshape(-1, rows.shape[-1]), dxw_rows,
                               (((0,), (0,)), ((), ()))).T
      dw_ih, dw_hh = dw[:, :input_size], dw[:, input_size:]
    else:
      dw_ih, dw_hh = _sum_outer(dxw, xs), None
    drp = rules.finish(rp, dxw, outs, states_tm1, dw_hh)
    dxs = jax.lax.dot_general(dxw, w_ih, (((dxw.ndim - 1,), (0,)), ((), ())))
    return drp, dw_ih, jnp.sum(dxw_rows, axis=0), dxs, dstate0, None

  layer.defvjp(fwd, bwd)
  return layer


@functools.lru_cache(maxsize=None)
def _rules_for(kind: str, config) -> _Rules:
  """One `_Rules` per (kind, config), so equal cells share one cached custom_vjp."""
  return _RULES[kind](config)


def recurrence(cell: Cell, params, xs, state, mask, *, time_major: bool, reverse: bool,
               unroll: int, remat: bool, clip_delta):
  """`unroll`'s manual-gradient path: `xs [*batch, T, D]` (`[T, *batch, D]` with `time_major`),
  `mask [T, *batch]` or None; returns `(ys, final)` in the layout of `xs`."""
  rules = _rules_for(cell.kind, cell.config)
  if xs.shape[0 if time_major else -2] == 0:  # no steps: no outputs, the initial state
    return jnp.zeros(xs.shape[:-1] + (cell.output_size,), xs.dtype), state
  if time_major:
    num_steps, batch_shape, axis = xs.shape[0], xs.shape[1:-1], 0
  else:
    num_steps, batch_shape, axis = xs.shape[-2], xs.shape[:-2], 1
  batch = math.prod(batch_shape)
  xs = xs.reshape(((num_steps, batch) if time_major else (batch, num_steps)) + xs.shape[-1:])
  state = jax.tree.map(lambda s: s.reshape((batch, s.shape[-1])), state)
  if mask is not None:
    mask = mask.reshape((num_steps, batch))
  fn = _make_layer(rules, mask is not None, bool(remat), unroll, clip_delta, bool(reverse), axis)
  ys, final = fn(rules.recurrent_params(params), params.w_ih, rules.input_bias(params), xs, state,
                 mask)
  if time_major:
    ys = ys.reshape((num_steps,) + batch_shape + ys.shape[-1:])
  else:
    ys = ys.reshape(batch_shape + (num_steps,) + ys.shape[-1:])
  final = jax.tree.map(lambda s: s.reshape(batch_shape + s.shape[-1:]), final)
  return ys, final
