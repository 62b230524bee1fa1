"""Flax NNX modules around `rnn` cells and `softmax_alts` output layers, for use in `nnx.Module`s.

The modules hold the parameters that the pure `init` returns, leaf for leaf, as `nnx.Param`s
inside the same NamedTuple structure, and rebuild the plain NamedTuple of arrays on every call,
so a module computes exactly what the pure functions compute with the same parameters:

```python
class LM(nnx.Module):
  def __init__(self, vocab_size, *, rngs):
    self.embed = nnx.Embed(vocab_size, 64, rngs=rngs)
    self.rnn = train.RNNModule(rnn.lstm(128), 64, rngs=rngs)
    self.out = train.OutputLayerModule(softmax_alts.full(), 128, vocab_size, rngs=rngs)

  def __call__(self, tokens_BxT, targets_BxT):
    ys_BxTxH, _ = self.rnn(self.embed(tokens_BxT))
    return self.out.loss(ys_BxTxH, targets_BxT).mean()
```

`nnx.grad`, `nnx.jit`, `nnx.Optimizer(model, tx, wrt=nnx.Param)`, `nnx.split` and `nnx.merge`
work on such models as on any other.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import rnn

_LAYER_FUNCTIONS = ("init", "loss", "log_prob", "log_probs")


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _wrap(params):
  """The pure params with every array leaf wrapped in an `nnx.Param` (None stays None)."""
  return jax.tree.map(nnx.Param, params)


def _unwrap(wrapped):
  """The inverse of `_wrap`: the same NamedTuple structure, with the Params' current arrays."""
  return jax.tree.map(lambda v: v.get_value(), wrapped, is_leaf=_is_variable)


def _check_given_params(params, expected, what: str) -> None:
  """Raises `ValueError` unless `params` has the structure, shapes and dtypes of `expected`."""
  got_def, expected_def = jax.tree.structure(params), jax.tree.structure(expected)
  if got_def != expected_def:
    raise ValueError(f"`params` must have the structure that {what} returns, {expected_def}; "
                     f"got {got_def}.")
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    if jnp.shape(got) != want.shape or jnp.result_type(got) != want.dtype:
      raise ValueError(f"`params` leaves must match {what}: expected {want.shape} {want.dtype}, "
                       f"got {jnp.shape(got)} {jnp.result_type(got)}.")


def _init_or_check(init_fn, rngs, params, what: str):
  if params is None:
    if rngs is None:
      raise ValueError("pass `rngs` (an nnx.Rngs) to initialise the parameters, or `params`.")
    return init_fn(rngs.params())
  _check_given_params(params, jax.eval_shape(init_fn, jax.random.key(0)), what)
  return jax.tree.map(jnp.asarray, params)


class RNNModule(nnx.Module):
  """An `rnn.Cell` as an `nnx.Module`: its parameters as `nnx.Param`s, `rnn.unroll` on call.

  ```python
  layer = train.RNNModule(rnn.lstm(128), input_size=64, rngs=nnx.Rngs(0))
  ys_BxTxH, final = layer(xs_BxTxD)                      # zero initial state
  ys_BxTxH, final = layer(xs_BxTxD, final, lengths=lengths_B, grad="manual")
  ```

  Attributes:
    cell: the `rnn.Cell` (static).
    input_size: D.
    params: the cell's parameter NamedTuple (e.g. `rnn.LSTMParams`) with `nnx.Param` leaves.
  """

  def __init__(self, cell: rnn.Cell | rnn.Layer, input_size: int, *, rngs: nnx.Rngs | None = None,
               params: Any = None):
    """Initialises the parameters with `cell.init(rngs.params(), input_size)`.

    Args:
      cell: an `rnn.Cell` (a single cell, `rnn.stack` or `rnn.bidirectional`).
      input_size: D, the size of the inputs.
      rngs: an `nnx.Rngs`; the key is drawn from its `params` stream (or `default`).
      params: existing parameters to hold instead (the structure, shapes and dtypes that
        `cell.init(key, input_size)` returns); `rngs` is then not needed.
    """
    if not isinstance(cell, (rnn.Cell, rnn.Layer)):
      raise ValueError(f"`cell` must be an rnn.Cell or a layer (rnn.stack, rnn.bidirectional); "
                       f"got {type(cell).__name__}.")
    params = _init_or_check(lambda key: cell.init(key, input_size), rngs, params,
                            "`cell.init(key, input_size)`")
    self.cell = cell
    self.input_size = input_size
    self.params = nnx.data(_wrap(params))

  def pure_params(self):
    """The parameters as the plain NamedTuple of arrays that the pure `rnn` functions take."""
    return _unwrap(self.params)

  def initial_state(self, batch_shape=()):
    """The zero state, `cell.initial_state(params, batch_shape)`, leaves `[*batch_shape, ...]`."""
    return self.cell.initial_state(self.pure_params(), tuple(batch_shape))

  def step(self, state, x_t: jax.Array):
    """One step, `cell.step(params, state, cell.project(params, x_t))`, for generation.

    Args:
      state: the state, leaves `[B, ...]`.
      x_t: `[B, D]` inputs of one step.

    Returns:
      `(state, y_t)`: the new state and `y_t [B, O]`.
    """
    params = self.pure_params()
    return self.cell.step(params, state, self.cell.project(params, x_t))

  def __call__(self, xs: jax.Array, state=None, *, lengths: jax.Array | None = None,
               reverse: bool = False, time_major: bool = False, unroll: int = 1,
               remat: bool = False, grad: str = "autodiff", clip_delta: float | None = None,
               key: jax.Array | None = None):
    """Runs the cell over `xs` with `rnn.unroll` (see there for every option).

    Args:
      xs: `[B, T, D]` inputs (`[T, B, D]` with `time_major`).
      state: the initial state, leaves `[B, ...]`; None: zeros.
      lengths: optional `[B]` int, the valid steps of each sequence.
      reverse: read the sequences from the end.
      time_major: `xs` and `ys` are `[T, B, ...]`.
      unroll: steps unrolled per scan iteration.
      remat: recompute activations in the backward pass (sqrt(T) memory).
      grad: `"autodiff"` or `"manual"` (the hand-derived BPTT of `rnn.unroll`).
      clip_delta: with `grad="manual"`, clip the error signal per step.
      key: a `jax.random.key` for the dropout between the layers of an `rnn.stack`.

    Returns:
      `(ys, final)`: `ys [B, T, O]` (`[T, B, O]` with `time_major`) and the final state.
    """
    params = self.pure_params()
    if state is None:
      if jnp.ndim(xs) < 2:
        raise ValueError(f"`xs` must be [B, T, D] ([T, B, D] with time_major); got shape "
                         f"{jnp.shape(xs)}.")
      batch_shape = xs.shape[1:-1] if time_major else xs.shape[:-2]
      state = self.cell.initial_state(params, batch_shape)
    return rnn.unroll(self.cell, params, xs, state, lengths=lengths, reverse=reverse,
                      time_major=time_major, unroll=unroll, remat=remat, grad=grad,
                      clip_delta=clip_delta, key=key)


def _flatten_hidden(hidden, hidden_size: int):
  if jnp.ndim(hidden) < 1 or jnp.shape(hidden)[-1] != hidden_size:
    raise ValueError(f"`hidden` must be [..., H] with H = {hidden_size}; got shape "
                     f"{jnp.shape(hidden)}.")
  return jnp.reshape(hidden, (-1, hidden_size)), jnp.shape(hidden)[:-1]


def _flatten_targets(targets, batch_shape):
  if jnp.shape(targets) != batch_shape:
    raise ValueError(f"`targets` must have the leading shape {batch_shape} of `hidden`; got "
                     f"shape {jnp.shape(targets)}.")
  return jnp.reshape(targets, (-1,))


class OutputLayerModule(nnx.Module):
  """A `softmax_alts.OutputLayer` as an `nnx.Module`: its parameters as `nnx.Param`s.

  The methods call the layer's pure functions; they accept any leading shape (`hidden
  [..., H]`, `targets [...]`), flattened to the `[N, H]` and `[N]` the layer takes and
  reshaped back.

  ```python
  out = train.OutputLayerModule(softmax_alts.adaptive((2000, 10000)), 512, 33278, rngs=rngs)
  loss_BxT = out.loss(ys_BxTxH, targets_BxT, key=rngs.sample())   # training objective
  log_p_BxT = out.log_prob(ys_BxTxH, targets_BxT)                  # exact, for evaluation
  ```

  Attributes:
    layer: the `OutputLayer` (static).
    hidden_size: H.
    vocab_size: V.
    params: the layer's parameter NamedTuple with `nnx.Param` leaves.
  """

  def __init__(self, layer, hidden_size: int, vocab_size: int, *,
               rngs: nnx.Rngs | None = None, params: Any = None):
    """Initialises the parameters with `layer.init(rngs.params(), hidden_size, vocab_size)`.

    Args:
      layer: a `softmax_alts.OutputLayer`.
      hidden_size: H.
      vocab_size: V.
      rngs: an `nnx.Rngs`; the key is drawn from its `params` stream (or `default`).
      params: existing parameters to hold instead (as `layer.init` returns them); `rngs` is
        then not needed.
    """
    if not all(callable(getattr(layer, name, None)) for name in _LAYER_FUNCTIONS):
      raise ValueError(f"`layer` must be a softmax_alts.OutputLayer; got "
                       f"{type(layer).__name__}.")
    params = _init_or_check(lambda key: layer.init(key, hidden_size, vocab_size), rngs, params,
                            "`layer.init(key, hidden_size, vocab_size)`")
    self.layer = layer
    self.hidden_size = hidden_size
    self.vocab_size = vocab_size
    self.params = nnx.data(_wrap(params))

  def pure_params(self):
    """The parameters as the plain NamedTuple of arrays that the layer's functions take."""
    return _unwrap(self.params)

  def loss(self, hidden: jax.Array, targets: jax.Array, *,
           key: jax.Array | None = None) -> jax.Array:
    """The layer's training objective per token (sampled methods need `key`).

    Args:
      hidden: `[..., H]`.
      targets: `[...]` int ids in `[0, V)`.
      key: a `jax.random.key` for the sampling methods; None for the exact ones.

    Returns:
      `[...]` the loss of every token.
    """
    hidden_NxH, batch_shape = _flatten_hidden(hidden, self.hidden_size)
    targets_N = _flatten_targets(targets, batch_shape)
    loss_N = self.layer.loss(self.pure_params(), hidden_NxH, targets_N, key=key)
    return loss_N.reshape(batch_shape)

  def log_prob(self, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """The exact normalized log-probability of every target.

    Args:
      hidden: `[..., H]`.
      targets: `[...]` int ids in `[0, V)`.

    Returns:
      `[...]` log p(target).
    """
    hidden_NxH, batch_shape = _flatten_hidden(hidden, self.hidden_size)
    targets_N = _flatten_targets(targets, batch_shape)
    return self.layer.log_prob(self.pure_params(), hidden_NxH, targets_N).reshape(batch_shape)

  def log_probs(self, hidden: jax.Array) -> jax.Array:
    """The exact normalized log-probabilities of every word.

    Args:
      hidden: `[..., H]`.

    Returns:
      `[..., V]` log-probabilities.
    """
    hidden_NxH, batch_shape = _flatten_hidden(hidden, self.hidden_size)
    log_probs_NxV = self.layer.log_probs(self.pure_params(), hidden_NxH)
    return log_probs_NxV.reshape(batch_shape + (log_probs_NxV.shape[-1],))

  def __call__(self, hidden: jax.Array) -> jax.Array:
    """`log_probs(hidden)`: `[..., H] -> [..., V]`."""
    return self.log_probs(hidden)
