"""Run by `test_parallel.py` in a subprocess with 8 simulated CPU devices (the XLA flag is set
by the caller): every layer made with a mesh against the same layer without one, on meshes 4x2
and 2x4 (data x model), with both strategies where the layer has them, and on 8x1 (data only),
where the model axis has size 1.
Prints one JSON object: per (method, mesh), the largest differences of the loss, its gradients,
`log_prob` and `log_probs`, and the shardings seen."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import softmax_alts

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_disable_most_optimizations", True)

N, H, V = 16, 16, 64
CUTOFFS = (8, 24)  # clusters of 16 and 40 words: multiples of every model-axis size used
MESHES = ((4, 2), (2, 4))  # 8x1 (data only) gives the unsharded layers: checked once, below
K = 12


def methods(mesh):
  """name -> (layer without a mesh, layer with `mesh`)."""
  counts = np.arange(V, 0, -1).astype(np.float64)
  unigram, log_uniform = softmax_alts.unigram(counts), softmax_alts.log_uniform(V)
  in_batch = softmax_alts.in_batch(V)
  bands = ((16, 8), (48, 8))
  makers = {
      "full": lambda **kw: softmax_alts.full(**kw),
      "full (materialize)": lambda **kw: softmax_alts.full(strategy="materialize", **kw),
      "self_normalized": lambda **kw: softmax_alts.self_normalized(0.1, **kw),
      "sampled": lambda **kw: softmax_alts.sampled(K, log_uniform, **kw),
      "nce (per-example, in-batch)": lambda **kw: softmax_alts.nce(K, in_batch, shared=False,
                                                                   **kw),
      "negative_sampling": lambda **kw: softmax_alts.negative_sampling(K, unigram, **kw),
      "class_based": lambda **kw: softmax_alts.class_based(counts, 8, block_rows=8, **kw),
      "class_based (materialize)": lambda **kw: softmax_alts.class_based(
          counts, 8, strategy="materialize", **kw),
      "differentiated": lambda **kw: softmax_alts.differentiated(counts, bands, block_rows=8,
                                                                 **kw),
      "adaptive": lambda **kw: softmax_alts.adaptive(CUTOFFS, block_rows=8, tile_rows=4, **kw),
  }
  return {name: (make(), make(mesh=mesh, axis="model")) for name, make in makers.items()}


def evaluate(layer, params, hidden, targets, key):
  """Loss, its gradients w.r.t. params and hidden, `log_prob` and `log_probs`."""
  def objective(params, hidden):
    values = layer.loss(params, hidden, targets, key=key)
    return jnp.sum(values * jnp.linspace(0.5, 1.5, N, dtype=values.dtype)), values

  (_, loss), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(params, hidden)
  return {"loss": loss, "grads": grads, "log_prob": layer.log_prob(params, hidden, targets),
          "log_probs": layer.log_probs(params, hidden)}


def evaluate_all(layers, params, hidden, targets, key):
  """`evaluate` for every method, in one program (one compile per mesh)."""
  return {name: evaluate(layer, params[name], hidden, targets, key)
          for name, layer in layers.items()}


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(N, H)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, N), jnp.int32)
  key = jax.random.key(1)
  bias = jnp.asarray(rng.normal(size=(V,)), jnp.float32)
  results = {}
  reference = None
  for data, model in MESHES:
    mesh = jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    pairs = methods(mesh)
    if reference is None:  # the unsharded layers on one device, computed once
      params = {}
      for name, (plain, _) in pairs.items():
        params[name] = plain.init(jax.random.key(2), H, V)
        if isinstance(params[name], softmax_alts.FullParams):
          params[name] = params[name]._replace(b=bias)
        if isinstance(params[name], softmax_alts.ClassBasedParams):
          params[name] = params[name]._replace(word_bias=bias)
      plain_layers = {name: plain for name, (plain, _) in pairs.items()}
      reference = jax.jit(lambda p, h, t, k: evaluate_all(plain_layers, p, h, t, k))(
          params, hidden, targets, key)
    placed = {name: jax.device_put(p, jax.tree.map(
        lambda s: NamedSharding(mesh, s), softmax_alts.vocab_parallel_specs(p)))
              for name, p in params.items()}
    parallel_layers = {name: parallel for name, (_, parallel) in pairs.items()}
    every = jax.jit(lambda p, h, t, k: evaluate_all(parallel_layers, p, h, t, k))(
        placed, jax.device_put(hidden, NamedSharding(mesh, P("data", None))),
        jax.device_put(targets, NamedSharding(mesh, P("data"))), key)
    for name, got in every.items():
      want = reference[name]
      results[f"{name} {data}x{model}"] = {
          "loss": max_diff(got["loss"], want["loss"]),
          "grads": max_diff(got["grads"], want["grads"]),
          "log_prob": max_diff(got["log_prob"], want["log_prob"]),
          "log_probs": max_diff(got["log_probs"], want["log_probs"]),
          "loss_scale": float(np.max(np.abs(np.asarray(want["loss"])))),
          "log_probs_spec": str(got["log_probs"].sharding.spec),
          "table_grad_spec": str(jax.tree.leaves(got["grads"][0])[-1].sharding.spec),
          "finite": bool(np.isfinite(np.asarray(got["loss"])).all()),
      }
  # Outside jit, on arrays placed on one device: the layer reshards them itself.
  eager = parallel_layers["full"].log_prob(params["full"], hidden, targets)
  results["eager log_prob"] = max_diff(eager, reference["full"]["log_prob"])
  # A model axis of size 1 (mesh 8x1): the factories give the unsharded layer, run here on
  # hidden vectors split over the 8 devices of the data axis.
  mesh = jax.make_mesh((8, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  layer = softmax_alts.full(mesh=mesh)
  split = jax.device_put(hidden, NamedSharding(mesh, P("data", None)))
  results["8x1 log_probs"] = max_diff(jax.jit(layer.log_probs)(params["full"], split),
                                      reference["full"]["log_probs"])
  # A table whose rows do not divide over the model axis is refused, naming the array.
  bad = softmax_alts.full().init(jax.random.key(3), H, V + 2)
  try:
    parallel_layers["full"].log_prob(bad, hidden, targets)
    results["indivisible_error"] = None
  except ValueError as e:
    results["indivisible_error"] = str(e)
  json.dump(results, sys.stdout)


if __name__ == "__main__":
  main()
