"""Class-based softmax: a softmax over word classes, then a softmax over the words of one class."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from softmax_alts._base import OutputLayer, check_hidden, check_targets, nan_where_invalid
from softmax_alts._trees import _check_counts

# The within-class log-normalizer, tiled over class-sorted tokens.
#
# Token n needs logsumexp over the words of its class, the id range [lo_n, hi_n). Padding every
# row to the largest class (M words) and gathering `[N, M, H]` costs N M H memory traffic,
# more than the full softmax at V = 100K (M = 3,753 there). Instead the tokens are sorted by
# class, so that both lo and hi are non-decreasing, and cut into tiles of `TILE_ROWS`; tile i
# needs the contiguous ids [lo of its first token, hi of its last), so the tiles that need a
# given vocabulary block of `BLOCK_WORDS` ids are a contiguous run too. The loops go over the
# blocks (outside, a static count) and, for each, over the run of tiles that need it (inside,
# a count known at run time): one small `[T, H] x [H, B]` GEMM per (tile, block) pair, with an
# online log-sum-exp and a membership mask. Each block of the table is read once per pass and
# its gradient written once. Consecutive tiles overlap by at most one class, so the pairs
# number at most V / B + tiles * (M / B + 2): the cost follows V + N M / T instead of N M,
# with no `[N, V]` or `[N, M, H]` array. The gradient is a hand-written `custom_vjp` that
# revisits the same pairs.

TILE_ROWS = 16      # class-sorted tokens per tile
BLOCK_WORDS = 256   # vocabulary rows per block


class _Tiling(NamedTuple):
  """For every vocabulary block, the run of tiles whose id ranges reach into it."""
  first_tile: jax.Array    # [blocks]
  num_tiles: jax.Array     # [blocks] (0 where no tile needs the block)
  tile: int
  block: int


def _tiling(lo, hi, tile, block, vocab_size) -> _Tiling:
  num_blocks = -(-vocab_size // block)
  first_lo, last_hi = lo[::tile], hi[tile - 1::tile]
  nonempty = last_hi > first_lo            # a tile of padding only needs nothing
  first = jnp.where(nonempty, first_lo // block, num_blocks)
  last = jnp.where(nonempty, (last_hi - 1) // block, num_blocks)
  blocks = jnp.arange(num_blocks, dtype=jnp.int32)
  start = jnp.searchsorted(last, blocks, side="left").astype(jnp.int32)
  stop = jnp.searchsorted(first, blocks, side="right").astype(jnp.int32)
  return _Tiling(start, jnp.maximum(stop - start, 0), tile, block)


def _block_of(j, tiling: _Tiling, w, b):
  """Block j: its first row (the last block clamped to the end), fresh-id mask, rows of w, b."""
  start = jnp.minimum(j * tiling.block, w.shape[0] - tiling.block)
  ids = start + jnp.arange(tiling.block, dtype=jnp.int32)
  return (start, ids, ids >= j * tiling.block,
          lax.dynamic_slice_in_dim(w, start, tiling.block, 0),
          lax.dynamic_slice_in_dim(b, start, tiling.block, 0))


def _tile_logits(t, tiling: _Tiling, hidden, lo, hi, targets, ids, fresh, w_blk, b_blk):
  """Tile t against one block: `(row0, h [T, H], logits [T, B], member [T, B], hit [T, B])`."""
  row0 = t * tiling.tile
  h_t = lax.dynamic_slice_in_dim(hidden, row0, tiling.tile, 0)
  lo_t = lax.dynamic_slice_in_dim(lo, row0, tiling.tile, 0)
  hi_t = lax.dynamic_slice_in_dim(hi, row0, tiling.tile, 0)
  t_t = lax.dynamic_slice_in_dim(targets, row0, tiling.tile, 0)
  z = lax.dot_general(h_t, w_blk, (((1,), (1,)), ((), ()))) + b_blk[None, :].astype(h_t.dtype)
  member = fresh[None, :] & (ids[None, :] >= lo_t[:, None]) & (ids[None, :] < hi_t[:, None])
  return row0, h_t, z, member, member & (ids[None, :] == t_t[:, None])


def _class_lse_forward(w, b, hidden, lo, hi, targets, tile, block):
  tiling = _tiling(lo, hi, tile, block, w.shape[0])
  rows = hidden.shape[0]

  def over_blocks(j, carry):
    _, ids, fresh, w_blk, b_blk = _block_of(j, tiling, w, b)

    def over_tiles(k, carry):
      m, s, z_t = carry
      row0, _, z, member, hit = _tile_logits(tiling.first_tile[j] + k, tiling, hidden, lo, hi,
                                             targets, ids, fresh, w_blk, b_blk)
      z_t = lax.dynamic_update_slice_in_dim(
          z_t, lax.dynamic_slice_in_dim(z_t, row0, tile, 0)
          + jnp.sum(jnp.where(hit, z, 0), axis=1), row0, 0)
      m_prev = lax.dynamic_slice_in_dim(m, row0, tile, 0)
      s_prev = lax.dynamic_slice_in_dim(s, row0, tile, 0)
      z = jnp.where(member, z, -jnp.inf)
      m_new = jnp.maximum(m_prev, jnp.max(z, axis=1))
      shift = jnp.where(jnp.isfinite(m_new), m_new, 0)
      s_new = s_prev * jnp.exp(m_prev - shift) + jnp.sum(jnp.exp(z - shift[:, None]), axis=1)
      return (lax.dynamic_update_slice_in_dim(m, m_new, row0, 0),
              lax.dynamic_update_slice_in_dim(s, s_new, row0, 0), z_t)

    return lax.fori_loop(0, tiling.num_tiles[j], over_tiles, carry)

  init = (jnp.full((rows,), -jnp.inf, hidden.dtype), jnp.zeros((rows,), hidden.dtype),
          jnp.zeros((rows,), hidden.dtype))
  m, s, z_t = lax.fori_loop(0, tiling.first_tile.shape[0], over_blocks, init)
  return m + jnp.log(s), z_t


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _class_lse(w, b, hidden, lo, hi, targets, tile, block):
  """`([N] logsumexp, [N] target logit)` of `hidden @ w.T + b` over the ids `[lo_n, hi_n)`;
  `lo` and `hi` sorted, N a multiple of `tile`, rows with `lo == hi` give (-inf, 0).

  The target logit is computed in the same loops, so that its gradient lands in the same
  `[V, H]` buffer as the normalizer's instead of a second table-sized scatter."""
  return _class_lse_forward(w, b, hidden, lo, hi, targets, tile, block)


def _class_lse_fwd(w, b, hidden, lo, hi, targets, tile, block):
  lse, z_t = _class_lse_forward(w, b, hidden, lo, hi, targets, tile, block)
  return (lse, z_t), (w, b, hidden, lo, hi, targets, lse)


def _class_lse_bwd(tile, block, residuals, cotangents):
  """d logits = g_lse * softmax within the class + g_z * onehot(target), pair by pair; each
  block's dw, db written once."""
  w, b, hidden, lo, hi, targets, lse = residuals
  g, g_z = cotangents
  tiling = _tiling(lo, hi, tile, block, w.shape[0])
  g = jnp.where(jnp.isfinite(lse), g, 0)
  lse = jnp.where(jnp.isfinite(lse), lse, 0)

  def over_blocks(j, carry):
    dw, db, dh = carry
    start, ids, fresh, w_blk, b_blk = _block_of(j, tiling, w, b)

    def over_tiles(k, carry):
      dw_blk, db_blk, dh = carry
      row0, h_t, z, member, hit = _tile_logits(tiling.first_tile[j] + k, tiling, hidden, lo, hi,
                                               targets, ids, fresh, w_blk, b_blk)
      lse_t = lax.dynamic_slice_in_dim(lse, row0, tile, 0)
      g_t = lax.dynamic_slice_in_dim(g, row0, tile, 0)
      gz_t = lax.dynamic_slice_in_dim(g_z, row0, tile, 0)
      dz = (jnp.where(member, g_t[:, None] * jnp.exp(z - lse_t[:, None]), 0)
            + jnp.where(hit, gz_t[:, None], 0))
      dh = lax.dynamic_update_slice_in_dim(
          dh, lax.dynamic_slice_in_dim(dh, row0, tile, 0) + dz @ w_blk, row0, 0)
      return (dw_blk + lax.dot_general(dz, h_t, (((0,), (0,)), ((), ()))),
              db_blk + jnp.sum(dz, axis=0), dh)

    dw_blk, db_blk, dh = lax.fori_loop(
        0, tiling.num_tiles[j], over_tiles,
        (jnp.zeros(w_blk.shape, hidden.dtype), jnp.zeros(b_blk.shape, hidden.dtype), dh))
    # The clamped last block adds zeros to the ids an earlier block owns (dz is 0 there).
    dw = lax.dynamic_update_slice_in_dim(
        dw, lax.dynamic_slice_in_dim(dw, start, block, 0) + dw_blk.astype(dw.dtype), start, 0)
    db = lax.dynamic_update_slice_in_dim(
        db, lax.dynamic_slice_in_dim(db, start, block, 0) + db_blk.astype(db.dtype), start, 0)
    return dw, db, dh

  init = (jnp.zeros_like(w), jnp.zeros_like(b), jnp.zeros_like(hidden))
  dw, db, dh = lax.fori_loop(0, tiling.first_tile.shape[0], over_blocks, init)
  return dw, db, dh, None, None, None


_class_lse.defvjp(_class_lse_fwd, _class_lse_bwd)


def _within_class_log_prob(w, b, hidden, lo, hi, targets):
  """log softmax over each row's class `[lo_n, hi_n)` at its target, `[N]`: sorts the rows by
  class, pads them to whole tiles, runs the tiled loops and unsorts."""
  num_rows, vocab_size = hidden.shape[0], w.shape[0]
  tile, block = TILE_ROWS, min(BLOCK_WORDS, vocab_size)
  order = jnp.argsort(lo, stable=True)
  pad = -num_rows % tile
  fill = jnp.full((pad,), vocab_size, jnp.int32)  # empty ranges, sorted last
  lse, z_t = _class_lse(w, b, jnp.pad(hidden[order], ((0, pad), (0, 0))),
                        jnp.concatenate([lo[order], fill]), jnp.concatenate([hi[order], fill]),
                        jnp.concatenate([targets[order], fill]), tile, block)
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
  computes each tile of rows against only the vocabulary blocks its classes cover (see
  `_within_class_log_prob`): measured at V = 100K, H = 512, N = 1024 on 2 shared CPU cores, a
  training step of 326 ms (the full softmax's: 1,987 ms) where padding to M took 16.9 s.
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
                                  targets)

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
