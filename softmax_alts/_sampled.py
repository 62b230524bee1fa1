"""Sampled softmax (importance sampling) with the log Q correction, as TensorFlow's.

Also what every sampling loss shares (`sampled`, `nce`, `negative_sampling`): drawing the
negatives, shared or per example, or taking them from the caller (`Negatives`), and writing
the loss as a function of the table rows it touches (`RowLoss`), which is both how `loss`
computes it and what the row-sparse training path (`_sparse.py`) differentiates.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from softmax_alts._base import (OutputLayer, RowLoss, RowSparse, batch, check_targets,
                                check_where, finish, layer_functions, unbatch)
from softmax_alts._full import full_softmax, init_full_params
from softmax_alts._lse import accumulation_dtype, dot
from softmax_alts._samplers import Sampler, check_num_samples


class Negatives(NamedTuple):
  """Negatives given by the caller instead of drawn by the layer (TensorFlow's
  `sampled_values`).

  Attributes:
    ids: `[k]` int ids shared by the batch, or `[N, k]` per example.
    expected_counts: the expected count of each id among the draws that produced them (`Q`,
      `k q(v)` with replacement), of the shape of `ids`; None for a loss without the log Q
      correction (`negative_sampling`, `sampled(..., subtract_log_q=False)`).
    target_expected_counts: `[N]` the expected count of each target among those draws; None
      likewise.
  """

  ids: jax.Array
  expected_counts: jax.Array | None = None
  target_expected_counts: jax.Array | None = None


def hit_mask_value(dtype) -> jax.Array:
  """The logit given to an accidental hit: -0.7 times the largest finite float of `dtype`.

  Large and finite on purpose. `-inf` makes `0 * -inf = NaN` appear in any loss that weights
  the masked logit (TensorFlow's `sampled_softmax_loss` with label smoothing returned inf,
  tensorflow/tensorflow#19828), and a tiny constant such as TensorFlow Recommenders' `MIN_FLOAT`
  added to the logit is a no-op that leaves the hit in the softmax (tensorflow/recommenders#706,
  keras-team/keras-rs#206). -0.7 * max leaves head-room for the log-sum-exp's subtraction of
  the row maximum, which must not overflow to -inf.
  """
  return jnp.asarray(-0.7 * jnp.finfo(dtype).max, dtype)


def log_expected_count(counts: jax.Array, dtype) -> jax.Array:
  """`log(max(counts, tiny))` in `dtype`: a zero count (an id the sampler never draws) stays
  finite."""
  counts = jnp.asarray(counts).astype(dtype)
  return jnp.log(jnp.maximum(counts, jnp.finfo(dtype).tiny))


def scores(h_n, w_t, b_t, w_s, b_s, log_q_t, log_q_s):
  """One token's corrected logits, `(z_t [], z_s [k])` with `z_v = w_v . h + b_v - log Q_v`,
  accumulated in at least float32."""
  z_t = dot(w_t, h_n, ((0,), (0,)))
  z_s = dot(w_s, h_n, ((1,), (0,)))
  return (z_t + b_t.astype(z_t.dtype) - log_q_t.astype(z_t.dtype),
          z_s + b_s.astype(z_s.dtype) - log_q_s.astype(z_s.dtype))


def check_sampler(sampler) -> Sampler:
  if not isinstance(sampler, Sampler):
    raise ValueError(f"`sampler` must be a softmax_alts Sampler; got {type(sampler).__name__}.")
  return sampler


def _check_negatives(negatives, num_rows: int, subtract_log_q: bool) -> Negatives:
  if not isinstance(negatives, Negatives):
    raise ValueError(f"`negatives` must be a softmax_alts.Negatives; got "
                     f"{type(negatives).__name__}.")
  ids = jnp.asarray(negatives.ids)
  if (jnp.ndim(ids) not in (1, 2) or not jnp.issubdtype(ids.dtype, jnp.integer)
      or (jnp.ndim(ids) == 2 and jnp.shape(ids)[0] != num_rows)):
    raise ValueError(f"`negatives.ids` must be int [k] or [N, k] with N = {num_rows}; got "
                     f"{ids.dtype} of shape {jnp.shape(ids)}.")
  if subtract_log_q:
    for name, value, shape in (("expected_counts", negatives.expected_counts, ids.shape),
                               ("target_expected_counts", negatives.target_expected_counts,
                                (num_rows,))):
      if value is None or jnp.shape(value) != shape:
        raise ValueError(f"`negatives.{name}` must be {list(shape)} (this loss subtracts "
                         f"log Q); got {None if value is None else jnp.shape(value)}.")
  return negatives._replace(ids=ids.astype(jnp.int32))


def sampling_layer(token_loss: Callable[..., jax.Array], sampler: Sampler, num_samples: int, *,
                   shared: bool, subtract_log_q: bool, **exact) -> OutputLayer:
  """An `OutputLayer` over `FullParams` whose loss is `token_loss` on sampled negatives and
  whose log-probabilities are exact, `full(**exact)`'s.

  `token_loss(h [H], t [], ids [k], z_t [], z_s [k]) -> []` is written for ONE token, from its
  corrected logits (`scores`), and batched with `jax.vmap`; with shared negatives the vmap
  leaves the negatives' rows unbatched, so their scores are one `[N, H] x [H, k]` GEMM.
  """
  check_num_samples(num_samples)
  check_sampler(sampler)
  softmax = full_softmax(**exact)

  def log_q(ids, counts, dtype):
    return (log_expected_count(counts, dtype) if subtract_log_q
            else jnp.zeros(jnp.shape(ids), dtype))

  def rows(params, hidden, targets, *, key=None, where=None, negatives=None) -> RowLoss:
    vocab_size = softmax.check(params, hidden)
    num_rows = hidden.shape[0]
    if sampler.vocab_size != vocab_size:
      raise ValueError(f"the sampler's vocab_size must equal V = {vocab_size} (the rows of "
                       f"`params.w`); got {sampler.vocab_size}.")
    where = check_where(where, num_rows)
    valid = check_targets(targets, vocab_size, num_rows, where=where)
    safe = jnp.where(valid if where is None else valid & where, targets, 0).astype(jnp.int32)
    if negatives is None:
      if key is None:
        raise ValueError("`key` is required by a sampling loss (it draws the negatives) unless "
                         "`negatives` are given; got neither.")
      if shared:
        ids = sampler.sample(key, num_samples, safe)
      else:
        keys = jax.random.split(key, num_rows)
        ids = jax.vmap(lambda k: sampler.sample(k, num_samples, safe))(keys)
      ids = ids.astype(jnp.int32)
      counts_t = counts_s = None
      if subtract_log_q:
        counts_t = sampler.expected_count(safe, num_samples, safe)
        counts_s = sampler.expected_count(ids, num_samples, safe)
    else:
      negatives = _check_negatives(negatives, num_rows, subtract_log_q)
      ids, counts_s, counts_t = negatives
    per_example = ids.ndim == 2

    def values(hidden, table_rows, bias_rows):
      (w_t, w_s), (b_t, b_s) = table_rows, bias_rows
      dtype = accumulation_dtype(hidden, w_t)
      log_q_t, log_q_s = log_q(safe, counts_t, dtype), log_q(ids, counts_s, dtype)

      def one(h_n, t_n, w_t, b_t, ids, w_s, b_s, log_q_t, log_q_s):
        return token_loss(h_n, t_n, ids, *scores(h_n, w_t, b_t, w_s, b_s, log_q_t, log_q_s))

      axis = 0 if per_example else None
      return jax.vmap(one, in_axes=(0, 0, 0, 0, axis, axis, axis, 0, axis))(
          hidden, safe, w_t, b_t, ids, w_s, b_s, log_q_t, log_q_s)

    return RowLoss(ids=(safe, ids), keep=(where, None), values=values, valid=valid, where=where)

  def loss(params, hidden, targets, *, key=None, where=None, negatives=None):
    hidden, targets, where, unbatched = batch(hidden, targets, where)
    params = jax.tree.map(jnp.asarray, params)
    form = rows(params, hidden, targets, key=key, where=where, negatives=negatives)
    table_rows, bias_rows = zip(*(softmax.rows(params, ids) for ids in form.ids))
    values = form.values(hidden, table_rows, bias_rows)
    return unbatch(finish(values, form.valid, form.where), unbatched)

  _, log_prob, log_probs = layer_functions(softmax.check, softmax.log_prob, softmax.log_probs)
  return OutputLayer(init=init_full_params, loss=loss, log_prob=log_prob, log_probs=log_probs,
                     row_sparse=RowSparse(loss=loss, rows=rows))


def _sampled_token_loss(remove_accidental_hits: bool):
  def token_loss(h_n, t_n, ids, z_t, z_s):
    del h_n
    if remove_accidental_hits:
      z_s = jnp.where(ids == t_n, hit_mask_value(z_s.dtype), z_s)
    # logsumexp([z_t, z_s]) without concatenating them (a copy of every score each way)
    peak = jax.lax.stop_gradient(jnp.maximum(z_t, jnp.max(z_s)))
    return peak + jnp.log(jnp.exp(z_t - peak) + jnp.sum(jnp.exp(z_s - peak))) - z_t
  return token_loss


def sampled(num_samples: int, sampler: Sampler, *, remove_accidental_hits: bool = True,
            subtract_log_q: bool = True, shared: bool = True, chunk_size: int | None = None,
            strategy: str | None = None, mesh=None, axis: str = "model") -> OutputLayer:
  """Sampled softmax (importance sampling) with the log Q correction.

  For token n with target t and negatives `s_1..s_k` drawn from the sampler,
  `z_v = w_v . h_n + b_v - log E[count(v)]` and
  `loss_n = -z_t + log(exp(z_t) + sum_j exp(z_{s_j}))`, TensorFlow's `sampled_softmax_loss`:
  the softmax over [true, sampled] logits, each corrected by the log of its expected count
  among the k draws (`Q`; `k * p_v` with replacement). A negative equal to the target (an
  accidental hit) gets a large finite negative logit (`remove_accidental_hits`), so it adds
  nothing. The negatives are shared by the whole batch by default (one `[N, H] x [H, k]` GEMM
  on the gathered rows `w[ids]`); `shared=False` draws k per token (`[N, k, H]` rows). The
  caller may give the negatives and their expected counts instead (`loss(..., negatives=
  Negatives(ids, expected_counts, target_expected_counts))`, TensorFlow's `sampled_values`;
  no key is then needed). The gradient w.r.t. `w` touches only the target and sampled rows;
  see `sparse_loss_and_grads` for an O(k H) update. With `mesh`, the table is split along V
  (the gathers of the touched rows are partitioned by the compiler) and the exact outputs are
  `full`'s vocabulary-parallel ones.

  Args:
    num_samples: k, the number of negatives (per batch, or per token if not shared).
    sampler: a `Sampler` over the same V as the params.
    remove_accidental_hits: mask negatives equal to the row's target.
    subtract_log_q: subtract `log E[count]` from every logit (False: plain sampled softmax).
    shared: share the negatives across the batch.
    chunk_size, strategy, mesh, axis: options of the exact `log_prob` / `log_probs` (see
      `full`).

  Returns:
    An `OutputLayer` over `FullParams(w [V, H], b [V])`:
    `loss(params, hidden [N, H], targets [N], *, key=None, where=None, negatives=None) -> [N]`
    (a `key` or `negatives` required), and the exact full-softmax `log_prob -> [N]` and
    `log_probs -> [N, V]`; `row_sparse` set.

  References:
    Bengio and Senecal, "Adaptive Importance Sampling to Accelerate Training of a Neural
    Probabilistic Language Model", 2008. https://doi.org/10.1109/TNN.2007.912312
    Jean, Cho, Memisevic and Bengio, "On Using Very Large Target Vocabulary for Neural Machine
    Translation", 2015. https://arxiv.org/abs/1412.2007
  """
  return sampling_layer(_sampled_token_loss(remove_accidental_hits), sampler, num_samples,
                        shared=shared, subtract_log_q=subtract_log_q, chunk_size=chunk_size,
                        strategy=strategy, mesh=mesh, axis=axis)
