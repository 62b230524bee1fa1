"""Class-based softmax: a softmax over word classes, then a softmax over the words of one class."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from softmax_alts import _lse
from softmax_alts._base import (OutputLayer, check_divisible, check_options, init_function,
                                layer_functions)
from softmax_alts._trees import _check_counts


def _tile_rows(num_rows: int, num_classes: int) -> int:
  """The power of two from 8 to 64 at or above N / C, about the batch's rows per class: a tile
  of class-sorted rows then mostly holds the rows of one class."""
  return min(64, max(8, 1 << (max(1, -(-num_rows // num_classes)) - 1).bit_length()))


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


def class_based(counts, num_classes: int, *, strategy: str | None = None, block_rows: int = 64,
                tile_rows: int | None = None, mesh=None, axis: str = "model") -> OutputLayer:
  """Class-based softmax: p(w|h) = p(class(w) | h) * p(w | class(w), h), frequency-binned classes.

    log p(w | h) = log softmax(A h + a)_{c(w)} + log softmax_{v in c(w)}(W_v . h + b_v)_w

  The classes are contiguous id ranges of about equal total count (`frequency_classes`).
  Frequency binning makes the rare-word classes large (on Zipfian counts the largest class holds
  many times the average V / C words), so padding every row to the largest class would cost
  more than the full softmax. Both terms come from the package's one log-sum-exp primitive: the
  class term over the C classes, the word term over each row's own class, its id range. With
  the "stream" strategy (the CPU default) the rows are sorted by class and cut into tiles of
  `tile_rows` rows, the vocabulary into blocks of `block_rows` words, and each tile is computed
  against only the blocks its classes cover, reading the table once per training step; with
  "materialize" (accelerators) the word logits are one `[N, V]` GEMM masked to each row's
  class. `log_probs` computes every word (one `[N, V]` GEMM) and normalizes within each class.
  With `mesh`, the word table is split along V over `axis` (the class table is replicated) and
  computed vocabulary-parallel, as `full`'s.

  Example:
    >>> layer = class_based(counts, num_classes=int(len(counts) ** 0.5))
    >>> params = layer.init(key, hidden_size, len(counts))
    >>> loss = layer.loss(params, hidden, targets).mean()

  Args:
    counts: `[V]` non-negative word counts (or any weights to bin on, such as their square
      roots), ids sorted by descending frequency; only the class boundaries depend on them.
    num_classes: C in [1, V].
    strategy: "stream", "materialize" or None (by backend and size: `default_strategy`).
    block_rows: vocabulary rows per block (stream).
    tile_rows: class-sorted rows per tile (stream); None: the power of two from 8 to 64 at or
      above N / C.
    mesh: a `jax.sharding.Mesh` to split the word table over, or None.
    axis: the mesh axis the vocabulary is split over.

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
  shards = check_options(strategy, mesh, axis, block_rows=block_rows, tile_rows=tile_rows)

  @init_function
  def init(key, hidden_size: int, vocab_size: int, dtype) -> ClassBasedParams:
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

  def check(params: ClassBasedParams, hidden) -> int:
    width = jnp.shape(hidden)[1]
    for name, shape in (("class_weights", (num_classes, width)), ("class_bias", (num_classes,)),
                        ("word_weights", (num_words, width)), ("word_bias", (num_words,))):
      if jnp.shape(getattr(params, name)) != shape:
        raise ValueError(f"`params.{name}` must be {list(shape)} (C = {num_classes}, "
                         f"V = {num_words}, H = the width of `hidden`); "
                         f"got {list(jnp.shape(getattr(params, name)))}.")
    check_divisible(num_words, shards, "params.word_weights", axis)
    return num_words

  def target_log_prob(params: ClassBasedParams, hidden, targets) -> jax.Array:
    target_class = jnp.asarray(class_of)[targets]
    class_lse, class_z = _lse.lse_and_target(hidden, params.class_weights, params.class_bias,
                                             target_class, strategy=strategy)
    lo = jnp.asarray(starts)[target_class]
    word_lse, word_z = _lse.lse_and_target(
        hidden, params.word_weights, params.word_bias, targets, lo,
        lo + jnp.asarray(sizes)[target_class], strategy=strategy, block_rows=block_rows,
        tile_rows=tile_rows or _tile_rows(hidden.shape[0], num_classes),
        max_range=int(sizes.max()), mesh=mesh, axis=axis)
    return (class_z - class_lse) + (word_z - word_lse)

  def all_log_probs(params: ClassBasedParams, hidden) -> jax.Array:
    class_log_probs = _lse.log_softmax(_lse.logits(hidden, params.class_weights,
                                                   params.class_bias))      # [N, C]

    def words(shard, hidden, class_log_probs, word_weights, word_bias):
      z = _lse.logits(hidden, word_weights, word_bias)                     # [N, V / M]
      segments = lax.dynamic_slice_in_dim(jnp.asarray(class_of), shard[0] * z.shape[1],
                                          z.shape[1])
      peak = jax.ops.segment_max(z.T, segments, num_segments=num_classes,
                                 indices_are_sorted=True)                    # [C, N]
      peak = lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0))
      total = jax.ops.segment_sum(jnp.exp(z.T - peak[segments]), segments,
                                  num_segments=num_classes, indices_are_sorted=True)
      log_norm = _lse.combine(jnp.log(total) + peak, axis if shards > 1 else None).T  # [N, C]
      return z - log_norm[:, segments] + class_log_probs[:, segments]

    args = (hidden, class_log_probs, params.word_weights, params.word_bias)
    if shards == 1:
      return words(jnp.zeros((1,), jnp.int32), *args)
    return _lse.smap(words, mesh, axis, (P(axis), P(), P(), P(axis, None), P(axis)),
                     P(None, axis))(_lse.shard_numbers(mesh, axis), *args)

  loss, log_prob, log_probs = layer_functions(check, target_log_prob, all_log_probs)
  return OutputLayer(init=init, loss=loss, log_prob=log_prob, log_probs=log_probs)
