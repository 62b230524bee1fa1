"""The measurement behind the vanishing and exploding gradient story: ||dL/dh_t|| for every t."""

import jax
import jax.numpy as jnp

from rnn._cells import Cell, accumulation_dtype
from rnn._unroll import _check_cell_args, _from_time_major, _scan_steps, _to_time_major, prepare


def gradient_norms(cell: Cell, params, xs: jax.Array, state, loss_fn, *, lengths=None,
                   reverse: bool = False, time_major: bool = False) -> jax.Array:
  """`||dL/dh_t||` for every step t: how much the loss still feels each hidden state.

  `dL/dh_t` is the total derivative through every later step, the error signal that BPTT
  carries back (Bengio et al. 1994; Pascanu et al. 2013). It is read exactly by adding a zero
  offset to each `h_t` and differentiating with respect to the offsets. With a loss on the last
  step only, the norms against `T - 1 - t` decay geometrically for a tanh RNN whose recurrent
  matrix has a small norm (vanishing gradients), grow for a large one (exploding), and decay far
  more slowly through an LSTM's memory with its forget gate open.

  Args:
    cell: a single `rnn.Cell` whose state has a `hidden` field (e.g. `rnn.simple`, `rnn.lstm`,
      `rnn.gru`).
    params: its params.
    xs: `[B, T, D]` inputs (`[T, B, D]` with `time_major`).
    state: the initial state.
    loss_fn: `loss_fn(ys, final) -> scalar`, on `ys` as `rnn.unroll` returns them.
    lengths, reverse, time_major: as `rnn.unroll`.

  Returns:
    `[T]`: the Frobenius norm over batch and features of `dL/dh_t`, in the time order of `xs`.

  References:
    Bengio, Simard and Frasconi, Learning long-term dependencies with gradient descent is
      difficult, 1994. https://doi.org/10.1109/72.279181
    Pascanu, Mikolov and Bengio, On the difficulty of training recurrent neural networks, 2013.
      https://arxiv.org/abs/1211.5063
  """
  if not isinstance(cell, Cell):
    raise ValueError(f"`cell` must be a single cell (an rnn.Cell, not a layer); got "
                     f"{type(cell).__name__}.")
  _check_cell_args(cell, params, xs, state, lengths, None, time_major=time_major, unroll=1,
                   grad="autodiff", clip_delta=None, parallel=False)
  xs, state, mask, _, _ = prepare(cell, params, xs, state, lengths=lengths, resets=None,
                                  reverse=reverse, time_major=time_major)
  xs_tm = _to_time_major(xs, time_major)
  num_steps = xs_tm.shape[0]
  xw = cell.project(params, xs_tm)

  def loss_of_offsets(offsets):
    ys, final = _scan_steps(cell, params, xw, state, mask, reverse=reverse, unroll=1,
                            remat=False, offsets=offsets)
    return loss_fn(_from_time_major(ys, time_major), final)

  offsets = jnp.zeros((num_steps,) + xs_tm.shape[1:-1] + (cell.output_size,), state.hidden.dtype)
  grads = jax.grad(loss_of_offsets)(offsets)
  grads = grads.reshape(num_steps, -1).astype(accumulation_dtype(grads.dtype))
  return jnp.sqrt(jnp.sum(grads ** 2, axis=1))
