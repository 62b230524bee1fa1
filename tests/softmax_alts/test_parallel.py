"""Tests of the vocabulary-parallel output layers (the factories' `mesh=` option).

The multi-device checks run in one subprocess with 8 simulated CPU devices
(`--xla_force_host_platform_device_count=8`), so that the rest of the suite keeps its single
device; see `_parallel_worker.py` for what it computes.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_alts

REPO = pathlib.Path(__file__).resolve().parents[2]
TOL = 1e-5


def run_on_eight_devices(script: str) -> dict:
  """Runs `python -m <script>` with 8 simulated CPU devices; returns the JSON it prints."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""),
                               "--xla_force_host_platform_device_count=8"]).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in
                                       env.get("PYTHONPATH", "").split(os.pathsep) if p])
  proc = subprocess.run([sys.executable, "-m", script], env=env, cwd=str(REPO),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_vocab_parallel_layer_equals_its_unsharded_layer_on_8_devices():
  results = run_on_eight_devices("tests.softmax_alts._parallel_worker")
  methods = ("full", "full (materialize)", "self_normalized", "sampled",
             "nce (per-example, in-batch)", "negative_sampling", "class_based",
             "class_based (materialize)", "differentiated", "adaptive")
  for mesh in ("4x2", "2x4"):
    for method in methods:
      got = results[f"{method} {mesh}"]
      where = f"{method} on {mesh}"
      assert got["finite"], where
      assert got["loss_scale"] > 1.0, where  # the losses compared are not all zero
      for quantity in ("loss", "grads", "log_prob", "log_probs"):
        assert got[quantity] < TOL * max(1.0, got["loss_scale"]), (where, quantity, got)
      # log_probs [N, V] stays split along V over `model` (and along N over `data`).
      if not method.startswith("differentiated"):  # the bands' pieces, joined by the compiler
        assert got["log_probs_spec"] == "P('data', 'model')", (where, got)
      # The table's gradient is split along V like the table.
      assert got["table_grad_spec"].startswith("P('model'"), (where, got)
  assert results["eager log_prob"] < TOL * 10
  assert results["8x1 log_probs"] < TOL
  assert "`params.w`" in results["indivisible_error"]
  assert "divisible by the size 4" in results["indivisible_error"]


def test_a_model_axis_of_size_one_gives_the_unsharded_layer(key):
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  sampler = softmax_alts.uniform(12)
  plain, parallel = softmax_alts.nce(4, sampler), softmax_alts.vocab_parallel_nce(4, sampler,
                                                                                 mesh=mesh)
  hidden = jax.random.normal(jax.random.fold_in(key, 1), (5, 8))
  targets = jnp.asarray([0, 3, 5, 11, 7], jnp.int32)
  params = plain.init(jax.random.fold_in(key, 2), 8, 12)
  loss = jax.jit(lambda layer, p, k: layer.loss(p, hidden, targets, key=k), static_argnums=0)
  np.testing.assert_allclose(loss(parallel, params, key), loss(plain, params, key), rtol=1e-6)
  assert softmax_alts.has_row_sparse_path(parallel)  # the row-sparse path sees the same loss


def test_bad_mesh_axis_and_params_raise_value_errors(key):
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  with pytest.raises(ValueError, match="`mesh` must be a jax.sharding.Mesh"):
    softmax_alts.vocab_parallel_full(mesh="data=4,model=2")
  with pytest.raises(ValueError, match="`axis` must be one of the mesh's axes"):
    softmax_alts.full(mesh=mesh, axis="vocab")
  with pytest.raises(ValueError, match="`alpha` must be a non-negative number"):
    softmax_alts.vocab_parallel_self_normalized(-1.0, mesh=mesh)
  with pytest.raises(ValueError, match="`num_samples` must be a positive int"):
    softmax_alts.vocab_parallel_sampled(0, softmax_alts.uniform(8), mesh=mesh)
  with pytest.raises(ValueError, match="`params` must be FullParams, ClassBasedParams"):
    softmax_alts.vocab_parallel_specs({"w": jnp.zeros((4, 2))})
  specs = softmax_alts.vocab_parallel_specs(softmax_alts.full().init(key, 4, 8))
  assert specs == softmax_alts.FullParams(w=jax.sharding.PartitionSpec("model", None),
                                          b=jax.sharding.PartitionSpec("model"))
  adaptive = softmax_alts.adaptive([4], div_value=2.0).init(key, 4, 8)
  specs = softmax_alts.vocab_parallel_specs(adaptive, axis="vocab")
  assert specs.tail_outputs == (jax.sharding.PartitionSpec("vocab", None),)
  assert specs.head == jax.sharding.PartitionSpec() and specs.head_bias is None
  counts = np.arange(8, 0, -1)
  specs = softmax_alts.vocab_parallel_specs(softmax_alts.class_based(counts, 2).init(key, 4, 8))
  assert specs.word_weights == jax.sharding.PartitionSpec("model", None)
  assert specs.class_weights == jax.sharding.PartitionSpec()
  specs = softmax_alts.vocab_parallel_specs(
      softmax_alts.differentiated(counts, ((2, 2), (6, 2))).init(key, 4, 8))
  assert specs.weights == (jax.sharding.PartitionSpec("model", None),) * 2
