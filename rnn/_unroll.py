"""`unroll`: a cell over a sequence with `jax.lax.scan`, the input projection hoisted out of the loop."""

import math

import jax
import jax.numpy as jnp

from rnn import _manual
from rnn._cells import Cell, _select

_GRADS = ("autodiff", "manual")
_LEAF_KINDS = ("simple", "lstm", "gru")


def _check_unroll_args(cell, xs, state, lengths, time_major, unroll, grad, clip_delta):
  if not isinstance(cell, Cell):
    raise ValueError(f"`cell` must be an rnn.Cell; got {type(cell).__name__}.")
  if grad not in _GRADS:
    raise ValueError(f"`grad` must be one of {_GRADS}; got {grad!r}.")
  if clip_delta is not None and (grad != "manual" or not clip_delta > 0):
    raise ValueError("`clip_delta` needs grad='manual' and a positive value; got "
                     f"clip_delta={clip_delta!r} with grad={grad!r}.")
  if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
    raise ValueError(f"`unroll` must be a positive int; got {unroll!r}.")
  if jnp.ndim(xs) < 2:
    raise ValueError(f"`xs` must be [B, T, D] ([T, B, D] with time_major, or unbatched [T, D]); "
                     f"got shape {jnp.shape(xs)}.")
  batch_shape = xs.shape[1:-1] if time_major else xs.shape[:-2]
  leaves = jax.tree.leaves(state)
  for leaf in leaves:
    if leaf.shape[:-1] != batch_shape:
      raise ValueError(f"`state` leaves must have batch shape {batch_shape} (from `xs` of shape "
                       f"{xs.shape}, time_major={time_major}); got a leaf of shape {leaf.shape}.")
  if lengths is not None:
    if jnp.shape(lengths) != batch_shape:
      raise ValueError(f"`lengths` must have the batch shape {batch_shape}; got "
                       f"{jnp.shape(lengths)}.")
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
      raise ValueError(f"`lengths` must be integers; got dtype {jnp.result_type(lengths)}.")
  return batch_shape


def _check_input_size(cell: Cell, params, xs) -> None:
  if cell.kind in _LEAF_KINDS:
    expected = params.w_ih.shape[1]
    if xs.shape[-1] != expected:
      raise ValueError(f"`xs` must have {expected} features (the cell's input size, "
                       f"w_ih {params.w_ih.shape}); got shape {xs.shape}.")


def _step_mask(lengths, num_steps: int, batch_shape) -> jax.Array | None:
  """`[T, *batch]` bool: True where step t is inside the sequence."""
  if lengths is None:
    return None
  t = jnp.arange(num_steps).reshape((num_steps,) + (1,) * len(batch_shape))
  return t < lengths[None]


def _scan_steps(cell: Cell, params, xw, state, mask, *, reverse, unroll, remat, offsets=None):
  """Scans `cell.step` over time-major `xw [T, *batch, G]`; returns `(ys [T, *batch, O], final)`.

  `offsets [T, *batch, O]`, when given, is added to the hidden state after each step (the
  handle through which `gradient_norms` reads dL/dh_t).
  """

  def body(state_tm1, inputs):
    xw_t, mask_t, off_t = inputs
    state_t, y_t = cell.step(params, state_tm1, xw_t)
    if off_t is not None:
      state_t = state_t._replace(hidden=state_t.hidden + off_t)
      y_t = state_t.hidden
    if mask_t is not None:
      state_t = _select(mask_t, state_t, state_tm1)
      y_t = jnp.where(mask_t[..., None], y_t, jnp.zeros_like(y_t))
    return state_t, y_t

  num_steps = xw.shape[0]
  if not remat or num_steps <= 1:
    final, ys = jax.lax.scan(body, state, (xw, mask, offsets), reverse=reverse, unroll=unroll)
    return ys, final

  # sqrt(T) checkpointing: an outer scan over blocks of k steps saves only the state at each
  # block boundary; the backward pass recomputes one block's steps at a time (Chen et al. 2016).
  k = math.isqrt(num_steps - 1) + 1
  num_blocks = -(-num_steps // k)
  pad = num_blocks * k - num_steps
  batch_shape = xw.shape[1:-1]
  if mask is None:
    mask = jnp.ones((num_steps,) + batch_shape, bool)
  if pad:
    xw = jnp.concatenate([xw, jnp.zeros((pad,) + xw.shape[1:], xw.dtype)])
    mask = jnp.concatenate([mask, jnp.zeros((pad,) + batch_shape, bool)])
    if offsets is not None:
      offsets = jnp.concatenate([offsets, jnp.zeros((pad,) + offsets.shape[1:], offsets.dtype)])
  blocks = jax.tree.map(lambda a: a.reshape((num_blocks, k) + a.shape[1:]), (xw, mask, offsets))

  @jax.checkpoint
  def block(state_tm1, block_inputs):
    return jax.lax.scan(body, state_tm1, block_inputs, reverse=reverse, unroll=unroll)

  final, ys = jax.lax.scan(block, state, blocks, reverse=reverse)
  ys = ys.reshape((num_blocks * k,) + ys.shape[2:])[:num_steps]
  return ys, final


def _to_time_major(xs, time_major):
  return xs if time_major else jnp.moveaxis(xs, -2, 0)


def _from_time_major(ys, time_major):
  return ys if time_major else jnp.moveaxis(ys, 0, -2)


def unroll(cell: Cell, params, xs: jax.Array, state, *, lengths: jax.Array | None = None,
           reverse: bool = False, time_major: bool = False, unroll: int = 1, remat: bool = False,
           grad: str = "autodiff", clip_delta: float | None = None, key: jax.Array | None = None):
  """Runs `cell` over a sequence: one GEMM for every step's input products, then a scan.

  ```
  xw = cell.project(params, xs)                       # [B, T, G], one GEMM for all steps
  state_t, y_t = cell.step(params, state_{t-1}, xw_t)  # t = 0 .. T-1 (T-1 .. 0 with reverse)
  ```

  With `lengths`, step t of sequence b runs only while `t < lengths[b]`: past it the state is
  frozen and `y_t` is zero, so `final` is the state after each sequence's own last step (the
  initial state for a length of 0). With `reverse`, each sequence is read backwards from its own
  last step, and `ys` stays aligned with `xs`.

  Args:
    cell: an `rnn.Cell` (a single cell, `rnn.stack` or `rnn.bidirectional`).
    params: the cell's parameters.
    xs: `[B, T, D]` inputs (`[T, B, D]` with `time_major`; any number of batch axes, or none).
    state: the initial state, leaves `[B, ...]` (e.g. `cell.initial_state(params, (B,))`).
    lengths: optional `[B]` int, the number of valid steps of each sequence.
    reverse: read the sequences from the end.
    time_major: `xs` and `ys` are `[T, B, ...]`.
    unroll: steps unrolled per scan iteration (`jax.lax.scan`'s `unroll`).
    remat: bound activation memory for long sequences: store the state every ~sqrt(T) steps
      and recompute the rest in the backward pass (with `grad="manual"`: store only the state
      before each step, and recompute each step, its input product included).
    grad: `"autodiff"` (JAX differentiates the scan) or `"manual"` (the BPTT recursion written
      out as a reverse loop carrying only the error signal, the weight gradients as one GEMM
      over all steps; see `rnn` docs). Both give the same gradient to float32 rounding.
    clip_delta: with `grad="manual"`, clip the error signal at every step to
      `[-clip_delta, clip_delta]` (at the gates' pre-activations, as Graves 2013).
    key: a `jax.random.key` for the dropout between the layers of an `rnn.stack`; `None` runs
      without dropout (evaluation).

  Returns:
    `(ys, final)`: `ys [B, T, O]` (`[T, B, O]` with `time_major`), O the cell's `output_size`,
    and the final state.

  References:
    Werbos, Backpropagation through time: what it does and how to do it, 1990.
      https://doi.org/10.1109/5.58337
    Graves, Generating sequences with recurrent neural networks, 2013.
      https://arxiv.org/abs/1308.0850
  """
  batch_shape = _check_unroll_args(cell, xs, state, lengths, time_major, unroll, grad, clip_delta)
  _check_input_size(cell, params, xs)
  if cell.kind == "stack":
    from rnn._compose import unroll_stack
    return unroll_stack(cell, params, xs, state, lengths=lengths, reverse=reverse,
                        time_major=time_major, unroll=unroll, remat=remat, grad=grad,
                        clip_delta=clip_delta, key=key)
  if cell.kind == "bidirectional":
    from rnn._compose import unroll_bidirectional
    return unroll_bidirectional(cell, params, xs, state, lengths=lengths, reverse=reverse,
                                time_major=time_major, unroll=unroll, remat=remat, grad=grad,
                                clip_delta=clip_delta)

  mask = _step_mask(lengths, xs.shape[0 if time_major else -2], batch_shape)
  if grad == "manual":
    # The manual layer projects the inputs itself and loops over time where it lies.
    return _manual.recurrence(cell, params, xs, state, mask, time_major=time_major,
                              reverse=reverse, unroll=unroll, remat=remat, clip_delta=clip_delta)
  xw = cell.project(params, _to_time_major(xs, time_major))
  ys, final = _scan_steps(cell, params, xw, state, mask, reverse=reverse, unroll=unroll,
                          remat=remat)
  return _from_time_major(ys, time_major), final


def static_unroll(cell: Cell, params, xs: jax.Array, state, *, lengths=None, reverse=False):
  """The readable reference: a Python loop over `cell.step`, batch-major `[B, T, D]`.

  Slow to compile for long sequences; it is the oracle `unroll` is tested against. Each step
  projects its own input, so it also checks that hoisting the projection changes nothing.
  """
  num_steps = xs.shape[-2]
  order = range(num_steps - 1, -1, -1) if reverse else range(num_steps)
  ys = [None] * num_steps
  for t in order:
    new_state, y_t = cell.step(params, state, cell.project(params, xs[..., t, :]))
    if lengths is not None:
      valid = t < lengths
      new_state = _select(valid, new_state, state)
      y_t = jnp.where(valid[..., None], y_t, jnp.zeros_like(y_t))
    state, ys[t] = new_state, y_t
  return jnp.stack(ys, axis=-2), state
