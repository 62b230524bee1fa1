"""Row-sparse training: the output layer's step costs what the loss touches, not O(V H).

The gradient of `sampled`, `nce` or `negative_sampling` w.r.t. the `[V, H]` table is nonzero
only on the target and sampled rows; that of `hierarchical` w.r.t. the `[V-1, H]` node table
only on the nodes along the targets' paths (at most N * D rows for a tree of depth D). Autodiff
through `w[ids]` still materializes it as a dense table-sized array (a scatter into zeros) and
an optimizer then reads and writes the whole table. Here the loss is differentiated w.r.t. the
gathered rows themselves, the result is a `RowGrad`, and the update scatters into the table with
`.at[ids].add`, in place when the step is jitted with the params donated:

```python
@functools.partial(jax.jit, donate_argnums=0)
def step(params, hidden, targets, key):
  loss, hidden_grad, row_grad = softmax_alts.sparse_loss_and_grads(
      layer, params, hidden, targets, key=key)
  return softmax_alts.apply_row_update(params, row_grad, 0.1), loss, hidden_grad
```

`hidden_grad` is the cotangent to feed back into the network that produced `hidden` (e.g. with
`jax.vjp`). The same code serves `FullParams(w, b)` (the sampling losses) and
`HierarchicalParams(nodes, bias)` (`hierarchical`, whose `key` may be None). A layer says that it
has this form with its `row_sparse` field (`OutputLayer.row_sparse`), the only thing read here.

For optax optimizers, `row_wise(tx)` applies any element-wise optax transformation
(sgd, adagrad, adam, ...) to the touched rows only, "lazily" in the manner of TensorFlow's
LazyAdam; `apply_row_updates` then adds its updates.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from softmax_alts._base import OutputLayer, RowLoss, finish
from softmax_alts._full import FullParams
from softmax_alts._hierarchical import HierarchicalParams


class RowGrad(NamedTuple):
  """Gradient (or update) rows of a table: row `ids[m]` gets `w_rows[m]`, `b_rows[m]`.

  The table is `FullParams(w [V, H], b [V])` or `HierarchicalParams(nodes [V-1, H],
  bias [V-1])`: `w_rows` are rows of its `[R, H]` matrix (`w` or `nodes`) and `b_rows` entries
  of its `[R]` bias (`b` or `bias`). Ids may repeat (their rows add up); an id outside `[0, R)`
  is dropped on update.

  Attributes:
    ids: `[M]` int32 row ids.
    w_rows: `[M, H]` rows for `w` (or `nodes`).
    b_rows: `[M]` entries for `b` (or `bias`).
  """

  ids: jax.Array
  w_rows: jax.Array
  b_rows: jax.Array


_TABLES = (FullParams, HierarchicalParams)


def _table(params, name: str = "params"):
  """`(matrix [R, H], bias [R])` of a `FullParams` or `HierarchicalParams`, else `ValueError`."""
  if not isinstance(params, _TABLES):
    raise ValueError(f"`{name}` must be FullParams(w, b) or HierarchicalParams(nodes, bias) "
                     f"(a table with a row-sparse update); got {type(params).__name__}.")
  return params[0], params[1]


def has_row_sparse_path(layer: OutputLayer) -> bool:
  """Whether `sparse_loss_and_grads` (and so `row_wise`) can train `layer` row-sparsely.

  True for the layers whose `row_sparse` field holds the form of their current `loss`: those
  made by `sampled`, `nce`, `negative_sampling` and `hierarchical` (with or without a mesh);
  False for the others (`full`, `class_based`, `adaptive`, ...), whose gradient is dense, and
  for a layer whose `loss` was replaced without replacing `row_sparse` (train it densely).

  Args:
    layer: an `OutputLayer`.

  Returns:
    A Python bool, known without params or data (for choosing a training step).
  """
  form = layer.row_sparse
  return form is not None and form.loss is layer.loss


def _row_loss(layer: OutputLayer, params, hidden, targets, key, where, negatives) -> RowLoss:
  """The layer's loss as a function of the rows it reads, or `ValueError` if it has none."""
  form = layer.row_sparse
  if form is None:
    raise ValueError("`layer` must be an OutputLayer made by hierarchical or by sampled, nce or "
                     "negative_sampling (the losses whose gradient touches only some rows: their "
                     "`row_sparse` form); got one without a row-sparse path (e.g. full, "
                     "class_based, adaptive): train it with jax.grad.")
  if form.loss is not layer.loss:
    raise ValueError("`layer.loss` is not the loss that `layer.row_sparse` is the form of (it "
                     "was replaced, e.g. wrapped): training row-sparsely would train the old "
                     "loss. Replace `row_sparse` along with `loss`, or set it to None and train "
                     "with jax.grad.")
  _table(params)
  return form.rows(params, hidden, targets, key=key, where=where, negatives=negatives)


def sparse_loss_and_grads(layer: OutputLayer, params, hidden: jax.Array, targets: jax.Array, *,
                          key: jax.Array | None = None, weights: jax.Array | None = None,
                          where: jax.Array | None = None, negatives=None):
  """The loss and its gradients, with the table's gradient as touched rows only.

  Differentiates `J = sum_n weights_n * loss_n` (`weights` defaults to `1 / N`: the mean) with
  the same negatives that `layer.loss(params, hidden, targets, key=key)` draws, so
  `scatter_add(row_grad)` equals the dense `grad(J, params)` exactly. The loss is
  differentiated w.r.t. the gathered rows, never the whole table, so the cost is independent of
  V: O((N + M) H) with `M = N + k` touched rows for the sampling losses (`N + N k` with
  per-example negatives), and O(N D H) with `M = N D` for `hierarchical` (tree depth D).

  Args:
    layer: an `OutputLayer` made by `sampled`, `nce`, `negative_sampling` (over `FullParams`)
      or `hierarchical` (over `HierarchicalParams`).
    params: the layer's params: `FullParams(w [V, H], b [V])` or
      `HierarchicalParams(nodes [V-1, H], bias [V-1])`.
    hidden: `[N, H]`.
    targets: `[N]` ids in `[0, V)` (`ValueError` outside jit; NaN losses under jit).
    key: a `jax.random.key` for the negatives (required by the sampling losses; `hierarchical`
      ignores it).
    weights: optional `[N]` per-token weights of the objective (e.g. a padding mask / count).
    where: optional `[N]` bool mask: a masked row gives loss 0 and touches no row, whatever its
      id.
    negatives: the sampling losses' given negatives (`Negatives`), instead of `key`.

  Returns:
    `(loss [N], hidden_grad [N, H], row_grad)`: the per-token losses, `dJ/dhidden`, and a
    `RowGrad(ids [M], w_rows [M, H], b_rows [M])` (duplicates allowed: rows with the same id
    add up). Sampling losses: ids `concat(targets, sampled ids)`. `hierarchical`: ids
    `paths[targets].reshape(-1)` (`[N D]`, token-major), where an entry past a word's path (or
    of a target outside `[0, V)`) has id V-1, outside the table, and zero rows: it touches
    nothing.
  """
  hidden, targets = jnp.asarray(hidden), jnp.asarray(targets)
  form = _row_loss(layer, params, hidden, targets, key, where, negatives)
  table, bias = _table(params)
  num_table_rows, hidden_size = table.shape
  num_rows = hidden.shape[0]
  if weights is None:
    weights = jnp.full((num_rows,), 1.0 / num_rows, hidden.dtype)
  elif jnp.shape(weights) != (num_rows,):
    raise ValueError(f"`weights` must be [N] with N = {num_rows}; got shape "
                     f"{jnp.shape(weights)}.")

  def objective(hidden, table_rows, bias_rows):
    values = finish(form.values(hidden, table_rows, bias_rows), form.valid, form.where)
    return jnp.sum(weights.astype(values.dtype) * values), values

  table_rows = tuple(table[ids] for ids in form.ids)
  bias_rows = tuple(bias[ids] for ids in form.ids)
  (_, values), (hidden_grad, d_table, d_bias) = jax.value_and_grad(
      objective, argnums=(0, 1, 2), has_aux=True)(hidden, table_rows, bias_rows)
  all_ids, all_w, all_b = [], [], []
  for ids, keep, dw, db in zip(form.ids, form.keep, d_table, d_bias):
    ids, dw, db = ids.reshape(-1).astype(jnp.int32), dw.reshape(-1, hidden_size), db.reshape(-1)
    if keep is not None:  # padding: an id outside the table (dropped) and zero rows
      keep = keep.reshape(-1)
      ids = jnp.where(keep, ids, num_table_rows)
      dw = jnp.where(keep[:, None], dw, jnp.zeros((), dw.dtype))
      db = jnp.where(keep, db, jnp.zeros((), db.dtype))
    all_ids.append(ids)
    all_w.append(dw)
    all_b.append(db)
  row_grad = RowGrad(ids=jnp.concatenate(all_ids), w_rows=jnp.concatenate(all_w),
                     b_rows=jnp.concatenate(all_b))
  return values, hidden_grad, row_grad


def _check_rows(params, rows: RowGrad, name: str) -> None:
  if not isinstance(rows, RowGrad):
    raise ValueError(f"`{name}` must be a RowGrad; got {type(rows).__name__}.")
  table, _ = _table(params)
  num_ids = jnp.shape(rows.ids)[0] if jnp.ndim(rows.ids) == 1 else None
  hidden_size = jnp.shape(table)[1]
  if (num_ids is None or jnp.shape(rows.w_rows) != (num_ids, hidden_size)
      or jnp.shape(rows.b_rows) != (num_ids,)):
    raise ValueError(f"`{name}` must hold ids [M], w_rows [M, {hidden_size}] and b_rows [M]; "
                     f"got shapes {jnp.shape(rows.ids)}, {jnp.shape(rows.w_rows)}, "
                     f"{jnp.shape(rows.b_rows)}.")


def _add_rows(params, rows: RowGrad, scale=None):
  """`params` of the same type with `scale * rows` added at `rows.ids` (out of range: dropped)."""
  table, bias = _table(params)
  w_rows, b_rows = rows.w_rows.astype(table.dtype), rows.b_rows.astype(bias.dtype)
  if scale is not None:
    w_rows = jnp.asarray(scale, table.dtype) * w_rows
    b_rows = jnp.asarray(scale, bias.dtype) * b_rows
  return type(params)(table.at[rows.ids].add(w_rows, mode="drop"),
                      bias.at[rows.ids].add(b_rows, mode="drop"))


def apply_row_update(params, row_grad: RowGrad, learning_rate):
  """Sparse SGD: `w[ids] -= learning_rate * w_rows`, `b[ids] -= learning_rate * b_rows`.

  Equal to the dense SGD step `params - learning_rate * grad` (untouched rows have zero
  gradient). In place under `jax.jit(..., donate_argnums=...)` with `params` donated.

  Args:
    params: `FullParams(w [V, H], b [V])` or `HierarchicalParams(nodes [V-1, H], bias [V-1])`.
    row_grad: `RowGrad(ids [M], w_rows [M, H], b_rows [M])`, e.g. from `sparse_loss_and_grads`.
    learning_rate: a scalar.

  Returns:
    The updated params, of the same type as `params`.
  """
  _check_rows(params, row_grad, "row_grad")
  return _add_rows(params, row_grad, -jnp.asarray(learning_rate))


def apply_row_updates(params, updates: RowGrad):
  """Adds update rows to the table, the row-wise `optax.apply_updates`: `w[ids] += w_rows`.

  Args:
    params: `FullParams(w [V, H], b [V])` or `HierarchicalParams(nodes [V-1, H], bias [V-1])`.
    updates: `RowGrad` of updates, e.g. from `row_wise(tx).update`.

  Returns:
    The updated params, of the same type as `params`.
  """
  _check_rows(params, updates, "updates")
  return _add_rows(params, updates)


def merge_rows(rows: RowGrad, vocab_size: int) -> RowGrad:
  """Sums rows with equal ids, with static shapes: `[M]` slots, unused slots get id R and zeros.

  Ids outside `[0, R)` are sent to the unused id R. Every id in `[0, R)` appears at most once.

  Args:
    rows: `RowGrad(ids [M], w_rows [M, H], b_rows [M])`.
    vocab_size: R, the table's number of rows (V for `FullParams`, V-1 for
      `HierarchicalParams`).

  Returns:
    A `RowGrad` of the same shapes whose ids in `[0, R)` are distinct.
  """
  ids = jnp.asarray(rows.ids).astype(jnp.int32)
  num_ids = ids.shape[0]
  ids = jnp.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)
  order = jnp.argsort(ids)
  sorted_ids = ids[order]
  first = jnp.concatenate([jnp.ones((1,), bool), sorted_ids[1:] != sorted_ids[:-1]])
  segment = jnp.cumsum(first.astype(jnp.int32)) - 1
  w_rows = jax.ops.segment_sum(rows.w_rows[order], segment, num_segments=num_ids)
  b_rows = jax.ops.segment_sum(rows.b_rows[order], segment, num_segments=num_ids)
  unique_ids = jnp.full((num_ids,), vocab_size, jnp.int32).at[segment].set(sorted_ids)
  return RowGrad(ids=unique_ids, w_rows=w_rows, b_rows=b_rows)


class RowOptimizer(NamedTuple):
  """An optax-style optimizer on `RowGrad`s: a NamedTuple of pure functions.

  Attributes:
    init: `init(params) -> state`, the wrapped optax transformation's state for the full table.
    update: `update(row_grad, state, params) -> (updates: RowGrad, new_state)`; apply the updates
      with `apply_row_updates`.
  """

  init: Callable[..., Any]
  update: Callable[..., Any]


def row_wise(tx: optax.GradientTransformation, *, distinct_ids: bool = False) -> RowOptimizer:
  """Applies an element-wise optax transformation to the touched rows only ("lazy" updates).

  Rows with equal ids are summed first (`merge_rows`); then every state leaf whose leading axis
  is the table's R rows (Adam's moments, Adagrad's accumulators, ...) is gathered at the touched rows, `tx`
  updates those rows, and the new state rows are scattered back. Scalars (step counts) are
  global. Untouched rows keep their parameters and their state, so the step costs O(M H).

  This is exact for transformations under which a zero gradient leaves a row's parameters and
  state unchanged: `optax.sgd` without momentum and `optax.adagrad` equal their dense versions
  step for step. With moments (`optax.adam`) it is TensorFlow's LazyAdam: equal to dense Adam
  on rows touched at every step, and untouched rows' moments do not decay. Transformations that
  read the whole update (`optax.clip_by_global_norm`) see the merged rows, whose norm is the
  dense gradient's.

  Args:
    tx: an `optax.GradientTransformation` over the params: `FullParams` or
      `HierarchicalParams`.
    distinct_ids: the caller's promise that the ids in `[0, R)` of every `row_grad` passed to
      `update` are distinct (as `merge_rows` leaves them, e.g. merged once to clip by the global
      norm); the merge, a sort of the M ids, is then skipped. With repeated ids the result is
      wrong (one of the repeated rows wins).

  Returns:
    A `RowOptimizer(init, update)`.

  References:
    Duchi, Hazan and Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic
    Optimization", 2011. https://jmlr.org/papers/v12/duchi11a.html
  """

  def init(params):
    return tx.init(params)

  def update(row_grad, state, params):
    _check_rows(params, row_grad, "row_grad")
    table, bias = _table(params)
    num_table_rows = table.shape[0]
    if distinct_ids:  # out-of-range ids still go to the dropped id R
      ids = jnp.asarray(row_grad.ids).astype(jnp.int32)
      rows = row_grad._replace(ids=jnp.where((ids >= 0) & (ids < num_table_rows), ids,
                                             num_table_rows))
    else:
      rows = merge_rows(row_grad, num_table_rows)

    def per_row(leaf):
      return hasattr(leaf, "shape") and len(leaf.shape) >= 1 and leaf.shape[0] == num_table_rows

    def gather(leaf):
      return leaf.at[rows.ids].get(mode="fill", fill_value=0) if per_row(leaf) else leaf

    params_type = type(params)
    sub_state = jax.tree.map(gather, state)
    sub_params = params_type(gather(table), gather(bias))
    grads = params_type(rows.w_rows.astype(table.dtype), rows.b_rows.astype(bias.dtype))
    sub_updates, new_sub_state = tx.update(grads, sub_state, sub_params)

    def scatter(leaf, new_sub):
      return leaf.at[rows.ids].set(new_sub, mode="drop") if per_row(leaf) else new_sub

    new_state = jax.tree.map(scatter, state, new_sub_state)
    updates = RowGrad(ids=rows.ids, w_rows=sub_updates[0], b_rows=sub_updates[1])
    return updates, new_state

  return RowOptimizer(init=init, update=update)
