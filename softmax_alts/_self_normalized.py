"""Self-normalized softmax: the softmax NLL plus a penalty that drives log Z to 0."""

import jax
import jax.numpy as jnp

from softmax_alts._base import OutputLayer, batch, check_targets, finish, layer_functions, unbatch
from softmax_alts._full import FullParams, check_params, full_softmax, init_full_params
from softmax_alts._lse import accumulation_dtype


def unnormalized_score(params: FullParams, hidden: jax.Array, targets: jax.Array) -> jax.Array:
  """The self-normalized log-probability estimate at test time: `w_t . h + b_t`.

  A model trained with `self_normalized` has log Z close to 0, so its raw score of the target
  stands in for `log p(t | h)` at O(H) cost per token instead of O(V H) (Devlin et al. 2014).
  It is an estimate: report perplexity with the exact `log_prob`, and measure how well the
  model self-normalizes with `log_normalizer` (the gap is exactly log Z). Works for any
  `FullParams` model.

  Args:
    params: `FullParams(w [V, H], b [V])`.
    hidden: `[N, H]` (or `[H]`).
    targets: `[N]` ids in `[0, V)` (or a scalar).

  Returns:
    `[N]` unnormalized scores, float32; NaN under jit for ids outside `[0, V)` (`ValueError`
    outside).

  References:
    Devlin, Zbib, Huang, Lamar, Schwartz and Makhoul, "Fast and Robust Neural Network Joint
    Models for Statistical Machine Translation", 2014. https://aclanthology.org/P14-1129/
  """
  hidden, targets, _, unbatched = batch(hidden, targets)
  vocab_size = check_params(params, hidden)
  valid = check_targets(targets, vocab_size, hidden.shape[0])
  safe = jnp.where(valid, targets, 0)
  dtype = accumulation_dtype(hidden, params.w)
  scores = (jnp.sum(hidden.astype(dtype) * params.w[safe].astype(dtype), axis=1)
            + params.b[safe].astype(dtype))
  return unbatch(finish(scores, valid, None), unbatched)


def self_normalized(alpha: float, *, chunk_size: int | None = None, strategy: str | None = None,
                    block_rows: int = 2048, mesh=None, axis: str = "model") -> OutputLayer:
  """Self-normalized softmax: `loss = -log softmax(z)[t] + alpha * (log Z)^2`.

  `z = W h + b`, `log Z = logsumexp_v z_v`. The penalty teaches the model to output
  `log Z ~ 0`, so that the unnormalized score `z_t` is itself a log-probability at test time:
  use `softmax_alts.unnormalized_score(params, hidden, targets)` for the cheap O(H) estimate.
  Training still costs a full softmax, whose log Z and target logit the loss adds the penalty
  to; `log_prob` / `log_probs` are the exact normalized softmax (what perplexity should be
  reported on). Devlin et al. (2014) call this self-normalization; Chen, Grangier and Auli
  (2016) call it WeakNorm.

  Args:
    alpha: the penalty's weight, a non-negative number (Devlin et al. use 0.1).
    chunk_size, strategy, block_rows, mesh, axis: the full softmax's options (see `full`).

  Returns:
    An `OutputLayer` over `FullParams(w [V, H], b [V])`:
    `loss(params, hidden [N, H], targets [N], *, key=None, where=None) -> [N]` (key unused),
    `log_prob(...) -> [N]` and `log_probs(params, hidden) -> [N, V]`, exact.

  References:
    Devlin, Zbib, Huang, Lamar, Schwartz and Makhoul, "Fast and Robust Neural Network Joint
    Models for Statistical Machine Translation", 2014. https://aclanthology.org/P14-1129/
    Chen, Grangier and Auli, "Strategies for Training Large Vocabulary Neural Language Models",
    2016. https://arxiv.org/abs/1512.04906
  """
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
    raise ValueError(f"`alpha` must be a non-negative number; got {alpha!r}.")
  softmax = full_softmax(chunk_size=chunk_size, strategy=strategy, block_rows=block_rows,
                         mesh=mesh, axis=axis)

  def target_loss(params, hidden, targets):
    lse, z_t = softmax.lse_and_target(params, hidden, targets)
    return lse - z_t + jnp.asarray(alpha, lse.dtype) * jnp.square(lse)

  loss, log_prob, log_probs = layer_functions(softmax.check, softmax.log_prob, softmax.log_probs,
                                              target_loss=target_loss)
  return OutputLayer(init=init_full_params, loss=loss, log_prob=log_prob, log_probs=log_probs)
