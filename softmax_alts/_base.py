"""The `OutputLayer` contract shared by every method, the input checks, and the one wrapper that
turns a layer's array functions into its public `loss`, `log_prob` and `log_probs`."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh


class RowLoss(NamedTuple):
  """A loss written as a function of the table rows it reads (see `_sparse.py`).

  Attributes:
    ids: a tuple of int32 arrays of any shapes, row ids that are safe to gather (in `[0, R)`).
    keep: a tuple, one entry per `ids` array: None, or a bool array of its shape; False marks
      padding, an entry that reads no row (its id is dropped and its gradient is zero).
    values: `values(hidden [N, H], table_rows, bias_rows) -> [N]` the per-token loss, where
      `table_rows[i] = table[ids[i]]` (shape `ids[i].shape + (H,)`) and
      `bias_rows[i] = bias[ids[i]]`.
    valid: `[N]` bool, False for a target outside the vocabulary (its loss becomes NaN).
    where: `[N]` bool or None: False for a masked row (its loss is 0, its gradient zero).
  """

  ids: tuple
  keep: tuple
  values: Callable[..., jax.Array]
  valid: jax.Array
  where: Any = None


class RowSparse(NamedTuple):
  """The row-sparse form of a layer's loss, read by `sparse_loss_and_grads`.

  Attributes:
    loss: the `loss` function this is the form of. A layer whose `loss` was replaced (wrapped,
      scaled, ...) no longer matches it, and `sparse_loss_and_grads` refuses it rather than
      train a different loss: replace `row_sparse` along with `loss`, or set it to None.
    rows: `rows(params, hidden [N, H], targets [N], *, key, where, negatives) -> RowLoss`.
  """

  loss: Callable[..., jax.Array]
  rows: Callable[..., RowLoss]


class OutputLayer(NamedTuple):
  """An output layer over a vocabulary, as a NamedTuple of pure functions.

  `hidden` may be `[N, H]` or a single `[H]` (with a scalar target: the results lose their
  batch axis), in float32 or bfloat16 (parameters too, independently): the losses and
  log-probabilities are float32.

  Attributes:
    init: `init(key, hidden_size, vocab_size, *, param_dtype=float32) -> params`.
    loss: `loss(params, hidden [N, H], targets [N], *, key=None, where=None) -> [N]`, the
      training objective per token (exact NLL for exact methods; a sampled estimate for the
      sampling methods, which need `key` or given `negatives=`). `where [N]` bool masks rows:
      a masked row gives 0 and no gradient, whatever its id.
    log_prob: `log_prob(params, hidden [N, H], targets [N], *, where=None) -> [N]`, the exact
      normalized log-probability of each target.
    log_probs: `log_probs(params, hidden [N, H]) -> [N, V]`, exact normalized
      log-probabilities of every word (for generation and top-k).
    row_sparse: the layer's row-sparse form (`RowSparse`), or None where its gradient is dense.
      Replacing `loss` means replacing or dropping this too (`sparse_loss_and_grads` checks).
  """

  init: Callable[..., Any]
  loss: Callable[..., jax.Array]
  log_prob: Callable[..., jax.Array]
  log_probs: Callable[..., jax.Array]
  row_sparse: RowSparse | None = None


def check_targets(targets, vocab_size: int, num_rows: int | None = None,
                  name: str = "targets", where=None) -> jax.Array:
  """Checks `targets` and returns a mask of the ids inside `[0, vocab_size)`.

  Shape and dtype are checked at trace time (`ValueError`). When `targets` is concrete (outside
  `jit`), an id outside `[0, vocab_size)` raises `ValueError` naming the id and the vocabulary
  size, unless `where` masks its row. Under `jit` the values are unknown, so callers turn the
  returned mask into NaN losses: an id out of range never yields a finite wrong loss.

  Args:
    targets: `[N]` integer ids.
    vocab_size: V.
    num_rows: the N of `hidden`, if it must match.
    name: the argument's name, for messages.
    where: `[N]` bool or None: rows whose id is not checked.

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
  if not isinstance(targets, jax.core.Tracer) and not isinstance(where, jax.core.Tracer):
    values = np.asarray(targets)
    bad = (values < 0) | (values >= vocab_size)
    if where is not None:
      bad &= np.asarray(where)
    if bad.any():
      raise ValueError(f"`{name}` holds id {int(values[bad][0])}, outside [0, {vocab_size}) "
                       f"(vocab_size = {vocab_size}).")
  return (targets >= 0) & (targets < vocab_size)


def check_where(where, num_rows: int):
  """`where` as a `[N]` bool array (None stays None), or `ValueError`."""
  if where is None:
    return None
  if jnp.shape(where) != (num_rows,) or jnp.result_type(where) != jnp.bool_:
    raise ValueError(f"`where` must be a [N] bool mask with N = {num_rows}; got "
                     f"{jnp.result_type(where)} of shape {jnp.shape(where)}.")
  return jnp.asarray(where)


def finish(values, valid, where):
  """`values` with NaN where `valid` is False and 0 where `where` masks the row (no gradient)."""
  values = jnp.where(valid, values, jnp.asarray(jnp.nan, values.dtype))
  return values if where is None else jnp.where(where, values, jnp.zeros((), values.dtype))


def batch(hidden, targets=None, where=None):
  """`(hidden [N, H], targets [N], where, unbatched)`: a single `hidden [H]` (with a scalar
  target and mask) becomes a batch of one, to be undone with `unbatch`."""
  hidden = jnp.asarray(hidden)
  targets = None if targets is None else jnp.asarray(targets)
  unbatched = jnp.ndim(hidden) == 1
  if unbatched:
    hidden = hidden[None]
    if targets is not None:
      if jnp.ndim(targets) != 0:
        raise ValueError(f"`targets` must be a scalar id with `hidden` [H]; got shape "
                         f"{jnp.shape(targets)}.")
      targets = jnp.reshape(targets, (1,))
    if where is not None:
      where = jnp.reshape(where, (1,))
  if jnp.ndim(hidden) != 2:
    raise ValueError(f"`hidden` must be [N, H] or [H]; got shape {jnp.shape(hidden)}.")
  if not jnp.issubdtype(hidden.dtype, jnp.floating):
    raise ValueError(f"`hidden` must be floating; got dtype {hidden.dtype}.")
  return hidden, targets, where, unbatched


def unbatch(values, unbatched: bool):
  return values[0] if unbatched else values


def layer_functions(check: Callable, target_log_prob: Callable, all_log_probs: Callable, *,
                    target_loss: Callable | None = None):
  """`(loss, log_prob, log_probs)` of an exact layer, from its array functions.

  The public functions check their inputs (shapes at trace time, ids eagerly outside `jit`),
  batch a single `hidden [H]`, apply `where`, and call the array functions, jitted once here
  (called under an outer `jit`, they are inlined).

  Args:
    check: `check(params, hidden [N, H]) -> V`, raising `ValueError` on shapes that disagree.
    target_log_prob: `(params, hidden, targets) -> [N]` for ids in `[0, V)`.
    all_log_probs: `(params, hidden) -> [N, V]`.
    target_loss: `(params, hidden, targets) -> [N]`, when the loss is not `-log_prob`.
  """
  target_log_prob, all_log_probs = jax.jit(target_log_prob), jax.jit(all_log_probs)
  target_loss = (jax.jit(target_loss) if target_loss is not None
                 else jax.jit(lambda *args: -target_log_prob(*args)))

  def per_target(fn, params, hidden, targets, where):
    hidden, targets, where, unbatched = batch(hidden, targets, where)
    params = jax.tree.map(jnp.asarray, params)
    vocab_size = check(params, hidden)
    where = check_where(where, hidden.shape[0])
    valid = check_targets(targets, vocab_size, hidden.shape[0], where=where)
    safe = jnp.where(valid if where is None else valid & where, targets, 0).astype(jnp.int32)
    return unbatch(finish(fn(params, hidden, safe), valid, where), unbatched)

  def loss(params, hidden, targets, *, key=None, where=None):
    del key  # exact: nothing is sampled
    return per_target(target_loss, params, hidden, targets, where)

  def log_prob(params, hidden, targets, *, where=None):
    return per_target(target_log_prob, params, hidden, targets, where)

  def log_probs(params, hidden):
    hidden, _, _, unbatched = batch(hidden)
    params = jax.tree.map(jnp.asarray, params)
    check(params, hidden)
    return unbatch(all_log_probs(params, hidden), unbatched)

  return loss, log_prob, log_probs


def check_positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"`{name}` must be a positive int; got {value!r}.")
  return int(value)


def init_function(draw: Callable) -> Callable:
  """A layer's `init(key, hidden_size, vocab_size, *, param_dtype=None, dtype=None) -> params`
  from `draw(key, hidden_size, vocab_size, dtype)`, jitted with the sizes and dtype static.

  `param_dtype` is the parameters' floating dtype (float32 by default), Flax's name; `dtype`
  is accepted as its older name.
  """

  def init(key, hidden_size: int, vocab_size: int, *, param_dtype=None, dtype=None):
    if dtype is not None:
      if param_dtype is not None and jnp.dtype(param_dtype) != jnp.dtype(dtype):
        raise ValueError(f"`dtype` is an alias of `param_dtype`; got both, {param_dtype} and "
                         f"{dtype}.")
      param_dtype = dtype
    param_dtype = jnp.dtype(jnp.float32 if param_dtype is None else param_dtype)
    if not jnp.issubdtype(param_dtype, jnp.floating):
      raise ValueError(f"`param_dtype` must be a floating dtype; got {param_dtype}.")
    return draw(key, hidden_size, vocab_size, param_dtype)

  init.__name__, init.__doc__ = draw.__name__, draw.__doc__
  return jax.jit(init, static_argnums=(1, 2), static_argnames=("param_dtype", "dtype"))


def check_options(strategy, mesh, axis, **knobs) -> int:
  """Checks a factory's options of the log-sum-exp primitive (`strategy`, the mesh and its axis,
  positive-int `knobs` such as `block_rows`, None allowed); returns the size of the mesh axis (1
  without a mesh)."""
  if strategy is not None and strategy not in ("stream", "materialize"):
    raise ValueError(f"`strategy` must be None or one of ('stream', 'materialize'); got "
                     f"{strategy!r}.")
  for name, value in knobs.items():
    if value is not None:
      check_positive_int(value, name)
  if mesh is None:
    return 1
  if not isinstance(mesh, Mesh):
    raise ValueError(f"`mesh` must be a jax.sharding.Mesh or None; got {type(mesh).__name__}.")
  if axis not in mesh.axis_names:
    raise ValueError(f"`axis` must be one of the mesh's axes {tuple(mesh.axis_names)}; "
                     f"got {axis!r}.")
  return int(mesh.shape[axis])


def check_divisible(rows: int, shards: int, name: str, axis) -> None:
  """Raises `ValueError` naming the array when its rows do not split evenly over the axis."""
  if rows % shards:
    raise ValueError(f"`{name}` must have a number of rows divisible by the size {shards} of "
                     f"the mesh axis {axis!r} (each device holds an equal slice); got {rows} "
                     "rows.")
