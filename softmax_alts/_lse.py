"""The one primitive behind every exact output layer: each row's log-sum-exp over an id range.

For rows `hidden [N, K]`, a table `w [R, K]` with bias `b [R]` (or none), targets `t [N]` and
per-row id ranges `[lo_n, hi_n)` (the whole table unless given), `lse_and_target` returns

    lse_n = log sum_{lo_n <= v < hi_n} exp(w_v . h_n + b_v),    z_n = w_{t_n} . h_n + b_{t_n},

with `z_n = 0` where `t_n` is outside the row's range and `lse_n = -inf` for an empty range
(whose gradient is zero), in float32 (float64 for float64 inputs) whatever the input dtypes:
the products run in the inputs' common dtype and accumulate in float32. The gradient is one
`jax.custom_vjp` (reverse mode) over two strategies:

- "stream": the vocabulary in blocks of `block` ids with an online log-sum-exp (running max,
  rescaled sum), so that each block's logits are made and used while in cache. With ranges,
  the rows are sorted by range and cut into tiles of `tile` rows, and one loop runs over the
  (tile, block) pairs that meet, a number known at run time: a row costs the blocks of its own
  range only. The forward pass also accumulates each row's softmax-weighted mean of the table
  rows, which gives `d hidden` with no second pass over the table; with `store`, it keeps every
  pair's logits so that the backward pass only forms `d logits @ hidden` per block (pairs past
  a static capacity are recomputed); without, the backward pass recomputes them all and
  nothing of size N x R is held.
- "materialize": one `[N, R]` GEMM, masked to the ranges, and a fused log-softmax; the logits
  are kept for the backward pass (`store`, the 6 N K R flops of a softmax) or recomputed.

`strategy=None` picks by backend and size (`default_strategy`).

Vocabulary parallelism: with a `mesh` and an `axis`, `w` and `b` are split along R over the
axis (device m holds rows `[m R/M, (m+1) R/M)`), and the same code runs on every device inside
`jax.shard_map` on its own rows, with the ranges and targets moved to its ids. The devices
combine their log-sum-exps with a `pmax` and a `psum` and their target logits and mean rows
with a `psum` (Megatron-LM's vocab-parallel cross-entropy); the backward pass writes each
device's slice of `d w` locally. Every other axis of the mesh is left to the compiler.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

class Plan(NamedTuple):
  """Static settings of one call (see `lse_and_target`)."""
  strategy: str
  store: bool
  block: int
  tile: int | None
  span: int | None
  mesh: Any
  axis: str | None


def default_strategy(num_rows: int, num_words: int, *, ranges: bool = False) -> str:
  """The strategy that `strategy=None` picks for `num_rows` rows against a `num_words` table.

  On CPU, "stream", except "materialize" for rows that need the whole table while their float32
  logits fit in a cache-sized budget (8 MiB): streamed blocks stay in cache while they are used,
  and rows with ranges skip the blocks outside them. On accelerators, whose GEMMs want one large
  product, "materialize" while the `[N, R]` float32 logits fit in a 2 GiB memory budget, else
  "stream". The measured effect of both rules is in the softmax benchmark.

  Args:
    num_rows: N.
    num_words: R, the rows of the table (of all devices together).
    ranges: whether each row needs only an id range of the table.

  Returns:
    "stream" or "materialize".
  """
  logits_bytes = 4 * num_rows * num_words
  if jax.default_backend() == "cpu":
    return "materialize" if not ranges and logits_bytes <= 2 ** 23 else "stream"
  return "materialize" if logits_bytes <= 2 ** 31 else "stream"


def common_dtype(*arrays):
  """The widest floating dtype of `arrays` (bfloat16 with float16: float32), computed without
  implicit promotion, which a strict `jax_numpy_dtype_promotion` forbids across float widths."""
  dtypes = {jnp.dtype(jnp.result_type(x)) for x in arrays}
  widest = max(dtypes, key=lambda d: d.itemsize)
  if len([d for d in dtypes if d.itemsize == widest.itemsize]) > 1:
    return jnp.dtype(jnp.float32)
  return widest


def accumulation_dtype(*arrays):
  """The dtype of sums, log-sum-exps and losses: the inputs' common dtype, at least float32."""
  return common_dtype(jnp.zeros((), jnp.float32), *arrays)


def dot(x, y, contract):
  """`lax.dot_general` over `((x_axes,), (y_axes,))` in the operands' common dtype, accumulated
  in at least float32."""
  common = common_dtype(x, y)
  return lax.dot_general(x.astype(common), y.astype(common), (contract, ((), ())),
                         preferred_element_type=accumulation_dtype(common))


def logits(hidden, w, b) -> jax.Array:
  """`hidden @ w.T + b`: `[N, K] x [R, K] -> [N, R]`, accumulated in at least float32."""
  z = dot(hidden, w, ((1,), (1,)))
  return z if b is None else z + b[None, :].astype(z.dtype)


def log_softmax(z) -> jax.Array:
  """`z - logsumexp(z, 1)` for logits `[N, R]`, in their dtype."""
  return z - _logsumexp(z)[:, None]


def split_logits(hidden, w, b, mesh=None, axis: str | None = None):
  """`(z [N, R], lse [N])`: the logits `hidden @ w.T + b` (`b` may be None) and each row's
  log-sum-exp over all R, with `w`, `b` and `z` split along R over `axis` of `mesh` if given."""

  if not split(mesh, axis):
    z = logits(hidden, w, b)
    return z, _logsumexp(z)

  def body(hidden, w, b):
    z = logits(hidden, w, b)
    return z, combine(_logsumexp(z), axis)

  return smap(body, mesh, axis, (P(), P(axis, None), None if b is None else P(axis)),
              (P(None, axis), P()))(hidden, w, b)


def _logsumexp(z):
  """Row-wise log-sum-exp of `[N, R]` logits; -inf for a row of -inf (an empty range)."""
  m = jnp.max(z, axis=1)
  shift = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0))
  return shift + jnp.log(jnp.sum(jnp.exp(z - shift[:, None]), axis=1))


def combine(lse, axis: str | None):
  """The log-sum-exp over the devices of `axis` of their row-wise log-sum-exps `[N]`."""
  if axis is None:
    return lse
  m = lax.stop_gradient(lax.pmax(lse, axis))
  shift = jnp.where(jnp.isfinite(m), m, 0)
  return shift + jnp.log(lax.psum(jnp.exp(lse - shift), axis))


def take_rows(table, ids, mesh=None, axis: str | None = None):
  """`table[ids]` for a table split along its rows over `axis` of `mesh` (if given): each device
  reads the ids it holds and a psum completes them, so no table-sized array crosses devices,
  in either direction of autodiff (the gradient stays split like the table)."""
  if not split(mesh, axis):
    return table[ids]

  def body(shard, table, ids):
    local = ids - shard[0] * table.shape[0]
    owned = (local >= 0) & (local < table.shape[0])
    rows = table[jnp.clip(local, 0, table.shape[0] - 1)]
    owned = owned.reshape(owned.shape + (1,) * (rows.ndim - owned.ndim))
    return lax.psum(jnp.where(owned, rows, jnp.zeros((), rows.dtype)), axis)

  spec = P(axis, *(None,) * (table.ndim - 1))
  return smap(body, mesh, axis, (P(axis), spec, P()), P())(shard_numbers(mesh, axis), table,
                                                            ids)


def _cdiv(a, b):
  return -(-a // b)


def _add_at(x, start, delta):
  """`x` with `delta` added to its rows `[start, start + len(delta))` (in place in a loop)."""
  return lax.dynamic_update_slice_in_dim(
      x, lax.dynamic_slice_in_dim(x, start, delta.shape[0], 0) + delta.astype(x.dtype), start, 0)


def shard_numbers(mesh, axis):
  """`[0, .., M - 1]`, to pass into a shard_map split over `axis`: each device reads its own
  number from its slice (`lax.axis_index` lowers to XLA's PartitionId, which the partitioner
  refuses in a program that is manual over one axis and automatic over the others)."""
  return jnp.arange(mesh.shape[axis], dtype=jnp.int32)


def split(mesh, axis) -> bool:
  """Whether tables are split over `axis` of `mesh` (None, or an axis of size 1: no)."""
  return mesh is not None and mesh.shape[axis] > 1


def smap(fn, mesh, axis, in_specs, out_specs, *, autodiff: bool = True):
  """`jax.shard_map` manual over `axis` only (every other axis is left to the compiler).

  `autodiff=False` for bodies that nothing differentiates through (the primitive's forward and
  backward, whose VJP is written out) and whose loops' replication JAX cannot infer: the checks
  that serve autodiff are then off.
  """
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       axis_names={axis}, check_vma=autodiff)


# --------------------------------------------------------------------------------------------
# The schedule of the stream strategy: (tile, block) pairs, in block order.

class _Pairs(NamedTuple):
  """Pair p is the rows `[row[p], row[p] + T)` against the ids of block `block[p]`; the first
  `count` of the slots are used."""
  block: jax.Array
  row: jax.Array
  count: Any


def _pairs(lo, hi, tile, block, num_words, num_rows, span) -> _Pairs:
  """The pairs of `num_rows` rows sorted by range (then a tile of padding), each range at most
  `span` ids long; without ranges, every block against every tile."""
  num_blocks = _cdiv(num_words, block)
  if lo is None:
    tiles = _cdiv(num_rows, tile)
    slots = jnp.arange(num_blocks * tiles, dtype=jnp.int32)
    return _Pairs(slots // tiles, (slots % tiles) * tile, num_blocks * tiles)
  starts = jnp.arange(num_blocks, dtype=jnp.int32) * block
  ends = jnp.minimum(starts + block, num_words)
  first = jnp.searchsorted(hi, starts, side="right").astype(jnp.int32)  # first row: hi > start
  stop = jnp.searchsorted(lo, ends, side="left").astype(jnp.int32)      # first row: lo >= end
  tiles = _cdiv(jnp.maximum(stop - first, 0), tile)
  # sum_j ceil(rows_j / T) <= blocks + (sum_j rows_j) / T, and sum_j rows_j <= N * max_span.
  max_span = min(_cdiv(span - 1, block) + 1, num_blocks)
  slots = max(1, min(num_blocks + num_rows * max_span // tile,
                     num_blocks * _cdiv(num_rows, tile)))
  block_of = jnp.repeat(jnp.arange(num_blocks, dtype=jnp.int32), tiles,
                        total_repeat_length=slots)
  offset = jnp.arange(slots, dtype=jnp.int32) - (jnp.cumsum(tiles) - tiles)[block_of]
  return _Pairs(block_of, first[block_of] + offset * tile, jnp.sum(tiles))


def _capacity(pairs: _Pairs, tile, block, num_words, num_rows) -> int:
  """Pairs whose logits are kept: all of a static schedule; with ranges, every block once and
  every row twice over, which covers typical batches (a block meets more than one tile only
  where many rows share small ranges); the backward pass recomputes the rest."""
  if isinstance(pairs.count, int):
    return pairs.count
  return min(pairs.block.shape[0], _cdiv(num_words, block) + 2 * _cdiv(num_rows, tile))


class _Rows(NamedTuple):
  """The rows as the stream loop reads them: sorted by range and padded with a tile of empty
  rows when there are ranges (`order` [N] then undoes the sort), else as given."""
  hidden: jax.Array
  targets: jax.Array
  lo: Any
  hi: Any
  order: Any
  pairs: _Pairs
  tile: int
  block: int


def _stream_rows(plan: Plan, w, hidden, targets, lo, hi) -> _Rows:
  num_rows, num_words = hidden.shape[0], w.shape[0]
  block = min(plan.block, num_words)
  if lo is None:  # rows padded to whole tiles (the padding's values are dropped)
    tile = min(plan.tile or num_rows, num_rows)
    pad = -num_rows % tile
    pairs = _pairs(None, None, tile, block, num_words, num_rows + pad, None)
    return _Rows(jnp.pad(hidden, ((0, pad), (0, 0))), jnp.pad(targets, (0, pad)), None, None,
                 None, pairs, tile, block)
  tile = plan.tile
  empty = lo >= hi  # empty ranges go last, so that sorting by lo sorts hi too
  lo, hi = jnp.where(empty, num_words, lo), jnp.where(empty, num_words, hi)
  order = jnp.argsort(lo, stable=True)
  fill = jnp.full((tile,), num_words, jnp.int32)
  lo, hi = jnp.concatenate([lo[order], fill]), jnp.concatenate([hi[order], fill])
  pairs = _pairs(lo, hi, tile, block, num_words, num_rows, plan.span or num_words)
  return _Rows(jnp.pad(hidden[order], ((0, tile), (0, 0))),
               jnp.concatenate([targets[order], fill]), lo, hi, order, pairs, tile, block)


def _pair(p, rows: _Rows, num_words, *arrays):
  """Pair p: its first row, the block's first id (the last block clamped to the end of the
  table), the block's ids, the mask of ids that are the block's own and inside each row's range
  (`[B, T]`, or `[B, 1]` without ranges), and `arrays` sliced to the tile."""
  j, row0 = rows.pairs.block[p], rows.pairs.row[p]
  start = jnp.minimum(j * rows.block, num_words - rows.block)
  ids = start + jnp.arange(rows.block, dtype=jnp.int32)
  sliced = [lax.dynamic_slice_in_dim(x, row0, rows.tile, 0) for x in arrays]
  mask = (ids >= j * rows.block)[:, None]
  if rows.lo is not None:
    lo_t, hi_t = (lax.dynamic_slice_in_dim(x, row0, rows.tile, 0) for x in (rows.lo, rows.hi))
    mask = mask & (ids[:, None] >= lo_t[None, :]) & (ids[:, None] < hi_t[None, :])
  return row0, start, ids, mask, sliced


def _block_logits(w, b, h_t, start, block, mask):
  """`[B, T]` logits of a block against a tile, -inf outside the mask. The block is the dot's
  left operand, as stored (a transposed `[B, K]` operand would be repacked on every call)."""
  w_blk = lax.dynamic_slice_in_dim(w, start, block, 0)
  z = dot(w_blk, h_t, ((1,), (1,)))
  if b is not None:
    z = z + lax.dynamic_slice_in_dim(b, start, block, 0)[:, None].astype(z.dtype)
  return w_blk, jnp.where(mask, z, -jnp.inf)


def _stream_forward(plan: Plan, w, b, hidden, targets, lo, hi, with_grad):
  """`(lse [N], z_t [N])` of this device's rows and, `with_grad`, `(mean rows [N, K], target
  rows [N, K], kept logits)`. The target's row and bias are picked from the block in cache (a
  gather from the table outside the loops makes XLA copy a donated table)."""
  num_words = w.shape[0]
  rows = _stream_rows(plan, w, hidden, targets, lo, hi)
  num_rows, dtype = rows.hidden.shape[0], accumulation_dtype(hidden, w)
  capacity = _capacity(rows.pairs, rows.tile, rows.block, num_words,
                       hidden.shape[0]) if with_grad and plan.store else 0

  def body(p, carry):
    m, s, w_t, b_t, acc, kept = carry
    row0, start, _, mask, (h_t, t_t, m_prev, s_prev) = _pair(
        p, rows, num_words, rows.hidden, rows.targets, m, s)
    w_blk, z = _block_logits(w, b, h_t, start, rows.block, mask)
    # The targets in this block (targets outside their row's range are -1: never).
    j = rows.pairs.block[p]
    found = (t_t >= j * rows.block) & (t_t < jnp.minimum((j + 1) * rows.block, num_words))
    local = jnp.clip(t_t - start, 0, rows.block - 1)
    w_t = _add_at(w_t, row0, jnp.where(found[:, None], jnp.take(w_blk, local, axis=0), 0))
    if b is not None:
      b_t = _add_at(b_t, row0, jnp.where(
          found, lax.dynamic_slice_in_dim(b, start, rows.block, 0)[local], 0))
    m_new = jnp.maximum(m_prev, jnp.max(z, axis=0))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0)
    scale = jnp.exp(m_prev - shift)
    # [T, B], materialized as such (the barrier keeps XLA from folding the transpose into the
    # dot below, which would then run on its slow transposed-operand path).
    e = lax.optimization_barrier(jnp.exp(z.T - shift[:, None]))
    s = lax.dynamic_update_slice_in_dim(s, s_prev * scale + jnp.sum(e, axis=1), row0, 0)
    if with_grad:
      acc_t = lax.dynamic_slice_in_dim(acc, row0, rows.tile, 0) * scale[:, None]
      acc = lax.dynamic_update_slice_in_dim(
          acc, acc_t + dot(e.astype(w_blk.dtype), w_blk, ((1,), (0,))), row0, 0)
      if capacity:
        kept = lax.dynamic_update_index_in_dim(kept, z, jnp.minimum(p, capacity), 0)
    return lax.dynamic_update_slice_in_dim(m, m_new, row0, 0), s, w_t, b_t, acc, kept

  k = hidden.shape[1]
  init = (jnp.full((num_rows,), -jnp.inf, dtype), jnp.zeros((num_rows,), dtype),
          jnp.zeros((num_rows, k), dtype), jnp.zeros((num_rows,), dtype),
          jnp.zeros((num_rows, k) if with_grad else (0,), dtype),
          jnp.zeros((capacity + 1, rows.block, rows.tile) if capacity else (0,), dtype))
  m, s, w_t, b_t, acc, kept = lax.fori_loop(0, rows.pairs.count, body, init)
  outputs = [m + jnp.log(s), jnp.sum(rows.hidden.astype(dtype) * w_t, axis=1) + b_t]
  if with_grad:
    outputs += [jnp.where((s > 0)[:, None], acc / jnp.where(s > 0, s, 1)[:, None], 0), w_t]
  if rows.order is not None:  # back to the caller's row order
    outputs = [_unsort(x, rows.order) for x in outputs]
  n = hidden.shape[0]
  return [x[:n] for x in outputs], kept


def _unsort(x, order):
  return jnp.zeros((order.shape[0],) + x.shape[1:], x.dtype).at[order].set(x[:order.shape[0]])


def _stream_backward(plan: Plan, w, b, hidden, targets, lo, hi, lse, g, g_z, kept):
  """`(d w, d b)` of this device's rows, block by block from the kept (or recomputed) logits."""
  num_words = w.shape[0]
  rows = _stream_rows(plan, w, hidden, targets, lo, hi)
  pad = rows.hidden.shape[0] - hidden.shape[0]
  order = jnp.arange(hidden.shape[0]) if rows.order is None else rows.order
  lse, g, g_z = (jnp.pad(x[order], (0, pad)) for x in (lse, g, g_z))
  capacity = kept.shape[0] - 1 if kept.ndim > 1 else 0
  grad_dtype = accumulation_dtype(w)

  def add_pair(p, carry, recompute):
    dw, db = carry
    row0, start, ids, mask, (h_t, t_t, lse_t, g_t, gz_t) = _pair(
        p, rows, num_words, rows.hidden, rows.targets, lse, g, g_z)
    if recompute:
      _, z = _block_logits(w, b, h_t, start, rows.block, mask)
    else:
      z = kept[p]
    hit = mask & (ids[:, None] == t_t[None, :])
    dz = g_t[None, :] * jnp.exp(z - lse_t[None, :]) + jnp.where(hit, gz_t[None, :], 0)  # [B, T]
    # The clamped last block adds zeros to the ids an earlier block owns (dz is 0 there).
    dw = _add_at(dw, start, dot(dz.astype(h_t.dtype), h_t, ((1,), (0,))))
    return dw, None if db is None else _add_at(db, start, jnp.sum(dz, axis=1))

  carry = (jnp.zeros(w.shape, grad_dtype), None if b is None else jnp.zeros(b.shape, grad_dtype))
  count = rows.pairs.count
  if capacity:
    carry = lax.fori_loop(0, jnp.minimum(count, capacity),
                          functools.partial(add_pair, recompute=False), carry)
  if not isinstance(count, int) or count > capacity:
    carry = lax.fori_loop(capacity, jnp.maximum(count, capacity),
                          functools.partial(add_pair, recompute=True), carry)
  return carry


# --------------------------------------------------------------------------------------------
# The materialize strategy.

def _masked_logits(w, b, hidden, lo, hi):
  z = logits(hidden, w, b)
  if lo is None:
    return z
  ids = jnp.arange(w.shape[0], dtype=jnp.int32)[None, :]
  return jnp.where((ids >= lo[:, None]) & (ids < hi[:, None]), z, -jnp.inf)


def _materialize_backward(w, b, hidden, targets, lo, hi, lse, g, g_z, kept):
  """`(d w, d b, this device's part of d hidden)` from the kept (or recomputed) logits."""
  z = kept if kept.ndim > 1 else _masked_logits(w, b, hidden, lo, hi)
  ids = jnp.arange(w.shape[0], dtype=jnp.int32)[None, :]
  dz = (g[:, None] * jnp.exp(z - lse[:, None])
        + jnp.where(ids == targets[:, None], g_z[:, None], 0))  # targets: -1 outside the range
  common = common_dtype(hidden, w)
  dz = dz.astype(common)
  dw = dot(dz, hidden, ((0,), (0,))).astype(accumulation_dtype(w))
  db = None if b is None else jnp.sum(dz, axis=0, dtype=accumulation_dtype(b))
  return dw, db, dot(dz, w, ((1,), (0,)))


# --------------------------------------------------------------------------------------------
# One device's share, and the custom VJP over it.

def _local_ids(shard, num_words, targets, lo, hi):
  """Targets and ranges in this device's ids: targets outside its rows or outside their row's
  range become -1; ranges are clipped to `[0, R_local]`."""
  offset = 0 if shard is None else shard[0] * num_words
  local = targets - offset
  if lo is None:
    inside = (local >= 0) & (local < num_words)
  else:
    lo = jnp.clip(lo - offset, 0, num_words)
    hi = jnp.clip(hi - offset, 0, num_words)
    inside = (local >= lo) & (local < hi)
  return jnp.where(inside, local, -1), lo, hi


def _local_forward(plan: Plan, with_grad, shard, w, b, hidden, targets, lo, hi):
  """This device's share: `(lse, z_t)` over all devices (combined with collectives) and,
  `with_grad`, the parts of `d hidden` (stream) and its own kept logits."""
  targets, lo, hi = _local_ids(shard, w.shape[0], targets, lo, hi)
  if plan.strategy == "stream":
    outputs, kept = _stream_forward(plan, w, b, hidden, targets, lo, hi, with_grad)
    lse_local, z_t = outputs[:2]
  else:
    z = _masked_logits(w, b, hidden, lo, hi)
    lse_local = _logsumexp(z)
    z_t = jnp.take_along_axis(z, jnp.maximum(targets, 0)[:, None], axis=1)[:, 0]
    z_t = jnp.where(targets >= 0, z_t, 0)
    kept = z if with_grad and plan.store else jnp.zeros((0,), z.dtype)
  lse = combine(lse_local, plan.axis)
  if plan.axis is not None:
    z_t = lax.psum(z_t, plan.axis)
  if not with_grad:
    return lse, z_t
  if plan.strategy == "stream":  # d hidden's parts, summed over the devices here, not later
    mean_w, w_t = outputs[2:]
    weight = jnp.where(jnp.isfinite(lse_local), jnp.exp(lse_local - jnp.where(
        jnp.isfinite(lse), lse, 0)), 0)
    mean_w = weight[:, None] * mean_w
    if plan.axis is not None:
      mean_w, w_t = lax.psum(mean_w, plan.axis), lax.psum(w_t, plan.axis)
    return lse, z_t, (mean_w, w_t), kept
  return lse, z_t, (None, None), kept


def _local_backward(plan: Plan, shard, w, b, hidden, targets, lo, hi, lse, g, g_z, kept):
  targets, lo, hi = _local_ids(shard, w.shape[0], targets, lo, hi)
  if plan.strategy == "stream":
    return _stream_backward(plan, w, b, hidden, targets, lo, hi, lse, g, g_z, kept)
  dw, db, dh = _materialize_backward(w, b, hidden, targets, lo, hi, lse, g, g_z, kept)
  return dw, db, dh if plan.axis is None else lax.psum(dh, plan.axis)


def _specs(plan: Plan, b, lo):
  """in_specs of `(shard, w, b, hidden, targets, lo, hi)`: the table split, the rest whole."""
  ax = plan.axis
  return (P(ax), P(ax, None), None if b is None else P(ax), P(), P(),
          None if lo is None else P(), None if lo is None else P())


def _forward(plan: Plan, with_grad, w, b, hidden, targets, lo, hi):
  fn = functools.partial(_local_forward, plan, with_grad)
  if plan.mesh is None:
    out = fn(None, w, b, hidden, targets, lo, hi)
    return out if not with_grad else (*out[:3], out[3][None])
  # Each device's kept logits are stacked along a new leading axis split over `axis`.
  local = lambda *args: (lambda o: o if not with_grad else (*o[:3], o[3][None]))(fn(*args))
  shared = (P(), P())
  out_specs = shared if not with_grad else (*shared, (P(), P()), P(plan.axis))
  return smap(local, plan.mesh, plan.axis, _specs(plan, b, lo), out_specs, autodiff=False)(
      shard_numbers(plan.mesh, plan.axis), w, b, hidden, targets, lo, hi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(plan, w, b, hidden, targets, lo, hi):
  return _forward(plan, False, w, b, hidden, targets, lo, hi)


def _core_fwd(plan, w, b, hidden, targets, lo, hi):
  lse, z_t, parts, kept = _forward(plan, True, w, b, hidden, targets, lo, hi)
  return (lse, z_t), (w, b, hidden, targets, lo, hi, lse, parts, kept)


def _core_bwd(plan, residuals, cotangents):
  w, b, hidden, targets, lo, hi, lse, (mean_w, w_t), kept = residuals
  g, g_z = cotangents
  g = jnp.where(jnp.isfinite(lse), g, 0).astype(lse.dtype)
  lse = jnp.where(jnp.isfinite(lse), lse, 0)
  g_z = g_z.astype(lse.dtype)
  fn = lambda shard, w, b, hidden, targets, lo, hi, lse, g, g_z, kept: _local_backward(
      plan, shard, w, b, hidden, targets, lo, hi, lse, g, g_z, kept[0])
  if plan.mesh is None:
    grads = fn(None, w, b, hidden, targets, lo, hi, lse, g, g_z, kept)
  else:
    table = (P(plan.axis, None), None if b is None else P(plan.axis))
    grads = smap(fn, plan.mesh, plan.axis,
                 (*_specs(plan, b, lo), P(), P(), P(), P(plan.axis)),
                 table if plan.strategy == "stream" else (*table, P()), autodiff=False)(
                     shard_numbers(plan.mesh, plan.axis), w, b, hidden, targets, lo, hi, lse,
                     g, g_z, kept)
  if plan.strategy == "stream":
    dw, db = grads
    dh = g[:, None] * mean_w + g_z[:, None] * w_t
  else:
    dw, db, dh = grads
  return (dw.astype(w.dtype), None if b is None else db.astype(b.dtype),
          dh.astype(hidden.dtype), None, None, None)


_core.defvjp(_core_fwd, _core_bwd)


def lse_and_target(hidden, w, b, targets, lo=None, hi=None, *, strategy: str | None = None,
                   store: bool = True, block_rows: int = 2048, tile_rows: int | None = None,
                   max_range: int | None = None, mesh=None, axis: str | None = None):
  """`(lse [N], z_t [N])`: each row's log-sum-exp over its id range and its target's logit.

  Args:
    hidden: `[N, K]` float.
    w: `[R, K]` float table (split along R over the mesh axis, if any).
    b: `[R]` float bias, or None.
    targets: `[N]` int ids in `[0, R)`; an id outside its row's range gives `z_t = 0`.
    lo, hi: None (every row: the whole table), or `[N]` int range bounds. The ranges must be
      ordered alike: sorting the rows by `lo` sorts them by `hi` too (contiguous classes, a
      common range, ...); an empty range may sit anywhere.
    strategy: "stream", "materialize", or None (see `default_strategy`).
    store: keep the logits for the backward pass (else recompute them there).
    block_rows: table rows per block (stream).
    tile_rows: rows per tile (stream): None for all rows (only without ranges).
    max_range: the longest range, a static bound on the pairs a row meets (None: R).
    mesh, axis: split `w` and `b` along R over the `mesh` axis `axis` (None: one device).

  Returns:
    `(lse [N], z_t [N])` in at least float32; reverse-mode differentiable in `hidden`, `w`, `b`.
  """
  if not split(mesh, axis):
    mesh = axis = None
  num_rows, num_words = hidden.shape[0], w.shape[0]
  strategy = strategy or default_strategy(num_rows, num_words, ranges=lo is not None)
  if lo is not None and strategy == "stream" and tile_rows is None:
    raise ValueError("`tile_rows` is required by the stream strategy with ranges.")
  dtype = accumulation_dtype(hidden, w)
  if num_rows == 0:
    return jnp.zeros((0,), dtype), jnp.zeros((0,), dtype)
  plan = Plan(strategy, store, block_rows, tile_rows, max_range, mesh, axis)
  targets = jnp.asarray(targets).astype(jnp.int32)
  if lo is not None:
    lo, hi = jnp.asarray(lo).astype(jnp.int32), jnp.asarray(hi).astype(jnp.int32)
  return _core(plan, w, b, hidden, targets, lo, hi)
