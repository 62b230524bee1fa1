"""`unroll`: a cell over a sequence with `jax.lax.scan` (or `jax.lax.associative_scan`), the input
projection hoisted out of the loop; layers (`rnn.stack`, `rnn.bidirectional`) unroll themselves."""

import math
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from rnn import _manual
from rnn._cells import Cell, _select, _to_accumulation, masked_step, promote

_GRADS = ("autodiff", "manual")


@runtime_checkable
class Layer(Protocol):
  """A sequence-level object built on cells (`rnn.stack`, `rnn.bidirectional`, or a user's own).

  `rnn.unroll(layer, params, xs, state, **options)` calls `layer.unroll(params, xs, state,
  **options)` with the same keyword options, so a layer unrolls itself (typically by unrolling
  its cells with `rnn.unroll`).
  """

  output_size: int

  def init(self, key, input_size: int): ...

  def initial_state(self, params, batch_shape=()): ...

  def unroll(self, params, xs, state, **options): ...


def _describe(tree) -> str:
  return type(tree).__name__


def _check_structure(name: str, value, expected, what: str) -> None:
  if jax.tree.structure(value) != jax.tree.structure(expected):
    raise ValueError(f"`{name}` must be {_describe(expected)} ({what}: "
                     f"{jax.tree.structure(expected)}); got {_describe(value)} "
                     f"({jax.tree.structure(value)}).")


def _check_shapes(name: str, value, expected, what: str) -> None:
  """`value`'s leaves have the shapes of `expected`'s (dtypes may differ)."""
  leaves = jax.tree_util.tree_flatten_with_path(value)[0]
  for (path, v), e in zip(leaves, jax.tree.leaves(expected)):
    if jnp.shape(v) != e.shape:
      raise ValueError(f"`{name}` must have the shapes {what}: its leaf "
                       f"`{name}{jax.tree_util.keystr(path)}` must be {e.shape}; got "
                       f"{jnp.shape(v)}.")


def _check_cell_args(cell: Cell, params, xs, state, lengths, resets, *, time_major, unroll, grad,
                     clip_delta, parallel):
  """Validates `unroll`'s arguments for a single cell at trace time; returns the batch shape."""
  if grad not in _GRADS:
    raise ValueError(f"`grad` must be one of {_GRADS}; got {grad!r}.")
  if grad == "manual" and cell.pointwise is None:
    raise ValueError("`grad='manual'` needs the cell's `pointwise` field (an rnn.Pointwise: the "
                     "step split around its recurrent product); this cell has `pointwise=None`.")
  if parallel and cell.linear is None:
    raise ValueError("`parallel=True` needs the cell's `linear` field (the coefficients of "
                     "h_t = a_t * h_{t-1} + b_t, as rnn.min_gru has); this cell has `linear=None`.")
  if parallel and grad == "manual":
    raise ValueError("`parallel=True` differentiates the associative scan with autodiff; got "
                     "grad='manual'.")
  if clip_delta is not None and (grad != "manual" or not clip_delta > 0):
    raise ValueError("`clip_delta` needs grad='manual' and a positive value; got "
                     f"clip_delta={clip_delta!r} with grad={grad!r}.")
  if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
    raise ValueError(f"`unroll` must be a positive int; got {unroll!r}.")
  if jnp.ndim(xs) < 2:
    raise ValueError(f"`xs` must be [B, T, D] ([T, B, D] with time_major, or unbatched [T, D]); "
                     f"got shape {jnp.shape(xs)}.")
  if not jnp.issubdtype(jnp.result_type(xs), jnp.floating):
    raise ValueError(f"`xs` must be floating point (float32, bfloat16, ...); got dtype "
                     f"{jnp.result_type(xs)}.")
  input_size = xs.shape[-1]
  expected = jax.eval_shape(lambda key: cell.init(key, input_size), jax.random.key(0))
  _check_structure("params", params, expected, "as `cell.init` makes them for this cell")
  w_ih = getattr(params, "w_ih", None)
  if w_ih is not None and jnp.ndim(w_ih) == 2 and jnp.shape(w_ih)[1] != input_size:
    raise ValueError(f"`xs` must have {jnp.shape(w_ih)[1]} features (the cell's input size, "
                     f"w_ih {jnp.shape(w_ih)}); got shape {xs.shape}.")
  _check_shapes("params", params, expected, f"as `cell.init(key, {input_size})` makes it")
  batch_shape = xs.shape[1:-1] if time_major else xs.shape[:-2]
  num_steps = xs.shape[0 if time_major else -2]
  expected = jax.eval_shape(lambda p: cell.initial_state(p, batch_shape), params)
  what = (f"as `cell.initial_state(params, {batch_shape})` makes it, the batch shape from `xs` "
          f"of shape {xs.shape} with time_major={time_major}")
  _check_structure("state", state, expected, what)
  _check_shapes("state", state, expected, what)
  if lengths is not None:
    if jnp.shape(lengths) != batch_shape:
      raise ValueError(f"`lengths` must have the batch shape {batch_shape}; got "
                       f"{jnp.shape(lengths)}.")
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
      raise ValueError(f"`lengths` must be integers; got dtype {jnp.result_type(lengths)}.")
    if not isinstance(lengths, jax.core.Tracer):
      values = np.asarray(lengths)
      if values.size and (values.min() < 0 or values.max() > num_steps):
        raise ValueError(f"`lengths` must be in [0, {num_steps}] (T, the number of steps); got "
                         f"values from {values.min()} to {values.max()}.")
  if resets is not None:
    layout = (num_steps,) + batch_shape if time_major else batch_shape + (num_steps,)
    if jnp.shape(resets) != layout:
      raise ValueError(f"`resets` must have shape {layout} (the layout of `xs` without its "
                       f"features); got {jnp.shape(resets)}.")
    if jnp.result_type(resets) != jnp.bool_:
      raise ValueError(f"`resets` must be bool; got dtype {jnp.result_type(resets)}.")
  return batch_shape


def _step_mask(lengths, num_steps: int, batch_shape) -> jax.Array | None:
  """`[T, *batch]` bool: True where step t is inside the sequence (lengths clamped to [0, T])."""
  if lengths is None:
    return None
  t = jnp.arange(num_steps).reshape((num_steps,) + (1,) * len(batch_shape))
  return t < jnp.clip(lengths, 0, num_steps)[None]


def _reset_mask(resets, mask, *, reverse: bool, time_major: bool) -> jax.Array | None:
  """`[T, *batch]` bool: True where the state returns to its initial value before step t is read.

  `resets[t]` marks step t as the first of a segment. Read forwards, the state is reset before
  step t; read backwards (`reverse`), before step t - 1, the segment's last step on that side.
  Only steps inside the sequence are reset.
  """
  if resets is None:
    return None
  before = resets if time_major else jnp.moveaxis(resets, -1, 0)
  if mask is not None:
    before = before & mask
  if reverse:
    before = jnp.concatenate([before[1:], jnp.zeros_like(before[:1])])
  return before


def _zero_padding(xs, mask, time_major: bool):
  """`xs` with the steps past each length set to zero (whatever they held, NaN included)."""
  if mask is None:
    return xs
  keep = mask if time_major else jnp.moveaxis(mask, 0, -1)
  return jnp.where(keep[..., None], xs, jnp.zeros_like(xs))


def _promote_state(state, dtype):
  """Every floating state leaf promoted to at least the computation dtype `dtype`."""
  return jax.tree.map(lambda s: s.astype(promote(s.dtype, dtype))
                      if jnp.issubdtype(s.dtype, jnp.floating) else s, state)


def _scan_steps(cell, params, xw, state, mask, before=None, init=None, *, reverse, unroll, remat,
                offsets=None, collect="ys"):
  """Scans `cell.step` over time-major `xw [T, *batch, G]`; returns `(ys [T, *batch, O], final)`.

  `mask` and `before` (`[T, *batch]` or None) pad and reset steps (see `masked_step`). `offsets
  [T, *batch, O]`, when given, is added to the hidden state after each step (the handle through
  which `gradient_norms` reads dL/dh_t). With `collect="states"`, the per-step outputs are the
  states after each step instead of `ys`.
  """

  def body(state_tm1, inputs):
    xw_t, mask_t, reset_t, off_t = inputs

    def step(state):
      state_t, y_t = cell.step(params, state, xw_t)
      state_t = jax.tree.map(lambda n, o: n.astype(o.dtype), state_t, state)  # the carry's type
      if off_t is not None:
        state_t = state_t._replace(hidden=state_t.hidden + off_t)
        y_t = state_t.hidden
      return state_t, y_t

    state_t, y_t, _ = masked_step(step, state_tm1, mask_t, reset_t, init)
    return state_t, (state_t if collect == "states" else y_t)

  num_steps = xw.shape[0]
  if not remat or num_steps <= 1:
    final, ys = jax.lax.scan(body, state, (xw, mask, before, offsets), reverse=reverse,
                             unroll=unroll)
    return ys, final

  # sqrt(T) checkpointing: an outer scan over blocks of k steps saves only the state at each
  # block boundary; the backward pass recomputes one block's steps at a time (Chen et al. 2016).
  k = math.isqrt(num_steps - 1) + 1
  num_blocks = -(-num_steps // k)
  pad = num_blocks * k - num_steps
  batch_shape = xw.shape[1:-1]
  if mask is None:
    mask = jnp.ones((num_steps,) + batch_shape, bool)
  inputs = (xw, mask, before, offsets)
  if pad:  # padded steps are masked: they keep the state
    inputs = jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)]),
                          inputs)
  blocks = jax.tree.map(lambda a: a.reshape((num_blocks, k) + a.shape[1:]), inputs)

  @jax.checkpoint
  def block(state_tm1, block_inputs):
    return jax.lax.scan(body, state_tm1, block_inputs, reverse=reverse, unroll=unroll)

  final, ys = jax.lax.scan(block, state, blocks, reverse=reverse)
  ys = ys.reshape((num_blocks * k,) + ys.shape[2:])[:num_steps]
  return ys, final


def _parallel_steps(cell, params, xw, state, mask, before=None, init=None, *, reverse):
  """The linear recurrence `h_t = a_t * h_{t-1} + b_t` over time-major `xw` with
  `jax.lax.associative_scan`: every prefix composition `(A_t, B_t)` at once, then
  `h_t = A_t * h_0 + B_t`. Resets make `a_t = 0`, padded steps `(a_t, b_t) = (1, 0)`."""
  a, b = cell.linear(params, _to_accumulation(xw))
  if before is not None:
    reset = before[..., None]
    b = jnp.where(reset, b + a * init.hidden.astype(a.dtype)[None], b)
    a = jnp.where(reset, jnp.zeros_like(a), a)
  if mask is not None:
    keep = mask[..., None]
    a = jnp.where(keep, a, jnp.ones_like(a))
    b = jnp.where(keep, b, jnp.zeros_like(b))

  def compose(first, second):  # `first` is read before `second`
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, a2 * b1 + b2

  a, b = jax.lax.associative_scan(compose, (a, b), reverse=reverse, axis=0)
  hs = a * state.hidden.astype(a.dtype)[None] + b
  ys = hs.astype(xw.dtype)
  if mask is not None:
    ys = jnp.where(mask[..., None], ys, jnp.zeros_like(ys))
  final = state._replace(hidden=hs[0 if reverse else -1].astype(state.hidden.dtype))
  return ys, final


def _to_time_major(xs, time_major):
  return xs if time_major else jnp.moveaxis(xs, -2, 0)


def _from_time_major(ys, time_major):
  return ys if time_major else jnp.moveaxis(ys, 0, -2)


def prepare(cell: Cell, params, xs, state, *, lengths, resets, reverse: bool, time_major: bool):
  """What every way of running a cell needs: `(xs, state, mask, before, init)`.

  `xs` with its padded steps zeroed; `state` promoted to the computation dtype; `mask` and
  `before` `[T, *batch]` (or None); `init` the state a reset returns to (None without resets).
  """
  batch_shape = xs.shape[1:-1] if time_major else xs.shape[:-2]
  num_steps = xs.shape[0 if time_major else -2]
  mask = _step_mask(lengths, num_steps, batch_shape)
  before = _reset_mask(resets, mask, reverse=reverse, time_major=time_major)
  xs = _zero_padding(xs, mask, time_major)
  dtype = jax.eval_shape(cell.project, params, jax.ShapeDtypeStruct(xs.shape[-1:], xs.dtype)).dtype
  state = _promote_state(state, dtype)
  init = None
  if before is not None:
    init = jax.tree.map(lambda i, s: i.astype(s.dtype),
                        cell.initial_state(params, batch_shape), state)
  return xs, state, mask, before, init


def unroll(cell, params, xs: jax.Array, state, *, lengths: jax.Array | None = None,
           resets: jax.Array | None = None, reverse: bool = False, time_major: bool = False,
           unroll: int = 1, remat: bool = False, grad: str = "autodiff",
           clip_delta: float | None = None, parallel: bool = False, key: jax.Array | None = None):
  """Runs `cell` over a sequence: one GEMM for every step's input products, then a scan.

  ```
  xw = cell.project(params, xs)                       # [B, T, G], one GEMM for all steps
  state_t, y_t = cell.step(params, state_{t-1}, xw_t)  # t = 0 .. T-1 (T-1 .. 0 with reverse)
  ```

  With `lengths`, step t of sequence b runs only while `t < lengths[b]`: past it the state is
  frozen and `y_t` is zero, so `final` is the state after each sequence's own last step (the
  initial state for a length of 0). Padded steps are zeroed before any GEMM, so they contribute
  nothing to any gradient whatever they hold (NaN included). With `reverse`, each sequence is
  read backwards from its own last step, and `ys` stays aligned with `xs`.

  With `resets`, `resets[b, t]` marks step t as the first of a new segment (a document or an
  episode in a stream): no state crosses the boundary, as Haiku's `ResetCore`. Read forwards,
  the state returns to `cell.initial_state(params, ...)` before step t; with `reverse`, before
  step t - 1 (the segment's last step seen from the other side), so a bidirectional layer takes
  the same `resets` for both halves.

  Args:
    cell: an `rnn.Cell`, or a layer (`rnn.stack`, `rnn.bidirectional`: any `rnn.Layer`, which
      is then called as `cell.unroll(params, xs, state, **options)`).
    params: the cell's parameters.
    xs: `[B, T, D]` float inputs (`[T, B, D]` with `time_major`; any number of batch axes, or
      none).
    state: the initial state, leaves `[B, ...]` (e.g. `cell.initial_state(params, (B,))`);
      its floating leaves are promoted to the computation dtype.
    lengths: optional `[B]` int, the number of valid steps of each sequence, in `[0, T]`. A
      concrete value outside raises; under `jit` it is clamped to `[0, T]`.
    resets: optional `[B, T]` bool (`[T, B]` with `time_major`), the first step of each segment.
    reverse: read the sequences from the end.
    time_major: `xs` and `ys` are `[T, B, ...]`.
    unroll: steps unrolled per scan iteration (`jax.lax.scan`'s `unroll`).
    remat: bound activation memory for long sequences: store the state every ~sqrt(T) steps
      and recompute the rest in the backward pass (with `grad="manual"`: store only the state
      before each step, and recompute each step, its input product included).
    grad: `"autodiff"` (JAX differentiates the scan) or `"manual"` (the BPTT recursion written
      out as a reverse loop carrying only the error signal, the weight gradients as GEMMs over
      all steps; needs the cell's `pointwise` field). Both give the same gradient to rounding.
    clip_delta: with `grad="manual"`, clip the error signal at every step to
      `[-clip_delta, clip_delta]` at the point-wise part's inputs `a_t` (the gate
      pre-activations, as Graves 2013).
    parallel: solve the recurrence with `jax.lax.associative_scan` (O(log T) depth) instead of
      the scan; needs the cell's `linear` field (`rnn.min_gru`, `rnn.min_lstm`). Same result.
    key: a `jax.random.key` for the dropout between the layers of an `rnn.stack`; `None` runs
      without dropout (evaluation).

  Returns:
    `(ys, final)`: `ys [B, T, O]` (`[T, B, O]` with `time_major`), O the cell's `output_size`,
    in the computation dtype, and the final state.

  References:
    Werbos, Backpropagation through time: what it does and how to do it, 1990.
      https://doi.org/10.1109/5.58337
    Graves, Generating sequences with recurrent neural networks, 2013.
      https://arxiv.org/abs/1308.0850
    Feng et al., Were RNNs all we needed?, 2024. https://arxiv.org/abs/2410.01201
  """
  options = dict(lengths=lengths, resets=resets, reverse=reverse, time_major=time_major,
                 unroll=unroll, remat=remat, grad=grad, clip_delta=clip_delta, parallel=parallel)
  if not isinstance(cell, Cell):
    if isinstance(cell, Layer):
      return cell.unroll(params, xs, state, key=key, **options)
    raise ValueError("`cell` must be an rnn.Cell or a layer (rnn.stack, rnn.bidirectional, or "
                     "any object with init, initial_state, unroll and output_size); got "
                     f"{type(cell).__name__}.")
  _check_cell_args(cell, params, xs, state, lengths, resets, time_major=time_major,
                   unroll=unroll, grad=grad, clip_delta=clip_delta, parallel=parallel)
  xs, state, mask, before, init = prepare(cell, params, xs, state, lengths=lengths, resets=resets,
                                          reverse=reverse, time_major=time_major)
  if grad == "manual":
    # The manual layer projects the inputs itself and loops over time where it lies.
    return _manual.recurrence(cell, params, xs, state, init, mask, before, time_major=time_major,
                              reverse=reverse, unroll=unroll, remat=remat, clip_delta=clip_delta)

  def run(params, xs, state, init):
    xw = cell.project(params, _to_time_major(xs, time_major))
    if parallel:
      return _parallel_steps(cell, params, xw, state, mask, before, init, reverse=reverse)
    return _scan_steps(cell, params, xw, state, mask, before, init, reverse=reverse,
                       unroll=unroll, remat=remat)

  if parallel and remat:  # the associative scan's intermediates are recomputed, not stored
    run = jax.checkpoint(run)
  ys, final = run(params, xs, state, init)
  return _from_time_major(ys, time_major), final


def static_unroll(cell, params, xs: jax.Array, state, *, lengths=None, reverse=False,
                  resets=None):
  """The readable reference: a Python loop over `cell.step`, batch-major `[B, T, D]`.

  Slow to compile for long sequences; it is the oracle `unroll` is tested against. Each step
  projects its own input, so it also checks that hoisting the projection changes nothing.
  `resets [B, T]` marks the first step of each segment (see `unroll`).
  """
  num_steps = xs.shape[-2]
  batch_shape = xs.shape[:-2]
  order = range(num_steps - 1, -1, -1) if reverse else range(num_steps)
  initial = cell.initial_state(params, batch_shape) if resets is not None else None
  ys = [None] * num_steps
  for t in order:
    if resets is not None:
      boundary = t + 1 if reverse else t  # the segment start that precedes step t as read
      if boundary < num_steps:
        reset = resets[..., boundary]
        if lengths is not None:
          reset = reset & (boundary < lengths)
        state = jax.tree.map(lambda i, s: jnp.where(reset[..., None], i.astype(s.dtype), s),
                             initial, state)
    new_state, y_t = cell.step(params, state, cell.project(params, xs[..., t, :]))
    if lengths is not None:
      valid = t < lengths
      new_state = _select(valid, new_state, state)
      y_t = jnp.where(valid[..., None], y_t, jnp.zeros_like(y_t))
    state, ys[t] = new_state, y_t
  return jnp.stack(ys, axis=-2), state
