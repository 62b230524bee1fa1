"""Multi-layer and bidirectional cells, unrolled layer by layer so each projection is one GEMM."""

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from rnn._cells import Cell


class StackConfig(NamedTuple):
  dropout: float


class Bidirectional(NamedTuple):
  """Params or state of a bidirectional cell: one for each direction."""
  forward: Any
  backward: Any


def stack(cells: Sequence[Cell], *, dropout: float = 0.0) -> Cell:
  """Stacks cells: layer l reads the outputs of layer l-1.

  `rnn.unroll` runs a stack layer by layer, each layer a full unroll, so every layer's input
  projection is one GEMM over all steps. `step` runs all layers for one step (for generation).
  With `dropout > 0` and a `key` passed to `unroll`, the outputs of every layer but the last are
  dropped out (inverted dropout) before the next layer reads them: the non-recurrent connections
  of Zaremba et al. 2014.

  Args:
    cells: the layers, bottom first; any `rnn.Cell` (including `rnn.bidirectional`).
    dropout: the drop probability between layers, in `[0, 1)`.

  Returns:
    A `Cell` whose params and state are tuples with one entry per layer.

  References:
    Zaremba, Sutskever and Vinyals, Recurrent neural network regularization, 2014.
      https://arxiv.org/abs/1409.2329
  """
  cells = tuple(cells)
  if not cells or not all(isinstance(c, Cell) for c in cells):
    raise ValueError(f"`cells` must be a non-empty sequence of rnn.Cell; got {cells!r}.")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"`dropout` must be in [0, 1); got {dropout!r}.")

  def init(key, input_size: int):
    params = []
    for cell, k in zip(cells, jax.random.split(key, len(cells))):
      params.append(cell.init(k, input_size))
      input_size = cell.output_size
    return tuple(params)

  def initial_state(params, batch_shape=()):
    return tuple(c.initial_state(p, batch_shape) for c, p in zip(cells, params))

  def project(params, xs):
    return cells[0].project(params[0], xs)

  def step(params, state, xw_t):
    new_states = []
    for layer, (cell, p, s) in enumerate(zip(cells, params, state)):
      if layer > 0:
        xw_t = cell.project(p, y_t)
      s, y_t = cell.step(p, s, xw_t)
      new_states.append(s)
    return tuple(new_states), y_t

  return Cell(init, initial_state, project, step, "stack", StackConfig(float(dropout)),
              cells[-1].output_size, cells)


def bidirectional(forward: Cell, backward: Cell) -> Cell:
  """Runs `forward` left to right and `backward` right to left; outputs are concatenated.

  With `lengths`, the backward cell reads each sequence from its own last step. The cell cannot
  be stepped (its backward half needs the whole sequence): use it through `rnn.unroll`.

  Returns:
    A `Cell` with `Bidirectional(forward, backward)` params and state, and
    `output_size = forward.output_size + backward.output_size`.

  References:
    Schuster and Paliwal, Bidirectional recurrent neural networks, 1997.
      https://doi.org/10.1109/78.650093
  """
  for name, c in (("forward", forward), ("backward", backward)):
    if not isinstance(c, Cell):
      raise ValueError(f"`{name}` must be an rnn.Cell; got {type(c).__name__}.")

  def init(key, input_size: int):
    kf, kb = jax.random.split(key)
    return Bidirectional(forward.init(kf, input_size), backward.init(kb, input_size))

  def initial_state(params, batch_shape=()):
    return Bidirectional(forward.initial_state(params.forward, batch_shape),
                         backward.initial_state(params.backward, batch_shape))

  def project(params, xs):
    return Bidirectional(forward.project(params.forward, xs),
                         backward.project(params.backward, xs))

  def step(params, state, xw_t):
    raise ValueError("a bidirectional cell cannot be stepped one step at a time; use rnn.unroll.")

  return Cell(init, initial_state, project, step, "bidirectional", None,
              forward.output_size + backward.output_size, (forward, backward))


def _dropout(key, ys, rate):
  keep = jax.random.bernoulli(key, 1.0 - rate, ys.shape)
  return jnp.where(keep, ys / (1.0 - rate), jnp.zeros_like(ys))


def unroll_stack(cell: Cell, params, xs, state, *, key, **kwargs):
  from rnn._unroll import unroll
  num_layers = len(cell.layers)
  rate = cell.config.dropout
  keys = jax.random.split(key, num_layers) if key is not None and rate > 0 else None
  finals = []
  ys = xs
  for layer, (c, p, s) in enumerate(zip(cell.layers, params, state)):
    ys, final = unroll(c, p, ys, s, **kwargs)
    finals.append(final)
    if keys is not None and layer < num_layers - 1:
      ys = _dropout(keys[layer], ys, rate)
  return ys, tuple(finals)


def unroll_bidirectional(cell: Cell, params, xs, state, *, reverse, **kwargs):
  from rnn._unroll import unroll
  fwd, bwd = cell.layers
  ys_f, final_f = unroll(fwd, params.forward, xs, state.forward, reverse=reverse, **kwargs)
  ys_b, final_b = unroll(bwd, params.backward, xs, state.backward, reverse=not reverse, **kwargs)
  return jnp.concatenate([ys_f, ys_b], axis=-1), Bidirectional(final_f, final_b)
