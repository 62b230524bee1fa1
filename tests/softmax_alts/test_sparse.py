"""Tests of the row-sparse training path: it must equal the dense gradient step."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softmax_alts


SCALE = 1.0


def _inputs(key, num_rows, hidden_size, vocab_size, dtype=jnp.float32):
  """Params with random biases, hidden and targets, from numpy (no per-shape compiles)."""
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 30)))
  params = softmax_alts.FullParams(
      w=jnp.asarray(rng.normal(size=(vocab_size, hidden_size)) / np.sqrt(hidden_size), dtype),
      b=jnp.asarray(rng.normal(size=(vocab_size,)), dtype))
  hidden = jnp.asarray(SCALE * rng.normal(size=(num_rows, hidden_size)), dtype)
  targets = jnp.asarray(rng.integers(0, vocab_size, num_rows), jnp.int32)
  return params, hidden, targets


VOCAB = 40
LAYERS = {  # Every method; shared and per-example negatives; with and without replacement.
    "sampled": lambda: softmax_alts.sampled(6, softmax_alts.log_uniform(VOCAB)),
    "nce_unique_per_example": lambda: softmax_alts.nce(
        3, softmax_alts.unigram(np.arange(VOCAB, 0, -1) * 1.0, unique=True), shared=False),
    "negative_sampling_in_batch": lambda: softmax_alts.negative_sampling(
        8, softmax_alts.in_batch(VOCAB)),
}


def _dense(layer, params, hidden, targets, key, weights):
  objective = lambda p, h: jnp.sum(weights * layer.loss(p, h, targets, key=key))
  return jax.grad(objective, argnums=(0, 1))(params, hidden)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_row_update_equals_dense_sgd(key, name):
  layer = LAYERS[name]()
  params, hidden, targets = _inputs(key, 8, 5, VOCAB)
  targets = targets.at[3].set(targets[0])  # A repeated target: its rows must add up.
  weights = jnp.linspace(0.1, 1.0, 8)

  @jax.jit
  def both(params, hidden, targets, key):
    loss, hidden_grad, row_grad = softmax_alts.sparse_loss_and_grads(
        layer, params, hidden, targets, key=key, weights=weights)
    dense_params, dense_hidden = _dense(layer, params, hidden, targets, key, weights)
    return loss, hidden_grad, row_grad, dense_params, dense_hidden

  loss, hidden_grad, row_grad, dense_params, dense_hidden = both(params, hidden, targets, key)
  np.testing.assert_allclose(loss, jax.jit(layer.loss)(params, hidden, targets, key=key),
                             rtol=1e-6)
  np.testing.assert_allclose(hidden_grad, dense_hidden, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(row_grad.ids[:8], targets)
  sparse_step = softmax_alts.apply_row_update(params, row_grad, 0.3)
  dense_step = jax.tree.map(lambda p, g: p - 0.3 * g, params, dense_params)
  chex.assert_trees_all_close(sparse_step, dense_step, rtol=1e-5, atol=1e-6)
  # Untouched rows are bit-for-bit unchanged.
  untouched = np.setdiff1d(np.arange(VOCAB), np.asarray(row_grad.ids))
  np.testing.assert_array_equal(sparse_step.w[untouched], params.w[untouched])


def test_default_weights_are_the_mean(key):
  layer = LAYERS["sampled"]()
  params, hidden, targets = _inputs(key, 6, 4, VOCAB)
  _, hidden_grad, _ = jax.jit(lambda p, h, t: softmax_alts.sparse_loss_and_grads(
      layer, p, h, t, key=key))(params, hidden, targets)
  expected = jax.jit(jax.grad(lambda h: jnp.mean(layer.loss(params, h, targets, key=key))))(
      hidden)
  np.testing.assert_allclose(hidden_grad, expected, rtol=1e-5, atol=1e-7)


def test_donated_jitted_step_equals_dense(key):
  layer = LAYERS["sampled"]()
  params, hidden, targets = _inputs(key, 8, 5, VOCAB)
  dense_grad = jax.jit(_dense, static_argnums=0)(layer, params, hidden, targets, key,
                                                 jnp.full((8,), 1 / 8))[0]
  dense = jax.tree.map(lambda p, g: p - 0.1 * g, params, dense_grad)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(params, hidden, targets, key):
    _, _, row_grad = softmax_alts.sparse_loss_and_grads(layer, params, hidden, targets, key=key)
    return softmax_alts.apply_row_update(params, row_grad, 0.1)

  updated = step(jax.tree.map(jnp.copy, params), hidden, targets, key)
  chex.assert_trees_all_close(updated, dense, rtol=1e-5, atol=1e-6)


def test_cost_does_not_grow_with_vocab(key):
  """The compiled sparse step's FLOPs are the same at V = 1000 and V = 100000."""
  layer_for = lambda v: softmax_alts.sampled(64, softmax_alts.log_uniform(v))

  def flops(vocab_size, sparse):
    layer = layer_for(vocab_size)
    params = softmax_alts.FullParams(jax.ShapeDtypeStruct((vocab_size, 32), jnp.float32),
                                     jax.ShapeDtypeStruct((vocab_size,), jnp.float32))
    hidden = jax.ShapeDtypeStruct((128, 32), jnp.float32)
    targets = jax.ShapeDtypeStruct((128,), jnp.int32)

    def step(params, hidden, targets):
      if sparse:
        _, _, rows = softmax_alts.sparse_loss_and_grads(layer, params, hidden, targets, key=key)
        return softmax_alts.apply_row_update(params, rows, 0.1)
      grad = jax.grad(lambda p: jnp.mean(layer.loss(p, hidden, targets, key=key)))(params)
      return jax.tree.map(lambda p, g: p - 0.1 * g, params, grad)

    compiled = jax.jit(step, donate_argnums=0).lower(params, hidden, targets).compile()
    return compiled.cost_analysis()["flops"]

  small, large = flops(1000, True), flops(100_000, True)
  assert large < 1.1 * small
  assert flops(100_000, False) > 5 * large  # The dense gradient touches all V H entries.


def test_merge_rows():
  rows = softmax_alts.RowGrad(ids=jnp.array([3, 1, 3, 7, 1, 3, 9, -1], jnp.int32),
                              w_rows=jnp.arange(16.0).reshape(8, 2),
                              b_rows=jnp.arange(8.0))
  merged = jax.jit(softmax_alts.merge_rows, static_argnums=1)(rows, 8)
  chex.assert_shape([merged.ids, merged.b_rows], (8,))
  ids = np.asarray(merged.ids)
  real = ids < 8
  assert sorted(ids[real].tolist()) == [1, 3, 7]  # 9 and -1 are outside [0, 8): dropped.
  for i, expected_b in ((1, 1.0 + 4.0), (3, 0.0 + 2.0 + 5.0), (7, 3.0)):
    slot = int(np.flatnonzero(ids == i)[0])
    np.testing.assert_allclose(merged.b_rows[slot], expected_b)
  dense = np.zeros((8, 2))
  np.add.at(dense, ids[real], np.asarray(merged.w_rows)[real])
  expected = np.zeros((8, 2))
  for i, row in zip(np.asarray(rows.ids), np.asarray(rows.w_rows)):
    if 0 <= i < 8:
      expected[i] += row
  np.testing.assert_allclose(dense, expected)


@pytest.mark.parametrize("make_tx,exact", [(lambda: optax.adagrad(0.2), True),
                                           (lambda: optax.adam(0.05), False)])
def test_row_wise_optax(key, make_tx, exact):
  layer = LAYERS["sampled"]()
  params, hidden, targets = _inputs(key, 6, 4, VOCAB)
  tx = make_tx()
  row_opt = softmax_alts.row_wise(tx)

  @jax.jit
  def sparse_step(params, state, key):
    _, _, row_grad = softmax_alts.sparse_loss_and_grads(layer, params, hidden, targets, key=key)
    updates, state = row_opt.update(row_grad, state, params)
    return softmax_alts.apply_row_updates(params, updates), state, row_grad.ids

  @jax.jit
  def dense_step(params, state, key):
    grad = jax.grad(lambda p: jnp.mean(layer.loss(p, hidden, targets, key=key)))(params)
    updates, state = tx.update(grad, state, params)
    return optax.apply_updates(params, updates), state

  sparse_params, sparse_state = params, row_opt.init(params)
  dense_params, dense_state = params, tx.init(params)
  for step, step_key in enumerate(jax.random.split(key, 3)):
    before = sparse_params
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float scalars.
      sparse_params, sparse_state, ids = sparse_step(sparse_params, sparse_state, step_key)
      dense_params, dense_state = dense_step(dense_params, dense_state, step_key)
    untouched = np.setdiff1d(np.arange(VOCAB), np.asarray(ids))
    np.testing.assert_array_equal(sparse_params.w[untouched], before.w[untouched])
    if exact or step == 0:
      chex.assert_trees_all_close(sparse_params, dense_params, rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_close(sparse_state, dense_state, rtol=1e-5, atol=1e-6)


def test_row_wise_adam_is_lazy(key):
  """Lazy Adam: an untouched row keeps its moments; a touched row follows Adam's formula."""
  params, _, _ = _inputs(key, 2, 3, 6)
  row_opt = softmax_alts.row_wise(optax.adam(0.1, b1=0.9, b2=0.99, eps=1e-8))
  g1 = softmax_alts.RowGrad(jnp.array([1, 4], jnp.int32), jnp.ones((2, 3)), jnp.ones((2,)))
  g2 = softmax_alts.RowGrad(jnp.array([4, 4], jnp.int32), jnp.full((2, 3), 0.5),
                            jnp.zeros((2,)))
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float scalars.
    update = jax.jit(row_opt.update)
    state = row_opt.init(params)
    _, state = update(g1, state, params)
    updates, state = update(g2, state, params)
  mu, nu = state[0].mu, state[0].nu
  np.testing.assert_allclose(mu.w[1], 0.1)  # Row 1 untouched at step 2: no decay.
  np.testing.assert_allclose(mu.w[4], 0.9 * 0.1 + 0.1 * 1.0)  # Row 4: merged gradient 1.0.
  np.testing.assert_allclose(nu.w[4], 0.99 * 0.01 + 0.01 * 1.0, rtol=1e-6)
  m_hat, v_hat = mu.w[4] / (1 - 0.9 ** 2), nu.w[4] / (1 - 0.99 ** 2)
  slot = int(np.flatnonzero(np.asarray(updates.ids) == 4)[0])
  np.testing.assert_allclose(updates.w_rows[slot], -0.1 * m_hat / (np.sqrt(v_hat) + 1e-8),
                             rtol=1e-5)
  np.testing.assert_array_equal(mu.w[jnp.array([0, 2, 3, 5])], 0.0)


def test_bad_inputs(key):
  params, hidden, targets = _inputs(key, 4, 3, VOCAB)
  layer = LAYERS["sampled"]()
  with pytest.raises(ValueError, match="layer.*sampled, nce or negative_sampling"):
    softmax_alts.sparse_loss_and_grads(softmax_alts.full(), params, hidden, targets, key=key)
  with pytest.raises(ValueError, match="key.*required"):
    softmax_alts.sparse_loss_and_grads(layer, params, hidden, targets, key=None)
  with pytest.raises(ValueError, match="weights.*N = 4"):
    softmax_alts.sparse_loss_and_grads(layer, params, hidden, targets, key=key,
                                       weights=jnp.ones(3))
  with pytest.raises(ValueError, match="id 40.*vocab_size = 40"):
    softmax_alts.sparse_loss_and_grads(layer, params, hidden, targets.at[0].set(40), key=key)
  loss, hidden_grad, row_grad = jax.jit(
      lambda p, h, t: softmax_alts.sparse_loss_and_grads(layer, p, h, t, key=key))(
          params, hidden, targets.at[0].set(40))
  assert np.isnan(loss[0]) and np.all(np.isfinite(loss[1:]))
  assert np.all(np.isfinite(hidden_grad)) and np.all(np.isfinite(row_grad.w_rows))
  bad_rows = softmax_alts.RowGrad(jnp.zeros((2,), jnp.int32), jnp.zeros((2, 5)), jnp.zeros(2))
  with pytest.raises(ValueError, match="row_grad.*w_rows \\[M, 3\\]"):
    softmax_alts.apply_row_update(params, bad_rows, 0.1)
  with pytest.raises(ValueError, match="updates.*RowGrad"):
    softmax_alts.apply_row_updates(params, (1, 2, 3))


def test_has_row_sparse_path_names_the_layers_sparse_loss_and_grads_accepts(key):
  params, hidden, targets = _inputs(key, 4, 3, VOCAB)
  counts = np.arange(VOCAB, 0, -1)
  sparse = [make() for make in LAYERS.values()] + [
      softmax_alts.hierarchical(softmax_alts.balanced_tree(VOCAB)),
      softmax_alts.hierarchical(softmax_alts.huffman_tree(counts))]
  dense = [softmax_alts.full(), softmax_alts.self_normalized(0.1),
           softmax_alts.class_based(counts, 6), softmax_alts.adaptive((10, 20))]
  assert all(softmax_alts.has_row_sparse_path(layer) is True for layer in sparse)
  assert all(softmax_alts.has_row_sparse_path(layer) is False for layer in dense)
  for layer in dense:  # False exactly where the row-sparse path refuses the layer
    with pytest.raises(ValueError, match="without a row-sparse path"):
      softmax_alts.sparse_loss_and_grads(layer, params, hidden, targets, key=key)


def test_row_wise_with_distinct_ids_skips_the_merge(key):
  params, _, _ = _inputs(key, 2, 3, 6)
  rng = np.random.default_rng(0)
  rows = softmax_alts.RowGrad(ids=jnp.asarray([4, 1, 4, 6, 1, 0], jnp.int32),  # 6: dropped
                              w_rows=jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
                              b_rows=jnp.asarray(rng.normal(size=(6,)), jnp.float32))
  tx = optax.adam(0.1)
  state = tx.init(params)
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float scalars.
    want = softmax_alts.row_wise(tx).update(rows, state, params)
    merged = softmax_alts.merge_rows(rows, 6)
    got = softmax_alts.row_wise(tx, distinct_ids=True).update(merged, state, params)
    unmerged, _ = softmax_alts.row_wise(tx, distinct_ids=True).update(rows, state, params)
  (want_updates, want_state), (got_updates, got_state) = want, got
  chex.assert_trees_all_close(softmax_alts.apply_row_updates(params, got_updates),
                              softmax_alts.apply_row_updates(params, want_updates), rtol=1e-6)
  chex.assert_trees_all_close(got_state, want_state, rtol=1e-6)
  # Without the merge, repeated ids would not add up: the promise is what makes it exact.
  changed = softmax_alts.apply_row_updates(params, unmerged)
  assert not np.allclose(changed.w[1], softmax_alts.apply_row_updates(params, want_updates).w[1])


def test_a_replaced_loss_is_never_trained_by_the_old_row_form(key):
  """The row-sparse form is a field: a layer whose `loss` was wrapped (here to scale it) keeps
  a `row_sparse` that describes the old loss, so it is refused rather than silently trained;
  replacing the field along with the loss, or dropping it, says what to train."""
  import functools
  layer = LAYERS["sampled"]()
  params, hidden, targets = _inputs(key, 6, 4, VOCAB)

  @functools.wraps(layer.loss)
  def half_loss(*args, **kwargs):
    return 0.5 * layer.loss(*args, **kwargs)

  wrapped = layer._replace(loss=half_loss)
  assert not softmax_alts.has_row_sparse_path(wrapped)
  with pytest.raises(ValueError, match="layer.loss.*replaced.*row_sparse"):
    softmax_alts.sparse_loss_and_grads(wrapped, params, hidden, targets, key=key)
  assert not softmax_alts.has_row_sparse_path(layer._replace(loss=half_loss, row_sparse=None))
  # A row form of the new loss, given with it, is what gets trained.
  rows = layer.row_sparse.rows

  def half_rows(*args, **kwargs):
    form = rows(*args, **kwargs)
    return form._replace(values=lambda *a: 0.5 * form.values(*a))

  both = layer._replace(loss=half_loss,
                        row_sparse=softmax_alts.RowSparse(loss=half_loss, rows=half_rows))
  assert softmax_alts.has_row_sparse_path(both)
  loss, _, _ = softmax_alts.sparse_loss_and_grads(both, params, hidden, targets, key=key)
  np.testing.assert_allclose(loss, half_loss(params, hidden, targets, key=key), rtol=1e-6)


def test_where_masks_rows_of_the_row_sparse_path(key):
  layer = LAYERS["sampled"]()
  params, hidden, targets = _inputs(key, 6, 4, VOCAB)
  where = jnp.asarray([True, False, True, True, True, False])
  padded = targets.at[1].set(-1).at[5].set(VOCAB)
  loss, hidden_grad, rows = softmax_alts.sparse_loss_and_grads(
      layer, params, hidden, padded, key=key, where=where)
  np.testing.assert_allclose(loss, layer.loss(params, hidden, padded, key=key, where=where),
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(loss)[[1, 5]], 0.0)
  np.testing.assert_array_equal(np.asarray(hidden_grad)[[1, 5]], 0.0)
  np.testing.assert_array_equal(np.asarray(rows.ids)[[1, 5]], VOCAB)  # dropped on update
  dense = jax.grad(lambda p: jnp.mean(layer.loss(p, hidden, padded, key=key, where=where)))(
      params)
  chex.assert_trees_all_close(softmax_alts.apply_row_update(params, rows, 0.5),
                              jax.tree.map(lambda p, g: p - 0.5 * g, params, dense),
                              rtol=1e-5, atol=1e-6)
