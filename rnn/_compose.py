"""Layers built on cells: multi-layer stacks and bidirectional layers, each unrolling itself layer
by layer so every layer's input projection is one GEMM."""

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from rnn._cells import Cell
from rnn._unroll import Layer, unroll


class Bidirectional(NamedTuple):
  """Params or state of a bidirectional layer: one for each direction."""
  forward: Any
  backward: Any


def steppable(layer) -> bool:
  """Can `layer` run one step at a time (a cell, or a stack of steppable layers)?"""
  return isinstance(layer, Cell) or (isinstance(layer, Stack)
                                     and all(steppable(c) for c in layer.layers))


def _check_per_layer(name: str, value, num_layers: int) -> None:
  if not isinstance(value, (tuple, list)) or len(value) != num_layers:
    raise ValueError(f"`{name}` of a stack must be a tuple with one entry per layer "
                     f"({num_layers}); got {type(value).__name__}"
                     f"{f' of length {len(value)}' if isinstance(value, (tuple, list)) else ''}.")


def _dropout(key, ys, rate):
  keep = jax.random.bernoulli(key, 1.0 - rate, ys.shape)
  return jnp.where(keep, ys / jnp.asarray(1.0 - rate, ys.dtype), jnp.zeros_like(ys))


class Stack(NamedTuple):
  """Layers run one after another: layer l reads the outputs of layer l-1 (`rnn.stack`).

  Attributes:
    layers: the layers, bottom first (cells or layers).
    dropout: the drop probability between layers.
  """

  layers: tuple
  dropout: float = 0.0

  @property
  def output_size(self) -> int:
    return self.layers[-1].output_size

  def init(self, key, input_size: int) -> tuple:
    """`init(key, input_size) -> params`, a tuple with one entry per layer."""
    params = []
    for layer, k in zip(self.layers, jax.random.split(key, len(self.layers))):
      params.append(layer.init(k, input_size))
      input_size = layer.output_size
    return tuple(params)

  def initial_state(self, params, batch_shape=()) -> tuple:
    """The layers' initial states, a tuple."""
    _check_per_layer("params", params, len(self.layers))
    return tuple(layer.initial_state(p, batch_shape) for layer, p in zip(self.layers, params))

  def _check_steppable(self) -> None:
    for i, layer in enumerate(self.layers):
      if not steppable(layer):
        raise ValueError(f"layer {i} of this stack ({type(layer).__name__}) cannot be stepped one "
                         "step at a time (a bidirectional layer needs the whole sequence); "
                         "use rnn.unroll.")

  def project(self, params, xs):
    """The first layer's input products (the others read the layer below, one step at a time)."""
    self._check_steppable()
    return self.layers[0].project(params[0], xs)

  def step(self, params, state, xw_t):
    """All layers for one step (for generation): `(state_t, y_t)`."""
    self._check_steppable()
    new_states = []
    for i, (layer, p, s) in enumerate(zip(self.layers, params, state)):
      if i > 0:
        xw_t = layer.project(p, y_t)
      s, y_t = layer.step(p, s, xw_t)
      new_states.append(s)
    return tuple(new_states), y_t

  def unroll(self, params, xs, state, *, key=None, **options):
    """Each layer unrolled over the whole sequence in turn (`rnn.unroll`'s options apply to
    every layer); dropout between layers when `key` is given."""
    num_layers = len(self.layers)
    _check_per_layer("params", params, num_layers)
    _check_per_layer("state", state, num_layers)
    keys = (jax.random.split(key, num_layers) if key is not None and self.dropout > 0
            else None)
    finals = []
    ys = xs
    for i, (layer, p, s) in enumerate(zip(self.layers, params, state)):
      ys, final = unroll(layer, p, ys, s, **options)
      finals.append(final)
      if keys is not None and i < num_layers - 1:
        ys = _dropout(keys[i], ys, self.dropout)
    return ys, tuple(finals)


class BidirectionalLayer(NamedTuple):
  """`forward` read left to right and `backward` right to left, outputs concatenated
  (`rnn.bidirectional`).

  Attributes:
    forward: the cell (or layer) reading forwards.
    backward: the cell (or layer) reading backwards.
  """

  forward: Any
  backward: Any

  @property
  def output_size(self) -> int:
    return self.forward.output_size + self.backward.output_size

  def init(self, key, input_size: int) -> Bidirectional:
    """`init(key, input_size) -> Bidirectional(forward_params, backward_params)`."""
    kf, kb = jax.random.split(key)
    return Bidirectional(self.forward.init(kf, input_size), self.backward.init(kb, input_size))

  def initial_state(self, params, batch_shape=()) -> Bidirectional:
    """`Bidirectional(forward_state, backward_state)`."""
    return Bidirectional(self.forward.initial_state(params.forward, batch_shape),
                         self.backward.initial_state(params.backward, batch_shape))

  def unroll(self, params, xs, state, *, reverse=False, key=None, **options):
    """Both halves over the sequence (the backward one with `reverse` flipped); `ys` concatenated
    on the features, `final` a `Bidirectional` pair."""
    for name, value in (("params", params), ("state", state)):
      if not isinstance(value, Bidirectional):
        raise ValueError(f"`{name}` of a bidirectional layer must be an rnn.Bidirectional pair; "
                         f"got {type(value).__name__}.")
    ys_f, final_f = unroll(self.forward, params.forward, xs, state.forward, reverse=reverse,
                           **options)
    ys_b, final_b = unroll(self.backward, params.backward, xs, state.backward,
                           reverse=not reverse, **options)
    return jnp.concatenate([ys_f, ys_b], axis=-1), Bidirectional(final_f, final_b)


def _check_layer(name: str, value) -> None:
  if not isinstance(value, (Cell, Layer)):
    raise ValueError(f"`{name}` must be an rnn.Cell or a layer (rnn.stack, rnn.bidirectional); "
                     f"got {type(value).__name__}.")


def stack(cells: Sequence[Any], *, dropout: float = 0.0) -> Stack:
  """Stacks cells: layer l reads the outputs of layer l-1.

  `rnn.unroll` runs a stack layer by layer, each layer a full unroll, so every layer's input
  projection is one GEMM over all steps. `step` runs all layers for one step (for generation).
  With `dropout > 0` and a `key` passed to `unroll`, the outputs of every layer but the last are
  dropped out (inverted dropout) before the next layer reads them: the non-recurrent connections
  of Zaremba et al. 2014.

  Args:
    cells: the layers, bottom first: `rnn.Cell`s or layers (e.g. `rnn.bidirectional`).
    dropout: the drop probability between layers, in `[0, 1)`.

  Returns:
    An `rnn.Stack` whose params and state are tuples with one entry per layer; it has `init`,
    `initial_state`, `unroll`, `output_size`, and `project` and `step` when every layer can be
    stepped.

  References:
    Zaremba, Sutskever and Vinyals, Recurrent neural network regularization, 2014.
      https://arxiv.org/abs/1409.2329
  """
  cells = tuple(cells)
  if not cells:
    raise ValueError("`cells` must be a non-empty sequence of rnn.Cell or layers; got none.")
  for i, c in enumerate(cells):
    _check_layer(f"cells[{i}]", c)
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"`dropout` must be in [0, 1); got {dropout!r}.")
  return Stack(cells, float(dropout))


def bidirectional(forward, backward) -> BidirectionalLayer:
  """Runs `forward` left to right and `backward` right to left; outputs are concatenated.

  With `lengths`, the backward half reads each sequence from its own last step; with `resets`,
  both halves keep to the same segments. A bidirectional layer has no `step` (its backward half
  needs the whole sequence): use it through `rnn.unroll`.

  Returns:
    An `rnn.BidirectionalLayer` with `Bidirectional(forward, backward)` params and state, and
    `output_size = forward.output_size + backward.output_size`.

  References:
    Schuster and Paliwal, Bidirectional recurrent neural networks, 1997.
      https://doi.org/10.1109/78.650093
  """
  _check_layer("forward", forward)
  _check_layer("backward", backward)
  return BidirectionalLayer(forward, backward)
