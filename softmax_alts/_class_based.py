"""Class-based softmax: a softmax over word classes, then a softmax over the words of one class."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from softmax_alts._base import OutputLayer, check_hidden, check_targets, nan_where_invalid
from softmax_alts._trees import _check_counts

# The within-class log-normalizer, in (tile, block) pairs of class-sorted rows.
#
# Token n needs logsumexp over the words of its class, the id range [lo_n, hi_n). Padding every
# row to the largest class (M words) and gathering `[N, M, H]` costs N M H memory traffic,
# more than the full softmax at V = 100K (M = 3,753 there). Instead the rows are sorted by
# class, so that both lo and hi are non-decreasing, and the vocabulary is cut into blocks of
# `BLOCK_WORDS` ids: the rows whose classes reach into block j are then a contiguous run, cut
# into tiles of T rows (`_tile_rows`: about the batch's rows per class). One flat loop goes over
# these (tile, block) pairs in block order (their number is known at run time): one small
# `[B, H] x [H, T]` GEMM per pair, with an online log-sum-exp over the blocks a row meets and a
# membership mask. In the tail, where the
# classes are large and each holds few of the batch's rows, a block meets about one tile, so
# the pairs number about V / B + N / T and each word's row of the table is read once.
#
# The gradient is a hand-written `custom_vjp` that reads the table once in all:
#   - the forward pass also accumulates, per row, the softmax-weighted sum of the word vectors
#     of its class (online, rescaled as the sum of exponentials is) and the target's word
#     vector, which give d hidden = g * E_p[w] + g_z * w_t without a second pass over the table;
#   - it keeps each pair's `[B, T]` logits (`_capacity` pairs of them; the backward pass
#     recomputes the rare pairs beyond it from the table), so that the backward pass only forms
#     d logits and adds `d logits @ h` into each block of the `[V, H]` gradient.
# Nothing of size N V or N M H is built.

TILE_ROWS = None    # class-sorted rows per tile; None: from the rows per class (`_tile_rows`)
BLOCK_WORDS = 64    # vocabulary rows per block


def _tile_rows(num_rows: int, num_classes: int) -> int:
  """`TILE_ROWS`, or the power of two (8 to 64) at or above N / C, about the batch's rows per
  class: a tile then mostly holds the rows of one class. Measured at V = 100K, N = 1024 (2 CPU
  cores): C = 316 is fastest with tiles of 8 (4 is no faster), C = 100 with 16, C = 32 with 32,
  C = 8 with 64 or more."""
  if TILE_ROWS is not None:
    return TILE_ROWS
  return min(64, max(8, 1 << (max(1, -(-num_rows // num_classes)) - 1).bit_length()))


class _Pairs(NamedTuple):
  """The (tile, block) pairs, in block order: pair p is the rows `[row[p], row[p] + T)` against
  the ids of block `block[p]`; the first `count` of the slots are used."""
  block: jax.Array   # [slots]
  row: jax.Array     # [slots]
  count: jax.Array   # []


def _pairs(lo, hi, tile, block, vocab_size, num_rows, max_span) -> _Pairs:
  """The pairs of `num_rows` sorted rows (then padding), each meeting at most `max_span` blocks."""
  num_blocks = -(-vocab_size // block)
  starts = jnp.arange(num_blocks, dtype=jnp.int32) * block
  ends = jnp.minimum(starts + block, vocab_size)
  first = jnp.searchsorted(hi, starts, side="right").astype(jnp.int32)  # first row with hi > start
  stop = jnp.searchsorted(lo, ends, side="left").astype(jnp.int32)      # first row with lo >= end
  tiles = -(-jnp.maximum(stop - first, 0) // tile)
  # sum_j ceil(rows_j / T) <= blocks + (sum_j rows_j) / T, and sum_j rows_j <= N * max_span.
  slots = max(1, min(num_blocks + num_rows * max_span // tile,
                     num_blocks * -(-num_rows // tile)))
  block_of = jnp.repeat(jnp.arange(num_blocks, dtype=jnp.int32), tiles,
                        total_repeat_length=slots)
  offset = jnp.arange(slots, dtype=jnp.int32) - (jnp.cumsum(tiles) - tiles)[block_of]
  return _Pairs(block_of, first[block_of] + offset * tile, jnp.sum(tiles))


def _capacity(pairs: _Pairs, tile, block, vocab_size, num_rows) -> int:
  """Pairs whose logits are kept: every block once and every row twice over, which covers the
  pairs of typical batches (a block meets more than one tile only where many rows share small
  classes) at about `(V + 2 N B) T` floats, where the worst case is `(V + N M) T`."""
  return min(pairs.block.shape[0], -(-vocab_size // block) + 2 * -(-num_rows // tile))


def _pair(p, pairs: _Pairs, tile, block, vocab_size, *rows):
  """Pair p: its first row, the block's first id (the last block clamped to the end of the
  table), the block's ids, the mask of ids no earlier block owns, and `rows` sliced to the tile."""
  j, row0 = pairs.block[p], pairs.row[p]
  start = jnp.minimum(j * block, vocab_size - block)
  ids = start + jnp.arange(block, dtype=jnp.int32)
  return (row0, start, ids, ids >= j * block,
          *(lax.dynamic_slice_in_dim(x, row0, tile, 0) for x in rows))


def _logits(w_blk, b_blk, h_t, lo_t, hi_t, ids, fresh):
  """`[B, T]` logits of a tile against a block, -inf outside each row's class. The block is the
  dot's left operand, used as stored (a transposed `[B, H]` operand is repacked on every call)."""
  z = lax.dot_general(w_blk, h_t, (((1,), (1,)), ((), ()))) + b_blk[:, None].astype(h_t.dtype)
  member = fresh[:, None] & (ids[:, None] >= lo_t[None, :]) & (ids[:, None] < hi_t[None, :])
  return jnp.where(member, z, -jnp.inf)


def _forward(w, b, hidden, lo, hi, targets, pairs, tile, block, capacity):
  """`(lse, z_t)` and, with `capacity` (for the gradient), `(sum of exponentials, accumulated
  softmax-weighted word vectors, target word vectors, kept logits)`, all per sorted row."""
  rows, dtype, vocab_size = hidden.shape[0], hidden.dtype, w.shape[0]
  with_grad = capacity is not None

  def body(p, carry):
    m, s, z_t, acc, w_t, kept = carry
    row0, start, ids, fresh, h_t, lo_t, hi_t, t_t, m_prev, s_prev, zt_prev = _pair(
        p, pairs, tile, block, vocab_size, hidden, lo, hi, targets, m, s, z_t)
    w_blk = lax.dynamic_slice_in_dim(w, start, block, 0)
    z = _logits(w_blk, lax.dynamic_slice_in_dim(b, start, block, 0), h_t, lo_t, hi_t, ids, fresh)
    hit = fresh[:, None] & (ids[:, None] == t_t[None, :])  # within the class: a member
    z_t = lax.dynamic_update_slice_in_dim(z_t, zt_prev + jnp.sum(jnp.where(hit, z, 0), axis=0),
                                          row0, 0)
    m_new = jnp.maximum(m_prev, jnp.max(z, axis=0))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0)
    scale = jnp.exp(m_prev - shift)
    # [T, B], materialized as such (the barrier keeps XLA from folding the transpose into the
    # dot below, which would then run on its slow transposed-operand path).
    e = lax.optimization_barrier(jnp.exp(z.T - shift[:, None]))
    s = lax.dynamic_update_slice_in_dim(s, s_prev * scale + jnp.sum(e, axis=1), row0, 0)
    if with_grad:
      acc = lax.dynamic_update_slice_in_dim(
          acc, lax.dynamic_slice_in_dim(acc, row0, tile, 0) * scale[:, None] + e @ w_blk, row0, 0)
      # The target's word vector from the block in cache (a gather from the table after the
      # loop would make XLA copy the donated table before the SGD update overwrites it).
      found = jnp.any(hit, axis=0)
      w_hit = jnp.take(w_blk, jnp.clip(t_t - start, 0, block - 1), axis=0)
      w_t = lax.dynamic_update_slice_in_dim(
          w_t, lax.dynamic_slice_in_dim(w_t, row0, tile, 0)
          + jnp.where(found[:, None], w_hit, 0), row0, 0)
      kept = lax.dynamic_update_index_in_dim(kept, z, jnp.minimum(p, capacity), 0)  # last: spare
    return lax.dynamic_update_slice_in_dim(m, m_new, row0, 0), s, z_t, acc, w_t, kept

  empty = lambda shape: jnp.zeros(shape if with_grad else (0,), dtype)
  init = (jnp.full((rows,), -jnp.inf, dtype), jnp.zeros((rows,), dtype), jnp.zeros((rows,), dtype),
          empty(hidden.shape), empty(hidden.shape),
          empty((capacity + 1 if with_grad else 0, block, tile)))
  m, s, z_t, acc, w_t, kept = lax.fori_loop(0, pairs.count, body, init)
  return m + jnp.log(s), z_t, (s, acc, w_t, kept)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _class_lse(w, b, hidden, lo, hi, targets, tile, block, max_span):
  """`([N] logsumexp, [N] target logit)` of `hidden @ w.T + b` over the ids `[lo_n, hi_n)`;
  `lo` and `hi` sorted, the last `tile` rows padding with `lo == hi == V` (they give (-inf, 0)),
  every other row's class meeting at most `max_span` blocks."""
  pairs = _pairs(lo, hi, tile, block, w.shape[0], hidden.shape[0] - tile, max_span)
  lse, z_t, _ = _forward(w, b, hidden, lo, hi, targets, pairs, tile, block, None)
  return lse, z_t


def _class_lse_fwd(w, b, hidden, lo, hi, targets, tile, block, max_span):
  pairs = _pairs(lo, hi, tile, block, w.shape[0], hidden.shape[0] - tile, max_span)
  capacity = _capacity(pairs, tile, block, w.shape[0], hidden.shape[0] - tile)
  lse, z_t, (s, acc, w_t, kept) = _forward(w, b, hidden, lo, hi, targets, pairs, tile, block,
                                           capacity)
  mean_w = jnp.where((s > 0)[:, None], acc / jnp.where(s > 0, s, 1)[:, None], 0)  # E_p[w]
  return (lse, z_t), (w, b, hidden, lo, hi, targets, lse, mean_w, w_t, kept, pairs)


def _class_lse_bwd(tile, block, max_span, residuals, cotangents):
  """d logits = g * softmax within the class + g_z * onehot(target): d hidden from the forward
  pass's sums, d w and d b added block by block from the kept (or recomputed) logits."""
  w, b, hidden, lo, hi, targets, lse, mean_w, w_t, kept, pairs = residuals
  g, g_z = cotangents
  vocab_size, capacity = w.shape[0], kept.shape[0] - 1
  g = jnp.where(jnp.isfinite(lse), g, 0)
  lse = jnp.where(jnp.isfinite(lse), lse, 0)
  d_hidden = g[:, None] * mean_w + g_z[:, None] * w_t

  def add_pair(p, carry, recompute):
    dw, db = carry
    row0, start, ids, fresh, h_t, lo_t, hi_t, t_t, lse_t, g_t, gz_t = _pair(
        p, pairs, tile, block, vocab_size, hidden, lo, hi, targets, lse, g, g_z)
    if recompute:
      z = _logits(lax.dynamic_slice_in_dim(w, start, block, 0),
                  lax.dynamic_slice_in_dim(b, start, block, 0), h_t, lo_t, hi_t, ids, fresh)
    else:
      z = kept[p]
    hit = fresh[:, None] & (ids[:, None] == t_t[None, :])
    dz = g_t[None, :] * jnp.exp(z - lse_t[None, :]) + jnp.where(hit, gz_t[None, :], 0)  # [B, T]
    # The clamped last block adds zeros to the ids an earlier block owns (dz is 0 there).
    dw = lax.dynamic_update_slice_in_dim(
        dw, lax.dynamic_slice_in_dim(dw, start, block, 0) + (dz @ h_t).astype(dw.dtype), start, 0)
    db = lax.dynamic_update_slice_in_dim(
        db, lax.dynamic_slice_in_dim(db, start, block, 0) + jnp.sum(dz, axis=1).astype(db.dtype),
        start, 0)
    return dw, db

  carry = (jnp.zeros_like(w), jnp.zeros_like(b))
  carry = lax.fori_loop(0, jnp.minimum(pairs.count, capacity),
                        functools.partial(add_pair, recompute=False), carry)
  dw, db = lax.fori_loop(capacity, jnp.maximum(pairs.count, capacity),
                         functools.partial(add_pair, recompute=True), carry)
  return dw, db, d_hidden, None, None, None


_class_lse.defvjp(_class_lse_fwd, _class_lse_bwd)


def _within_class_log_prob(w, b, hidden, lo, hi, targets, max_size, num_classes):
  """log softmax over each row's class `[lo_n, hi_n)` at its target, `[N]`, where the
  `num_classes` classes hold at most `max_size` words each: sorts the rows by class, pads them
  with one tile of empty rows, runs the pair loops and unsorts."""
  num_rows, vocab_size = hidden.shape[0], w.shape[0]
  tile, block = _tile_rows(num_rows, num_classes), min(BLOCK_WORDS, vocab_size)
  max_span = min(-(-(max_size - 1) // block) + 1, -(-vocab_size // block))
  order = jnp.argsort(lo, stable=True)
  fill = jnp.full((tile,), vocab_size, jnp.int32)  # empty ranges, sorted last
  lse, z_t = _class_lse(w, b, jnp.pad(hidden[order], ((0, tile), (0, 0))),
                        jnp.concatenate([lo[order], fill]), jnp.concatenate([hi[order], fill]),
                        jnp.concatenate([targets[order], fill]), tile, block, max_span)
  return jnp.zeros((num_rows,), lse.dtype).at[order].set((z_t - lse)[:num_rows])


class ClassBasedParams(NamedTuple):
  """Parameters of the class-based softmax.

  Class c holds the contiguous ids `[starts[c], starts[c] + sizes[c])` (see `frequency_classes`).

  Attributes:
    class_weights: `[C, H]` class output vectors.
    class_bias: `[C]` class biases.
    word_weights: `[V, H]` word output vectors (row w for word w, as in a full softmax).
    word_bias: `[V]` word biases.
  """

  class_weights: jax.Array
  class_bias: jax.Array
  word_weights: jax.Array
  word_bias: jax.Array


def frequency_classes(counts, num_classes: int) -> np.ndarray:
  """Frequency binning: contiguous classes of ids that each hold about 1/C of the total count.

  Word w (ids in descending frequency) goes to class floor(C * sum_{v<w} counts[v] / total), as
  in Mikolov's RNNLM toolkit, with the class boundaries then moved just enough that every class
  holds at least one word (frequent words may each fill a class on their own). All-zero counts
  are treated as uniform.

  Args:
    counts: `[V]` non-negative word counts, ids sorted by descending frequency.
    num_classes: C in [1, V].

  Returns:
    `[C + 1]` int64 class boundaries: class c is the ids `[bounds[c], bounds[c+1])`.
  """
  values = _check_counts(counts)
  vocab_size = values.shape[0]
  if (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
      or not 1 <= num_classes <= vocab_size):
    raise ValueError(f"`num_classes` must be an int in [1, V] = [1, {vocab_size}] (V = "
                     f"len(counts)); got {num_classes!r}.")
  total = values.sum()
  if total == 0:
    values = np.ones_like(values)
    total = values.sum()
  before = np.concatenate([[0.0], np.cumsum(values)[:-1]])  # mass of the ids before w
  wanted = np.searchsorted(before, np.arange(1, num_classes) * total / num_classes, side="left")
  bounds = np.zeros(num_classes + 1, np.int64)
  bounds[num_classes] = vocab_size
  for c in range(1, num_classes):
    bounds[c] = min(max(wanted[c - 1], bounds[c - 1] + 1), vocab_size - (num_classes - c))
  return bounds


def class_based(counts, num_classes: int) -> OutputLayer:
  """Class-based softmax: p(w|h) = p(class(w) | h) * p(w | class(w), h), frequency-binned classes.

    log p(w | h) = log softmax(A h + a)_{c(w)} + log softmax_{v in c(w)}(W_v . h + b_v)_w

  The classes are contiguous id ranges of about equal total count (`frequency_classes`).
  Frequency binning makes the rare-word classes large (on Zipfian counts with V = 100K and
  C = 316 the largest holds M = 3,753 words, the average V / C = 316), so padding every row to
  M words costs more than the full softmax. The loss instead sorts the rows by class and
  computes each tile of rows against only the vocabulary blocks its classes cover, reading the
  table once per training step (see `_within_class_log_prob`): measured at V = 100K, H = 512,
  N = 1024 on 2 shared CPU cores, interleaved with the full softmax, a training step (loss,
  gradients, SGD) of 140 ms against its 1,550 ms (11.1x), where padding to M took 16.9 s.
  `log_probs` computes every word (one `[N, V]` GEMM) and normalizes within each class.

  Example:
    >>> layer = class_based(counts, num_classes=int(len(counts) ** 0.5))
    >>> params = layer.init(key, hidden_size, len(counts))
    >>> loss = layer.loss(params, hidden, targets).mean()

  Args:
    counts: `[V]` non-negative word counts (or any weights to bin on, such as their square
      roots), ids sorted by descending frequency; only the class boundaries depend on them.
    num_classes: C in [1, V].

  Returns:
    An `OutputLayer` with `ClassBasedParams(class_weights [C, H], class_bias [C],
    word_weights [V, H], word_bias [V])`. `loss` is the exact NLL `[N]` (its `key` is unused),
    `log_prob` `[N]`, `log_probs` `[N, V]`.

  References:
    Goodman, "Classes for Fast Maximum Entropy Training", 2001. https://arxiv.org/abs/cs/0108006
    Mikolov, Kombrink, Burget, Cernocky and Khudanpur, "Extensions of Recurrent Neural Network
    Language Model", 2011. https://doi.org/10.1109/ICASSP.2011.5947611
  """
  bounds = frequency_classes(counts, num_classes)
  num_words = int(bounds[-1])
  starts = bounds[:-1].astype(np.int32)
  sizes = np.diff(bounds).astype(np.int32)
  max_size = int(sizes.max())
  class_of = np.repeat(np.arange(num_classes, dtype=np.int32), sizes)       # [V]

  @functools.partial(jax.jit, static_argnums=(1, 2), static_argnames=("dtype",))
  def init(key, hidden_size: int, vocab_size: int, *, dtype=jnp.float32) -> ClassBasedParams:
    """Weights uniform in +-1/sqrt(H) (as a PyTorch `Linear`), biases zero."""
    if vocab_size != num_words:
      raise ValueError(f"`vocab_size` must equal len(counts) = {num_words}; got {vocab_size}.")
    if hidden_size < 1:
      raise ValueError(f"`hidden_size` must be >= 1; got {hidden_size}.")
    bound = float(hidden_size) ** -0.5
    weights = jax.random.uniform(key, (num_classes + num_words, hidden_size), dtype,
                                 -bound, bound)  # one draw for both tables
    return ClassBasedParams(
        class_weights=weights[:num_classes],
        class_bias=jnp.zeros((num_classes,), dtype),
        word_weights=weights[num_classes:],
        word_bias=jnp.zeros((num_words,), dtype))

  def check_params(params: ClassBasedParams, hidden) -> None:
    width = jnp.shape(hidden)[1]
    for name, shape in (("class_weights", (num_classes, width)), ("class_bias", (num_classes,)),
                        ("word_weights", (num_words, width)), ("word_bias", (num_words,))):
      if jnp.shape(getattr(params, name)) != shape:
        raise ValueError(f"`params.{name}` must be {list(shape)} (C = {num_classes}, "
                         f"V = {num_words}, H = the width of `hidden`); "
                         f"got {list(jnp.shape(getattr(params, name)))}.")

  def within_class(params: ClassBasedParams, hidden, targets):
    """log p(w | class(w), h) for each row: the target's class only (see `_within_class_log_prob`)."""
    lo = jnp.asarray(starts)[jnp.asarray(class_of)[targets]]              # [n]
    hi = lo + jnp.asarray(sizes)[jnp.asarray(class_of)[targets]]
    return _within_class_log_prob(params.word_weights, params.word_bias, hidden, lo, hi,
                                  targets, max_size, num_classes)

  # The computations are jitted once here (the checks stay outside, so that a bad id raises
  # eagerly); called under an outer `jit`, they are inlined.
  @jax.jit
  def target_log_prob(params: ClassBasedParams, hidden, targets) -> jax.Array:
    valid = (targets >= 0) & (targets < num_words)  # NaN for a bad id under jit
    targets = jnp.where(valid, targets, 0).astype(jnp.int32)
    class_logits = hidden @ params.class_weights.T + params.class_bias[None, :]  # [N, C]
    target_class = jnp.asarray(class_of)[targets]
    class_term = (jnp.take_along_axis(class_logits, target_class[:, None], axis=1)[:, 0]
                  - jax.nn.logsumexp(class_logits, axis=1))
    return nan_where_invalid(class_term + within_class(params, hidden, targets), valid)

  @jax.jit
  def all_log_probs(params: ClassBasedParams, hidden) -> jax.Array:
    class_logits = hidden @ params.class_weights.T + params.class_bias[None, :]
    class_log_probs = jax.nn.log_softmax(class_logits, axis=1)            # [N, C]
    logits = hidden @ params.word_weights.T + params.word_bias[None, :]   # [N, V]
    segments = jnp.asarray(class_of)
    peak = jax.lax.stop_gradient(jax.ops.segment_max(
        logits.T, segments, num_segments=num_classes, indices_are_sorted=True))  # [C, N]
    shifted = jnp.exp(logits - peak.T[:, segments])
    total = jax.ops.segment_sum(shifted.T, segments, num_segments=num_classes,
                                indices_are_sorted=True)                  # [C, N]
    log_norm = jnp.log(total.T) + peak.T                                  # [N, C]
    return logits - log_norm[:, segments] + class_log_probs[:, segments]

  def log_prob(params: ClassBasedParams, hidden, targets) -> jax.Array:
    check_hidden(hidden)
    params, hidden = jax.tree.map(jnp.asarray, params), jnp.asarray(hidden)
    check_params(params, hidden)
    check_targets(targets, num_words, jnp.shape(hidden)[0])  # raises on a bad id outside jit
    return target_log_prob(params, hidden, jnp.asarray(targets))

  def loss(params: ClassBasedParams, hidden, targets, *, key=None) -> jax.Array:
    del key  # exact: nothing is sampled
    return -log_prob(params, hidden, targets)

  def log_probs(params: ClassBasedParams, hidden) -> jax.Array:
    check_hidden(hidden)
    params, hidden = jax.tree.map(jnp.asarray, params), jnp.asarray(hidden)
    check_params(params, hidden)
    return all_log_probs(params, hidden)

  return OutputLayer(init=init, loss=loss, log_prob=log_prob, log_probs=log_probs)
