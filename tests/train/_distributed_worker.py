"""Run by `test_distributed.py` in a subprocess with 8 simulated CPU devices (the XLA flag is set
by the caller). Prints one JSON object:

- `steps`: for meshes 8x1, 4x2 and 2x4 (data x model), each with another output layer, the
  largest difference between the parameters after 3 sharded training steps and after the same
  3 steps on one device, the losses of both, and the sharding the output table ended with;
- `checkpoint`: a state saved from the 4x2 mesh by `train.Checkpoints` and restored on a 2x4
  mesh and on one device: the largest difference from the saved values and the shardings got;
- `cli`: `python -m train --mesh data=2,model=4 --save DIR`: its exit code, what it printed and
  the steps of the checkpoints it saved.
"""

import contextlib
import io
import json
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import train
from train._model import ModelConfig, language_model
from tests.train._tiny import TINY

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_disable_most_optimizations", True)

V, B, T, STEPS = 32, 8, 5, 3
COUNTS = np.sort(np.random.default_rng(0).integers(1, 100, V))[::-1].copy()
CASES = (
    # (data, model), config, optimizer (name, lr, row-sparse output)
    ((8, 1), dict(softmax="sampled", num_samples=6, sampler="log_uniform"), ("adam", 1e-2, True)),
    ((4, 2), dict(softmax="full", tied=True), ("adam", 1e-2, False)),
    ((2, 4), dict(softmax="adaptive", cutoffs=(8, 16), div_value=2.0), ("sgd", 0.5, False)),
)


def windows():
  stream = np.random.default_rng(1).integers(0, V, B * (STEPS * T + 1))
  return train.bptt_windows(train.batchify(stream, B), T)[:STEPS]


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run(step, state, batches, key):
  losses = []
  for i, batch in enumerate(batches):
    state, metrics = step(state, batch, jax.random.fold_in(key, i))
    losses.append(float(metrics["loss"]))
  return state, losses


def main():
  assert jax.device_count() == 8, jax.devices()
  key = jax.random.key(0)
  batches = windows()
  out = {"steps": {}}
  kept = None
  for (data, model_size), options, (name, lr, sparse) in CASES:
    config = ModelConfig(vocab_size=V, emsize=8, nhid=8, dropout=0.1, **options)
    opt = train.optimizer(name, lr, clip=1.0, sparse_output=sparse)
    mesh = train.make_mesh(data=data, model=model_size)
    # One device: the plain model and step.
    plain = language_model(config, COUNTS)
    want, want_losses = run(train.make_train_step(plain, opt),
                            train.init_train_state(plain, opt, key, B), batches, key)
    # The mesh: the vocabulary-parallel model, the sharded state and step.
    model = train.sharded_language_model(config, COUNTS, mesh)
    state = train.init_train_state(model, opt, key, B)
    shardings = train.state_shardings(state, mesh, opt)
    state = train.put_sharded(state, shardings)
    got, got_losses = run(train.make_sharded_train_step(model, opt, mesh, shardings), state,
                          batches, key)
    table = jax.tree.leaves(got.params.output)[-1]
    out["steps"][f"{data}x{model_size}"] = {
        "softmax": config.softmax,
        "params": max_diff(got.params, want.params),
        "opt_state": max_diff(got.opt_state, want.opt_state),
        "losses": got_losses, "want_losses": want_losses,
        "moved": max_diff(want.params, language_model(config, COUNTS).init(key)),
        "table_spec": str(table.sharding.spec),
        "table_shard_rows": int(table.addressable_shards[0].data.shape[0]),
        "carry_spec": str(jax.tree.leaves(got.carry)[0].sharding.spec),
    }
    if (data, model_size) == (4, 2):
      kept = (config, opt, got)

  # Save on 4x2, restore on 2x4 and on one device.
  config, opt, saved = kept
  with tempfile.TemporaryDirectory() as folder:
    checkpoints = train.Checkpoints(folder)
    checkpoints.save(saved, {"step": int(saved.step)})
    mesh = train.make_mesh(data=2, model=4)
    model = train.sharded_language_model(config, COUNTS, mesh)
    like = train.init_train_state(model, opt, jax.random.key(5), B)
    like = train.put_sharded(like, train.state_shardings(like, mesh, opt))
    on_mesh, loop = checkpoints.restore(like)
    single = train.init_train_state(language_model(config, COUNTS), opt, jax.random.key(5), B)
    single = jax.device_put(single, jax.devices()[0])
    on_one, _ = checkpoints.restore(single)
    checkpoints.close()
  table = on_mesh.params.output.w
  out["checkpoint"] = {
      "loop_step": loop["step"],
      "mesh_2x4": max_diff(on_mesh, saved),
      "one_device": max_diff(on_one, saved),
      "differs_from_like": max_diff(like.params, saved.params),
      "mesh_2x4_table_spec": str(table.sharding.spec),
      "mesh_2x4_table_devices": len(table.sharding.device_set),
      "mesh_2x4_table_shard_rows": int(table.addressable_shards[0].data.shape[0]),
      "one_device_devices": len(on_one.params.output.w.sharding.device_set),
  }

  # The command line: 2 steps on a 2x4 mesh, saved in a run folder.
  tiny = TINY + ["--synthetic-vocab", "31"]  # V = 32 (31 words and <unk>): splits over 4
  with tempfile.TemporaryDirectory() as folder:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      code = train.main(tiny + ["--mesh", "data=2,model=4", "--max-steps", "2", "--save",
                                f"{folder}/run"])
    saved = train.Checkpoints(f"{folder}/run")
    out["cli"] = {"code": code, "out": printed.getvalue(), "steps": saved.steps()}
    saved.close()
  json.dump(out, sys.stdout)


if __name__ == "__main__":
  main()
