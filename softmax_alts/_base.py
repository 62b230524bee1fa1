"""The `OutputLayer` contract shared by every method, and the input checks they all use."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class OutputLayer(NamedTuple):
  """An output layer over a vocabulary, as a NamedTuple of pure functions.

  Attributes:
    init: `init(key, hidden_size, vocab_size) -> params`, a pytree of arrays.
    loss: `loss(params, hidden [N, H], targets [N], *, key=None) -> [N]`, the training objective
      per token (exact NLL for exact methods; a sampled estimate for the sampling methods, which
      need `key`).
    log_prob: `log_prob(params, hidden [N, H], targets [N]) -> [N]`, the exact normalized
      log-probability of each target.
    log_probs: `log_probs(params, hidden [N, H]) -> [N, V]`, exact normalized log-probabilities
      of every word (for generation and top-k).
  """

  init: Callable[..., Any]
  loss: Callable[..., jax.Array]
  log_prob: Callable[..., jax.Array]
  log_probs: Callable[..., jax.Array]


class RowLoss(NamedTuple):
  """A loss written as a function of the table rows it reads (private: see `_sparse.py`).

  A layer whose loss touches only some rows of its `[R, H]` table and `[R]` bias exposes
  `loss.row_loss(params, hidden, targets, *, key) -> RowLoss`, which checks the inputs, picks
  the rows, and leaves the differentiation to `sparse_loss_and_grads`.

  Attributes:
    ids: a tuple of int32 arrays of any shapes, row ids that are safe to gather (in `[0, R)`).
    keep: a tuple, one entry per `ids` array: None, or a bool array of its shape; False marks
      padding, an entry that reads no row (its id is dropped and its gradient is zero).
    values: `values(hidden [N, H], table_rows, bias_rows) -> [N]` the per-token loss, where
      `table_rows[i] = table[ids[i]]` (shape `ids[i].shape + (H,)`) and
      `bias_rows[i] = bias[ids[i]]`.
    valid: `[N]` bool, False for a target outside the vocabulary (its loss becomes NaN).
  """

  ids: tuple
  keep: tuple
  values: Callable[..., jax.Array]
  valid: jax.Array


def check_hidden(hidden, name: str = "hidden") -> None:
  """Raises `ValueError` unless `hidden` is a floating `[N, H]` array (checked at trace time)."""
  if jnp.ndim(hidden) != 2:
    raise ValueError(f"`{name}` must be [N, H]; got shape {jnp.shape(hidden)}.")
  if not jnp.issubdtype(jnp.result_type(hidden), jnp.floating):
    raise ValueError(f"`{name}` must be floating; got dtype {jnp.result_type(hidden)}.")


def check_targets(targets, vocab_size: int, num_rows: int | None = None,
                  name: str = "targets") -> jax.Array:
  """Checks `targets` and returns a mask of the ids inside `[0, vocab_size)`.

  Shape and dtype are checked at trace time (`ValueError`). When `targets` is concrete (outside
  `jit`), an id outside `[0, vocab_size)` raises `ValueError` naming the id and the vocabulary
  size. Under `jit` the values are unknown, so callers turn the returned mask into NaN losses:
  an id out of range never yields a finite wrong loss.

  Args:
    targets: `[N]` integer ids.
    vocab_size: V.
    num_rows: the N of `hidden`, if it must match.
    name: the argument's name, for messages.

  Returns:
    `[N]` bool, True where the id is in range.
  """
  if jnp.ndim(targets) != 1:
    raise ValueError(f"`{name}` must be [N]; got shape {jnp.shape(targets)}.")
  if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
    raise ValueError(f"`{name}` must be integer ids; got dtype {jnp.result_type(targets)}.")
  if num_rows is not None and jnp.shape(targets)[0] != num_rows:
    raise ValueError(f"`{name}` must be [N] with N = {num_rows} (the rows of `hidden`); "
                     f"got shape {jnp.shape(targets)}.")
  if not isinstance(targets, jax.core.Tracer):
    values = np.asarray(targets)
    bad = (values < 0) | (values >= vocab_size)
    if bad.any():
      raise ValueError(f"`{name}` holds id {int(values[bad][0])}, outside [0, {vocab_size}) "
                       f"(vocab_size = {vocab_size}).")
  return (targets >= 0) & (targets < vocab_size)


def nan_where_invalid(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Returns `values` with NaN where `valid` is False (broadcast over trailing axes)."""
  valid = valid.reshape(valid.shape + (1,) * (values.ndim - valid.ndim))
  return jnp.where(valid, values, jnp.asarray(jnp.nan, values.dtype))
