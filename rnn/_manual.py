"""Hand-derived BPTT: a `jax.custom_vjp` over the whole layer, as cuDNN organises it, for any cell
that gives its `Pointwise` parts.

The recursion and every GEMM are written here once; a cell contributes only its point-wise math
(`Pointwise.update`), whose derivatives come from `jax.vjp`. Per step t:

```
hw_t = h_{t-1} @ W.T;   a_t = combine(xw_t, hw_t);   state_t, y_t = update(params, a_t, state_{t-1})
```

The forward pass is one call of `project` for every step's input products, then a loop over time
that stores, per step, the state before the step and the pre-activations `a_t`. The backward pass
is the textbook BPTT recursion (Werbos 1990): a reverse loop whose carry is only the error signal
`dL/dstate_t`; each step takes `jax.vjp` of `update` at the stored `a_t` (recomputing the
point-wise part, not storing its intermediates), transposes `combine` to split `da_t` into the
input and recurrent products' cotangents `dxw_t`, `dhw_t`, and sends `dhw_t` one step back through
`W`. The weight gradients are then GEMMs over all `T * B` rows at once instead of `T` small
products accumulated inside the loop: `dW = dhw.T @ h_prev`, and `jax.vjp` of `project` for the
input weights, biases and `dxs`. Parameters that `update` reads itself (the GRU's `b_hn`, the
LSTMP projection) get their gradient from the per-step `jax.vjp`, summed in the loop's carry.

With `remat`, the forward pass stores only the state before each step, and the backward loop
runs each step again, its input product included, so nothing `[T, B, G]` is stored between the
passes (the forward's `xw` and the backward's `da` still count in the peak).

The loops index the time axis where it lies (batch-major `[B, T, ...]` by default), so neither
the inputs nor the outputs are transposed, and `reverse` is a reversed index, not a flipped copy.
Padded steps (`mask`) and resets (`before`) are handled as in the scan: a reset step reads the
initial state `init`, a padded step keeps the state; their transposes route the error signal.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

from rnn._cells import Cell, _dense, _select, accumulation_dtype, apply_update, masked_step


def _sum_outer(a: jax.Array, b: jax.Array) -> jax.Array:
  """`sum_rows a[row, :, None] * b[row, None, :]`: one `[G, rows] x [rows, H]` GEMM, `b`'s dtype."""
  a2 = a.reshape(-1, a.shape[-1]).astype(b.dtype)
  b2 = b.reshape(-1, b.shape[-1])
  acc = accumulation_dtype(b.dtype)
  return jax.lax.dot_general(a2, b2, (((0,), (0,)), ((), ())),
                             preferred_element_type=None if acc == b.dtype else acc)


def _clip(tree, clip_delta):
  if clip_delta is None:
    return tree
  return jax.tree.map(lambda x: jnp.clip(x, -clip_delta, clip_delta), tree)


def _at(tree, t, axis):
  """Step `t` of every stacked array in `tree` (time on `axis`)."""
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, t, axis, keepdims=False), tree)


def _store(bufs, values, t, axis):
  return jax.tree.map(lambda b, v: jax.lax.dynamic_update_index_in_dim(b, v, t, axis), bufs, values)


def _stacked_zeros(tree, num_steps, axis):
  """Buffers for `num_steps` values shaped like the leaves of `tree`, time on `axis`."""
  return jax.tree.map(lambda v: jnp.zeros(v.shape[:axis] + (num_steps,) + v.shape[axis:], v.dtype),
                      tree)


def _used_by(fn, params, *args) -> tuple[bool, ...]:
  """For each leaf of `params`: does `fn(params, *args)` read it? (From its jaxpr.)"""
  jaxpr = jax.make_jaxpr(fn)(params, *args).jaxpr
  read = {v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, Literal)}
  read.update(v for v in jaxpr.outvars if not isinstance(v, Literal))
  return tuple(v in read for v in jaxpr.invars[:len(jax.tree.leaves(params))])


def _split_params(params, used):
  leaves, treedef = jax.tree.flatten(params)
  picked = tuple(leaf for leaf, u in zip(leaves, used) if u)

  def merge(picked_values):
    it = iter(picked_values)
    return jax.tree.unflatten(treedef, [next(it) if u else leaf for leaf, u in zip(leaves, used)])

  def scatter(values):
    """`values` of the picked leaves back in `params`' structure, zeros elsewhere."""
    it = iter(values)
    return jax.tree.unflatten(treedef, [next(it).astype(leaf.dtype) if u else jnp.zeros_like(leaf)
                                        for leaf, u in zip(leaves, used)])

  return picked, merge, scatter


@functools.lru_cache(maxsize=None)
def _make_layer(cell: Cell, masked: bool, resets: bool, remat: bool, unroll: int, clip_delta,
                reverse: bool, axis: int):
  """A custom_vjp `f(params, xs, state0, init, mask [T, B], before [T, B]) -> (ys, final)`.

  `xs` is `[B, T, D]` (`axis=1`) or `[T, B, D]` (`axis=0`), and `ys` has the same layout.
  """
  pw = cell.pointwise
  additive = pw.combine is None

  def forward_step(params, w, xw_t, state_tm1, mask_t, reset_t, init):
    def step(state):
      hw_t = None if w is None else _dense(state.hidden, w)
      a_t = pw.add_bias(params, pw.products(xw_t, hw_t))
      return (*apply_update(pw, params, a_t, state, xw_t.dtype), a_t)
    return masked_step(step, state_tm1, mask_t, reset_t, init)

  def run_forward(params, xs, state0, init, mask, before):
    num_steps = xs.shape[axis]
    xw = cell.project(params, xs)
    w = pw.weight(params)

    def step(state_tm1, t):
      mask_t = mask[t] if masked else None
      reset_t = before[t] if resets else None
      state_t, y_t, state_in, a_t = forward_step(params, w, _at(xw, t, axis), state_tm1, mask_t,
                                                 reset_t, init)
      return state_t, (y_t, state_in, None if remat else a_t)

    def body(k, carry):
      state_tm1, bufs = carry
      t = num_steps - 1 - k if reverse else k
      state_t, outs = step(state_tm1, t)
      return state_t, _store(bufs, outs, t, axis)

    bufs = _stacked_zeros(jax.eval_shape(step, state0, 0)[1], num_steps, axis)
    final, (ys, states_in, pre) = jax.lax.fori_loop(0, num_steps, body, (state0, bufs),
                                                    unroll=unroll)
    return ys, final, states_in, pre

  @jax.custom_vjp
  def layer(params, xs, state0, init, mask, before):
    ys, final, _, _ = run_forward(params, xs, state0, init, mask, before)
    return ys, final

  def fwd(params, xs, state0, init, mask, before):
    ys, final, states_in, pre = run_forward(params, xs, state0, init, mask, before)
    return (ys, final), (params, xs, init, mask, before, states_in, pre)

  def bwd(saved, cotangents):
    params, xs, init, mask, before, states_in, pre = saved
    dys, dfinal = cotangents
    num_steps = xs.shape[axis]
    w = pw.weight(params)
    wt = None if w is None else w.T  # materialised once: every per-step product contracts last
    xw_spec = jax.eval_shape(cell.project, params, _at(xs, 0, axis))
    state_spec = _at(states_in, 0, axis)
    a_spec = jax.eval_shape(forward_step, params, w, xw_spec, state_spec, None, None, None)[3]

    def update(p, a_t, state):
      return apply_update(pw, p, a_t, state, xw_spec.dtype)

    used = _used_by(update, params, a_spec, state_spec)
    picked, merge, scatter = _split_params(params, used)
    if w is not None and not additive:
      hw_spec = jax.eval_shape(_dense, state_spec.hidden, w)
      split = jax.linear_transpose(pw.products, xw_spec, hw_spec)

    def step(carry, t):
      dstate, dinit, dpicked = carry
      state_in = _at(states_in, t, axis)
      if remat:  # the step again, its input products included: nothing [T, B, G] is stored
        xw_t = cell.project(params, _at(xs, t, axis))
        hw_t = None if w is None else _dense(state_in.hidden, w)
        a_t = pw.add_bias(params, pw.products(xw_t, hw_t))
      else:
        a_t = _at(pre, t, axis)
      dy_t = _at(dys, t, axis)
      if masked:
        keep = mask[t][:, None]
        passed = jax.tree.map(lambda d: jnp.where(keep, jnp.zeros_like(d), d), dstate)
        dstate = jax.tree.map(lambda d: jnp.where(keep, d, jnp.zeros_like(d)), dstate)
        dy_t = jnp.where(keep, dy_t, jnp.zeros_like(dy_t))
      _, vjp = jax.vjp(lambda pk, a, s: update(merge(pk), a, s), picked, a_t, state_in)
      dp_t, da_t, dstate_in = vjp((dstate, dy_t))
      da_t = _clip(da_t, clip_delta)
      if w is not None:
        dhw_t = da_t if additive else split(da_t)[1]
        h = dstate_in.hidden
        dh = h.astype(dhw_t.dtype) + _dense(dhw_t.astype(h.dtype), wt)
        dstate_in = dstate_in._replace(hidden=dh.astype(h.dtype))
      if resets:
        reset = before[t][:, None]
        dinit = jax.tree.map(lambda acc, d: acc + jnp.where(reset, d, jnp.zeros_like(d)), dinit,
                             dstate_in)
        dstate_in = _select(~before[t], dstate_in, jax.tree.map(jnp.zeros_like, dstate_in))
      if masked:
        dstate_in = jax.tree.map(jnp.add, dstate_in, passed)
      dpicked = jax.tree.map(lambda acc, d: acc + d.astype(acc.dtype), dpicked, dp_t)
      return (dstate_in, dinit, dpicked), da_t

    def body(k, carry):
      inner, bufs = carry
      t = k if reverse else num_steps - 1 - k
      inner, stored = step(inner, t)
      return inner, _store(bufs, stored, t, axis)

    dinit0 = jax.tree.map(jnp.zeros_like, init) if resets else None
    dpicked0 = tuple(jnp.zeros(p.shape, accumulation_dtype(p.dtype)) for p in picked)
    inner0 = (dfinal, dinit0, dpicked0)
    bufs = _stacked_zeros(jax.eval_shape(step, inner0, 0)[1], num_steps, axis)
    (dstate0, dinit, dpicked), da = jax.lax.fori_loop(0, num_steps, body, (inner0, bufs),
                                                      unroll=unroll)
    dparams = scatter(dpicked)
    bias = None if pw.bias is None else pw.bias(params)
    if bias is not None:  # one sum over all steps and rows per bias
      sums = jax.tree.map(lambda d, b: jnp.sum(d.reshape(-1, d.shape[-1]), axis=0).astype(b.dtype),
                          da, bias)
      dparams = jax.tree.map(jnp.add, dparams, jax.vjp(pw.bias, params)[1](sums)[0])
    if w is None or additive:
      dxw, dhw = da, da
    else:  # combine's transpose over all steps at once
      hw_full = jax.ShapeDtypeStruct(xs.shape[:-1] + hw_spec.shape[-1:], hw_spec.dtype)
      xw_full = jax.ShapeDtypeStruct(xs.shape[:-1] + xw_spec.shape[-1:], xw_spec.dtype)
      dxw, dhw = jax.linear_transpose(pw.products, xw_full, hw_full)(da)
    if w is not None:
      dw = _sum_outer(dhw, states_in.hidden).astype(w.dtype)
      dparams = jax.tree.map(jnp.add, dparams, jax.vjp(pw.weight, params)[1](dw)[0])
    # `project` treats every row alike: its transpose over [T * B, ...] rows is one plain GEMM.
    rows = lambda a: a.reshape(-1, a.shape[-1])
    d_project, dxs = jax.vjp(cell.project, params, rows(xs))[1](rows(dxw).astype(xw_spec.dtype))
    dparams = jax.tree.map(jnp.add, dparams, d_project)
    dxs = dxs.reshape(xs.shape)
    return dparams, dxs, dstate0, dinit, None, None

  layer.defvjp(fwd, bwd)
  return layer


def recurrence(cell: Cell, params, xs, state, init, mask, before, *, time_major: bool,
               reverse: bool, unroll: int, remat: bool, clip_delta):
  """`unroll`'s manual-gradient path: `xs [*batch, T, D]` (`[T, *batch, D]` with `time_major`),
  `mask` and `before` `[T, *batch]` or None, `init` the state a reset returns to (None without
  resets); returns `(ys, final)` in the layout of `xs`."""
  num_steps = xs.shape[0 if time_major else -2]
  if num_steps == 0:  # no steps: no outputs, the initial state
    dtype = jax.eval_shape(cell.project, params, xs).dtype
    return jnp.zeros(xs.shape[:-1] + (cell.output_size,), dtype), state
  if time_major:
    batch_shape, axis = xs.shape[1:-1], 0
  else:
    batch_shape, axis = xs.shape[:-2], 1
  batch = math.prod(batch_shape)
  xs = xs.reshape(((num_steps, batch) if time_major else (batch, num_steps)) + xs.shape[-1:])
  flat = lambda tree: jax.tree.map(lambda s: s.reshape((batch,) + s.shape[len(batch_shape):]),
                                   tree)
  state, init = flat(state), flat(init)
  mask, before = jax.tree.map(lambda m: m.reshape((num_steps, batch)), (mask, before))
  fn = _make_layer(cell, mask is not None, before is not None, bool(remat), unroll, clip_delta,
                   bool(reverse), axis)
  ys, final = fn(params, xs, state, init, mask, before)
  if time_major:
    ys = ys.reshape((num_steps,) + batch_shape + ys.shape[-1:])
  else:
    ys = ys.reshape(batch_shape + (num_steps,) + ys.shape[-1:])
  final = jax.tree.map(lambda s: s.reshape(batch_shape + s.shape[1:]), final)
  return ys, final
