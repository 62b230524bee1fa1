"""Differentiated softmax (D-softmax): wide output vectors for frequent words, narrow for rare."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softmax_alts import _lse
from softmax_alts._base import (OutputLayer, check_divisible, check_options, init_function,
                                layer_functions)
from softmax_alts._trees import _check_counts


class DifferentiatedParams(NamedTuple):
  """Parameters of the differentiated softmax.

  Attributes:
    weights: a tuple over bands; band j is `[num_words_j, dim_j]`, the output vectors of its
      words (ids in band order: band 0 holds the most frequent ids).
    bias: `[V]` word biases.
  """

  weights: tuple[jax.Array, ...]
  bias: jax.Array


def _check_bands(bands, vocab_size: int) -> tuple[tuple[int, int], ...]:
  """Returns `bands` as a tuple of `(num_words, dim)` ints, or raises `ValueError`."""
  try:
    pairs = tuple((w, d) for w, d in bands)
  except (TypeError, ValueError):
    raise ValueError(f"`bands` must be a sequence of (num_words, dim) pairs; "
                     f"got {bands!r}.") from None
  if not pairs:
    raise ValueError("`bands` must hold at least one (num_words, dim) pair; got none.")
  for w, d in pairs:
    for value in (w, d):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`bands` must hold positive int (num_words, dim) pairs; got "
                         f"{bands!r}.")
  pairs = tuple((int(w), int(d)) for w, d in pairs)
  total = sum(w for w, _ in pairs)
  if total != vocab_size:
    raise ValueError(f"`bands` word counts must sum to V = len(counts) = {vocab_size}; got "
                     f"{[w for w, _ in pairs]} (sum {total}).")
  return pairs


def differentiated(counts, bands, *, strategy: str | None = None, block_rows: int = 2048,
                   mesh=None, axis: str = "model") -> OutputLayer:
  """D-softmax: word w in band j scores only against the j-th segment of h, of width dim_j.

  The hidden vector is cut into contiguous segments h = [h_1; ..; h_B] of widths dim_1 .. dim_B
  (summing to H), and the words, in frequency order, into bands of num_1 .. num_B words. A word
  of band j has an output vector of width dim_j:

    logit_w = W^{(j)}_w . h_j + b_w,    log p(w | h) = logit_w - logsumexp_v logit_v,

  a block-diagonal output matrix, normalized exactly over all V words. It costs
  O(N * sum_j num_j * dim_j) instead of O(N * V * H): wide vectors for the few frequent words,
  narrow ones for the many rare words. Each band's log-sum-exp and target logit come from the
  package's one log-sum-exp primitive (on its segment of h, with `full`'s strategies), and
  log Z is the log-sum-exp of the bands'. With `mesh`, every band's table and the bias are split
  along their words over `axis` (each band's word count a multiple of the axis size).

  Example:
    >>> layer = differentiated(counts, ((2000, 256), (8000, 128), (90_000, 128)))  # H = 512
    >>> params = layer.init(key, 512, 100_000)
    >>> loss = layer.loss(params, hidden, targets).mean()

  Args:
    counts: `[V]` word counts, ids sorted by descending frequency; fixes V (only its length is
      used).
    bands: a tuple of `(num_words, dim)` pairs in frequency order; the num_words sum to V and
      the dims to H.
    strategy: "stream", "materialize" or None (by backend and size: `default_strategy`).
    block_rows: vocabulary rows per block (stream).
    mesh: a `jax.sharding.Mesh` to split the bands over, or None.
    axis: the mesh axis the vocabulary is split over.

  Returns:
    An `OutputLayer` with `DifferentiatedParams(weights=(W_1 [num_1, dim_1], ..), bias [V])`.
    `loss` is the exact NLL `[N]` (its `key` is unused), `log_prob` `[N]`, `log_probs` `[N, V]`.

  References:
    Chen, Grangier and Auli, "Strategies for Training Large Vocabulary Neural Language
    Models", 2016. https://arxiv.org/abs/1512.04906
  """
  num_words = _check_counts(counts).shape[0]
  pairs = _check_bands(bands, num_words)
  shards = check_options(strategy, mesh, axis, block_rows=block_rows)
  width = sum(d for _, d in pairs)
  dim_offsets = np.concatenate([[0], np.cumsum([d for _, d in pairs])]).tolist()
  word_offsets = np.concatenate([[0], np.cumsum([w for w, _ in pairs])]).tolist()

  @init_function
  def init(key, hidden_size: int, vocab_size: int, dtype) -> DifferentiatedParams:
    """Band weights uniform in +-1/sqrt(dim_j) (as a PyTorch `Linear`), biases zero."""
    if vocab_size != num_words:
      raise ValueError(f"`vocab_size` must equal len(counts) = {num_words}; got {vocab_size}.")
    if hidden_size != width:
      raise ValueError(f"`hidden_size` must equal the sum of the `bands` dims = {width}; "
                       f"got {hidden_size}.")
    sizes = [w * d for w, d in pairs]
    flat = jax.random.uniform(key, (sum(sizes),), dtype, -1.0, 1.0)  # one draw for all bands
    weights = tuple((part * float(d) ** -0.5).astype(dtype).reshape(w, d)
                    for part, (w, d) in zip(jnp.split(flat, np.cumsum(sizes)[:-1].tolist()),
                                            pairs))
    return DifferentiatedParams(weights=weights, bias=jnp.zeros((num_words,), dtype))

  def check(params: DifferentiatedParams, hidden) -> int:
    if jnp.shape(hidden)[1] != width:
      raise ValueError(f"`hidden` must be [N, H] with H = {width} (the sum of the `bands` "
                       f"dims); got shape {jnp.shape(hidden)}.")
    shapes = [jnp.shape(w) for w in params.weights]
    if shapes != list(pairs) or jnp.shape(params.bias) != (num_words,):
      raise ValueError(f"`params` must hold weights of shapes {list(pairs)} and a bias of shape "
                       f"({num_words},); got {shapes} and {jnp.shape(params.bias)}.")
    for j, (words, _) in enumerate(pairs):
      check_divisible(words, shards, f"params.weights[{j}]", axis)
    return num_words

  def bands_of(params: DifferentiatedParams, hidden):
    """`(h_j [N, dim_j], W_j, b_j)` of every band."""
    return [(hidden[:, dim_offsets[j]:dim_offsets[j + 1]], w,
             params.bias[word_offsets[j]:word_offsets[j + 1]])
            for j, w in enumerate(params.weights)]

  def target_log_prob(params: DifferentiatedParams, hidden, targets) -> jax.Array:
    log_norms, target_logit = [], 0
    for j, (h_j, w, b) in enumerate(bands_of(params, hidden)):
      lse, z = _lse.lse_and_target(h_j, w, b, targets - word_offsets[j], strategy=strategy,
                                   block_rows=block_rows, mesh=mesh, axis=axis)
      log_norms.append(lse)
      target_logit = target_logit + z  # 0 outside the band
    return target_logit - jax.nn.logsumexp(jnp.stack(log_norms, axis=1), axis=1)

  def all_log_probs(params: DifferentiatedParams, hidden) -> jax.Array:
    logits, log_norms = zip(*(_lse.split_logits(h_j, w, b, mesh, axis)
                              for h_j, w, b in bands_of(params, hidden)))
    log_norm = jax.nn.logsumexp(jnp.stack(log_norms, axis=1), axis=1)
    return jnp.concatenate(logits, axis=1) - log_norm[:, None]

  loss, log_prob, log_probs = layer_functions(check, target_log_prob, all_log_probs)
  return OutputLayer(init=init, loss=loss, log_prob=log_prob, log_probs=log_probs)
