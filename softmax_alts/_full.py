"""The full softmax: exact cross-entropy over the whole vocabulary.

`FullParams(w [V, H], b [V])` is the parameter structure shared by `full`, `self_normalized`,
`sampled`, `nce` and `negative_sampling`: a model trained with any of them is evaluated exactly
by `full()`, and their exact outputs are computed here (`FullSoftmax`).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from softmax_alts import _lse
from softmax_alts._base import (OutputLayer, check_divisible, check_options, check_positive_int,
                                init_function, layer_functions)


class FullParams(NamedTuple):
  """Parameters of a softmax output layer: `logits = hidden @ w.T + b`.

  Attributes:
    w: `[V, H]` output word embeddings, one row per word (PyTorch's `nn.Linear(H, V).weight`).
    b: `[V]` biases.
  """

  w: jax.Array
  b: jax.Array


@init_function
def init_full_params(key: jax.Array, hidden_size: int, vocab_size: int, dtype) -> FullParams:
  """Initializes `FullParams`: `w ~ N(0, 1 / H)` i.i.d., `b = 0`.

  The rows are drawn in blocks so that the peak memory stays near the size of `w` itself
  (drawing a `[V, H]` normal at once needs several times that in temporaries).

  Args:
    key: a `jax.random.key`.
    hidden_size: H.
    vocab_size: V.
    param_dtype: floating dtype of the parameters (float32 by default; `dtype` is an older
      name).

  Returns:
    `FullParams(w [V, H], b [V])`.
  """
  check_positive_int(hidden_size, "hidden_size")
  check_positive_int(vocab_size, "vocab_size")
  rows = min(16384, vocab_size)
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


class FullSoftmax(NamedTuple):
  """The exact softmax over `FullParams` with a layer's settings, shared by the layers over
  them. `check(params, hidden) -> V`; `lse_and_target(params, hidden, targets) -> (log Z [N],
  target logit [N])`; `log_prob(params, hidden, targets) -> [N]` and
  `log_probs(params, hidden) -> [N, V]`, for ids in range; `rows(params, ids) -> (w[ids],
  b[ids])` (vocabulary-parallel with a mesh)."""
  check: Any
  lse_and_target: Any
  log_prob: Any
  log_probs: Any
  rows: Any


def full_softmax(*, chunk_size=None, strategy=None, block_rows: int = 2048, mesh=None,
                 axis: str = "model") -> FullSoftmax:
  """The checked `FullSoftmax` for `full`'s options (see there)."""
  shards = check_options(strategy, mesh, axis, chunk_size=chunk_size, block_rows=block_rows)
  if chunk_size is not None and strategy == "materialize":
    raise ValueError("`chunk_size` streams the vocabulary in blocks to bound the memory; it "
                     "takes strategy='stream' or None, not 'materialize'.")

  def check(params, hidden):
    vocab_size = check_params(params, hidden)
    check_divisible(vocab_size, shards, "params.w", axis)
    return vocab_size

  def lse_and_target(params, hidden, targets):
    return _lse.lse_and_target(
        hidden, params.w, params.b, targets, strategy=strategy, store=chunk_size is None,
        block_rows=chunk_size or block_rows, mesh=mesh, axis=axis)

  def log_prob(params, hidden, targets):
    lse, z_t = lse_and_target(params, hidden, targets)
    return z_t - lse

  def log_probs(params, hidden):
    z, lse = _lse.split_logits(hidden, params.w, params.b, mesh, axis)
    return z - lse[:, None]

  def rows(params, ids):
    return tuple(_lse.take_rows(x, ids, mesh, axis) for x in params)

  return FullSoftmax(check, lse_and_target, log_prob, log_probs, rows)


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
    `[N]` log Z, float32.
  """
  softmax = full_softmax(chunk_size=chunk_size)
  softmax.check(params, hidden)
  targets = jnp.zeros((hidden.shape[0],), jnp.int32)
  return softmax.lse_and_target(params, hidden, targets)[0]


def full(*, chunk_size: int | None = None, strategy: str | None = None, block_rows: int = 2048,
         mesh=None, axis: str = "model") -> OutputLayer:
  """The full softmax: exact cross-entropy over all V words.

  `loss_n = -log softmax(W h_n + b)[t_n] = logsumexp_v (w_v . h_n + b_v) - (w_t . h_n + b_t)`.

  Computed by the one log-sum-exp primitive of the package, with a hand-written VJP (reverse
  mode: `jax.grad`, `jax.vjp`; use `log_probs` for forward mode), by one of two strategies:

  - "stream": vocabulary blocks of `block_rows` words with an online log-sum-exp (running max
    and rescaled sum), each block's `[N, C]` logits made and used while in cache. The training
    step keeps every block's logits, as a plain softmax keeps its `[N, V]` logits, so the
    backward pass reads them back (6NHV flops, the minimum); the loss alone (evaluation) never
    holds more than one block. With `chunk_size=C` nothing of size `N x V` is kept: blocks of
    C words, recomputed in the backward pass (8NHV flops, O(N C) memory beyond the table and
    its gradient); use it when the logits do not fit.
  - "materialize": one `[N, V]` GEMM and a fused log-softmax, the logits kept for the backward
    pass: what accelerators run fastest while the logits fit.

  `strategy=None` picks by backend and size (`default_strategy`: "stream" on CPU beyond small
  tables, "materialize" on accelerators while the logits fit). A V that is not a multiple of the
  block is fine: the last block overlaps the one before it and masks the overlap, so the table
  is never padded.

  `hidden` and the params may each be float32 or bfloat16: the GEMMs run in their common
  dtype, accumulated in float32, and the log-sum-exp, the loss and the log-probabilities are
  float32.

  Vocabulary parallelism: with `mesh`, the table is split along V over the mesh axis `axis`
  (place it with `vocab_parallel_specs`; V must be a multiple of the axis size). Every device
  runs the same computation on its `V / M` rows; they combine their log Z with a pmax and a
  psum and their target logits with a psum, nothing of size V crosses devices, and the
  gradient of each device's rows is computed where they live. `log_probs` returns `[N, V]`
  split along V. Other mesh axes (`data`) are left to the compiler.

  Args:
    chunk_size: None (keep the logits for the backward pass) or the number of vocabulary rows
      per block when they must not be kept (streaming only).
    strategy: "stream", "materialize" or None (by backend and size).
    block_rows: vocabulary rows per block of the stream strategy.
    mesh: a `jax.sharding.Mesh` to split the vocabulary over, or None.
    axis: the mesh axis the vocabulary is split over.

  Returns:
    An `OutputLayer` over `FullParams(w [V, H], b [V])`:
    `loss(params, hidden [N, H], targets [N], *, key=None, where=None) -> [N]` (key unused),
    `log_prob(...) -> [N]` (`= -loss`) and `log_probs(params, hidden) -> [N, V]`.
    Ids outside `[0, V)` raise `ValueError` outside jit and give NaN under jit.

  References:
    Shoeybi, Patwary, Puri, LeGresley, Casper and Catanzaro, "Megatron-LM: Training
    Multi-Billion Parameter Language Models Using Model Parallelism", 2019.
    https://arxiv.org/abs/1909.08053
  """
  softmax = full_softmax(chunk_size=chunk_size, strategy=strategy, block_rows=block_rows,
                         mesh=mesh, axis=axis)
  loss, log_prob, log_probs = layer_functions(softmax.check, softmax.log_prob, softmax.log_probs)
  return OutputLayer(init=init_full_params, loss=loss, log_prob=log_prob, log_probs=log_probs)
