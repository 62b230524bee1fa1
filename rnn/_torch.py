"""Weights to and from PyTorch's `nn.RNN`, `nn.LSTM` and `nn.GRU`, with no torch import."""

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from rnn._cells import Cell, GRUParams, LSTMParams, SimpleParams
from rnn._compose import Bidirectional

_PARAMS = {"simple": SimpleParams, "lstm": LSTMParams, "gru": GRUParams}
_GATES = {"simple": 1, "lstm": 4, "gru": 3}


def _leaf_from_torch(cell: Cell, tensors, suffix: str):
  h = cell.config.hidden_size
  g = _GATES[cell.kind] * h
  p = cell.output_size

  def get(name, shape_fn, required=True):
    key = f"{name}{suffix}"
    if key not in tensors:
      if required:
        raise ValueError(f"`tensors` lacks {key!r} for this {cell.kind} cell; got keys "
                         f"{sorted(tensors)}.")
      return None
    value = np.asarray(tensors[key])
    expected = shape_fn(value)
    if value.shape != expected:
      raise ValueError(f"`tensors[{key!r}]` must have shape {expected} for this {cell.kind} cell "
                       f"(hidden_size={h}); got {value.shape}.")
    return jnp.asarray(value)

  w_ih = get("weight_ih", lambda v: (g, v.shape[1] if v.ndim == 2 else -1))
  w_hh = get("weight_hh", lambda v: (g, p))
  b_ih = get("bias_ih", lambda v: (g,), required=False)
  b_hh = get("bias_hh", lambda v: (g,), required=False)
  b_ih = jnp.zeros((g,), w_ih.dtype) if b_ih is None else b_ih
  b_hh = jnp.zeros((g,), w_ih.dtype) if b_hh is None else b_hh
  if cell.kind == "lstm":
    w_hr = None
    if cell.config.proj_size is not None:
      w_hr = get("weight_hr", lambda v: (p, h))
    elif f"weight_hr{suffix}" in tensors:
      raise ValueError(f"`tensors` has 'weight_hr{suffix}' but the cell has no proj_size.")
    return LSTMParams(w_ih, w_hh, b_ih, b_hh, w_hr)
  return _PARAMS[cell.kind](w_ih, w_hh, b_ih, b_hh)


def _leaf_to_torch(cell: Cell, params, suffix: str) -> dict:
  out = {f"weight_ih{suffix}": params.w_ih, f"weight_hh{suffix}": params.w_hh,
         f"bias_ih{suffix}": params.b_ih, f"bias_hh{suffix}": params.b_hh}
  if cell.kind == "lstm" and params.w_hr is not None:
    out[f"weight_hr{suffix}"] = params.w_hr
  return {k: np.asarray(v) for k, v in out.items()}


def _layers(cell: Cell):
  """(cell, layer index) pairs: a stack's layers, or the cell itself as layer 0."""
  return list(enumerate(cell.layers)) if cell.kind == "stack" else [(0, cell)]


def from_torch(cell: Cell, tensors: Mapping[str, np.ndarray]):
  """Builds params from PyTorch's state-dict names (numpy arrays; torch is not imported).

  A single cell reads `weight_ih_l0`, `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0` (and
  `weight_hr_l0` for an LSTM with `proj_size`); missing biases (PyTorch's `bias=False`) are zeros.
  An `rnn.stack` reads layer l from the `_l{l}` names and an `rnn.bidirectional` its backward
  half from the `_reverse` names, so a multi-layer, bidirectional `nn.LSTM` ports whole.

  Args:
    cell: the `rnn.Cell` whose params to build.
    tensors: a mapping of PyTorch names to arrays, e.g.
      `{k: v.detach().numpy() for k, v in torch_lstm.state_dict().items()}`.

  Returns:
    The cell's params, equal to PyTorch's weights.
  """
  def one(c: Cell, layer: int):
    if c.kind == "bidirectional":
      fwd, bwd = c.layers
      return Bidirectional(_leaf_from_torch(fwd, tensors, f"_l{layer}"),
                           _leaf_from_torch(bwd, tensors, f"_l{layer}_reverse"))
    if c.kind not in _PARAMS:
      raise ValueError(f"`cell` of kind {c.kind!r} has no PyTorch counterpart.")
    return _leaf_from_torch(c, tensors, f"_l{layer}")

  params = [one(c, layer) for layer, c in _layers(cell)]
  return tuple(params) if cell.kind == "stack" else params[0]


def to_torch(cell: Cell, params) -> dict:
  """The inverse of `from_torch`: PyTorch's state-dict names to numpy arrays."""
  out = {}
  layer_params = params if cell.kind == "stack" else (params,)
  for (layer, c), p in zip(_layers(cell), layer_params):
    if c.kind == "bidirectional":
      fwd, bwd = c.layers
      out.update(_leaf_to_torch(fwd, p.forward, f"_l{layer}"))
      out.update(_leaf_to_torch(bwd, p.backward, f"_l{layer}_reverse"))
    else:
      out.update(_leaf_to_torch(c, p, f"_l{layer}"))
  return out
