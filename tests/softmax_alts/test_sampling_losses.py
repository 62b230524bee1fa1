"""Tests of sampled softmax, NCE and negative sampling against the published formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_alts
from tests.softmax_alts._util import full_inputs


SCALE = 1.0


def _inputs(key, num_rows, hidden_size, vocab_size, dtype=jnp.float32):
  return full_inputs(key, num_rows, hidden_size, vocab_size, scale=SCALE, dtype=dtype)


def _fixed(sampler, ids):
  """The same sampler, except that it always draws `ids`."""
  ids = jnp.asarray(ids, jnp.int32)
  return sampler._replace(sample=lambda key, num_samples, targets=None: ids)


def _np_scores(params, hidden):
  return (np.asarray(hidden, np.float64) @ np.asarray(params.w, np.float64).T
          + np.asarray(params.b, np.float64)[None, :])


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _np_sampled(params, hidden, targets, ids, log_q, remove_hits=True):
  """TensorFlow's sampled_softmax_loss, transcribed: softmax over [true, sampled] logits."""
  s = _np_scores(params, hidden)
  losses = []
  for n, t in enumerate(np.asarray(targets)):
    z_t = s[n, t] - log_q[t]
    z_s = np.array([s[n, j] - log_q[j] for j in ids if not (remove_hits and j == t)])
    all_z = np.concatenate([[z_t], z_s])
    losses.append(np.log(np.exp(all_z - all_z.max()).sum()) + all_z.max() - z_t)
  return np.array(losses)


def _np_nce(params, hidden, targets, ids, log_kq, remove_hits=False):
  """Mnih and Teh (2012): -log s(s_t - log kq_t) - sum_j log s(-(s_j - log kq_j))."""
  s = _np_scores(params, hidden)
  losses = []
  for n, t in enumerate(np.asarray(targets)):
    loss = -_np_log_sigmoid(s[n, t] - log_kq[t])
    for j in ids:
      if not (remove_hits and j == t):
        loss -= _np_log_sigmoid(-(s[n, j] - log_kq[j]))
    losses.append(loss)
  return np.array(losses)


VOCAB = 30
IDS = [4, 0, 17, 4, 29, 11]


def test_sampled_matches_transcription(key):
  params, hidden, targets = _inputs(key, 7, 5, VOCAB)
  targets = targets.at[0].set(17).at[1].set(4)  # Accidental hits, one of them twice.
  base = softmax_alts.log_uniform(VOCAB)
  log_q = np.log(np.asarray(base.expected_count(jnp.arange(VOCAB), len(IDS)), np.float64))
  for remove in (True, False):
    layer = softmax_alts.sampled(len(IDS), _fixed(base, IDS), remove_accidental_hits=remove)
    loss = jax.jit(layer.loss)(params, hidden, targets, key=key)
    np.testing.assert_allclose(loss, _np_sampled(params, hidden, targets, IDS, log_q, remove),
                               rtol=1e-5, atol=1e-6)
  plain = softmax_alts.sampled(len(IDS), _fixed(base, IDS), subtract_log_q=False)
  np.testing.assert_allclose(
      jax.jit(plain.loss)(params, hidden, targets, key=key),
      _np_sampled(params, hidden, targets, IDS, np.zeros(VOCAB)), rtol=1e-5, atol=1e-6)


def test_given_negatives_match_the_transcription(key):
  """The caller's negatives and expected counts (TensorFlow's `sampled_values`) replace the
  draw: any ids, any counts, no key; the row-sparse path takes them too."""
  params, hidden, targets = _inputs(key, 7, 5, VOCAB)
  targets = targets.at[0].set(17)
  rng = np.random.default_rng(3)
  counts = rng.uniform(0.1, 2.0, VOCAB)  # some proposal's expected counts, one per id
  negatives = softmax_alts.Negatives(jnp.asarray(IDS), jnp.asarray(counts[IDS], jnp.float32),
                                     jnp.asarray(counts[np.asarray(targets)], jnp.float32))
  layer = softmax_alts.sampled(3, softmax_alts.uniform(VOCAB))  # k and sampler unused here
  expected = _np_sampled(params, hidden, targets, IDS, np.log(counts))
  np.testing.assert_allclose(jax.jit(lambda *a: layer.loss(*a, negatives=negatives))(
      params, hidden, targets), expected, rtol=1e-5, atol=1e-6)
  loss, _, rows = softmax_alts.sparse_loss_and_grads(layer, params, hidden, targets,
                                                     negatives=negatives)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(rows.ids, np.concatenate([targets, IDS]))
  # Per example, and without counts where the loss has no log Q correction.
  per_example = jnp.asarray(rng.integers(0, VOCAB, (7, 4)), jnp.int32)
  ns = softmax_alts.negative_sampling(4, softmax_alts.uniform(VOCAB))
  got = ns.loss(params, hidden, targets, negatives=softmax_alts.Negatives(per_example))
  for n in range(7):
    np.testing.assert_allclose(got[n], _np_nce(params, hidden[n:n + 1], targets[n:n + 1],
                                               list(np.asarray(per_example[n])),
                                               np.zeros(VOCAB))[0], rtol=1e-5)
  with pytest.raises(ValueError, match="negatives.expected_counts.*log Q"):
    layer.loss(params, hidden, targets, negatives=softmax_alts.Negatives(jnp.asarray(IDS)))
  with pytest.raises(ValueError, match="negatives.ids.*N = 7"):
    ns.loss(params, hidden, targets, negatives=softmax_alts.Negatives(per_example[:3]))
  with pytest.raises(ValueError, match="negatives.*Negatives"):
    ns.loss(params, hidden, targets, negatives=IDS)


@pytest.mark.parametrize("remove", [False, True])
def test_nce_matches_transcription(key, remove):
  params, hidden, targets = _inputs(key, 7, 5, VOCAB)
  targets = targets.at[0].set(17)
  base = softmax_alts.unigram(np.arange(VOCAB, 0, -1).astype(np.float64))
  log_kq = np.log(np.asarray(base.expected_count(jnp.arange(VOCAB), len(IDS)), np.float64))
  np.testing.assert_allclose(np.exp(log_kq),
                             len(IDS) * np.exp(np.asarray(base.log_probs(), np.float64)),
                             rtol=1e-5)  # With replacement, E[count] = k q.
  layer = softmax_alts.nce(len(IDS), _fixed(base, IDS), remove_accidental_hits=remove)
  np.testing.assert_allclose(jax.jit(layer.loss)(params, hidden, targets, key=key),
                             _np_nce(params, hidden, targets, IDS, log_kq, remove),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remove", [False, True])
def test_negative_sampling_matches_transcription(key, remove):
  params, hidden, targets = _inputs(key, 7, 5, VOCAB)
  targets = targets.at[3].set(0)
  layer = softmax_alts.negative_sampling(
      len(IDS), _fixed(softmax_alts.unigram(np.ones(VOCAB)), IDS), remove_accidental_hits=remove)
  np.testing.assert_allclose(jax.jit(layer.loss)(params, hidden, targets, key=key),
                             _np_nce(params, hidden, targets, IDS, np.zeros(VOCAB), remove),
                             rtol=1e-5, atol=1e-6)


def test_per_example_negatives(key):
  params, hidden, targets = _inputs(key, 5, 4, VOCAB)
  sampler = softmax_alts.log_uniform(VOCAB)
  log_q = np.log(np.asarray(sampler.expected_count(jnp.arange(VOCAB), 3), np.float64))
  keys = jax.random.split(key, 5)
  for make, reference in ((softmax_alts.sampled, _np_sampled), (softmax_alts.nce, _np_nce)):
    loss = jax.jit(make(3, sampler, shared=False).loss)(params, hidden, targets, key=key)
    for n in range(5):
      ids = np.asarray(sampler.sample(keys[n], 3)).tolist()
      expected = reference(params, hidden[n:n + 1], targets[n:n + 1], ids, log_q)
      np.testing.assert_allclose(loss[n], expected[0], rtol=1e-5)


def test_sampled_with_every_id_is_full_softmax(key):
  params, hidden, targets = _inputs(key, 9, 6, VOCAB)
  # Without replacement, k = V draws every id once and E[count] = 1: no correction remains.
  layer = softmax_alts.sampled(VOCAB, softmax_alts.uniform(VOCAB, unique=True))
  full = softmax_alts.full()
  np.testing.assert_allclose(jax.jit(layer.loss)(params, hidden, targets, key=key),
                             jax.jit(full.loss)(params, hidden, targets), rtol=1e-5)
  np.testing.assert_allclose(jax.jit(layer.log_probs)(params, hidden),
                             jax.jit(full.log_probs)(params, hidden))
  np.testing.assert_allclose(jax.jit(layer.log_prob)(params, hidden, targets),
                             jax.jit(full.log_prob)(params, hidden, targets))


def test_sampled_gradient_approaches_full_softmax(key):
  vocab_size = 200
  params, hidden, targets = _inputs(key, 16, 6, vocab_size)
  params = params._replace(w=3.0 * params.w)
  objective = lambda loss: (lambda h, k: jnp.mean(loss(params, h, targets, key=k)))
  exact = jax.jit(jax.grad(objective(softmax_alts.full().loss)), static_argnums=1)(hidden, None)
  errors = []
  for num_samples in (10, 40, 160):
    layer = softmax_alts.sampled(num_samples, softmax_alts.log_uniform(vocab_size, unique=True))
    grad = jax.jit(jax.grad(objective(layer.loss)))
    keys = jax.random.split(key, 8)
    errors.append(np.mean([float(jnp.linalg.norm(grad(hidden, k) - exact)) for k in keys]))
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < 0.5 * errors[0]


@pytest.mark.parametrize("make", [softmax_alts.sampled, softmax_alts.nce,
                                  softmax_alts.negative_sampling])
def test_accidental_hit_contributes_nothing(key, make):
  params, hidden, targets = _inputs(key, 4, 5, VOCAB)
  targets = jnp.array([2, 5, 2, 9], jnp.int32)
  params = params._replace(b=params.b.at[2].set(80.0))  # A huge logit for the hit.
  base = softmax_alts.uniform(VOCAB)
  with_hit = make(4, _fixed(base, [2, 6, 7, 8]), remove_accidental_hits=True)
  without = make(3, _fixed(base, [6, 7, 8]), remove_accidental_hits=True)
  loss_hit = jax.jit(with_hit.loss)(params, hidden, targets, key=key)
  loss_without = jax.jit(without.loss)(params, hidden, targets, key=key)
  assert np.all(np.isfinite(loss_hit))
  # Rows 0 and 2 (target 2) see the hit masked: the loss equals that without the sample,
  # up to the log Q correction, which depends on k (4 vs 3) for the remaining logits.
  if make is softmax_alts.negative_sampling:
    np.testing.assert_allclose(loss_hit[jnp.array([0, 2])], loss_without[jnp.array([0, 2])],
                               rtol=1e-6)
  else:
    log_q = np.log(np.asarray(base.expected_count(jnp.arange(VOCAB), 4), np.float64))
    reference = _np_sampled if make is softmax_alts.sampled else _np_nce
    np.testing.assert_allclose(
        loss_hit, reference(params, hidden, targets, [2, 6, 7, 8], log_q, True), rtol=1e-5)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(with_hit.loss(p, hidden, targets, key=key))))(
      params)
  assert np.all(np.isfinite(grads.w)) and np.all(np.isfinite(grads.b))


def test_trained_with_sampling_is_evaluated_by_full(key):
  """A model trained with sampled softmax lowers the exact NLL that `full()` reports."""
  vocab_size = 60
  k_inputs, k_loop = jax.random.split(key)
  params, hidden, targets = _inputs(k_inputs, 128, 8, vocab_size)
  layer = softmax_alts.sampled(8, softmax_alts.uniform(vocab_size))

  @jax.jit
  def step(p, k):
    grad = jax.grad(lambda p: jnp.mean(layer.loss(p, hidden, targets, key=k)))(p)
    return jax.tree.map(lambda a, g: a - 0.5 * g, p, grad), None

  trained = jax.lax.scan(step, params, jax.random.split(k_loop, 150))[0]
  full_loss = jax.jit(softmax_alts.full().loss)
  before = float(jnp.mean(full_loss(params, hidden, targets)))
  after = float(jnp.mean(full_loss(trained, hidden, targets)))
  assert after < before - 0.5
  np.testing.assert_allclose(jax.jit(layer.log_prob)(trained, hidden, targets),
                             -full_loss(trained, hidden, targets), rtol=1e-6)


def test_bad_inputs(key):
  params, hidden, targets = _inputs(key, 4, 3, 10)
  sampler = softmax_alts.uniform(10)
  for make in (softmax_alts.sampled, softmax_alts.nce, softmax_alts.negative_sampling):
    layer = make(3, sampler)
    with pytest.raises(ValueError, match="key.*required.*unless `negatives`"):
      layer.loss(params, hidden, targets)
    with pytest.raises(ValueError, match="id 10.*vocab_size = 10"):
      layer.loss(params, hidden, targets.at[1].set(10), key=key)
    loss = jax.jit(layer.loss)(params, hidden, targets.at[1].set(-1), key=key)
    assert np.isnan(loss[1]) and np.all(np.isfinite(loss[jnp.array([0, 2, 3])]))
    with pytest.raises(ValueError, match="vocab_size must equal V = 10"):
      make(3, softmax_alts.uniform(11)).loss(params, hidden, targets, key=key)
    with pytest.raises(ValueError, match="targets.*integer"):
      layer.loss(params, hidden, targets.astype(jnp.float32), key=key)
    with pytest.raises(ValueError, match="hidden.*H = 3"):
      layer.loss(params, hidden[:, :2], targets, key=key)
    for bad in (0, -1, 2.0):
      with pytest.raises(ValueError, match="num_samples.*positive int"):
        make(bad, sampler)
    with pytest.raises(ValueError, match="sampler.*Sampler"):
      make(3, "uniform")
    with pytest.raises(ValueError, match="chunk_size"):
      make(3, sampler, chunk_size=0)
  with pytest.raises(ValueError, match="num_samples.*at most 10"):
    softmax_alts.sampled(11, softmax_alts.uniform(10, unique=True)).loss(
        params, hidden, targets, key=key)
