"""Hand-derived BPTT: a `jax.custom_vjp` over the recurrence, as cuDNN organises it.

The forward pass is a scan that stores, per step, the state and the gate activations. The
backward pass is the textbook BPTT recursion (Werbos 1990): a reverse scan whose carry is only the
error signal `dL/dstate_t`; each step turns it into the gradient of the gate pre-activations and
sends it one step back through `W_hh`. The weight gradients are then single GEMMs over all
`T * B` rows at once, instead of `T` small products accumulated inside the loop; the input-side
gradients (`W_ih`, biases, `xs`) follow from the returned `dL/dxw` through `cell.project`, again
one GEMM.

Per cell the module defines three functions on flat `[B, n]` arrays:

- `forward(rp, state_tm1, xw_t) -> (state_t, y_t, residuals_t)`
- `backward(rp, rpt, residuals_t, state_tm1, dstate_t) -> (dstate_tm1, dxw_t, outs_t)`, where
  `dstate_t` already includes `dL/dy_t`, and `outs_t` holds what the weight gradients need;
- `finish(rp, outs, states_tm1) -> d rp`, the GEMMs over all steps.

`rp` holds the recurrent parameters only; `rpt` their transposes, made once per backward pass
so every per-step product contracts the weights' last axis (XLA's fast orientation on CPU).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnn._cells import Cell, GRUState, LSTMState, SimpleState, _add_bias, _dense, _lstm_gates


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
  forward: callable
  backward: callable
  finish: callable


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
    return SimpleState(_dense(da, w_hh_t)), da, da

  def finish(rp, da, states_tm1):
    return (_sum_outer(da, states_tm1.hidden),)

  return _Rules(lambda p: (p.w_hh,), forward, backward, finish)


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
    outs = (dz, dstate.hidden, o * tanh_c) if proj else (dz,)
    return dstate_tm1, dz, outs

  def finish(rp, outs, states_tm1):
    dw_hh = _sum_outer(outs[0], states_tm1.hidden)
    dw_hr = _sum_outer(outs[1], outs[2]) if proj else None
    return dw_hh, dw_hr

  return _Rules(lambda p: (p.w_hh, p.w_hr), forward, backward, finish)


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
    return GRUState(dh_tm1), dxw, (dxw, r * h_tm1)

  def finish(rp, outs, states_tm1):
    if reset_after:
      return _sum_outer(outs, states_tm1.hidden), jnp.sum(outs[..., 2 * h:], axis=(0, 1))
    dxw, rh = outs
    dw_rz = _sum_outer(dxw[..., :2 * h], states_tm1.hidden)
    dw_n = _sum_outer(dxw[..., 2 * h:], rh)
    return jnp.concatenate([dw_rz, dw_n], axis=0), None

  def recurrent_params(p):
    return p.w_hh, (p.b_hh[2 * h:] if reset_after else None)

  return _Rules(recurrent_params, forward, backward, finish)


_RULES = {"simple": _simple_rules, "lstm": _lstm_rules, "gru": _gru_rules}


# ----------------------------------------------------------------------------------------------
# The custom_vjp recurrence


def _transpose(rp):
  """Materialised transposes of the weight matrices (vectors and None pass through)."""
  return jax.tree.map(lambda w: w.T if w.ndim == 2 else w, rp)


def _masked(mask_t, new, old):
  return jax.tree.map(lambda n, o: jnp.where(mask_t[:, None], n, o), new, old)


@functools.lru_cache(maxsize=None)
def _make_recurrence(rules: _Rules, masked: bool, remat: bool, unroll: int, clip_delta):
  """A custom_vjp `f(rp, xw [T, B, G], state0, mask [T, B]) -> (ys [T, B, O], final)`."""

  def scan_forward(rp, xw, state0, mask):
    def body(state_tm1, inputs):
      xw_t, mask_t = inputs
      state_t, y_t, res_t = rules.forward(rp, state_tm1, xw_t)
      if masked:
        state_t = _masked(mask_t, state_t, state_tm1)
        y_t = jnp.where(mask_t[:, None], y_t, jnp.zeros_like(y_t))
      return state_t, (y_t, state_t, None if remat else res_t)

    final, (ys, states, res) = jax.lax.scan(body, state0, (xw, mask), unroll=unroll)
    return ys, final, states, res

  @jax.custom_vjp
  def recurrence(rp, xw, state0, mask):
    ys, final, _, _ = scan_forward(rp, xw, state0, mask)
    return ys, final

  def fwd(rp, xw, state0, mask):
    ys, final, states, res = scan_forward(rp, xw, state0, mask)
    return (ys, final), (rp, xw if remat else None, state0, mask, states, res)

  def bwd(saved, cotangents):
    rp, xw, state0, mask, states, res = saved
    dys, dfinal = cotangents
    # The state before each step: state0, then the stored states shifted by one.
    states_tm1 = jax.tree.map(lambda s0, s: jnp.concatenate([s0[None], s[:-1]]), state0, states)
    rpt = _transpose(rp)

    def body(dstate, inputs):
      res_t, xw_t, state_tm1, mask_t, dy_t = inputs
      if remat:
        _, _, res_t = rules.forward(rp, state_tm1, xw_t)
      dstate_new = dstate._replace(hidden=dstate.hidden + dy_t)
      if masked:
        keep = mask_t[:, None]
        passed = jax.tree.map(lambda d: jnp.where(keep, jnp.zeros_like(d), d), dstate)
        dstate_new = jax.tree.map(lambda d: jnp.where(keep, d, jnp.zeros_like(d)), dstate_new)
      dstate_tm1, dxw_t, outs_t = rules.backward(rp, rpt, res_t, state_tm1, dstate_new, clip_delta)
      if masked:
        dstate_tm1 = jax.tree.map(jnp.add, dstate_tm1, passed)
      return dstate_tm1, (dxw_t, outs_t)

    dstate0, (dxw, outs) = jax.lax.scan(body, dfinal, (res, xw, states_tm1, mask, dys),
                                        reverse=True, unroll=unroll)
    drp = rules.finish(rp, outs, states_tm1)
    return drp, dxw, dstate0, None

  recurrence.defvjp(fwd, bwd)
  return recurrence


@functools.lru_cache(maxsize=None)
def _rules_for(kind: str, config) -> _Rules:
  """One `_Rules` per (kind, config), so equal cells share one cached custom_vjp."""
  return _RULES[kind](config)


def recurrence(cell: Cell, params, xw, state, mask, *, reverse: bool, unroll: int, remat: bool,
               clip_delta):
  """`unroll`'s manual-gradient path on time-major `xw [T, *batch, G]`."""
  rules = _rules_for(cell.kind, cell.config)
  num_steps, batch_shape = xw.shape[0], xw.shape[1:-1]
  xw = xw.reshape((num_steps, -1, xw.shape[-1]))
  state = jax.tree.map(lambda s: s.reshape((-1, s.shape[-1])), state)
  if mask is not None:
    mask = mask.reshape((num_steps, -1))
  if reverse:
    xw = jnp.flip(xw, 0)
    mask = None if mask is None else jnp.flip(mask, 0)
  fn = _make_recurrence(rules, mask is not None, bool(remat), unroll, clip_delta)
  ys, final = fn(rules.recurrent_params(params), xw, state, mask)
  if reverse:
    ys = jnp.flip(ys, 0)
  ys = ys.reshape((num_steps,) + batch_shape + ys.shape[-1:])
  final = jax.tree.map(lambda s: s.reshape(batch_shape + s.shape[-1:]), final)
  return ys, final
