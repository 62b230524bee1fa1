"""Tests of the language model: shapes, tying, dropout, config checks, stepping = unrolling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_alts
import train
from train._model import (CELLS, ModelConfig, check_config, default_bands,
                          default_cutoffs, language_model)

VOCAB = 23
COUNTS = np.sort(np.random.default_rng(0).integers(1, 500, VOCAB))[::-1]


def _model(**kwargs):
  defaults = dict(vocab_size=VOCAB, emsize=8, nhid=8, num_samples=5)
  defaults.update(kwargs)
  return language_model(ModelConfig(**defaults), COUNTS)


def _tokens(key, shape):
  return jax.random.randint(key, shape, 0, VOCAB, jnp.int32)


@pytest.mark.parametrize("cell", CELLS)
def test_every_cell_gives_hidden_states_and_a_carried_state(cell, key):
  model = _model(cell=cell, nlayers=2, emsize=6, nhid=10)
  params = model.init(key)
  assert params.embedding.shape == (VOCAB, 6)
  assert len(params.rnn) == 2
  carry = model.initial_state(params, 3)
  hidden, final = jax.jit(model.apply)(params, _tokens(key, (3, 5)), carry)
  assert hidden.shape == (3, 5, 10)
  assert jax.tree.structure(final) == jax.tree.structure(carry)
  assert all(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(final))


def test_lstmp_output_size_is_the_projection_and_can_be_tied(key):
  model = _model(proj=4, nhid=12, emsize=4, tied=True)
  params = model.init(key)
  assert params.embedding is None
  assert params.output.w.shape == (VOCAB, 4)
  hidden, _ = model.apply(params, _tokens(key, (2, 3)), model.initial_state(params, 2))
  assert hidden.shape == (2, 3, 4)


def test_tied_model_reads_the_output_table_and_gets_both_gradients(key):
  model = _model(tied=True)
  params = model.init(key)
  inputs = _tokens(key, (2, 4))
  np.testing.assert_array_equal(model.embed(params, inputs), params.output.w[inputs])
  targets = _tokens(jax.random.fold_in(key, 1), (2, 4))
  mask = jnp.ones((2, 4), bool)

  def loss(params):
    return model.loss(params, inputs, targets, mask, model.initial_state(params, 2), key=key)[0]

  grads = jax.jit(jax.grad(loss))(params)
  # The tied table's gradient is the sum of the output layer's and the embedding's gradients of
  # the same model with the two tables held apart (and equal).
  untied = params._replace(embedding=params.output.w)
  untied_model = _model(tied=False)
  def untied_loss(p):
    return untied_model.loss(p, inputs, targets, mask, untied_model.initial_state(p, 2),
                             key=key)[0]
  untied_grads = jax.jit(jax.grad(untied_loss))(untied)
  np.testing.assert_allclose(grads.output.w, untied_grads.output.w + untied_grads.embedding,
                             rtol=1e-5, atol=1e-7)


def test_dropout_is_on_with_a_key_and_off_without(key):
  model = _model(dropout=0.5, nlayers=2)
  params = model.init(key)
  inputs = _tokens(key, (2, 6))
  carry = model.initial_state(params, 2)
  apply = jax.jit(model.apply)
  plain, _ = apply(params, inputs, carry)
  again, _ = apply(params, inputs, carry)
  dropped, _ = apply(params, inputs, carry, key=jax.random.key(1))
  np.testing.assert_array_equal(plain, again)
  assert not np.allclose(plain, dropped)
  # Inverted dropout before the output layer: about half the features are exactly zero.
  zero_fraction = float(jnp.mean(dropped == 0))
  assert 0.3 < zero_fraction < 0.7
  no_rate = _model(dropout=0.0)
  p0 = no_rate.init(key)
  carry0 = no_rate.initial_state(p0, 2)
  a, _ = no_rate.apply(p0, inputs, carry0)
  b, _ = no_rate.apply(p0, inputs, carry0, key=jax.random.key(1))
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("softmax", ["full", "hsm-huffman", "class", "adaptive", "dsoftmax"])
def test_stepping_one_token_at_a_time_equals_the_unrolled_log_prob(softmax, key):
  model = _model(softmax=softmax, cell="gru", nlayers=2, div_value=2.0)
  params = model.init(key)
  tokens = _tokens(key, (2, 7))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  carry = model.initial_state(params, 2)
  logp, final = jax.jit(model.log_prob)(params, inputs, targets, carry)
  step = jax.jit(model.step)
  stepped = []
  for t in range(inputs.shape[1]):
    carry, log_probs = step(params, carry, inputs[:, t])
    assert log_probs.shape == (2, VOCAB)
    np.testing.assert_allclose(jnp.sum(jnp.exp(log_probs), axis=1), 1.0, rtol=1e-5)
    stepped.append(jnp.take_along_axis(log_probs, targets[:, t:t + 1], axis=1)[:, 0])
  np.testing.assert_allclose(jnp.stack(stepped, axis=1), logp, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(final)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_loss_is_the_masked_mean_and_equals_minus_log_prob_for_exact_layers(key):
  model = _model()
  params = model.init(key)
  tokens = _tokens(key, (3, 6))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  mask = jnp.arange(5)[None, :] < jnp.array([5, 3, 1])[:, None]
  carry = model.initial_state(params, 3)
  objective, aux = jax.jit(model.loss)(params, inputs, targets, mask, carry, key=key)
  logp, _ = jax.jit(model.log_prob)(params, inputs, targets, carry)
  expected = -float(jnp.sum(jnp.where(mask, logp, 0.0))) / 9.0
  assert float(objective) == pytest.approx(expected, rel=1e-5)
  np.testing.assert_array_equal(aux.losses == 0, ~mask)
  assert aux.hidden.shape == (15, 8)


def test_manual_bptt_gives_the_autodiff_gradient(key):
  grads = []
  for grad in ("autodiff", "manual"):
    model = _model(grad=grad, nlayers=2)
    params = model.init(key)
    tokens = _tokens(key, (2, 6))
    mask = jnp.ones((2, 5), bool)

    def loss(p):
      return model.loss(p, tokens[:, :-1], tokens[:, 1:], mask, model.initial_state(p, 2),
                        key=key)[0]

    grads.append(jax.jit(jax.grad(loss))(params))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nce_starts_self_normalized(key):
  params = _model(softmax="nce").init(key)
  np.testing.assert_allclose(params.output.b, -math.log(VOCAB), rtol=1e-6)
  hidden = jnp.zeros((1, 8))
  log_z = softmax_alts.log_normalizer(params.output, hidden)
  np.testing.assert_allclose(log_z, 0.0, atol=1e-5)


def test_automatic_cutoffs_and_bands_fit_the_vocabulary():
  counts = np.array([500, 300, 100, 50, 20, 10, 5, 5, 3, 1, 1, 0])
  cutoffs = default_cutoffs(counts)
  assert list(cutoffs) == sorted(set(cutoffs))
  assert 0 < cutoffs[0] and cutoffs[-1] < counts.size
  # The shortlist covers at least 80% of the tokens.
  assert counts[:cutoffs[0]].sum() >= 0.8 * counts.sum()
  bands = default_bands(counts, 16)
  assert sum(w for w, _ in bands) == counts.size
  assert sum(d for _, d in bands) == 16
  assert [d for _, d in bands] == sorted((d for _, d in bands), reverse=True)
  assert sum(d for _, d in default_bands(counts, 2)) == 2
  config = check_config(ModelConfig(vocab_size=12, softmax="class"), counts)
  assert config.classes == round(math.sqrt(12))


@pytest.mark.parametrize("kwargs, message", [
    (dict(tied=True, softmax="hsm-balanced"), "tied"),
    (dict(tied=True, emsize=8, nhid=16), "emsize"),
    (dict(proj=4, cell="gru"), "proj"),
    (dict(proj=8, nhid=8), "proj"),
    (dict(softmax="adaptive", cutoffs=(5, 23)), "cutoffs"),
    (dict(softmax="adaptive", cutoffs=(5, 3)), "cutoffs"),
    (dict(softmax="adaptive", cutoffs=(5, 10)), "tail widths"),
    (dict(softmax="dsoftmax", bands=((20, 4), (4, 4))), "word counts must sum to V = 23"),
    (dict(softmax="dsoftmax", bands=((20, 4), (3, 3))), "dims must sum to H = 8"),
    (dict(softmax="class", classes=24), "classes"),
    (dict(dropout=1.0), "dropout"),
    (dict(nhid=0), "nhid"),
    (dict(cell="lstmp"), "cell"),
    (dict(sampler="zipf"), "sampler"),
])
def test_configs_that_cannot_be_built_raise_value_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _model(**kwargs)


def test_counts_must_match_the_vocabulary():
  with pytest.raises(ValueError, match="counts"):
    language_model(ModelConfig(vocab_size=VOCAB), COUNTS[:-1])


def test_model_is_exported():
  assert train.language_model is language_model
  assert train.ModelConfig is ModelConfig


def test_pytorch_init_is_word_language_models(key):
  # word_language_model: every nn.LSTM tensor U(-1/sqrt(H), 1/sqrt(H)) (no forget-gate bias),
  # decoder U(-0.1, 0.1) with zero bias, encoder U(-0.1, 0.1). Ours by default: the forget-gate
  # bias 1 and the table N(0, 1/H).
  nhid = 64
  ours = _model(nlayers=2, nhid=nhid, emsize=32).init(key)
  torch_like = _model(nlayers=2, nhid=nhid, emsize=32, init="pytorch").init(key)
  bound = 1 / math.sqrt(nhid)
  for layer in torch_like.rnn:
    for leaf in jax.tree.leaves(layer):
      leaf = np.asarray(leaf)
      assert np.abs(leaf).max() <= bound and leaf.std() == pytest.approx(bound / math.sqrt(3),
                                                                          rel=0.2)
  for layer in ours.rnn:
    np.testing.assert_array_equal(layer.b_ih[nhid:2 * nhid], 1.0)
    np.testing.assert_array_equal(layer.b_hh[nhid:2 * nhid], 0.0)
  w = np.asarray(torch_like.output.w)
  assert np.abs(w).max() <= 0.1 and w.std() == pytest.approx(0.1 / math.sqrt(3), rel=0.1)
  np.testing.assert_array_equal(torch_like.output.b, 0.0)
  assert np.asarray(ours.output.w).std() == pytest.approx(1 / math.sqrt(nhid), rel=0.1)
  np.testing.assert_array_equal(torch_like.embedding, ours.embedding)
  # Only the full-table layers have word_language_model's decoder; the others keep their own.
  tree = _model(softmax="hsm-huffman", init="pytorch").init(key)
  np.testing.assert_array_equal(tree.output.nodes,
                                _model(softmax="hsm-huffman").init(key).output.nodes)
  with pytest.raises(ValueError, match="`init` must be one of default, pytorch; got 'torch'"):
    _model(init="torch")
