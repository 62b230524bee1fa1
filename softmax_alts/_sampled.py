"""Sampled softmax (importance sampling) with the log Q correction, as TensorFlow's.

Also the machinery every sampling loss shares (`sampled`, `nce`, `negative_sampling`): drawing
the negatives, shared or per example, and writing the loss as a function of the table rows it
touches (`RowForm`), which the row-sparse training path (`_sparse.py`) differentiates directly.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from softmax_alts._base import OutputLayer, check_targets, nan_where_invalid
from softmax_alts._full import (FullParams, check_chunk_size, check_params, exact_log_prob,
                                exact_log_probs, init_full_params)
from softmax_alts._samplers import Sampler, check_num_samples


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
  counts = counts.astype(dtype)
  return jnp.log(jnp.maximum(counts, jnp.finfo(dtype).tiny))


class RowForm(NamedTuple):
  """A sampling loss written as a function of the table rows it reads.

  Attributes:
    sampler: the `Sampler`.
    num_samples: k.
    shared: one set of k negatives for the whole batch (True) or k per example (False).
    draw: `draw(key, targets [N]) -> sample_ids`, `[k]` if shared else `[N, k]`.
    rows_loss: `rows_loss(hidden [N, H], targets [N], w_t [N, H], b_t [N], sample_ids,
      w_s [k, H] or [N, k, H], b_s [k] or [N, k]) -> [N]`, with `w_t = w[targets]`,
      `w_s = w[sample_ids]` and the same for `b`.
  """

  sampler: Sampler
  num_samples: int
  shared: bool
  draw: Callable[..., jax.Array]
  rows_loss: Callable[..., jax.Array]


def log_q(sampler: Sampler, num_samples: int, targets, sample_ids, subtract_log_q: bool,
          dtype) -> tuple[jax.Array, jax.Array]:
  """`(log Q of the targets, log Q of the samples)`: the log expected counts among the k draws
  that the sampled logits are corrected by, or zeros without the correction."""
  if not subtract_log_q:
    return jnp.zeros(targets.shape, dtype), jnp.zeros(sample_ids.shape, dtype)
  return (log_expected_count(sampler.expected_count(targets, num_samples, targets), dtype),
          log_expected_count(sampler.expected_count(sample_ids, num_samples, targets), dtype))


def make_row_form(token_loss: Callable[..., jax.Array], sampler: Sampler, num_samples: int,
                  shared: bool, subtract_log_q: bool) -> RowForm:
  """Builds a `RowForm` from a loss written for ONE token and batched with `jax.vmap`.

  `token_loss(h [H], t [], w_t [H], b_t [], ids [k], w_s [k, H], b_s [k], log_q_t [],
  log_q_s [k]) -> []`. With shared negatives the vmap over tokens leaves `w_s` unbatched, so the
  scores are one `[N, H] x [H, k]` GEMM.
  """

  def draw(key, targets):
    if shared:
      return sampler.sample(key, num_samples, targets)
    keys = jax.random.split(key, targets.shape[0])
    return jax.vmap(lambda k: sampler.sample(k, num_samples, targets))(keys)

  def rows_loss(hidden, targets, w_t, b_t, sample_ids, w_s, b_s):
    dtype = hidden.dtype
    log_q_t, log_q_s = log_q(sampler, num_samples, targets, sample_ids, subtract_log_q, dtype)
    axis = None if shared else 0
    batched = jax.vmap(token_loss, in_axes=(0, 0, 0, 0, axis, axis, axis, 0, axis))
    return batched(hidden, targets, w_t, b_t.astype(dtype), sample_ids, w_s,
                   b_s.astype(dtype), log_q_t, log_q_s)

  return RowForm(sampler=sampler, num_samples=num_samples, shared=shared, draw=draw,
                 rows_loss=rows_loss)


def check_sampling_inputs(sampler: Sampler, params: FullParams, hidden, targets, key):
  """Trace-time checks shared by the sampling losses; returns `(valid [N], targets int32)`."""
  if key is None:
    raise ValueError("`key` is required by a sampling loss (it draws the negatives); got None.")
  vocab_size = check_params(params, hidden)
  if sampler.vocab_size != vocab_size:
    raise ValueError(f"the sampler's vocab_size must equal V = {vocab_size} (the rows of "
                     f"`params.w`); got {sampler.vocab_size}.")
  valid = check_targets(targets, vocab_size, hidden.shape[0])
  return valid, jnp.asarray(targets).astype(jnp.int32)


def check_sampler(sampler) -> Sampler:
  if not isinstance(sampler, Sampler):
    raise ValueError(f"`sampler` must be a softmax_alts Sampler; got {type(sampler).__name__}.")
  return sampler


def sampling_layer(row_form: RowForm, chunk_size: int | None) -> OutputLayer:
  """An `OutputLayer` whose loss is `row_form`'s and whose log-probabilities are exact."""

  def loss(params, hidden, targets, *, key=None):
    valid, targets = check_sampling_inputs(row_form.sampler, params, hidden, targets, key)
    sample_ids = row_form.draw(key, targets)
    values = row_form.rows_loss(hidden, targets, params.w[targets], params.b[targets],
                                sample_ids, params.w[sample_ids], params.b[sample_ids])
    return nan_where_invalid(values, valid)

  loss.row_form = row_form  # Read by `sparse_loss_and_grads`.

  def log_prob(params, hidden, targets):
    return exact_log_prob(params, hidden, targets, chunk_size)

  def log_probs(params, hidden):
    return exact_log_probs(params, hidden, chunk_size)

  return OutputLayer(init=init_full_params, loss=loss, log_prob=log_prob, log_probs=log_probs)


def _make_sampled_token_loss(remove_accidental_hits: bool):
  def token_loss(h_n, t_n, w_t, b_t, ids, w_s, b_s, log_q_t, log_q_s):
    z_t = jnp.dot(w_t, h_n) + b_t - log_q_t
    z_s = w_s @ h_n + b_s - log_q_s
    if remove_accidental_hits:
      z_s = jnp.where(ids == t_n, hit_mask_value(z_s.dtype), z_s)
    return jax.nn.logsumexp(jnp.concatenate([z_t[None], z_s])) - z_t
  return token_loss


def sampled(num_samples: int, sampler: Sampler, *, remove_accidental_hits: bool = True,
            subtract_log_q: bool = True, shared: bool = True,
            chunk_size: int | None = None) -> OutputLayer:
  """Sampled softmax (importance sampling) with the log Q correction.

  For token n with target t and negatives `s_1..s_k` drawn from the sampler,
  `z_v = w_v . h_n + b_v - log E[count(v)]` and
  `loss_n = -z_t + log(exp(z_t) + sum_j exp(z_{s_j}))`, TensorFlow's `sampled_softmax_loss`:
  the softmax over [true, sampled] logits, each corrected by the log of its expected count
  among the k draws (`Q`; `k * p_v` with replacement). A negative equal to the target (an
  accidental hit) gets a large finite negative logit (`remove_accidental_hits`), so it adds
  nothing. The negatives are shared by the whole batch by default (one `[N, H] x [H, k]` GEMM
  on the gathered rows `w[ids]`); `shared=False` draws k per token (`[N, k, H]` rows).
  The gradient w.r.t. `w` touches only the target and sampled rows; see
  `sparse_loss_and_grads` for an O(k H) update.

  Args:
    num_samples: k, the number of negatives (per batch, or per token if not shared).
    sampler: a `Sampler` over the same V as the params.
    remove_accidental_hits: mask negatives equal to the row's target.
    subtract_log_q: subtract `log E[count]` from every logit (False: plain sampled softmax).
    shared: share the negatives across the batch.
    chunk_size: vocabulary block size of the exact `log_prob` / `log_probs` (see `full`).

  Returns:
    An `OutputLayer` over `FullParams(w [V, H], b [V])`:
    `loss(params, hidden [N, H], targets [N], *, key) -> [N]` (`key` required), and the exact
    full-softmax `log_prob -> [N]` and `log_probs -> [N, V]`.

  References:
    Bengio and Senecal, "Adaptive Importance Sampling to Accelerate Training of a Neural
    Probabilistic Language Model", 2008. https://doi.org/10.1109/TNN.2007.912312
    Jean, Cho, Memisevic and Bengio, "On Using Very Large Target Vocabulary for Neural Machine
    Translation", 2015. https://arxiv.org/abs/1412.2007
  """
  check_num_samples(num_samples)
  check_sampler(sampler)
  check_chunk_size(chunk_size)
  row_form = make_row_form(_make_sampled_token_loss(remove_accidental_hits), sampler,
                           num_samples, shared, subtract_log_q)
  return sampling_layer(row_form, chunk_size)
