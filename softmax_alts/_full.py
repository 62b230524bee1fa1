"""The full softmax: exact cross-entropy over the whole vocabulary, optionally in vocabulary blocks.

`FullParams(w [V, H], b [V])` is the parameter structure shared by `full`, `self_normalized`,
`sampled`, `nce` and `negative_sampling`: a model trained with any of them is evaluated exactly
by `full()`.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from softmax_alts._base import OutputLayer, check_hidden, check_targets, nan_where_invalid


class FullParams(NamedTuple):
  """Parameters of a softmax output layer: `logits = hidden @ w.T + b`.

  Attributes:
    w: `[V, H]` output word embeddings, one row per word (PyTorch's `nn.Linear(H, V).weight`).
    b: `[V]` biases.
  """

  w: jax.Array
  b: jax.Array


def _check_positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"`{name}` must be a positive int; got {value!r}.")
  return value


def check_chunk_size(chunk_size) -> int | None:
  """Returns `chunk_size` after checking it is None or a positive int (else `ValueError`)."""
  if chunk_size is None:
    return None
  return _check_positive_int(chunk_size, "chunk_size")


_INIT_BLOCK_ROWS = 16384  # Rows drawn at a time by `init_full_params`, to bound its memory.


def init_full_params(key: jax.Array, hidden_size: int, vocab_size: int, *,
                     dtype=jnp.float32) -> FullParams:
  """Initializes `FullParams`: `w ~ N(0, 1 / H)` i.i.d., `b = 0`.

  The rows are drawn in blocks so that the peak memory stays near the size of `w` itself
  (drawing a `[800K, 512]` normal at once needs about 3x that in temporaries).

  Args:
    key: a `jax.random.key`.
    hidden_size: H.
    vocab_size: V.
    dtype: floating dtype of the parameters.

  Returns:
    `FullParams(w [V, H], b [V])`.
  """
  _check_positive_int(hidden_size, "hidden_size")
  _check_positive_int(vocab_size, "vocab_size")
  rows = min(_INIT_BLOCK_ROWS, vocab_size)
  scale = jnp.asarray(hidden_size ** -0.5, dtype)

  def draw(i, w):
    block = jax.random.normal(jax.random.fold_in(key, i), (rows, hidden_size), dtype)
    start = jnp.minimum(i * rows, vocab_size - rows)  # The last block may overlap: redrawn.
    return lax.dynamic_update_slice_in_dim(w, scale * block, start, 0)

  w = lax.fori_loop(0, -(-vocab_size // rows), draw,
                    jnp.zeros((vocab_size, hidden_size), dtype))
  return FullParams(w=w, b=jnp.zeros((vocab_size,), dtype))


def check_params(params: FullParams, hidden) -> int:
  """Checks `params` against `hidden [N, H]` at trace time and returns V."""
  check_hidden(hidden)
  w, b = params
  if jnp.ndim(w) != 2:
    raise ValueError(f"`params.w` must be [V, H]; got shape {jnp.shape(w)}.")
  vocab_size, hidden_size = jnp.shape(w)
  if jnp.shape(b) != (vocab_size,):
    raise ValueError(f"`params.b` must be [V] with V = {vocab_size}; got shape {jnp.shape(b)}.")
  if jnp.shape(hidden)[1] != hidden_size:
    raise ValueError(f"`hidden` must be [N, H] with H = {hidden_size} (the columns of "
                     f"`params.w`); got shape {jnp.shape(hidden)}.")
  return vocab_size


def _dot_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """`x [N, H]` times `rows [C, H]` transposed -> `[N, C]`, contracting the last axis of both.

  Written as `dot_general` so that no transposed copy of `rows` is ever made, even eagerly.
  """
  return lax.dot_general(x, rows, (((1,), (1,)), ((), ())))


def logits(params: FullParams, hidden: jax.Array) -> jax.Array:
  """All logits, `hidden @ w.T + b`: `[N, H] -> [N, V]`."""
  return _dot_rows(hidden, params.w) + params.b[None, :].astype(hidden.dtype)


def target_logits(params: FullParams, hidden: jax.Array, targets: jax.Array) -> jax.Array:
  """The logit of each target, `w[t] . h + b[t]`, without forming all logits: `-> [N]`."""
  return (jnp.sum(hidden * params.w[targets], axis=1)
          + params.b[targets].astype(hidden.dtype))


# Both paths work in vocabulary blocks of static shape `[C, H]` with an online log-sum-exp, so
# that each block's logits are produced and consumed while in cache. The last block, when
# `V % C != 0`, starts at `V - C` (`dynamic_slice` clamps) and masks the ids an earlier block
# already covered: the table is never padded or copied.
#
# `store_logits=True` (`chunk_size=None`): the forward pass keeps every block's logits (all
# `[N, V]` of them, as the unchunked softmax does) and the backward pass reads them back:
# 6NHV FLOPs. `store_logits=False` (`chunk_size=C`): nothing of size V is kept; the backward
# pass recomputes each block's logits: 8NHV FLOPs, O(N C) memory.

BLOCK_ROWS = 2048  # Vocabulary rows per block when `chunk_size` is None (fastest on CPU).


def _block_start(i, chunk, vocab_size):
  """Row where block `i` starts, its ids `[C]` and the mask of ids no earlier block covered."""
  start = jnp.minimum(i * chunk, vocab_size - chunk)
  ids = start + jnp.arange(chunk, dtype=jnp.int32)
  return start, ids, ids >= i * chunk


def _block_logits(w, b, hidden, start, chunk):
  w_blk = lax.dynamic_slice_in_dim(w, start, chunk, 0)
  b_blk = lax.dynamic_slice_in_dim(b, start, chunk, 0)
  return w_blk, _dot_rows(hidden, w_blk) + b_blk[None, :].astype(hidden.dtype)


def _num_blocks(vocab_size, chunk):
  return -(-vocab_size // chunk)


def _blocked_forward(w, b, hidden, targets, chunk, store_logits):
  """`(lse [N], z_t [N])` and, if `store_logits`, every block's logits `[num_blocks, N, C]`."""
  vocab_size, num_rows = w.shape[0], hidden.shape[0]

  def body(carry, i):
    m_prev, s_prev = carry
    start, _, fresh = _block_start(i, chunk, vocab_size)
    _, z_blk = _block_logits(w, b, hidden, start, chunk)
    z_fresh = jnp.where(fresh[None, :], z_blk, -jnp.inf)
    m = jnp.maximum(m_prev, jnp.max(z_fresh, axis=1))
    s = s_prev * jnp.exp(m_prev - m) + jnp.sum(jnp.exp(z_fresh - m[:, None]), axis=1)
    return (m, s), (z_blk if store_logits else None)

  init = (jnp.full((num_rows,), -jnp.inf, hidden.dtype), jnp.zeros((num_rows,), hidden.dtype))
  block_ids = jnp.arange(_num_blocks(vocab_size, chunk), dtype=jnp.int32)
  (m, s), z_blocks = lax.scan(body, init, block_ids)
  lse = m + jnp.log(s)
  z_t = jnp.sum(hidden * w[targets], axis=1) + b[targets].astype(hidden.dtype)
  return lse, z_t, z_blocks


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked_lse_and_target(w, b, hidden, targets, chunk, store_logits):
  """`(logsumexp(logits, 1), logits[n, t_n])`, computed in vocabulary blocks of `chunk` rows."""
  lse, z_t, _ = _blocked_forward(w, b, hidden, targets, chunk, False)
  return lse, z_t


def _blocked_fwd(w, b, hidden, targets, chunk, store_logits):
  lse, z_t, z_blocks = _blocked_forward(w, b, hidden, targets, chunk, store_logits)
  return (lse, z_t), (w, b, hidden, targets, lse, z_blocks)


def _blocked_bwd(chunk, store_logits, residuals, cotangents):
  """d logits = g_lse * softmax + g_z * onehot(target), block by block, into dw, db, dh."""
  w, b, hidden, targets, lse, z_blocks = residuals
  g_lse, g_z = cotangents
  vocab_size = w.shape[0]

  def body(carry, xs):
    dw, db, dh = carry
    i, z_blk = xs
    start, ids, fresh = _block_start(i, chunk, vocab_size)
    if store_logits:
      w_blk = lax.dynamic_slice_in_dim(w, start, chunk, 0)
    else:
      w_blk, z_blk = _block_logits(w, b, hidden, start, chunk)
    p_blk = jnp.where(fresh[None, :], jnp.exp(z_blk - lse[:, None]), 0)
    hit = (ids[None, :] == targets[:, None]) & fresh[None, :]
    dz_blk = g_lse[:, None] * p_blk + jnp.where(hit, g_z[:, None], 0)
    dw_blk = lax.dot_general(dz_blk, hidden, (((0,), (0,)), ((), ())))
    dw = lax.dynamic_update_slice_in_dim(
        dw, lax.dynamic_slice_in_dim(dw, start, chunk, 0) + dw_blk.astype(dw.dtype), start, 0)
    db = lax.dynamic_update_slice_in_dim(
        db, lax.dynamic_slice_in_dim(db, start, chunk, 0)
        + jnp.sum(dz_blk, axis=0).astype(db.dtype), start, 0)
    return (dw, db, dh + dz_blk @ w_blk), None

  init = (jnp.zeros_like(w), jnp.zeros_like(b), jnp.zeros_like(hidden))
  block_ids = jnp.arange(_num_blocks(vocab_size, chunk), dtype=jnp.int32)
  (dw, db, dh), _ = lax.scan(body, init, (block_ids, z_blocks))
  return dw, db, dh, None


_blocked_lse_and_target.defvjp(_blocked_fwd, _blocked_bwd)


def lse_and_target(params: FullParams, hidden, targets, chunk_size: int | None):
  """`(log Z [N], target logit [N])`, exact, with a blocked custom VJP (see `full`)."""
  targets = targets.astype(jnp.int32)
  vocab_size = params.w.shape[0]
  store_logits = chunk_size is None
  chunk = min(BLOCK_ROWS if store_logits else chunk_size, vocab_size)
  return _blocked_lse_and_target(params.w, params.b, hidden, targets, chunk, store_logits)


def log_normalizer(params: FullParams, hidden: jax.Array, *,
                   chunk_size: int | None = None) -> jax.Array:
  """The log partition function of each row, `log Z = logsumexp_v (w_v . h + b_v)`.

  A self-normalized model (`self_normalized`) drives this towards 0.

  Args:
    params: `FullParams(w [V, H], b [V])`.
    hidden: `[N, H]`.
    chunk_size: vocabulary rows per block (see `full`); the value never holds more than one
      block's logits.

  Returns:
    `[N]` log Z.
  """
  check_chunk_size(chunk_size)
  check_params(params, hidden)
  targets = jnp.zeros((hidden.shape[0],), jnp.int32)
  return lse_and_target(params, hidden, targets, chunk_size)[0]


def exact_log_prob(params: FullParams, hidden, targets, chunk_size: int | None) -> jax.Array:
  """Exact `log softmax(logits)[n, t_n]`, `[N]`; NaN (under jit) for ids outside `[0, V)`."""
  vocab_size = check_params(params, hidden)
  valid = check_targets(targets, vocab_size, hidden.shape[0])
  lse, z_t = lse_and_target(params, hidden, targets, chunk_size)
  return nan_where_invalid(z_t - lse, valid)


def exact_log_probs(params: FullParams, hidden, chunk_size: int | None) -> jax.Array:
  """Exact `log softmax(logits)`, `[N, V]` (the output is `[N, V]`, so `chunk_size` is moot)."""
  del chunk_size
  check_params(params, hidden)
  return jax.nn.log_softmax(logits(params, hidden), axis=1)


def full(*, chunk_size: int | None = None) -> OutputLayer:
  """The full softmax: exact cross-entropy over all V words.

  `loss_n = -log softmax(W h_n + b)[t_n] = logsumexp_v (w_v . h_n + b_v) - (w_t . h_n + b_t)`.

  Both modes compute exactly the same values and gradients, in vocabulary blocks with an online
  log-sum-exp (running max and rescaled sum) so that each block's `[N, C]` logits are made and
  used while in cache, and both differentiate through a `jax.custom_vjp` (reverse mode:
  `jax.grad`, `jax.vjp`; use `log_probs` for forward mode):

  - `chunk_size=None` (the default): the training step keeps all `[N, V]` logits, as a plain
    softmax does, and the backward pass reads them back: 6NHV FLOPs, the minimum. This is the
    fastest path: on a 2-core CPU at V = 100K, N = 1024, H = 512, forward, backward (w.r.t.
    hidden and params) and an SGD update ran about 1.1x faster than PyTorch's `cross_entropy`
    (about 190 GFLOP/s of 6NHV) and 1.2-1.4x faster than autodiff of `logsumexp` over
    materialized logits. The loss alone (no gradient, e.g. evaluation) never holds more than
    one block's logits.
  - `chunk_size=C`: nothing of size `N x V` is kept; the backward pass recomputes each block's
    logits, for 8NHV FLOPs and O(N C) memory beyond the table and its gradient. A training step
    at V = 800K, N = 4096, H = 512, C = 4096 needs about 3.2 GiB (1.5 of them the table and 1.5
    its gradient) instead of 15 GiB. Use it when the logits do not fit.

  A V that is not a multiple of the block size is fine: the last block overlaps the one before
  it and masks the overlap, so every block has a static shape and the table is never padded.

  Args:
    chunk_size: None (keep all logits for the backward pass) or the number of vocabulary rows
      per block when the logits must not be kept.

  Returns:
    An `OutputLayer` over `FullParams(w [V, H], b [V])`:
    `loss(params, hidden [N, H], targets [N], *, key=None) -> [N]` (key unused),
    `log_prob(...) -> [N]` (`= -loss`) and `log_probs(params, hidden) -> [N, V]`.
    Ids outside `[0, V)` raise `ValueError` outside jit and give NaN under jit.
  """
  check_chunk_size(chunk_size)

  def loss(params, hidden, targets, *, key=None):
    del key  # Exact: no sampling.
    return -exact_log_prob(params, hidden, targets, chunk_size)

  def log_prob(params, hidden, targets):
    return exact_log_prob(params, hidden, targets, chunk_size)

  def log_probs(params, hidden):
    return exact_log_probs(params, hidden, chunk_size)

  return OutputLayer(init=init_full_params, loss=loss, log_prob=log_prob, log_probs=log_probs)
