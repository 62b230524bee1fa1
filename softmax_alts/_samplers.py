"""Candidate samplers for the sampling losses: uniform, log-uniform (Zipf), unigram, in-batch.

A `Sampler` draws the negative ids and reports the expected count of any id among the draws,
the Q of the log Q correction in `sampled` and `nce`. Ids are assumed sorted by descending
frequency (id 0 the most frequent), which `log_uniform` relies on.

`log_uniform` and `unigram` draw with replacement by default, with Walker's alias method (O(1)
per draw, exact in float32), and then `expected_count = num_samples * p_v` exactly. With
`unique=True` they draw without replacement, by Gumbel-top-k over the V log-probabilities (O(V)
per call; Kool et al. 2019), which is sequential sampling proportional to p. Its inclusion
probabilities have no closed form; `expected_count` returns TensorFlow's estimator
`-expm1(num_tries * log1p(-p_v))`, the probability that v is among `num_tries` draws with
replacement, with `num_tries` the expected number of draws with replacement that give
`num_samples` distinct ids (the root of `sum_v -expm1(t * log1p(-p_v)) = num_samples`, so the
counts sum to `num_samples` as inclusion probabilities must): an approximation, better as V
grows.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class Sampler(NamedTuple):
  """A candidate sampler, as a NamedTuple of pure, jittable functions with static shapes.

  Attributes:
    sample: `sample(key, num_samples, targets=None) -> ids [num_samples]` int32. `targets [N]`
      are the batch's target ids; only `in_batch` reads them.
    expected_count: `expected_count(ids, num_samples, targets=None) -> [*ids.shape]` float32,
      the expected number of times each id occurs among `num_samples` draws (the inclusion
      probability when drawing without replacement).
    log_probs: `log_probs(targets=None) -> [V]` float32, the log-probability of each id in one
      draw (for `in_batch`, the frequency of each id among `targets`).
    vocab_size: V.
    unique: whether the draws are without replacement.
  """

  sample: Callable[..., jax.Array]
  expected_count: Callable[..., jax.Array]
  log_probs: Callable[..., jax.Array]
  vocab_size: int
  unique: bool


def check_num_samples(num_samples, limit: int | None = None, limit_name: str = "") -> int:
  """Raises `ValueError` unless `num_samples` is a positive int (at most `limit` if given)."""
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
    raise ValueError(f"`num_samples` must be a positive int; got {num_samples!r}.")
  if limit is not None and num_samples > limit:
    raise ValueError(f"`num_samples` must be at most {limit} ({limit_name}) when drawing "
                     f"without replacement; got {num_samples}.")
  return num_samples


def _check_vocab_size(vocab_size) -> int:
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
    raise ValueError(f"`vocab_size` must be a positive int; got {vocab_size!r}.")
  return vocab_size


def _alias_table(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Walker's alias table (Vose's construction) for O(1) exact draws from `probs [V]`."""
  size = probs.shape[0]
  scaled = probs * size
  threshold = np.ones(size, np.float64)
  alias = np.arange(size, dtype=np.int32)
  small = [i for i in range(size) if scaled[i] < 1.0]
  large = [i for i in range(size) if scaled[i] >= 1.0]
  while small and large:
    s, g = small.pop(), large.pop()
    threshold[s], alias[s] = scaled[s], g
    scaled[g] = scaled[g] + scaled[s] - 1.0
    (small if scaled[g] < 1.0 else large).append(g)
  return threshold.astype(np.float32), alias


def _expected_tries(probs: np.ndarray, num_samples: int) -> float:
  """The t with `sum_v 1 - (1 - p_v)^t = num_samples`: the expected number of draws with
  replacement that yield `num_samples` distinct ids (found by bisection on log t)."""
  log1m = np.log1p(-np.minimum(probs, 1.0 - 1e-16))

  def distinct(t):
    return np.sum(-np.expm1(t * log1m))

  lo, hi = float(num_samples), float(num_samples)
  while distinct(hi) < num_samples and hi < 1e300:
    hi *= 2.0
  for _ in range(200):
    mid = np.sqrt(lo * hi)
    if distinct(mid) < num_samples:
      lo = mid
    else:
      hi = mid
  return hi


def _from_probs(probs: np.ndarray, unique: bool) -> Sampler:
  """A sampler over `probs [V]` (float64, sums to 1, computed at construction)."""
  vocab_size = probs.shape[0]
  log_p_np = np.log(np.maximum(probs, np.finfo(np.float64).tiny))
  log_p_np[probs == 0] = -np.inf
  log_p = jnp.asarray(log_p_np, jnp.float32)
  threshold, alias = (jnp.asarray(a) for a in _alias_table(probs))
  p32 = jnp.asarray(probs, jnp.float32)
  with np.errstate(divide="ignore"):  # p = 1 (V = 1): log(1 - p) = -inf, as it should be.
    log1m_p = jnp.asarray(np.log1p(-np.minimum(probs, 1.0)), jnp.float32)
  num_positive = int(np.sum(probs > 0))
  tries: dict[int, float] = {}

  def sample(key, num_samples, targets=None):
    del targets
    if unique:
      check_num_samples(num_samples, num_positive, "the number of ids with p > 0")
      gumbel = jax.random.gumbel(key, (vocab_size,), jnp.float32)
      return lax.top_k(log_p + gumbel, num_samples)[1].astype(jnp.int32)
    check_num_samples(num_samples)
    key_slot, key_coin = jax.random.split(key)
    slot = jax.random.randint(key_slot, (num_samples,), 0, vocab_size, jnp.int32)
    coin = jax.random.uniform(key_coin, (num_samples,), jnp.float32)
    return jnp.where(coin < threshold[slot], slot, alias[slot])

  def expected_count(ids, num_samples, targets=None):
    del targets
    ids = jnp.asarray(ids).astype(jnp.int32)
    if not unique:
      check_num_samples(num_samples)
      return jnp.float32(num_samples) * p32[ids]
    check_num_samples(num_samples, num_positive, "the number of ids with p > 0")
    if num_samples == num_positive:  # Every id with p > 0 is drawn.
      return (p32[ids] > 0).astype(jnp.float32)
    if num_samples not in tries:  # A deterministic function of (p, k): computed once.
      tries[num_samples] = _expected_tries(probs, num_samples)
    return -jnp.expm1(jnp.float32(tries[num_samples]) * log1m_p[ids])

  def log_probs(targets=None):
    del targets
    return log_p

  return Sampler(sample=sample, expected_count=expected_count, log_probs=log_probs,
                 vocab_size=vocab_size, unique=unique)


def uniform(vocab_size: int, *, unique: bool = False) -> Sampler:
  """Uniform candidates: `p_v = 1 / V`.

  Without replacement the inclusion probability is exactly `num_samples / V`, which is what
  `expected_count` returns; with replacement it is `num_samples / V` expected draws.

  Args:
    vocab_size: V.
    unique: draw without replacement.

  Returns:
    A `Sampler`.
  """
  vocab_size = _check_vocab_size(vocab_size)
  log_p = jnp.full((vocab_size,), -np.log(vocab_size), jnp.float32)

  def sample(key, num_samples, targets=None):
    del targets
    if unique:
      check_num_samples(num_samples, vocab_size, "vocab_size")
      noise = jax.random.uniform(key, (vocab_size,), jnp.float32)
      return lax.top_k(noise, num_samples)[1].astype(jnp.int32)
    check_num_samples(num_samples)
    return jax.random.randint(key, (num_samples,), 0, vocab_size, jnp.int32)

  def expected_count(ids, num_samples, targets=None):
    del targets
    check_num_samples(num_samples, vocab_size if unique else None, "vocab_size")
    return jnp.full(jnp.shape(ids), num_samples / vocab_size, jnp.float32)

  def log_probs(targets=None):
    del targets
    return log_p

  return Sampler(sample=sample, expected_count=expected_count, log_probs=log_probs,
                 vocab_size=vocab_size, unique=unique)


def log_uniform(vocab_size: int, *, unique: bool = False) -> Sampler:
  """Log-uniform (Zipfian) candidates over frequency-sorted ids, as TensorFlow's.

  `P(v) = (log(v + 2) - log(v + 1)) / log(V + 1)`, the distribution of
  `tf.random.log_uniform_candidate_sampler`, which approximates a Zipf law when id 0 is the most
  frequent word. Drawn with or without replacement as the module docstring describes.

  Args:
    vocab_size: V.
    unique: draw without replacement.

  Returns:
    A `Sampler`.

  References:
    Jean, Cho, Memisevic and Bengio, "On Using Very Large Target Vocabulary for Neural Machine
    Translation", 2015. https://arxiv.org/abs/1412.2007
    Kool, van Hoof and Welling, "Stochastic Beams and Where to Find Them: The Gumbel-Top-k
    Trick for Sampling Sequences Without Replacement", 2019. https://arxiv.org/abs/1903.06059
  """
  vocab_size = _check_vocab_size(vocab_size)
  ids = np.arange(vocab_size, dtype=np.float64)
  probs = (np.log(ids + 2.0) - np.log(ids + 1.0)) / np.log(vocab_size + 1.0)
  return _from_probs(probs / probs.sum(), unique)


def unigram(counts, *, power: float = 0.75, unique: bool = False) -> Sampler:
  """Unigram candidates raised to a power: `P(v) = c_v^power / sum_u c_u^power`.

  `power = 0.75` is word2vec's distortion (Mikolov et al. 2013); `power = 1` is the unigram
  distribution and `power = 0` the uniform one over the ids with a positive count. Drawn with
  or without replacement as the module docstring describes.

  Args:
    counts: `[V]` non-negative word counts (concrete, read once at construction), at least one
      positive.
    power: non-negative exponent.
    unique: draw without replacement.

  Returns:
    A `Sampler`. Ids with count 0 are never drawn; their expected count is 0 (the sampling
    losses floor it at the smallest normal float before taking its log).

  References:
    Mikolov, Sutskever, Chen, Corrado and Dean, "Distributed Representations of Words and
    Phrases and their Compositionality", 2013. https://arxiv.org/abs/1310.4546
  """
  try:
    counts_np = np.asarray(counts, np.float64)
  except (TypeError, jax.errors.TracerArrayConversionError) as err:
    raise ValueError("`counts` must be a concrete [V] array of non-negative counts; got "
                     f"{type(counts).__name__}.") from err
  if counts_np.ndim != 1 or counts_np.shape[0] == 0:
    raise ValueError(f"`counts` must be [V] with V >= 1; got shape {counts_np.shape}.")
  if not np.all(np.isfinite(counts_np)) or np.any(counts_np < 0) or not np.any(counts_np > 0):
    raise ValueError("`counts` must be finite and non-negative with at least one positive "
                     f"entry; got min {counts_np.min()}, max {counts_np.max()}.")
  if isinstance(power, bool) or not isinstance(power, (int, float)) or not power >= 0:
    raise ValueError(f"`power` must be a non-negative number; got {power!r}.")
  weights = np.where(counts_np > 0, counts_np ** float(power), 0.0)
  return _from_probs(weights / weights.sum(), unique)


def in_batch(vocab_size: int, *, unique: bool = False) -> Sampler:
  """In-batch candidates: the negatives are the batch's own target ids.

  Jean et al. (2015) take the targets of the current batch as the candidate set. Here a draw
  picks a batch position uniformly, so id v is drawn with probability `m_v / N`, its
  multiplicity among the N targets. `unique=True` draws positions without replacement (the ids
  may still repeat when a target repeats), which needs `num_samples <= N`. Either way the
  expected count of id v among `num_samples` draws is exactly `num_samples * m_v / N`, the
  log Q correction that makes repeated ids count once in expectation (with `num_samples = N`
  and `unique=True` every target appears, and each copy of v is down-weighted by `m_v`).

  Args:
    vocab_size: V.
    unique: draw batch positions without replacement.

  Returns:
    A `Sampler` whose `sample`, `expected_count` and `log_probs` need `targets [N]`.

  References:
    Jean, Cho, Memisevic and Bengio, "On Using Very Large Target Vocabulary for Neural Machine
    Translation", 2015. https://arxiv.org/abs/1412.2007
  """
  vocab_size = _check_vocab_size(vocab_size)

  def _targets(targets):
    if targets is None:
      raise ValueError("the in-batch sampler needs `targets` [N]; got None.")
    if jnp.ndim(targets) != 1 or jnp.shape(targets)[0] == 0:
      raise ValueError(f"`targets` must be [N] with N >= 1; got shape {jnp.shape(targets)}.")
    return jnp.asarray(targets).astype(jnp.int32)

  def sample(key, num_samples, targets=None):
    targets = _targets(targets)
    num_rows = targets.shape[0]
    if unique:
      check_num_samples(num_samples, num_rows, "the batch size N")
      noise = jax.random.uniform(key, (num_rows,), jnp.float32)
      positions = lax.top_k(noise, num_samples)[1]
    else:
      check_num_samples(num_samples)
      positions = jax.random.randint(key, (num_samples,), 0, num_rows, jnp.int32)
    return targets[positions]

  def expected_count(ids, num_samples, targets=None):
    targets = _targets(targets)
    check_num_samples(num_samples, targets.shape[0] if unique else None, "the batch size N")
    ids = jnp.asarray(ids).astype(jnp.int32)
    flat = ids.reshape(-1)
    multiplicity = jnp.sum(flat[:, None] == targets[None, :], axis=1, dtype=jnp.int32)
    scale = jnp.float32(num_samples / targets.shape[0])
    return (scale * multiplicity.astype(jnp.float32)).reshape(ids.shape)

  def log_probs(targets=None):
    targets = _targets(targets)
    freq = jnp.zeros((vocab_size,), jnp.float32).at[targets].add(1.0 / targets.shape[0])
    return jnp.log(freq)

  return Sampler(sample=sample, expected_count=expected_count, log_probs=log_probs,
                 vocab_size=vocab_size, unique=unique)
