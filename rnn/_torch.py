"""Weights to and from PyTorch's `nn.RNN`, `nn.LSTM` and `nn.GRU`, with no torch import.

A cell's parameters are a NamedTuple whose fields map one to one onto PyTorch's names
(`w_ih` -> `weight_ih_l0`, ...), so any cell whose params use those field names ports: the
structure and shapes come from `cell.init`, not from a table per cell.
"""

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rnn._cells import Cell
from rnn._compose import Bidirectional, BidirectionalLayer, Stack

_TORCH_NAMES = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh",
                "w_hr": "weight_hr"}
_BIASES = ("b_ih", "b_hh")


def _cell_from_torch(cell: Cell, tensors, suffix: str):
  first = f"weight_ih{suffix}"
  if first not in tensors:
    raise ValueError(f"`tensors` lacks {first!r}; got keys {sorted(tensors)}.")
  input_size = np.shape(tensors[first])[-1]
  expected = jax.eval_shape(lambda key: cell.init(key, input_size), jax.random.key(0))
  values = {}
  for field in expected._fields:
    spec = getattr(expected, field)
    if field not in _TORCH_NAMES:
      raise ValueError(f"`cell`'s params field {field!r} has no PyTorch name; the cell cannot "
                       "be ported.")
    key = f"{_TORCH_NAMES[field]}{suffix}"
    if spec is None:
      if key in tensors:
        raise ValueError(f"`tensors` has {key!r} but the cell has no {field} (e.g. "
                         "proj_size=None or bias=False).")
      values[field] = None
    elif key not in tensors:
      if field not in _BIASES:
        raise ValueError(f"`tensors` lacks {key!r} for this cell; got keys {sorted(tensors)}.")
      values[field] = jnp.zeros(spec.shape, np.asarray(tensors[first]).dtype)  # bias=False
    else:
      value = np.asarray(tensors[key])
      if value.shape != spec.shape:
        raise ValueError(f"`tensors[{key!r}]` must have shape {spec.shape} for this cell "
                         f"(its params from `cell.init`); got {value.shape}.")
      values[field] = jnp.asarray(value)
  return type(expected)(**values)


def _cell_to_torch(params, suffix: str) -> dict:
  return {f"{_TORCH_NAMES[field]}{suffix}": np.asarray(value)
          for field, value in params._asdict().items() if value is not None}


def _layers(cell):
  """(layer index, layer) pairs: a stack's layers, or the cell itself as layer 0."""
  return list(enumerate(cell.layers)) if isinstance(cell, Stack) else [(0, cell)]


def _check(layer) -> None:
  if not isinstance(layer, (Cell, BidirectionalLayer)):
    raise ValueError(f"`cell` must be an rnn.Cell, an rnn.bidirectional pair of cells or an "
                     f"rnn.stack of those to port weights; got a layer {type(layer).__name__}.")


def from_torch(cell, tensors: Mapping[str, np.ndarray]):
  """Builds params from PyTorch's state-dict names (numpy arrays; torch is not imported).

  A single cell reads `weight_ih_l0`, `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0` (and
  `weight_hr_l0` for an LSTM with `proj_size`); missing biases (PyTorch's `bias=False`) are zeros
  for a cell with biases, and a cell made with `bias=False` refuses given ones.
  An `rnn.stack` reads layer l from the `_l{l}` names and an `rnn.bidirectional` its backward
  half from the `_reverse` names, so a multi-layer, bidirectional `nn.LSTM` ports whole.

  Args:
    cell: the `rnn.Cell` (or `rnn.stack` / `rnn.bidirectional`) whose params to build.
    tensors: a mapping of PyTorch names to arrays, e.g.
      `{k: v.detach().numpy() for k, v in torch_lstm.state_dict().items()}`.

  Returns:
    The cell's params, equal to PyTorch's weights.
  """
  def one(layer, index: int):
    _check(layer)
    if isinstance(layer, BidirectionalLayer):
      return Bidirectional(_cell_from_torch(layer.forward, tensors, f"_l{index}"),
                           _cell_from_torch(layer.backward, tensors, f"_l{index}_reverse"))
    return _cell_from_torch(layer, tensors, f"_l{index}")

  params = [one(layer, index) for index, layer in _layers(cell)]
  return tuple(params) if isinstance(cell, Stack) else params[0]


def to_torch(cell, params) -> dict:
  """The inverse of `from_torch`: PyTorch's state-dict names to numpy arrays."""
  out = {}
  layer_params = params if isinstance(cell, Stack) else (params,)
  for (index, layer), p in zip(_layers(cell), layer_params):
    _check(layer)
    if isinstance(layer, BidirectionalLayer):
      out.update(_cell_to_torch(p.forward, f"_l{index}"))
      out.update(_cell_to_torch(p.backward, f"_l{index}_reverse"))
    else:
      out.update(_cell_to_torch(p, f"_l{index}"))
  return out
