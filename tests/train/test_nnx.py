"""Tests for the Flax NNX modules `train.RNNModule` and `train.OutputLayerModule`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rnn
import softmax_alts
import train

B, T, D, H, V = 2, 5, 3, 4, 7


def _inputs(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  xs = jax.random.normal(k1, (B, T, D))
  hidden = jax.random.normal(k2, (B, T, H))
  targets = jax.random.randint(k3, (B, T), 0, V)
  return xs, hidden, targets


def _as_pure(grads, graphdef):
  """Turns the `nnx.State` of gradients into the pure params structure of the module."""
  return nnx.merge(graphdef, grads).pure_params()


def test_rnn_module_equals_pure_unroll_outputs_and_gradients():
  cell = rnn.stack([rnn.lstm(H, proj_size=2), rnn.gru(H)])
  xs, _, _ = _inputs()
  lengths = jnp.array([T, 3], jnp.int32)
  module = train.RNNModule(cell, D, rngs=nnx.Rngs(0))
  params = module.pure_params()
  chex.assert_trees_all_equal_structs(params, cell.init(jax.random.key(0), D))

  def pure_loss(p):
    ys, final = rnn.unroll(cell, p, xs, cell.initial_state(p, (B,)), lengths=lengths)
    return jnp.sum(ys ** 2) + jnp.sum(final[0].cell), (ys, final)

  def module_loss(m):
    ys, final = m(xs, lengths=lengths)
    return jnp.sum(ys ** 2) + jnp.sum(final[0].cell), (ys, final)

  expected_grads, (ys, final) = jax.jit(jax.grad(pure_loss, has_aux=True))(params)
  grads, (ys_m, final_m) = nnx.jit(nnx.grad(module_loss, has_aux=True))(module)
  chex.assert_trees_all_close(ys_m, ys, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(final_m, final, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(ys[1, 3:]).max()) == 0.0  # masked past the length
  chex.assert_trees_all_close(_as_pure(grads, nnx.graphdef(module)), expected_grads, rtol=1e-5,
                              atol=1e-6)


def test_rnn_module_holds_given_params_and_manual_grad_matches():
  cell = rnn.lstm(H)
  params = cell.init(jax.random.key(3), D)
  module = train.RNNModule(cell, D, params=params)
  chex.assert_trees_all_equal(module.pure_params(), params)
  assert len(jax.tree.leaves(nnx.state(module, nnx.Param))) == len(jax.tree.leaves(params))
  xs, _, _ = _inputs(1)

  @nnx.jit
  def both_grads(m):
    auto = nnx.grad(lambda m: jnp.sum(m(xs)[0] ** 2))(m)
    manual = nnx.grad(lambda m: jnp.sum(m(xs, grad="manual")[0] ** 2))(m)
    return auto, manual

  auto, manual = both_grads(module)
  chex.assert_trees_all_close(manual, auto, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(auto["params"].w_hh.get_value()).max()) > 0
  # The step method is one step of the unroll.
  _, y_0 = module.step(module.initial_state((B,)), xs[:, 0])
  ys, _ = rnn.unroll(cell, params, xs[:, :1], cell.initial_state(params, (B,)))
  np.testing.assert_allclose(y_0, ys[:, 0], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="params"):
    train.RNNModule(cell, D + 1, params=params)
  with pytest.raises(ValueError, match="rngs"):
    train.RNNModule(cell, D)


@pytest.mark.parametrize("name", ["full", "adaptive", "sampled"])
def test_output_layer_module_equals_pure_functions(name):
  layer = {
      "full": lambda: softmax_alts.full(),
      "adaptive": lambda: softmax_alts.adaptive((2, 4), div_value=2.0),
      "sampled": lambda: softmax_alts.sampled(3, softmax_alts.uniform(V)),
  }[name]()
  module = train.OutputLayerModule(layer, H, V, rngs=nnx.Rngs(params=1))
  params = module.pure_params()
  _, hidden, targets = _inputs(2)
  hidden_NxH, targets_N = hidden.reshape(B * T, H), targets.reshape(B * T)
  key = jax.random.key(4)

  @jax.jit
  def pure(p):
    grads = jax.grad(lambda p: layer.loss(p, hidden_NxH, targets_N, key=key).mean())(p)
    return (layer.loss(p, hidden_NxH, targets_N, key=key).reshape(B, T),
            layer.log_prob(p, hidden_NxH, targets_N).reshape(B, T),
            layer.log_probs(p, hidden_NxH).reshape(B, T, V), grads)

  @nnx.jit
  def with_module(m):
    grads = nnx.grad(lambda m: m.loss(hidden, targets, key=key).mean())(m)
    return m.loss(hidden, targets, key=key), m.log_prob(hidden, targets), m(hidden), grads

  loss, log_prob, log_probs, expected_grads = pure(params)
  loss_m, log_prob_m, log_probs_m, grads = with_module(module)
  chex.assert_shape([loss_m, log_prob_m], (B, T))
  chex.assert_shape(log_probs_m, (B, T, V))
  np.testing.assert_allclose(loss_m, loss, rtol=1e-6)
  np.testing.assert_allclose(log_prob_m, log_prob, rtol=1e-6)
  np.testing.assert_allclose(log_probs_m, log_probs, rtol=1e-6)
  np.testing.assert_allclose(jnp.exp(log_probs_m).sum(-1), np.ones((B, T)), rtol=1e-5)
  chex.assert_trees_all_close(_as_pure(grads, nnx.graphdef(module)), expected_grads, rtol=1e-5,
                              atol=1e-7)


def test_output_layer_module_rejects_bad_shapes():
  module = train.OutputLayerModule(softmax_alts.full(), H, V, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="hidden"):
    module.log_probs(jnp.zeros((3, H + 1)))
  with pytest.raises(ValueError, match="targets"):
    module.loss(jnp.zeros((3, H)), jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="layer"):
    train.OutputLayerModule(rnn.lstm(H), H, V, rngs=nnx.Rngs(0))


class _LM(nnx.Module):
  """A user's language model: embedding, a recurrent network and an output layer."""

  def __init__(self, *, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.rnn = train.RNNModule(rnn.lstm(H), D, rngs=rngs)
    self.out = train.OutputLayerModule(softmax_alts.full(), H, V, rngs=rngs)

  def __call__(self, tokens_BxT, targets_BxT):
    ys_BxTxH, _ = self.rnn(self.embed(tokens_BxT))
    return self.out.loss(ys_BxTxH, targets_BxT).mean()

  def step_fn(self, state, tokens_B):
    state, y_BxH = self.rnn.step(state, self.embed(tokens_B))
    return state, self.out.log_probs(y_BxH)


def _lm_batch():
  tokens = jax.random.randint(jax.random.key(5), (B, T + 1), 0, V)
  return tokens[:, :-1], tokens[:, 1:]


def test_user_lm_trains_with_nnx_optimizer_under_nnx_jit():
  model = _LM(rngs=nnx.Rngs(0))
  inputs, targets = _lm_batch()
  learning_rate = 0.5
  optimizer = nnx.Optimizer(model, optax.sgd(learning_rate), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, inputs, targets):
    loss, grads = nnx.value_and_grad(lambda m: m(inputs, targets))(model)
    optimizer.update(model, grads)
    return loss, grads

  # The pure computation of the same loss, for the reference gradient.
  graphdef, state = nnx.split(model)
  before = jax.tree.map(jnp.copy, state)
  w_ih_before = model.rnn.pure_params().w_ih
  expected_grads = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s)(inputs, targets)))(before)

  loss_0, grads = train_step(model, optimizer, inputs, targets)
  chex.assert_trees_all_close(nnx.state(grads), expected_grads, rtol=1e-5, atol=1e-7)
  # SGD: every parameter moved by -lr * grad, the recurrent ones included.
  chex.assert_trees_all_close(nnx.state(model, nnx.Param),
                              jax.tree.map(lambda p, g: p - learning_rate * g,
                                           before, expected_grads),
                              rtol=1e-5, atol=1e-6)
  assert not np.allclose(model.rnn.pure_params().w_ih, w_ih_before)
  losses = [float(loss_0)] + [float(train_step(model, optimizer, inputs, targets)[0])
                              for _ in range(15)]
  assert np.all(np.diff(losses) < 0) and losses[-1] < losses[0] - 0.1, losses


def test_split_merge_round_trip_and_greedy_generation_with_the_lm():
  model = _LM(rngs=nnx.Rngs(7))
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)
  assert isinstance(copy.rnn, train.RNNModule) and copy.rnn.cell is model.rnn.cell
  chex.assert_trees_all_equal(copy.rnn.pure_params(), model.rnn.pure_params())
  chex.assert_trees_all_equal(copy.out.pure_params(), model.out.pure_params())

  # Greedy generation through the module's step: every generated token is the argmax of the
  # next-token distribution that a full unroll over prompt + generated tokens gives.
  prompt, _ = _lm_batch()
  prompt = prompt[:, :2]

  @nnx.jit
  def generate_and_rescore(model, prompt):
    state = model.rnn.initial_state((B,))
    tokens = train.sample(model.step_fn, state, prompt, 3, key=jax.random.key(0), top_k=1)
    ys, _ = model.rnn(model.embed(jnp.concatenate([prompt, tokens], axis=1)))
    return tokens, model.out(ys)

  tokens, log_probs = generate_and_rescore(copy, prompt)
  chex.assert_shape(tokens, (B, 3))
  np.testing.assert_array_equal(tokens, jnp.argmax(log_probs[:, 1:-1], axis=-1))
