"""A synthetic corpus with a known best perplexity: a Zipfian hidden Markov source."""

import bisect
import dataclasses
from typing import Mapping, NamedTuple

import numpy as np

from train._corpus import Corpus
from train._vocab import Vocab

# The defaults of `synthetic_corpus`: a source whose best perplexity is well below its unigram
# and bigram perplexities, so that a model must use context to approach it, and a small LSTM gets
# close within a CPU minute (the measured values are in CHANGELOG.md).
VOCAB_SIZE = 500
NUM_STATES = 16
NUM_SUCCESSORS = 2
ZIPF_EXPONENT = 1.8
SHARED = 0.3
TRAIN_LENGTH = 500_000
VALID_LENGTH = 50_000
TEST_LENGTH = 50_000


class HiddenMarkovSource(NamedTuple):
  """A hidden Markov model over words, in float64.

  Attributes:
    initial: `[S]` the distribution of the first hidden state (the stationary distribution of
      `transitions` for sources made by `zipf_hmm`).
    transitions: `[S, S]` row-stochastic, `transitions[s, s'] = p(z_{t+1} = s' | z_t = s)`.
    emissions: `[S, V]` row-stochastic, `emissions[s, w] = p(w_t = w | z_t = s)`.
  """

  initial: np.ndarray
  transitions: np.ndarray
  emissions: np.ndarray


def zipf_hmm(seed: int | np.random.Generator = 0, *, vocab_size: int = VOCAB_SIZE,
             num_states: int = NUM_STATES, num_successors: int = NUM_SUCCESSORS,
             zipf_exponent: float = ZIPF_EXPONENT, shared: float = SHARED) -> HiddenMarkovSource:
  """Makes a random hidden Markov source with sparse transitions and Zipfian emissions.

  With `z_r = (r + 1)^-a / sum_k (k + 1)^-a` the Zipf distribution over ranks `r in [0, V)`:

  - transitions: state s goes to the `num_successors` states `(s + d) mod S` for offsets d that
    are 1 (so the chain is irreducible) and distinct values drawn from `[2, S)` (no self-loops:
    the state keeps moving). Random exponential weights on these edges are scaled by Sinkhorn
    iterations until the matrix is doubly stochastic, so every state has the same stationary
    probability 1/S whatever the seed, while each state has its own transition weights.
  - emissions: `e_s(w) = shared * z_w + (1 - shared) * z_{perm_s(w)}`, a word distribution common
    to every state (word w has rank w, as function words) mixed with a Zipf over a random
    permutation `perm_s` of the vocabulary that is proper to state s (its content words). Every
    word can be emitted by every state, so the last word does not determine the hidden state,
    and the common words carry no information about it: the best prediction depends on words
    further back.
  - initial: the stationary distribution of the transitions (uniform, to float64 rounding).

  Args:
    seed: an integer seed or a `np.random.Generator`.
    vocab_size: V.
    num_states: S.
    num_successors: the number of states each state can go to, in `[1, S - 1]`.
    zipf_exponent: a > 0; larger is more peaked.
    shared: the weight in `[0, 1]` of the common word distribution.

  Returns:
    The `HiddenMarkovSource`.

  Raises:
    ValueError: if an argument is out of range.
  """
  _check_int("vocab_size", vocab_size, 2)
  _check_int("num_states", num_states, 1)
  _check_int("num_successors", num_successors, 1)
  if num_successors > max(1, num_states - 1):
    raise ValueError(
        f"`num_successors` must be at most `num_states - 1 = {num_states - 1}` (no self-loops) "
        f"or 1; got {num_successors}.")
  if not zipf_exponent > 0:
    raise ValueError(f"`zipf_exponent` must be positive; got {zipf_exponent!r}.")
  if not 0 <= shared <= 1:
    raise ValueError(f"`shared` must be in [0, 1]; got {shared!r}.")
  rng = np.random.default_rng(seed)
  offsets = np.concatenate([[1], rng.choice(np.arange(2, num_states), num_successors - 1,
                                            replace=False)])
  states = np.arange(num_states)
  weights = np.zeros((num_states, num_states))
  weights[states[:, None], (states[:, None] + offsets) % num_states] = rng.exponential(
      size=(num_states, num_successors))
  transitions = _sinkhorn(weights)
  zipf = np.arange(1, vocab_size + 1, dtype=np.float64) ** -float(zipf_exponent)
  zipf /= zipf.sum()
  emissions = np.stack([shared * zipf + (1 - shared) * zipf[rng.permutation(vocab_size)]
                        for _ in range(num_states)])
  emissions /= emissions.sum(axis=1, keepdims=True)
  return HiddenMarkovSource(stationary_distribution(transitions), transitions, emissions)


def _sinkhorn(weights: np.ndarray, tol: float = 1e-13, max_iterations: int = 10_000):
  """Scales the rows and columns of a non-negative matrix until it is doubly stochastic.

  The pattern of `weights` is a union of permutation matrices, so the iteration converges
  (Sinkhorn and Knopp 1967). It ends on a row scaling, so the result is row-stochastic (a valid
  transition matrix) even if it stopped before the columns reached `tol`; `initial` is computed
  from it exactly either way.
  """
  for _ in range(max_iterations):
    weights = weights / weights.sum(axis=0, keepdims=True)
    weights = weights / weights.sum(axis=1, keepdims=True)
    if np.max(np.abs(weights.sum(axis=0) - 1.0)) < tol:
      break
  return weights


def stationary_distribution(transitions: np.ndarray) -> np.ndarray:
  """Returns the stationary distribution `pi = pi P` of an irreducible Markov chain.

  Args:
    transitions: `[S, S]` row-stochastic P.

  Returns:
    `[S]` float64 pi, summing to 1.
  """
  transitions = np.asarray(transitions, dtype=np.float64)
  num_states = transitions.shape[0]
  # pi (P - I) = 0 with sum(pi) = 1, solved in the least-squares sense (exact for this system).
  system = np.vstack([transitions.T - np.eye(num_states), np.ones((1, num_states))])
  rhs = np.zeros(num_states + 1)
  rhs[-1] = 1.0
  pi = np.linalg.lstsq(system, rhs, rcond=None)[0]
  pi = np.clip(pi, 0.0, None)
  return pi / pi.sum()


def hmm_sample(source: HiddenMarkovSource, length: int,
               seed: int | np.random.Generator) -> np.ndarray:
  """Draws a word sequence from a hidden Markov source, the first state from `initial`.

  Each step uses one pair of uniforms (transition, emission), so with the same seed a longer
  draw begins with the shorter one.

  Args:
    source: the `HiddenMarkovSource`.
    length: T.
    seed: an integer seed or a `np.random.Generator` (the same seed gives the same words).

  Returns:
    `[T]` int32 word indices in `[0, V)`.
  """
  _check_int("length", length, 1)
  rng = np.random.default_rng(seed)
  initial, transitions, emissions = (np.asarray(a, dtype=np.float64) for a in source)
  num_states, vocab_size = emissions.shape
  successors = [np.flatnonzero(row).tolist() for row in transitions]
  cumulative = [np.cumsum(row[row > 0]).tolist() for row in transitions]
  state = _draw(np.cumsum(initial), rng.random())
  uniforms = rng.random((length, 2))
  states = []
  for u in uniforms[:, 0].tolist():  # the chain: a Python loop over floats is fast enough
    states.append(state)
    cdf = cumulative[state]
    state = successors[state][min(bisect.bisect_right(cdf, u * cdf[-1]), len(cdf) - 1)]
  states = np.array(states)
  words = np.empty(length, dtype=np.int32)
  cdfs = np.cumsum(emissions, axis=1)
  for s in range(num_states):  # the emissions, vectorised per state
    at = states == s
    drawn = np.searchsorted(cdfs[s], uniforms[at, 1] * cdfs[s, -1], side="right")
    words[at] = np.minimum(drawn, vocab_size - 1)
  return words


def _draw(cdf: np.ndarray, u: float) -> int:
  return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), cdf.size - 1))


def hmm_log_probs(source: HiddenMarkovSource, words) -> np.ndarray:
  """Exact log-probability of each word given the words before it, by the forward algorithm.

  With pi the initial distribution, P the transitions and `e_s(w)` the emissions, the scaled
  forward recursion is

    alpha_1(s) = pi(s) e_s(w_1),
    c_t = sum_s alpha_t(s),   log p(w_t | w_{<t}) = log c_t,
    alpha_{t+1}(s') = sum_s (alpha_t(s) / c_t) P(s, s') e_{s'}(w_{t+1}),

  so that `sum_t log c_t = log p(w_1..w_T)`, the sum over all hidden paths, computed in float64
  without underflow.

  Args:
    source: the `HiddenMarkovSource`.
    words: `[T]` word indices in `[0, V)`.

  Returns:
    `[T]` float64, `log p(w_t | w_1..w_{t-1})`; its sum is the sequence's log-likelihood and
    `exp(-mean)` the best perplexity any model can have on it in expectation.

  Raises:
    ValueError: if `words` is not a 1-D integer sequence in `[0, V)`.

  References:
    Rabiner, "A Tutorial on Hidden Markov Models and Selected Applications in Speech
    Recognition", Proceedings of the IEEE, 1989. https://doi.org/10.1109/5.18626
  """
  initial, transitions, emissions = (np.asarray(a, dtype=np.float64) for a in source)
  words = _check_words(words, emissions.shape[1])
  by_word = np.ascontiguousarray(emissions.T)  # [V, S]: one contiguous row per word
  log_probs = np.empty(words.size)
  predicted = initial  # p(z_t | w_{<t})
  for t, w in enumerate(words.tolist()):
    joint = predicted * by_word[w]
    c = joint.sum()
    log_probs[t] = np.log(c)
    predicted = (joint / c) @ transitions
  return log_probs


def unigram_log_probs(source: HiddenMarkovSource, words) -> np.ndarray:
  """Log-probability of each word under the source's stationary unigram `u = pi E`.

  Args:
    source: the `HiddenMarkovSource`, with its stationary distribution as `initial`.
    words: `[T]` word indices in `[0, V)`.

  Returns:
    `[T]` float64 `log u(w_t)`.
  """
  initial, _, emissions = (np.asarray(a, dtype=np.float64) for a in source)
  words = _check_words(words, emissions.shape[1])
  return np.log(initial @ emissions)[words]


def bigram_log_probs(source: HiddenMarkovSource, words) -> np.ndarray:
  """Log-probability of each word given only the previous one, under the stationary source.

  `p(w' | w) = sum_{s, s'} pi(s) e_s(w) P(s, s') e_{s'}(w') / u(w)`: the best a model that sees
  one word back can do. The first word gets its unigram probability.

  Args:
    source: the `HiddenMarkovSource`, with its stationary distribution as `initial`.
    words: `[T]` word indices in `[0, V)`.

  Returns:
    `[T]` float64 `log p(w_t | w_{t-1})`.
  """
  initial, transitions, emissions = (np.asarray(a, dtype=np.float64) for a in source)
  words = _check_words(words, emissions.shape[1])
  joint = (emissions.T * initial) @ transitions @ emissions  # [V, V] p(w_{t-1}, w_t)
  log_conditional = np.log(joint) - np.log(joint.sum(axis=1, keepdims=True))
  first = np.log(initial @ emissions)[words[:1]]
  return np.concatenate([first, log_conditional[words[:-1], words[1:]]])


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticCorpus(Corpus):
  """A `Corpus` drawn from a known source, with reference perplexities on its test split.

  Attributes:
    source: the `HiddenMarkovSource` the splits were drawn from.
    words: maps each split to its `[T]` int32 source word indices (word i is the token "w{i}").
    best_perplexity: the exact perplexity of the test split under the source itself (forward
      algorithm): the best any model can do, in expectation.
    best_valid_perplexity: the same on the validation split.
    bigram_perplexity: the test perplexity of the source's exact bigram `p(w_t | w_{t-1})`:
      the best a model that sees one word back can do.
    unigram_perplexity: the test perplexity of the source's exact stationary unigram
      distribution: the best a model that ignores context can do.
  """

  source: HiddenMarkovSource
  words: Mapping[str, np.ndarray]
  best_perplexity: float
  best_valid_perplexity: float
  bigram_perplexity: float
  unigram_perplexity: float


def synthetic_corpus(seed: int = 0, *, train_length: int = TRAIN_LENGTH,
                     valid_length: int = VALID_LENGTH, test_length: int = TEST_LENGTH,
                     vocab_size: int = VOCAB_SIZE, num_states: int = NUM_STATES,
                     num_successors: int = NUM_SUCCESSORS, zipf_exponent: float = ZIPF_EXPONENT,
                     shared: float = SHARED) -> SyntheticCorpus:
  """Draws train, valid and test splits from a `zipf_hmm` source, with its exact perplexities.

  The seed makes the source and each split: the same seed gives the same corpus, a split does
  not depend on the lengths of the others, and a longer split begins with the shorter one. Each split is an independent draw whose first
  state comes from the stationary distribution, so its best perplexity is that of a model that
  reads the split from its start. The words are the strings "w0", ..., "w{V-1}" and the
  vocabulary is built from the training split as for real text (ids by descending frequency,
  `<unk>` unseen and last, no `<eos>`); a word missing from the training split encodes to
  `<unk>`. The reference perplexities are computed on the source's own words, whatever the ids.

  Args:
    seed: the integer seed.
    train_length: tokens in the training split.
    valid_length: tokens in the validation split.
    test_length: tokens in the test split.
    vocab_size: V, the number of words of the source.
    num_states: S, hidden states.
    num_successors: states each state can go to.
    zipf_exponent: the exponent of the Zipf emissions.
    shared: the weight of the emission distribution common to all states.

  Returns:
    A `SyntheticCorpus` (a `Corpus` with `level="word"`).
  """
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"`seed` must be a non-negative integer; got {seed!r}.")
  lengths = {"train": train_length, "valid": valid_length, "test": test_length}
  for split, length in lengths.items():
    _check_int(f"{split}_length", length, 1)
  source_seed, *split_seeds = np.random.SeedSequence(int(seed)).spawn(4)
  source = zipf_hmm(np.random.default_rng(source_seed), vocab_size=vocab_size,
                    num_states=num_states, num_successors=num_successors,
                    zipf_exponent=zipf_exponent, shared=shared)
  words = {split: hmm_sample(source, length, np.random.default_rng(split_seed))
           for (split, length), split_seed in zip(lengths.items(), split_seeds)}
  names = [f"w{i}" for i in range(vocab_size)]
  counts = np.bincount(words["train"], minlength=vocab_size)
  vocab = Vocab.from_counts({names[i]: int(c) for i, c in enumerate(counts) if c > 0})
  lookup = np.array([vocab.index(name) for name in names], dtype=np.int32)

  def perplexity(log_probs):
    return float(np.exp(-np.mean(log_probs)))

  description = (f"synthetic Zipfian HMM (seed {seed}, V={vocab_size}, S={num_states}, "
                 f"{num_successors} successors, exponent {zipf_exponent}, shared {shared})")
  return SyntheticCorpus(
      vocab=vocab, train=lookup[words["train"]], valid=lookup[words["valid"]],
      test=lookup[words["test"]], level="word",
      sources={split: f"{description}, {length} tokens" for split, length in lengths.items()},
      source=source, words=words,
      best_perplexity=perplexity(hmm_log_probs(source, words["test"])),
      best_valid_perplexity=perplexity(hmm_log_probs(source, words["valid"])),
      bigram_perplexity=perplexity(bigram_log_probs(source, words["test"])),
      unigram_perplexity=perplexity(unigram_log_probs(source, words["test"])))


def _check_int(name: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")


def _check_words(words, vocab_size: int) -> np.ndarray:
  words = np.asarray(words)
  if words.ndim != 1 or (words.size and not np.issubdtype(words.dtype, np.integer)):
    raise ValueError(f"`words` must be [T] integers; got shape {words.shape}, dtype {words.dtype}.")
  if words.size and (words.min() < 0 or words.max() >= vocab_size):
    raise ValueError(f"`words` must be in [0, {vocab_size}); got values in "
                     f"[{words.min()}, {words.max()}].")
  return words.astype(np.int64)
