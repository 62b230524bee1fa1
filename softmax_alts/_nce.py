"""Noise-contrastive estimation (log Z fixed at 0) and negative sampling."""

import jax.numpy as jnp

from softmax_alts._base import OutputLayer
from softmax_alts._sampled import sampling_layer
from softmax_alts._samplers import Sampler


def _log_sigmoid(x):
  """`log sigma(x)`, stable for any x, with one exponential each way (`jax.nn.log_sigmoid`'s
  `logaddexp` computes another one for its derivative)."""
  return jnp.minimum(x, 0) - jnp.log1p(jnp.exp(-jnp.abs(x)))


def _binary_token_loss(remove_accidental_hits: bool):
  """`-log sigma(z_t) - sum_j log sigma(-z_j)` for one token, from its corrected logits."""

  def token_loss(h_n, t_n, ids, z_t, z_s):
    del h_n
    negative = _log_sigmoid(-z_s)
    if remove_accidental_hits:
      negative = jnp.where(ids == t_n, jnp.zeros_like(negative), negative)
    return -_log_sigmoid(z_t) - jnp.sum(negative)

  return token_loss


def nce(num_samples: int, sampler: Sampler, *, remove_accidental_hits: bool = False,
        shared: bool = True, chunk_size: int | None = None, strategy: str | None = None,
        mesh=None, axis: str = "model") -> OutputLayer:
  """Noise-contrastive estimation with the log-normalizer fixed at 0 (Mnih and Teh 2012).

  With the unnormalized model `s(v) = w_v . h + b_v` (log Z taken as 0) and k noise words
  `n_1..n_k` drawn from q, the posterior that a word came from the data is
  `sigma(s(v) - log(k q(v)))`, and the per-token loss is

  `loss = -log sigma(s(t) - log(k q(t))) - sum_j log sigma(-(s(n_j) - log(k q(n_j))))`.

  `k q(v)` is the sampler's `expected_count` (exactly `k q(v)` with replacement; its inclusion
  probability without), as TensorFlow's `nce_loss`, or the caller's (`negatives=`, see
  `sampled`). Computed with `log_sigmoid`, stable for any score. Negatives are shared by the
  batch by default (`shared=False`: k per token); with `remove_accidental_hits`, a noise word
  equal to the target adds nothing (off by default, as in the paper and TensorFlow).

  Args:
    num_samples: k.
    sampler: the noise distribution q (a `Sampler` over the same V as the params).
    remove_accidental_hits: drop noise words equal to the row's target.
    shared: share the noise words across the batch.
    chunk_size, strategy, mesh, axis: options of the exact `log_prob` / `log_probs` (see
      `full`).

  Returns:
    An `OutputLayer` over `FullParams(w [V, H], b [V])`, as `sampled`'s.

  References:
    Gutmann and Hyvarinen, "Noise-contrastive estimation: A new estimation principle for
    unnormalized statistical models", 2010. https://proceedings.mlr.press/v9/gutmann10a.html
    Mnih and Teh, "A Fast and Simple Algorithm for Training Neural Probabilistic Language
    Models", 2012. https://arxiv.org/abs/1206.6426
  """
  return sampling_layer(_binary_token_loss(remove_accidental_hits), sampler, num_samples,
                        shared=shared, subtract_log_q=True, chunk_size=chunk_size,
                        strategy=strategy, mesh=mesh, axis=axis)


def negative_sampling(num_samples: int, sampler: Sampler, *,
                      remove_accidental_hits: bool = False, shared: bool = True,
                      chunk_size: int | None = None, strategy: str | None = None, mesh=None,
                      axis: str = "model") -> OutputLayer:
  """Negative sampling (Mikolov et al. 2013): NCE without the noise correction.

  `loss = -log sigma(s(t)) - sum_j log sigma(-s(n_j))`, `s(v) = w_v . h + b_v`, with k
  negatives `n_j` from the sampler (word2vec uses `unigram(counts, power=0.75)`) or given by
  the caller (`negatives=Negatives(ids)`). It does not estimate the softmax's parameters, yet
  its scores rank words well; `log_prob` and `log_probs` are the exact full softmax of the same
  parameters.

  Args:
    num_samples: k.
    sampler: the negatives' distribution (a `Sampler` over the same V as the params).
    remove_accidental_hits: drop negatives equal to the row's target.
    shared: share the negatives across the batch (word2vec draws per example: `shared=False`).
    chunk_size, strategy, mesh, axis: options of the exact `log_prob` / `log_probs` (see
      `full`).

  Returns:
    An `OutputLayer` over `FullParams(w [V, H], b [V])`, as `sampled`'s.

  References:
    Mikolov, Sutskever, Chen, Corrado and Dean, "Distributed Representations of Words and
    Phrases and their Compositionality", 2013. https://arxiv.org/abs/1310.4546
  """
  return sampling_layer(_binary_token_loss(remove_accidental_hits), sampler, num_samples,
                        shared=shared, subtract_log_q=False, chunk_size=chunk_size,
                        strategy=strategy, mesh=mesh, axis=axis)
