"""Tests for the synthetic Zipfian hidden Markov corpus and its exact likelihoods."""

import itertools

import numpy as np
import pytest

import train


def _brute_force_log_likelihood(source, words):
  """log p(w_1..w_T) as the sum over every hidden path, in float64."""
  initial, transitions, emissions = source
  total = 0.0
  for path in itertools.product(range(initial.size), repeat=len(words)):
    p = initial[path[0]] * emissions[path[0], words[0]]
    for t in range(1, len(words)):
      p *= transitions[path[t - 1], path[t]] * emissions[path[t], words[t]]
    total += p
  return np.log(total)


def _dense_source(rng, num_states, vocab_size):
  transitions = rng.dirichlet(np.ones(num_states), size=num_states)
  emissions = rng.dirichlet(np.ones(vocab_size), size=num_states)
  initial = rng.dirichlet(np.ones(num_states))
  return train.HiddenMarkovSource(initial, transitions, emissions)


@pytest.mark.parametrize("kind", ["zipf", "dense"])
def test_forward_algorithm_equals_sum_over_all_paths(kind):
  rng = np.random.default_rng(3)
  if kind == "zipf":
    source = train.zipf_hmm(1, vocab_size=4, num_states=3, num_successors=2, shared=0.2)
    assert np.sum(source.transitions == 0) == 3  # sparse: one missing successor per state
  else:
    source = _dense_source(rng, 3, 4)
  for _ in range(3):
    words = rng.integers(0, 4, size=5)
    log_probs = train.hmm_log_probs(source, words)
    assert log_probs.shape == (5,)
    assert log_probs.dtype == np.float64
    # Each conditional is a ratio of prefix likelihoods: log p(w_1..t) - log p(w_1..t-1).
    prefixes = [_brute_force_log_likelihood(source, words[:t]) for t in range(1, 6)]
    np.testing.assert_allclose(np.cumsum(log_probs), prefixes, rtol=1e-12, atol=1e-12)


def test_forward_algorithm_probabilities_sum_to_one_over_the_next_word():
  source = train.zipf_hmm(2, vocab_size=5, num_states=4, num_successors=2)
  prefix = [3, 0, 4]
  next_probs = [np.exp(train.hmm_log_probs(source, prefix + [w])[-1]) for w in range(5)]
  np.testing.assert_allclose(np.sum(next_probs), 1.0, rtol=1e-12)


def test_long_sequence_does_not_underflow():
  corpus = train.synthetic_corpus(0, train_length=2000, valid_length=100, test_length=5000)
  log_probs = train.hmm_log_probs(corpus.source, corpus.words["test"])
  assert np.all(np.isfinite(log_probs))
  assert np.all(log_probs < 0)
  assert -log_probs.sum() > 5000  # the total is far below what float64 probabilities can hold


def test_bigram_and_unigram_against_brute_force():
  source = train.zipf_hmm(4, vocab_size=4, num_states=3, num_successors=2)
  pi, transitions, emissions = source
  np.testing.assert_allclose(pi @ transitions, pi, atol=1e-13)
  np.testing.assert_allclose(pi.sum(), 1.0, rtol=1e-13)
  words = np.array([2, 0, 3, 3, 1])
  unigram = np.array([sum(pi[s] * emissions[s, w] for s in range(3)) for w in range(4)])
  np.testing.assert_allclose(train.unigram_log_probs(source, words), np.log(unigram[words]))
  expected = [np.log(unigram[words[0]])]
  for prev, word in zip(words[:-1], words[1:]):
    joint = sum(pi[s] * emissions[s, prev] * transitions[s, r] * emissions[r, word]
                for s in range(3) for r in range(3))
    expected.append(np.log(joint / unigram[prev]))
  np.testing.assert_allclose(train.bigram_log_probs(source, words), expected, rtol=1e-12)


def test_stationary_distribution_of_a_known_chain():
  transitions = np.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])  # periodic
  np.testing.assert_allclose(train.stationary_distribution(transitions), [0.25, 0.5, 0.25],
                             atol=1e-13)


def test_zipf_hmm_structure():
  source = train.zipf_hmm(0, vocab_size=50, num_states=8, num_successors=3, shared=0.25)
  np.testing.assert_allclose(source.transitions.sum(axis=1), 1.0, rtol=1e-13)
  np.testing.assert_allclose(source.emissions.sum(axis=1), 1.0, rtol=1e-13)
  np.testing.assert_array_equal(np.sum(source.transitions > 0, axis=1), 3)
  ring = source.transitions[np.arange(8), (np.arange(8) + 1) % 8]
  assert np.all(ring > 0)
  np.testing.assert_array_equal(np.diag(source.transitions), 0.0)  # no self-loops
  np.testing.assert_allclose(source.transitions.sum(axis=0), 1.0, atol=1e-12)  # doubly stochastic
  np.testing.assert_allclose(source.initial, 1 / 8, atol=1e-12)
  np.testing.assert_allclose(source.initial @ source.transitions, source.initial, atol=1e-14)
  assert np.all(source.emissions > 0)  # every state can emit every word
  # Word 0 is the most frequent shared word: at least 0.25 * z_0 in every state.
  zipf = np.arange(1, 51) ** -1.5
  np.testing.assert_array_less(0.25 * zipf[0] / zipf.sum(), source.emissions[:, 0] + 1e-15)


def test_sampling_is_deterministic_by_seed_and_follows_the_source():
  source = train.zipf_hmm(0, vocab_size=20, num_states=4, num_successors=2)
  a = train.hmm_sample(source, 20_000, 7)
  np.testing.assert_array_equal(a, train.hmm_sample(source, 20_000, 7))
  assert not np.array_equal(a, train.hmm_sample(source, 20_000, 8))
  assert a.dtype == np.int32
  unigram = source.initial @ source.emissions
  observed = np.bincount(a, minlength=20) / a.size
  # Markov dependence inflates the variance over the i.i.d. one; allow 6 i.i.d. sigmas.
  np.testing.assert_array_less(np.abs(observed - unigram), 6 * np.sqrt(unigram / a.size) + 1e-3)
  # The sample's exact cross-entropy is close to that of a second sample (the entropy rate).
  b = train.hmm_sample(source, 20_000, 9)
  np.testing.assert_allclose(train.hmm_log_probs(source, a).mean(),
                             train.hmm_log_probs(source, b).mean(), rtol=0.03)


def test_corpus_is_deterministic_by_seed_and_splits_independent():
  small = dict(train_length=3000, valid_length=500, test_length=700, vocab_size=40, num_states=6)
  a = train.synthetic_corpus(5, **small)
  b = train.synthetic_corpus(5, **small)
  for split in ("train", "valid", "test"):
    np.testing.assert_array_equal(getattr(a, split), getattr(b, split))
  assert a.vocab == b.vocab
  assert a.best_perplexity == b.best_perplexity
  c = train.synthetic_corpus(6, **small)
  assert not np.array_equal(a.words["test"], c.words["test"])
  longer = train.synthetic_corpus(5, **{**small, "train_length": 4000})
  np.testing.assert_array_equal(a.words["test"], longer.words["test"])
  np.testing.assert_array_equal(longer.words["train"][:3000], a.words["train"])  # a prefix


def test_corpus_vocabulary_and_ids():
  corpus = train.synthetic_corpus(1, train_length=5000, valid_length=800, test_length=800,
                                  vocab_size=30, num_states=5)
  assert isinstance(corpus, train.Corpus)
  vocab = corpus.vocab
  assert np.all(np.diff(vocab.counts) <= 0)
  assert vocab.eos_id is None
  assert corpus.level == "word"
  for split in ("train", "valid", "test"):
    ids = getattr(corpus, split)
    assert ids.dtype == np.int32
    words = [f"w{w}" for w in corpus.words[split]]
    expected = [w if w in vocab else "<unk>" for w in words]
    assert vocab.decode(ids) == expected
  counts = np.bincount(corpus.train, minlength=len(vocab))
  np.testing.assert_array_equal(counts, vocab.counts)
  best = np.exp(-train.hmm_log_probs(corpus.source, corpus.words["test"]).mean())
  np.testing.assert_allclose(corpus.best_perplexity, best, rtol=1e-12)
  unigram = np.exp(-train.unigram_log_probs(corpus.source, corpus.words["test"]).mean())
  np.testing.assert_allclose(corpus.unigram_perplexity, unigram, rtol=1e-12)


def test_default_corpus_has_a_clear_gap_and_longer_dependencies():
  corpus = train.synthetic_corpus()
  assert [ids.size for ids in corpus.splits().values()] == [500_000, 50_000, 50_000]
  assert len(corpus.vocab) == 501  # all 500 words occur in training, plus an unseen <unk>
  assert corpus.vocab.counts[corpus.vocab.unk_id] == 0
  assert corpus.unigram_perplexity >= 3 * corpus.best_perplexity
  # The last word alone leaves the state uncertain: the exact bigram is far from the best.
  assert corpus.bigram_perplexity >= 1.4 * corpus.best_perplexity
  np.testing.assert_allclose(corpus.best_valid_perplexity, corpus.best_perplexity, rtol=0.05)
  np.testing.assert_allclose(
      [corpus.best_perplexity, corpus.bigram_perplexity, corpus.unigram_perplexity],
      [20.44, 31.63, 74.62], rtol=1e-3)


@pytest.mark.parametrize("seed", [1, 2])
def test_other_seeds_keep_the_gaps(seed):
  corpus = train.synthetic_corpus(seed, train_length=1000, valid_length=1000, test_length=20_000)
  assert corpus.unigram_perplexity >= 2.5 * corpus.best_perplexity
  assert corpus.bigram_perplexity >= 1.3 * corpus.best_perplexity


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_successors=40), "num_successors"),
    (dict(shared=1.5), "shared"),
    (dict(zipf_exponent=0.0), "zipf_exponent"),
    (dict(vocab_size=1), "vocab_size"),
])
def test_bad_source_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    train.zipf_hmm(0, **kwargs)


def test_bad_words_and_lengths():
  source = train.zipf_hmm(0, vocab_size=5, num_states=2, num_successors=1)
  with pytest.raises(ValueError, match=r"in \[0, 5\)"):
    train.hmm_log_probs(source, [0, 5])
  with pytest.raises(ValueError, match="integers"):
    train.hmm_log_probs(source, [0.0, 1.0])
  with pytest.raises(ValueError, match="test_length"):
    train.synthetic_corpus(0, test_length=0)
  with pytest.raises(ValueError, match="seed"):
    train.synthetic_corpus(-1)
