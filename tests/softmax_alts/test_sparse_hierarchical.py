"""Tests of the row-sparse training path of the hierarchical softmax: it must equal the dense step."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softmax_alts

VOCAB = 13  # Not a power of two: the balanced tree has paths of length 3 and 4.
HIDDEN = 5
# Repeated targets, and words with short and long paths in both trees.
TARGETS = np.array([0, 0, 12, 3, 12, 5, 0, 7, 1, 9], np.int32)


def _tree(kind):
  if kind == "balanced":
    return softmax_alts.balanced_tree(VOCAB)
  return softmax_alts.huffman_tree(1000 // np.arange(1, VOCAB + 1))  # Zipf: depths 2 to 5


def _inputs(seed, num_rows=len(TARGETS)):
  rng = np.random.default_rng(seed)
  params = softmax_alts.HierarchicalParams(
      nodes=jnp.asarray(rng.normal(size=(VOCAB - 1, HIDDEN)), jnp.float32),
      bias=jnp.asarray(rng.normal(size=(VOCAB - 1,)), jnp.float32))
  hidden = jnp.asarray(rng.normal(size=(num_rows, HIDDEN)), jnp.float32)
  return params, hidden


def _scatter(row_grad, num_nodes):
  """The dense gradient the rows stand for, summed in numpy (ids outside the table dropped)."""
  ids = np.asarray(row_grad.ids)
  inside = ids < num_nodes
  nodes = np.zeros((num_nodes, HIDDEN))
  bias = np.zeros(num_nodes)
  np.add.at(nodes, ids[inside], np.asarray(row_grad.w_rows)[inside])
  np.add.at(bias, ids[inside], np.asarray(row_grad.b_rows)[inside])
  return nodes, bias


def _dense_grads(layer, params, hidden, targets):
  """`jax.grad` of the mean loss w.r.t. the whole params and the hidden vectors."""
  mean_loss = lambda p, h: jnp.mean(layer.loss(p, h, targets))
  return jax.grad(mean_loss, argnums=(0, 1))(params, hidden)


@pytest.mark.parametrize("kind", ["balanced", "huffman"])
def test_row_gradient_equals_dense_autodiff(kind):
  tree = _tree(kind)
  assert (tree.lengths[TARGETS] < tree.depth).any()  # Some paths are padded.
  layer = softmax_alts.hierarchical(tree)
  params, hidden = _inputs(1)
  targets = jnp.asarray(TARGETS)

  @jax.jit
  def both(params, hidden):
    sparse = softmax_alts.sparse_loss_and_grads(layer, params, hidden, targets)
    return sparse, _dense_grads(layer, params, hidden, targets)

  (loss, hidden_grad, row_grad), (dense_params, dense_hidden) = both(params, hidden)
  expected_loss = layer.loss(params, hidden, targets)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  np.testing.assert_allclose(np.mean(loss), np.mean(expected_loss), rtol=1e-6)
  np.testing.assert_allclose(hidden_grad, dense_hidden, rtol=1e-5, atol=1e-7)
  nodes, bias = _scatter(row_grad, VOCAB - 1)
  np.testing.assert_allclose(nodes, dense_params.nodes, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(bias, dense_params.bias, rtol=1e-5, atol=1e-7)
  # The ids are the targets' paths, token-major; padding gets id V-1 (no row) and zero rows.
  on_path = np.arange(tree.depth)[None, :] < tree.lengths[TARGETS][:, None]
  ids = np.asarray(row_grad.ids).reshape(len(TARGETS), tree.depth)
  np.testing.assert_array_equal(ids[on_path], tree.paths[TARGETS][on_path])
  np.testing.assert_array_equal(ids[~on_path], VOCAB - 1)
  w_rows = np.asarray(row_grad.w_rows).reshape(len(TARGETS), tree.depth, HIDDEN)
  np.testing.assert_array_equal(w_rows[~on_path], 0.0)
  np.testing.assert_array_equal(np.asarray(row_grad.b_rows).reshape(ids.shape)[~on_path], 0.0)


def test_weights_and_sgd_step_equal_dense(key):
  layer = softmax_alts.hierarchical(_tree("huffman"))
  params, hidden = _inputs(2, num_rows=6)
  targets = jnp.asarray(TARGETS[:6])  # Leaves some nodes untouched.
  weights = jnp.linspace(0.1, 1.0, 6)

  @jax.jit
  def both(params, hidden):
    _, hidden_grad, row_grad = softmax_alts.sparse_loss_and_grads(
        layer, params, hidden, targets, key=key, weights=weights)
    objective = lambda p, h: jnp.sum(weights * layer.loss(p, h, targets))
    return hidden_grad, row_grad, jax.grad(objective, argnums=(0, 1))(params, hidden)

  hidden_grad, row_grad, (dense_params, dense_hidden) = both(params, hidden)
  np.testing.assert_allclose(hidden_grad, dense_hidden, rtol=1e-5, atol=1e-7)
  sparse_step = softmax_alts.apply_row_update(params, row_grad, 0.3)
  assert isinstance(sparse_step, softmax_alts.HierarchicalParams)
  dense_step = jax.tree.map(lambda p, g: p - 0.3 * g, params, dense_params)
  chex.assert_trees_all_close(sparse_step, dense_step, rtol=1e-5, atol=1e-6)
  untouched = np.setdiff1d(np.arange(VOCAB - 1), np.asarray(row_grad.ids))
  assert untouched.size > 0
  np.testing.assert_array_equal(sparse_step.nodes[untouched], params.nodes[untouched])
  np.testing.assert_array_equal(sparse_step.bias[untouched], params.bias[untouched])


def test_donated_jitted_steps_equal_dense():
  layer = softmax_alts.hierarchical(_tree("balanced"))
  params, hidden = _inputs(3)
  targets = jnp.asarray(TARGETS)

  @functools.partial(jax.jit, donate_argnums=0)
  def sparse_step(params, hidden):
    loss, hidden_grad, row_grad = softmax_alts.sparse_loss_and_grads(
        layer, params, hidden, targets)
    return softmax_alts.apply_row_update(params, row_grad, 0.5), jnp.mean(loss), hidden_grad

  @jax.jit
  def dense_step(params, hidden):
    grads, hidden_grad = _dense_grads(layer, params, hidden, targets)
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), hidden_grad

  sparse, dense = jax.tree.map(jnp.copy, params), params
  for _ in range(2):
    donated = sparse
    sparse, loss, sparse_hidden = sparse_step(sparse, hidden)
    assert donated.nodes.is_deleted()
    np.testing.assert_allclose(loss, jnp.mean(layer.loss(dense, hidden, targets)), rtol=1e-6)
    dense, dense_hidden = dense_step(dense, hidden)
    chex.assert_trees_all_close(sparse, dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sparse_hidden, dense_hidden, rtol=1e-5, atol=1e-7)


def test_row_wise_adagrad_matches_hand_computation():
  layer = softmax_alts.hierarchical(_tree("huffman"))
  params, _ = _inputs(4)
  lr, init_acc, eps = 0.2, 0.1, 1e-7
  row_opt = softmax_alts.row_wise(
      optax.adagrad(lr, initial_accumulator_value=init_acc, eps=eps))

  @jax.jit
  def step(params, state, hidden, targets):
    _, _, row_grad = softmax_alts.sparse_loss_and_grads(layer, params, hidden, targets)
    updates, state = row_opt.update(row_grad, state, params)
    return softmax_alts.apply_row_updates(params, updates), state

  dense_grad = jax.jit(lambda p, h, t: _dense_grads(layer, p, h, t)[0])
  rng = np.random.default_rng(5)
  state = row_opt.init(params)
  nodes, bias = np.asarray(params.nodes, np.float64), np.asarray(params.bias, np.float64)
  acc_nodes, acc_bias = np.full_like(nodes, init_acc), np.full_like(bias, init_acc)
  touched = np.zeros(VOCAB - 1, bool)
  for targets in (TARGETS[:4], TARGETS[4:8]):  # Different paths at each step.
    hidden = jnp.asarray(rng.normal(size=(4, HIDDEN)), jnp.float32)
    targets = jnp.asarray(targets)
    g = dense_grad(params, hidden, targets)  # At the current params, before the step.
    with jax.numpy_dtype_promotion("standard"):  # optax mixes weak Python scalars.
      params, state = step(params, state, hidden, targets)
    g_nodes, g_bias = np.asarray(g.nodes, np.float64), np.asarray(g.bias, np.float64)
    acc_nodes, acc_bias = acc_nodes + g_nodes ** 2, acc_bias + g_bias ** 2
    nodes = nodes - lr * g_nodes / np.sqrt(acc_nodes + eps)
    bias = bias - lr * g_bias / np.sqrt(acc_bias + eps)
    touched |= np.any(g_nodes != 0, axis=1)
    np.testing.assert_allclose(params.nodes, nodes, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params.bias, bias, rtol=1e-5, atol=1e-6)
    accumulators = state[0].sum_of_squares
    np.testing.assert_allclose(accumulators.nodes, acc_nodes, rtol=1e-5)
    np.testing.assert_allclose(accumulators.bias, acc_bias, rtol=1e-5)
  assert 0 < touched.sum() < VOCAB - 1
  np.testing.assert_array_equal(np.asarray(accumulators.nodes)[~touched], np.float32(init_acc))


def test_cost_does_not_grow_with_the_table(key):
  """The compiled sparse step's FLOPs grow with the depth, not with V; the dense step's do."""

  def flops(vocab_size, sparse):
    layer = softmax_alts.hierarchical(softmax_alts.balanced_tree(vocab_size))
    params = softmax_alts.HierarchicalParams(
        jax.ShapeDtypeStruct((vocab_size - 1, 32), jnp.float32),
        jax.ShapeDtypeStruct((vocab_size - 1,), jnp.float32))
    hidden = jax.ShapeDtypeStruct((128, 32), jnp.float32)
    targets = jax.ShapeDtypeStruct((128,), jnp.int32)

    def step(params, hidden, targets):
      if sparse:
        _, _, rows = softmax_alts.sparse_loss_and_grads(layer, params, hidden, targets)
        return softmax_alts.apply_row_update(params, rows, 0.1)
      grad = jax.grad(lambda p: jnp.mean(layer.loss(p, hidden, targets)))(params)
      return jax.tree.map(lambda p, g: p - 0.1 * g, params, grad)

    compiled = jax.jit(step, donate_argnums=0).lower(params, hidden, targets).compile()
    return compiled.cost_analysis()["flops"]

  small, large = flops(1000, True), flops(100_000, True)  # depth 10 and 17
  assert large < 2 * small
  assert flops(100_000, False) > 5 * large  # The dense gradient touches all (V-1) H entries.


def test_bad_inputs(key):
  layer = softmax_alts.hierarchical(_tree("balanced"))
  params, hidden = _inputs(6)
  targets = jnp.asarray(TARGETS)
  adaptive = softmax_alts.adaptive([4, 8])
  with pytest.raises(ValueError, match="`layer`.*hierarchical"):
    softmax_alts.sparse_loss_and_grads(adaptive, adaptive.init(key, HIDDEN, VOCAB), hidden,
                                       targets)
  with pytest.raises(ValueError, match="`layer`.*hierarchical"):
    softmax_alts.sparse_loss_and_grads(softmax_alts.full(), params, hidden, targets)
  with pytest.raises(ValueError, match="params.nodes.*\\[12, 5\\]"):
    softmax_alts.sparse_loss_and_grads(layer, params._replace(nodes=params.nodes[:, :4]),
                                       hidden, targets)
  with pytest.raises(ValueError, match="`params` must be FullParams.*or HierarchicalParams"):
    softmax_alts.sparse_loss_and_grads(layer, tuple(params), hidden, targets)
  with pytest.raises(ValueError, match="id 13.*vocab_size = 13"):
    softmax_alts.sparse_loss_and_grads(layer, params, hidden, targets.at[1].set(VOCAB))
  row_grad = softmax_alts.sparse_loss_and_grads(layer, params, hidden, targets)[2]
  with pytest.raises(ValueError, match="`params` must be FullParams.*got tuple"):
    softmax_alts.apply_row_update(tuple(params), row_grad, 0.1)
  with pytest.raises(ValueError, match="row_grad.*w_rows \\[M, 5\\]"):
    softmax_alts.apply_row_update(params, row_grad._replace(w_rows=row_grad.w_rows[:, :4]),
                                  0.1)
  # Under jit a bad id gives a NaN loss and reads no row.
  loss, hidden_grad, row_grad = jax.jit(
      lambda p, h, t: softmax_alts.sparse_loss_and_grads(layer, p, h, t))(
          params, hidden, targets.at[1].set(VOCAB))
  assert np.isnan(loss[1]) and np.all(np.isfinite(np.delete(np.asarray(loss), 1)))
  assert np.all(np.isfinite(hidden_grad)) and np.all(np.isfinite(row_grad.w_rows))
  depth = _tree("balanced").depth
  np.testing.assert_array_equal(np.asarray(row_grad.ids)[depth:2 * depth], VOCAB - 1)
  np.testing.assert_array_equal(np.asarray(row_grad.w_rows)[depth:2 * depth], 0.0)
