"""Tests for `train.sample` and `train.beam_search` on toy models with known distributions."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import train

V = 4


def _markov_table(seed, vocab_size=V):
  """`[V, V]` log-probabilities of a first-order Markov chain: row i is p(. | i)."""
  logits = 2.0 * jax.random.normal(jax.random.key(seed), (vocab_size, vocab_size))
  return jax.nn.log_softmax(logits, axis=-1)


def _markov_step(table):
  """A step function whose next-token log-probs are `table[token]`; the state counts steps."""

  def step_fn(count_B, token_B):
    return count_B + 1, table[token_B]

  return step_fn


def _second_order_model(seed, vocab_size=3):
  """A step function whose log-probs depend on the state (previous token and a float memory).

  Beam search must gather both state leaves from the right parents to match brute force.
  """
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  table = 2.0 * jax.random.normal(k1, (vocab_size, vocab_size, vocab_size))
  emb = jax.random.normal(k2, (vocab_size, 2))
  out = jax.random.normal(k3, (2, vocab_size))

  def step_fn(state, token_B):
    prev_B, h_Bx2 = state
    h_Bx2 = jnp.tanh(0.5 * h_Bx2 + emb[token_B])
    log_probs = jax.nn.log_softmax(table[prev_B, token_B] + h_Bx2 @ out, axis=-1)
    return (token_B, h_Bx2), log_probs

  def initial_state(batch_size):
    return (jnp.zeros((batch_size,), jnp.int32), jnp.zeros((batch_size, 2), jnp.float32))

  return step_fn, initial_state


def _sample(step_fn, state, prompt, num_tokens, key, **kwargs):
  """`train.sample` under one `jax.jit` (eager calls compile every op on its own)."""
  fn = jax.jit(lambda s, p, k: train.sample(step_fn, s, p, num_tokens, key=k, **kwargs))
  return fn(state, prompt, key)


def _beam_search(step_fn, state, prompt, num_tokens, **kwargs):
  """`train.beam_search` under one `jax.jit`."""
  fn = jax.jit(lambda s, p: train.beam_search(step_fn, s, p, num_tokens, **kwargs))
  return fn(state, prompt)


def _greedy_path(table, last_token, num_tokens):
  path, token = [], int(last_token)
  for _ in range(num_tokens):
    token = int(np.argmax(np.asarray(table[token])))
    path.append(token)
  return path


def _score_all(step_fn, state, prompt_row, sequences, eos_id=None):
  """Sum of log-probs of every sequence (`[S, T]`) after one prompt, by a Python loop.

  With `eos_id`, tokens after the first eos add nothing; returns `(scores [S], lengths [S])`.
  """
  step_fn = jax.jit(step_fn)
  num = sequences.shape[0]
  state = jax.tree.map(lambda leaf: jnp.repeat(leaf[:1], num, axis=0), state)
  for token in prompt_row[:-1]:
    state, _ = step_fn(state, jnp.full((num,), token, jnp.int32))
  token = jnp.full((num,), prompt_row[-1], jnp.int32)
  scores = np.zeros(num)
  done = np.zeros(num, bool)
  lengths = np.zeros(num, int)
  for t in range(sequences.shape[1]):
    state, log_probs = step_fn(state, token)
    token = jnp.asarray(sequences[:, t], jnp.int32)
    step_lp = np.asarray(log_probs)[np.arange(num), sequences[:, t]]
    scores += np.where(done, 0.0, step_lp)
    lengths += ~done
    if eos_id is not None:
      done |= sequences[:, t] == eos_id
  return scores, lengths


def _canonical(sequences, eos_id):
  """True for sequences whose tokens after the first eos are all eos."""
  keep = []
  for seq in sequences:
    hits = np.flatnonzero(seq == eos_id)
    keep.append(hits.size == 0 or np.all(seq[hits[0]:] == eos_id))
  return np.array(keep)


# ---------------------------------------------------------------------------------------------
# sample


@pytest.mark.parametrize("mode", ["top_k=1", "temperature=0"])
def test_greedy_sampling_follows_the_argmax_path(mode):
  table = _markov_table(0)
  prompt = jnp.array([[0, 1], [2, 3], [3, 0]], jnp.int32)
  kwargs = {"top_k": 1} if mode == "top_k=1" else {"temperature": 0.0}
  tokens = _sample(_markov_step(table), jnp.zeros((3,), jnp.int32), prompt, 6,
                   jax.random.key(1), **kwargs)
  chex.assert_shape(tokens, (3, 6))
  assert tokens.dtype == jnp.int32
  for b in range(3):
    np.testing.assert_array_equal(tokens[b], _greedy_path(table, prompt[b, -1], 6))


@pytest.mark.parametrize("temperature, top_k", [(0.5, None), (2.0, 3)])
def test_first_token_frequencies_match_the_scaled_truncated_distribution(temperature, top_k):
  table = _markov_table(2)
  num = 20000
  prompt = jnp.full((num, 1), 1, jnp.int32)
  tokens = _sample(_markov_step(table), jnp.zeros((num,), jnp.int32), prompt, 1,
                   jax.random.key(3), temperature=temperature, top_k=top_k)
  logits = np.asarray(table[1], np.float64) / temperature
  if top_k is not None:
    logits[np.argsort(-logits)[top_k:]] = -np.inf
  expected = np.exp(logits - logits.max())
  expected /= expected.sum()
  counts = np.bincount(np.asarray(tokens[:, 0]), minlength=V)
  assert np.all(counts[expected == 0] == 0), (counts, expected)
  support = expected > 0
  _, p_value = stats.chisquare(counts[support], num * expected[support])
  assert p_value > 1e-3, (observed, expected)


def test_joint_frequencies_of_two_tokens_follow_the_chain():
  # Each step draws with its own key: the pair (x_0, x_1) has law p(x_0 | 2) p(x_1 | x_0).
  table = _markov_table(4)
  num = 20000
  prompt = jnp.full((num, 1), 2, jnp.int32)
  tokens = np.asarray(_sample(_markov_step(table), jnp.zeros((num,), jnp.int32), prompt, 2,
                              jax.random.key(5)))
  p = np.exp(np.asarray(table, np.float64))
  expected = (p[2][:, None] * p).reshape(-1)
  counts = np.bincount(tokens[:, 0] * V + tokens[:, 1], minlength=V * V)
  support = expected * num > 5
  observed = counts[support]
  expected = observed.sum() * expected[support] / expected[support].sum()
  _, p_value = stats.chisquare(observed, expected)
  assert p_value > 1e-3, (observed, expected)


def test_sampling_is_deterministic_per_key_and_varies_across_keys():
  table = _markov_table(6)
  step_fn, state = _markov_step(table), jnp.zeros((64,), jnp.int32)
  prompt = jnp.zeros((64, 1), jnp.int32)
  fn = jax.jit(lambda k: train.sample(step_fn, state, prompt, 8, key=k))
  a, b, c = fn(jax.random.key(7)), fn(jax.random.key(7)), fn(jax.random.key(8))
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))


def test_sampling_pads_with_eos_after_the_first_eos():
  # Token 0 is the eos; from 0 the chain usually moves on, so padding is the sampler's doing.
  logits = jnp.array([[-5.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0],
                      [1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
  table = jax.nn.log_softmax(logits, axis=-1)
  num, steps = 512, 10
  prompt = jnp.full((num, 1), 1, jnp.int32)
  state = jnp.zeros((num,), jnp.int32)
  padded = np.asarray(_sample(_markov_step(table), state, prompt, steps, jax.random.key(9),
                              eos_id=0))
  free = np.asarray(_sample(_markov_step(table), state, prompt, steps, jax.random.key(9)))
  has_eos = (padded == 0).any(axis=1)
  assert has_eos.mean() > 0.9
  first = np.argmax(padded == 0, axis=1)
  after = np.arange(steps)[None, :] >= first[:, None]
  assert np.all(padded[has_eos][after[has_eos]] == 0)
  # Up to and including the first eos both runs drew the same tokens (same keys, same chain).
  np.testing.assert_array_equal(np.where(after, 0, padded), np.where(after, 0, free))
  # Without eos_id the chain leaves state 0 again.
  assert np.any(np.where(after, free, 0)[has_eos] != 0)


def test_sample_jit_equals_eager():
  step_fn, initial_state = _second_order_model(10)
  prompt = jnp.array([[0, 1, 2], [2, 2, 1]], jnp.int32)
  kwargs = dict(temperature=0.8, top_k=2, eos_id=1)
  eager = train.sample(step_fn, initial_state(2), prompt, 7, key=jax.random.key(11), **kwargs)
  jitted = _sample(step_fn, initial_state(2), prompt, 7, jax.random.key(11), **kwargs)
  np.testing.assert_array_equal(eager, jitted)


def test_sample_rejects_bad_arguments():
  table = _markov_table(0)
  step_fn, state = _markov_step(table), jnp.zeros((2,), jnp.int32)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="prompt"):
    train.sample(step_fn, state, jnp.zeros((2, 0), jnp.int32), 3, key=key)
  with pytest.raises(ValueError, match="state"):
    train.sample(step_fn, jnp.zeros((3,), jnp.int32), jnp.zeros((2, 1), jnp.int32), 3, key=key)
  with pytest.raises(ValueError, match="top_k"):
    train.sample(step_fn, state, jnp.zeros((2, 1), jnp.int32), 3, key=key, top_k=V + 1)
  with pytest.raises(ValueError, match="temperature"):
    train.sample(step_fn, state, jnp.zeros((2, 1), jnp.int32), 3, key=key, temperature=-1.0)
  with pytest.raises(ValueError, match="eos_id"):
    train.sample(step_fn, state, jnp.zeros((2, 1), jnp.int32), 3, key=key, eos_id=V)


# ---------------------------------------------------------------------------------------------
# beam_search


def test_exhaustive_beam_search_equals_brute_force():
  step_fn, initial_state = _second_order_model(12)
  vocab_size, steps = 3, 3
  prompt = jnp.array([[0, 2], [1, 1]], jnp.int32)
  beam = vocab_size ** steps
  seqs, scores = _beam_search(step_fn, initial_state(2), prompt, steps, beam_size=beam)
  chex.assert_shape(seqs, (2, beam, steps))
  chex.assert_shape(scores, (2, beam))
  all_seqs = np.array(list(itertools.product(range(vocab_size), repeat=steps)))
  for b in range(2):
    brute, _ = _score_all(step_fn, initial_state(2), np.asarray(prompt[b]), all_seqs)
    order = np.argsort(-brute)
    np.testing.assert_array_equal(seqs[b, 0], all_seqs[order[0]])
    # Every continuation appears once, best first, with its exact score.
    np.testing.assert_array_equal(seqs[b], all_seqs[order])
    np.testing.assert_allclose(scores[b], brute[order], rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(np.asarray(scores[b])) <= 0)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_exhaustive_beam_search_with_eos_equals_brute_force(length_penalty):
  step_fn, initial_state = _second_order_model(13)
  vocab_size, steps, eos = 3, 3, 0
  prompt = jnp.array([[0, 2], [1, 1]], jnp.int32)
  beam = vocab_size ** steps
  seqs, scores = _beam_search(step_fn, initial_state(2), prompt, steps, beam_size=beam,
                              eos_id=eos, length_penalty=length_penalty)
  all_seqs = np.array(list(itertools.product(range(vocab_size), repeat=steps)))
  canon = all_seqs[_canonical(all_seqs, eos)]
  for b in range(2):
    log_p, lengths = _score_all(step_fn, initial_state(2), np.asarray(prompt[b]), canon,
                                eos_id=eos)
    brute = log_p / ((5.0 + lengths) / 6.0) ** length_penalty
    order = np.argsort(-brute)
    finite = np.isfinite(np.asarray(scores[b]))
    assert finite.sum() == len(canon)  # the rest of the beams could not be filled
    np.testing.assert_array_equal(seqs[b][finite], canon[order])
    np.testing.assert_allclose(scores[b][finite], brute[order], rtol=1e-5, atol=1e-5)


def test_beam_size_one_is_greedy():
  table = _markov_table(14)
  prompt = jnp.array([[0], [1], [3]], jnp.int32)
  state = jnp.zeros((3,), jnp.int32)
  seqs, scores = _beam_search(_markov_step(table), state, prompt, 5, beam_size=1)
  greedy = _sample(_markov_step(table), state, prompt, 5, jax.random.key(0), top_k=1)
  np.testing.assert_array_equal(seqs[:, 0], greedy)
  for b in range(3):
    path = [int(prompt[b, 0])] + list(np.asarray(greedy[b]))
    expected = sum(float(table[i, j]) for i, j in zip(path[:-1], path[1:]))
    np.testing.assert_allclose(scores[b, 0], expected, rtol=1e-6)


def test_small_beam_finds_sequences_with_their_scores():
  # A beam narrower than the search space: each returned sequence still scores its exact sum.
  step_fn, initial_state = _second_order_model(15, vocab_size=5)
  prompt = jnp.array([[4, 0, 3]], jnp.int32)
  seqs, scores = _beam_search(step_fn, initial_state(1), prompt, 6, beam_size=3)
  brute, _ = _score_all(step_fn, initial_state(1), np.asarray(prompt[0]), np.asarray(seqs[0]))
  np.testing.assert_allclose(scores[0], brute, rtol=1e-5)
  assert len({tuple(s) for s in np.asarray(seqs[0])}) == 3
  assert np.all(np.diff(np.asarray(scores[0])) <= 0)


def test_beam_search_jit_equals_eager():
  step_fn, initial_state = _second_order_model(16)
  prompt = jnp.array([[0, 1], [2, 0]], jnp.int32)
  kwargs = dict(beam_size=4, eos_id=2, length_penalty=0.6)
  eager = train.beam_search(step_fn, initial_state(2), prompt, 5, **kwargs)
  jitted = _beam_search(step_fn, initial_state(2), prompt, 5, **kwargs)
  np.testing.assert_array_equal(eager[0], jitted[0])
  np.testing.assert_allclose(eager[1], jitted[1], rtol=1e-6)


def test_beam_search_rejects_bad_arguments():
  step_fn, state = _markov_step(_markov_table(0)), jnp.zeros((2,), jnp.int32)
  prompt = jnp.zeros((2, 1), jnp.int32)
  with pytest.raises(ValueError, match="beam_size"):
    train.beam_search(step_fn, state, prompt, 3, beam_size=0)
  with pytest.raises(ValueError, match="num_tokens"):
    train.beam_search(step_fn, state, prompt, 0, beam_size=2)
  with pytest.raises(ValueError, match="prompt"):
    train.beam_search(step_fn, state, jnp.zeros((2, 1), jnp.float32), 3, beam_size=2)
