"""Class-based softmax: a softmax over word classes, then a softmax over the words of one class."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softmax_alts._base import OutputLayer, check_hidden, check_targets, nan_where_invalid
from softmax_alts._trees import _check_counts

# Largest `[rows, max_class_size, H]` block of gathered word vectors the loss materializes at
# once (elements; 2 MiB of float32, cache-sized): bigger batches are processed in chunks of rows.
_GATHER_BUDGET = 1 << 19


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

  The classes are contiguous id ranges of about equal total count (`frequency_classes`). For
  static shapes the loss pads every class to the largest class size M with masked entries: it
  gathers the M word vectors of each row's class, so it costs O(N * H * (C + M)) instead of
  O(N * H * V). Frequency binning makes the rare-word classes the largest (on Zipfian counts
  with V = 100K and C = 316, M = 3721 while the average is V / C = 316); binning on the square
  roots of the counts, `class_based(counts ** 0.5, C)`, gives smaller rare-word classes (there
  M = 628) and a loss several times cheaper. `log_probs` computes every word (one `[N, V]`
  GEMM) and normalizes within each class.

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
    """log p(w | class(w), h) for each row: the target's class only, padded to M words."""
    start = jnp.asarray(starts)[jnp.asarray(class_of)[targets]]              # [n]
    size = jnp.asarray(sizes)[jnp.asarray(class_of)[targets]]
    offsets = jnp.arange(max_size, dtype=jnp.int32)
    ids = jnp.minimum(start[:, None] + offsets[None, :], num_words - 1)   # [n, M]
    members = offsets[None, :] < size[:, None]
    logits = (jnp.einsum("nmh,nh->nm", params.word_weights[ids], hidden)
              + params.word_bias[ids])
    log_norm = jax.nn.logsumexp(logits, axis=1, where=members)
    target_logit = jnp.take_along_axis(logits, (targets - start)[:, None], axis=1)[:, 0]
    return target_logit - log_norm

  # The computations are jitted once here (the checks stay outside, so that a bad id raises
  # eagerly); called under an outer `jit`, they are inlined.
  @jax.jit
  def target_log_prob(params: ClassBasedParams, hidden, targets) -> jax.Array:
    valid = (targets >= 0) & (targets < num_words)  # NaN for a bad id under jit
    targets = jnp.where(valid, targets, 0).astype(jnp.int32)
    num_rows, width = hidden.shape
    class_logits = hidden @ params.class_weights.T + params.class_bias[None, :]  # [N, C]
    target_class = jnp.asarray(class_of)[targets]
    class_term = (jnp.take_along_axis(class_logits, target_class[:, None], axis=1)[:, 0]
                  - jax.nn.logsumexp(class_logits, axis=1))
    rows = max(1, _GATHER_BUDGET // max(1, max_size * width))
    if num_rows <= rows:
      word_term = within_class(params, hidden, targets)
    else:  # bound the memory of the gathered word vectors: chunks of `rows` rows
      word_term = jax.lax.map(lambda x: within_class(params, x[0][None], x[1][None])[0],
                              (hidden, targets), batch_size=rows)
    return nan_where_invalid(class_term + word_term, valid)

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
