"""Tests of the class-based softmax against a float64 two-level softmax."""

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_alts
from softmax_alts import _lse


def _zipf(vocab_size):
  return np.round(1e4 / np.arange(1, vocab_size + 1)) + 1


def _inputs(key, layer, num_rows, hidden_size, vocab_size, dtype=jnp.float32):
  """Random params (shaped as `init` makes them), hidden and targets, drawn with numpy."""
  rng = np.random.default_rng(vocab_size)
  shapes = jax.eval_shape(lambda k: layer.init(k, hidden_size, vocab_size), key)
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), dtype), shapes)
  hidden = jnp.asarray(2.0 * rng.normal(size=(num_rows, hidden_size)), dtype)
  targets = jnp.asarray(rng.integers(0, vocab_size, size=num_rows), jnp.int32)
  return params, hidden, targets


def _reference(params, hidden, bounds):
  """log p(c|h) + log p(w|c,h) for every w, with explicit per-class softmaxes in float64."""
  h = np.asarray(hidden, np.float64)
  class_logits = h @ np.asarray(params.class_weights, np.float64).T + np.asarray(
      params.class_bias, np.float64)
  class_lp = class_logits - np.logaddexp.reduce(class_logits, axis=1, keepdims=True)
  word_logits = h @ np.asarray(params.word_weights, np.float64).T + np.asarray(
      params.word_bias, np.float64)
  out = np.zeros_like(word_logits)
  for c in range(len(bounds) - 1):
    block = word_logits[:, bounds[c]:bounds[c + 1]]
    out[:, bounds[c]:bounds[c + 1]] = (block - np.logaddexp.reduce(block, axis=1, keepdims=True)
                                       + class_lp[:, c:c + 1])
  return out


@pytest.mark.parametrize("vocab_size,num_classes",
                         [(1, 1), (2, 1), (2, 2), (3, 2), (17, 1), (17, 4), (17, 17), (1000, 32)])
def test_normalized_and_consistent(key, vocab_size, num_classes):
  counts = _zipf(vocab_size)
  layer = softmax_alts.class_based(counts, num_classes)
  params, hidden, targets = _inputs(key, layer, 6, 8, vocab_size)
  log_probs = np.asarray(layer.log_probs(params, hidden))
  log_prob = np.asarray(layer.log_prob(params, hidden, targets))
  loss = np.asarray(layer.loss(params, hidden, targets))
  assert log_probs.shape == (6, vocab_size) and log_prob.shape == loss.shape == (6,)
  np.testing.assert_allclose(np.logaddexp.reduce(log_probs, axis=1), 0.0, atol=1e-5)
  np.testing.assert_allclose(log_prob, log_probs[np.arange(6), np.asarray(targets)],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(loss, -log_prob)
  reference = _reference(params, hidden, softmax_alts.frequency_classes(counts, num_classes))
  np.testing.assert_allclose(log_probs, reference, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(log_prob, reference[np.arange(6), np.asarray(targets)],
                             rtol=1e-5, atol=1e-5)


def test_frequency_classes_bin_by_cumulative_mass():
  counts = np.full(100, 3.0)
  np.testing.assert_array_equal(softmax_alts.frequency_classes(counts, 4), [0, 25, 50, 75, 100])
  counts = _zipf(10000)
  bounds = softmax_alts.frequency_classes(counts, 50)
  assert bounds[0] == 0 and bounds[-1] == 10000 and np.all(np.diff(bounds) >= 1)
  total = counts.sum()
  mass = np.add.reduceat(counts, bounds[:-1]) / total
  sizes = np.diff(bounds)
  last_word = counts[bounds[1:] - 1] / total
  # A class overshoots its share by at most its last word (or is a single frequent word).
  assert np.all((mass <= 1 / 50 + last_word + 1e-12) | (sizes == 1))
  # Past the frequent head (single-word classes), each class holds its share up to the words
  # that cross its two boundaries.
  first_word_before = counts[bounds[:-1] - 1] / total
  settled = np.arange(50) > np.nonzero(sizes == 1)[0].max() + 1
  assert settled.sum() > 25
  assert np.all(np.abs(mass - 1 / 50)[settled]
                <= (first_word_before + last_word)[settled] + 1e-12)
  # Rare words are in big classes, frequent words in small ones.
  assert np.diff(bounds)[-1] > 100 * np.diff(bounds)[1]
  # Mikolov's rule with no adjustment needed: class = floor(C * mass before the word).
  before = np.concatenate([[0.0], np.cumsum(counts)[:-1]]) / counts.sum()
  expected = np.minimum(np.floor(50 * before), 49).astype(int)
  got = np.repeat(np.arange(50), np.diff(bounds))
  differs = np.nonzero(expected != got)[0]
  assert differs.size > 0  # the head is moved: classes of one word each, none empty
  assert np.all(differs < bounds[np.argmax(settled)])  # only the head


def test_frequency_classes_are_never_empty():
  bounds = softmax_alts.frequency_classes([1000, 1, 1, 1, 1], 4)
  np.testing.assert_array_equal(bounds, [0, 1, 2, 3, 5])
  bounds = softmax_alts.frequency_classes([0, 0, 0, 0], 2)  # no counts: uniform
  np.testing.assert_array_equal(bounds, [0, 2, 4])
  bounds = softmax_alts.frequency_classes([5, 4, 3], 3)
  np.testing.assert_array_equal(bounds, [0, 1, 2, 3])


def test_loss_only_touches_the_target_class(key):
  """Nothing of size N * V (all logits) or N * M * H (every row's class padded to the largest,
  M words, and gathered) is built: the loss works in `[B, T]` pairs of class-sorted rows."""
  vocab_size, num_rows, hidden_size = 2000, 64, 32
  layer = softmax_alts.class_based(np.ones(vocab_size), 40, strategy="stream")  # 40 of 50 words
  params, hidden, targets = _inputs(key, layer, num_rows, hidden_size, vocab_size)
  for fn in (lambda p, h: layer.loss(p, h, targets),
             jax.grad(lambda p, h: jnp.sum(layer.loss(p, h, targets)), argnums=1)):
    jaxpr = jax.make_jaxpr(fn)(params, hidden).jaxpr

    def sizes(jaxpr):
      for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          yield from sizes(sub)
        yield from (int(np.prod(v.aval.shape)) for v in eqn.outvars)

    # the largest arrays are the [V, H] gradient of the table and the kept [B, T] logits of
    # the pairs (about (V + 2 N B) T floats, fewer than V H here)
    assert max(sizes(jaxpr)) <= vocab_size * hidden_size < num_rows * 50 * hidden_size


def _reference_grads(params, hidden, targets, bounds):
  """Gradients of sum_n c_n log p(t_n) in float64 by autodiff of a dense two-level softmax."""
  class_of = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
  same = jnp.asarray(class_of[np.asarray(targets)][:, None] == class_of[None, :])
  weights = jnp.linspace(0.5, 1.5, hidden.shape[0], dtype=jnp.float64)

  def objective(params, hidden):
    class_logits = hidden @ params.class_weights.T + params.class_bias[None, :]
    word_logits = hidden @ params.word_weights.T + params.word_bias[None, :]
    rows = jnp.arange(hidden.shape[0])
    log_p = (jax.nn.log_softmax(class_logits)[rows, class_of[np.asarray(targets)]]
             + word_logits[rows, targets]
             - jax.nn.logsumexp(jnp.where(same, word_logits, -jnp.inf), axis=1))
    return jnp.sum(weights * log_p)

  return jax.grad(objective, argnums=(0, 1))(params, hidden)


@pytest.mark.parametrize("tile,block", [(1, 16), (3, 7), (64, 5)])
def test_tiles_and_blocks_of_any_size(key, tile, block):
  """Values and gradients equal a dense float64 reference whatever the tiling: tiles that span
  many classes, blocks that cut classes, a last block clamped to the end of the table."""
  counts = _zipf(300)
  layer = softmax_alts.class_based(counts, 17, tile_rows=tile, block_rows=block,
                                   strategy="stream")
  params, hidden, targets = _inputs(key, layer, 37, 8, 300)
  value, grads = jax.value_and_grad(
      lambda p, h: jnp.sum(jnp.linspace(0.5, 1.5, 37) * -layer.loss(p, h, targets)),
      argnums=(0, 1))(params, hidden)
  bounds = softmax_alts.frequency_classes(counts, 17)
  expected = _reference(params, hidden, bounds)[np.arange(37), np.asarray(targets)]
  np.testing.assert_allclose(value, np.sum(np.linspace(0.5, 1.5, 37) * expected), rtol=1e-5)
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
    expected_grads = _reference_grads(to64(params), to64(hidden), targets, bounds)
  chex.assert_trees_all_close(grads, jax.tree.map(np.asarray, expected_grads),
                              rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_classes,tile,block", [(1, 4, 32), (3, 2, 16)])
def test_pairs_beyond_the_kept_logits(key, num_classes, tile, block):
  """Where many rows share large classes, the pairs outnumber the logits kept for the backward
  pass, which recomputes the rest: values and gradients still equal the float64 reference
  (one class or a few, classes of many blocks, V = 300 not a multiple of the block)."""
  counts = np.ones(300)  # equal counts: classes of 300 / C words
  layer = softmax_alts.class_based(counts, num_classes, tile_rows=tile, block_rows=block,
                                   strategy="stream")
  params, hidden, targets = _inputs(key, layer, 37, 8, 300)
  bounds = softmax_alts.frequency_classes(counts, num_classes)
  lo = np.sort(bounds[np.searchsorted(bounds, np.asarray(targets), side="right") - 1])
  hi = bounds[np.searchsorted(bounds, lo, side="right")]
  fill = np.full(tile, 300)
  pairs = _lse._pairs(jnp.asarray(np.concatenate([lo, fill]), jnp.int32),
                      jnp.asarray(np.concatenate([hi, fill]), jnp.int32),
                      tile, block, 300, 37, 300 // num_classes)
  assert int(pairs.count) > _lse._capacity(pairs, tile, block, 300, 37)
  weights = np.linspace(0.5, 1.5, 37)
  value, grads = jax.value_and_grad(
      lambda p, h: jnp.sum(weights * -layer.loss(p, h, targets)), argnums=(0, 1))(params, hidden)
  expected = _reference(params, hidden, bounds)[np.arange(37), np.asarray(targets)]
  np.testing.assert_allclose(value, np.sum(weights * expected), rtol=1e-5)
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
    expected_grads = _reference_grads(to64(params), to64(hidden), targets, bounds)
  chex.assert_trees_all_close(grads, jax.tree.map(np.asarray, expected_grads),
                              rtol=1e-4, atol=1e-5)


def test_init(key):
  layer = softmax_alts.class_based(_zipf(300), 10)
  params = layer.init(key, 64, 300)
  chex.assert_shape([params.class_weights, params.class_bias, params.word_weights,
                     params.word_bias], [(10, 64), (10,), (300, 64), (300,)])
  for weights in (params.class_weights, params.word_weights):
    assert 0.9 / 8 < np.abs(weights).max() <= 1 / 8  # uniform in +-1/sqrt(H)
  np.testing.assert_array_equal(params.word_bias, 0.0)
  assert layer.init(key, 4, 300, dtype=jnp.float16).word_weights.dtype == jnp.float16


@pytest.mark.parametrize("num_classes", [0, 18, 2.5, None])
def test_bad_num_classes(num_classes):
  with pytest.raises(ValueError, match="num_classes.*17"):
    softmax_alts.class_based(_zipf(17), num_classes)


def test_bad_config(key):
  with pytest.raises(ValueError, match="counts"):
    softmax_alts.class_based(np.ones((3, 3)), 2)
  with pytest.raises(ValueError, match="counts"):
    softmax_alts.class_based([3, -1], 1)
  layer = softmax_alts.class_based(_zipf(17), 4)
  with pytest.raises(ValueError, match="vocab_size.*17.*got 16"):
    layer.init(key, 4, 16)
  params, _, targets = _inputs(key, layer, 3, 4, 17)
  with pytest.raises(ValueError, match="class_weights"):
    layer.loss(params, jnp.zeros((3, 5)), targets)
