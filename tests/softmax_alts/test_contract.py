"""The `OutputLayer` contract, checked for every factory and strategy on one device.

Normalization, `log_prob` against `log_probs`, `loss == -log_prob` for the exact methods, jit
against eager, vmap against the batched call, reverse-mode gradients against finite
differences (float64), bfloat16 and mixed dtypes against float32 on the same rounded values,
`where` masks, an unbatched `hidden [H]`, and bad ids. The vocabulary-parallel forms are checked
against these layers on simulated devices in `test_parallel.py`.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import softmax_alts

V, H, N = 37, 8, 6  # V is not a multiple of the stream blocks: the last block is clamped
COUNTS = np.round(1e3 / np.arange(1, V + 1)) + 1
BLOCKS = {"block_rows": 8}  # several blocks (and tiles) even at this size

FACTORIES = {
    "full (stream)": lambda: softmax_alts.full(strategy="stream", **BLOCKS),
    "full (materialize)": lambda: softmax_alts.full(strategy="materialize"),
    "self_normalized": lambda: softmax_alts.self_normalized(0.3, strategy="stream", **BLOCKS),
    "class_based (stream)": lambda: softmax_alts.class_based(
        COUNTS, 5, strategy="stream", tile_rows=4, **BLOCKS),
    "class_based (materialize)": lambda: softmax_alts.class_based(COUNTS, 5,
                                                                  strategy="materialize"),
    "differentiated (stream)": lambda: softmax_alts.differentiated(
        COUNTS, ((7, 5), (30, 3)), strategy="stream", **BLOCKS),
    "differentiated (materialize)": lambda: softmax_alts.differentiated(
        COUNTS, ((7, 5), (30, 3)), strategy="materialize"),
    "adaptive (stream)": lambda: softmax_alts.adaptive(
        (5, 15), div_value=2.0, head_bias=True, strategy="stream", tile_rows=4, **BLOCKS),
    "adaptive (materialize)": lambda: softmax_alts.adaptive(
        (5, 15), div_value=2.0, head_bias=True, strategy="materialize"),
    "hierarchical": lambda: softmax_alts.hierarchical(softmax_alts.huffman_tree(COUNTS)),
    "sampled": lambda: softmax_alts.sampled(5, softmax_alts.log_uniform(V)),
    "nce (per example)": lambda: softmax_alts.nce(5, softmax_alts.unigram(COUNTS),
                                                  shared=False),
    "negative_sampling (in batch)": lambda: softmax_alts.negative_sampling(
        5, softmax_alts.in_batch(V)),
}
SAMPLING = ("sampled", "nce (per example)", "negative_sampling (in batch)")
NAMES = sorted(FACTORIES)
EXACT = [name for name in NAMES if name not in SAMPLING and name != "self_normalized"]


def _inputs(layer, dtype=jnp.float32, param_dtype=None, seed=0):
  """Params of the layer's shapes with random values everywhere (biases too), hidden, targets."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda k: layer.init(k, H, V), jax.random.key(0))
  params = jax.tree.map(lambda s: jnp.asarray(0.7 * rng.normal(size=s.shape),
                                              param_dtype or dtype), shapes)
  hidden = jnp.asarray(1.5 * rng.normal(size=(N, H)), dtype)
  targets = jnp.asarray(rng.integers(0, V, N), jnp.int32).at[0].set(V - 1)
  return params, hidden, targets


@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_normalized_consistent_and_jit_equals_eager(name, key):
  layer = FACTORIES[name]()
  params, hidden, targets = _inputs(layer)

  def outputs(params, hidden, targets):
    return (layer.log_probs(params, hidden), layer.log_prob(params, hidden, targets),
            layer.loss(params, hidden, targets, key=key))

  log_probs, log_prob, loss = jax.jit(outputs)(params, hidden, targets)
  chex.assert_shape(log_probs, (N, V))
  chex.assert_shape([log_prob, loss], (N,))
  assert log_probs.dtype == log_prob.dtype == loss.dtype == jnp.float32
  np.testing.assert_allclose(jax.nn.logsumexp(log_probs, axis=1), 0.0, atol=1e-5)
  np.testing.assert_allclose(log_prob, log_probs[jnp.arange(N), targets], rtol=1e-5, atol=1e-5)
  if name in EXACT:
    np.testing.assert_allclose(loss, -log_prob, rtol=1e-6, atol=1e-6)
  for got, want in zip(outputs(params, hidden, targets), (log_probs, log_prob, loss)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_finite_differences(name, key):
  layer = FACTORIES[name]()
  with jax.enable_x64(True):
    params, hidden, targets = _inputs(layer, jnp.float64)
    check_grads(jax.jit(lambda p, h: layer.loss(p, h, targets, key=key)), (params, hidden),
                order=1, modes=("rev",))  # the primitive's VJP is reverse mode
    check_grads(jax.jit(layer.log_probs), (params, hidden), order=1, modes=("rev",))


@pytest.mark.parametrize("name", NAMES)
def test_vmap_equals_the_batched_call(name, key):
  layer = FACTORIES[name]()
  params, hidden, targets = _inputs(layer)
  groups = lambda x: x.reshape((2, N // 2) + x.shape[1:])
  weights = jnp.linspace(0.5, 1.5, N)
  if name in SAMPLING:  # a group draws its own negatives: compare each group with its call
    grouped = jax.jit(jax.vmap(lambda h, t: layer.loss(params, h, t, key=key)))(
        groups(hidden), groups(targets))
    for g in range(2):
      np.testing.assert_allclose(
          grouped[g], jax.jit(layer.loss)(params, groups(hidden)[g], groups(targets)[g],
                                          key=key), rtol=1e-5)
    return
  # Through the gradient too (the primitive's VJP under vmap, with its run-time loops).
  objective = lambda p, f: jnp.sum(weights * f(p))
  vmapped = lambda p: jax.vmap(layer.loss, in_axes=(None, 0, 0))(
      p, groups(hidden), groups(targets)).reshape(N)
  value, grads = jax.jit(jax.value_and_grad(lambda p: objective(p, vmapped)))(params)
  want, want_grads = jax.jit(jax.value_and_grad(
      lambda p: objective(p, lambda p: layer.loss(p, hidden, targets))))(params)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-5)
  log_probs = jax.jit(jax.vmap(layer.log_probs, in_axes=(None, 0)))(params, groups(hidden))
  np.testing.assert_allclose(log_probs.reshape(N, V), jax.jit(layer.log_probs)(params, hidden),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_and_mixed_dtypes_equal_float32_on_the_rounded_values(name, key):
  """GEMMs in the inputs' dtype accumulate in float32 and the log-sum-exp is float32: the
  outputs equal a float32 computation on the same bfloat16-rounded values, and are normalized
  to float32 precision (a bfloat16 log-normalizer would be off by about 1e-2)."""
  layer = FACTORIES[name]()
  params, hidden, targets = _inputs(layer, jnp.bfloat16)
  as32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)

  @jax.jit
  def outputs(params, hidden):
    loss, grads = jax.value_and_grad(
        lambda p, h: jnp.sum(layer.loss(p, h, targets, key=key)), argnums=(0, 1))(params, hidden)
    return layer.log_probs(params, hidden), layer.log_prob(params, hidden, targets), loss, grads

  want_log_probs, want_log_prob, want_loss, want_grads = outputs(as32(params), as32(hidden))
  # The adaptive softmax's projections `P h` are activations between two GEMMs, rounded to
  # bfloat16 when both are (as any bfloat16 layer's output is).
  tol = 5e-3 if name.startswith("adaptive") else 1e-4
  # Mixed dtypes meet the stream strategy's loop carries; the one-GEMM form casts like any GEMM.
  mixed = () if name.endswith("(materialize)") else ((as32(params), hidden),
                                                      (params, as32(hidden)))
  for p, h in ((params, hidden),) + mixed:
    log_probs, log_prob, loss, (d_params, d_hidden) = outputs(p, h)
    assert log_probs.dtype == log_prob.dtype == loss.dtype == jnp.float32
    np.testing.assert_allclose(jax.nn.logsumexp(log_probs, axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(log_probs, want_log_probs, rtol=tol, atol=tol)
    np.testing.assert_allclose(log_prob, want_log_prob, rtol=tol, atol=tol)
    np.testing.assert_allclose(loss, want_loss, rtol=tol)
    # Gradients come back in each input's own dtype; bfloat16 ones are rounded.
    chex.assert_trees_all_equal_dtypes(d_params, p)
    assert d_hidden.dtype == h.dtype
    chex.assert_trees_all_close(as32((d_params, d_hidden)), want_grads, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", NAMES)
def test_where_masks_rows_whatever_their_id(name, key):
  layer = FACTORIES[name]()
  params, hidden, targets = _inputs(layer)
  where = jnp.asarray([True, False, True, True, False, True])
  padded = targets.at[1].set(-1).at[4].set(V + 5)  # padding ids: no error, no NaN
  eager = layer.loss(params, hidden, padded, key=key, where=where)  # eager: the ids are checked

  @jax.jit
  def masked(hidden, targets, where):
    loss_of = lambda h: layer.loss(params, h, targets, key=key, where=where)
    return loss_of(hidden), layer.log_prob(params, hidden, targets, where=where), jax.grad(
        lambda h: jnp.sum(loss_of(h)))(hidden)

  loss, log_prob, d_hidden = masked(hidden, padded, where)
  unmasked_loss, unmasked_log_prob, _ = masked(hidden, targets, jnp.ones(N, bool))
  np.testing.assert_allclose(eager, loss, rtol=1e-6)
  off = ~np.asarray(where)
  for values in (loss, log_prob, d_hidden):
    np.testing.assert_array_equal(np.asarray(values)[off], 0.0)  # zero, and no gradient
  assert np.all(np.isfinite(d_hidden)) and np.any(d_hidden[where] != 0)
  if name != "negative_sampling (in batch)":  # its negatives are the other rows' targets
    np.testing.assert_allclose(loss[where], unmasked_loss[where], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(log_prob[where], unmasked_log_prob[where], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="where.*bool"):
    layer.loss(params, hidden, targets, key=key, where=where[:3])


@pytest.mark.parametrize("name", ["full (stream)", "adaptive (materialize)"])
def test_float16_works_as_bfloat16_does(name, key):
  """float16 takes the same path: products in float16 accumulated in float32, float32 results."""
  layer = FACTORIES[name]()
  params, hidden, targets = _inputs(layer, jnp.float16)
  as32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
  log_prob = jax.jit(layer.log_prob)(params, hidden, targets)
  assert log_prob.dtype == jnp.float32
  tol = 2e-3 if name.startswith("adaptive") else 1e-4
  np.testing.assert_allclose(log_prob, jax.jit(layer.log_prob)(as32(params), as32(hidden),
                                                               targets), rtol=tol, atol=tol)
  np.testing.assert_allclose(jax.nn.logsumexp(jax.jit(layer.log_probs)(params, hidden), axis=1),
                             0.0, atol=1e-5)


# One helper batches `hidden [H]` for every layer: checked on each kind of layer once.
UNBATCHED = ("full (stream)", "class_based (materialize)", "adaptive (stream)", "hierarchical",
             "sampled", "negative_sampling (in batch)")


@pytest.mark.parametrize("name", UNBATCHED)
def test_unbatched_hidden_gives_scalars(name, key):
  layer = FACTORIES[name]()
  params, hidden, targets = _inputs(layer)
  log_prob = layer.log_prob(params, hidden[2], targets[2])
  assert log_prob.shape == () and layer.log_probs(params, hidden[2]).shape == (V,)
  np.testing.assert_allclose(log_prob, layer.log_prob(params, hidden[2:3], targets[2:3])[0],
                             rtol=1e-6)
  loss = layer.loss(params, hidden[2], targets[2], key=key, where=jnp.asarray(True))
  assert loss.shape == ()
  if name not in SAMPLING[1:]:  # per-example and in-batch negatives depend on the batch
    np.testing.assert_allclose(loss, layer.loss(params, hidden[2:3], targets[2:3], key=key)[0],
                               rtol=1e-6)
  with pytest.raises(ValueError, match="targets.*scalar"):
    layer.log_prob(params, hidden[2], targets[:2])


@pytest.mark.parametrize("name", NAMES)
def test_bad_ids_raise_outside_jit_and_give_nan_under_jit(name, key):
  layer = FACTORIES[name]()
  params, hidden, targets = _inputs(layer)
  for bad in (V, -1):
    with pytest.raises(ValueError, match=f"id {bad}.*vocab_size = {V}"):
      layer.loss(params, hidden, targets.at[2].set(bad), key=key)
  for fn in (lambda *a: layer.loss(*a, key=key), layer.log_prob):
    values = np.asarray(jax.jit(fn)(params, hidden, targets.at[2].set(V)))
    assert np.isnan(values[2]) and np.all(np.isfinite(np.delete(values, 2)))


@pytest.mark.parametrize("name", NAMES)
def test_init_param_dtype(name, key):
  layer = FACTORIES[name]()
  for kwargs in ({"param_dtype": jnp.bfloat16}, {"dtype": jnp.bfloat16}):
    params = layer.init(key, H, V, **kwargs)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(layer.init(key, H, V))} == {jnp.dtype(jnp.float32)}
  with pytest.raises(ValueError, match="param_dtype.*floating"):
    layer.init(key, H, V, param_dtype=jnp.int32)
