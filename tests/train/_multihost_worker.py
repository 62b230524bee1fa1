"""One of the processes of `test_distributed.py`'s multi-process test:

`python _multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT`

joins the run with `train.initialize` (one CPU device per process, gloo collectives), builds a
data-parallel mesh over the devices of all processes, and trains 3 steps feeding only the batch
rows of its own devices. Process 0 writes the final parameters, the losses and every process's
rows to OUT (an `.npz` file).
"""

import sys

import jax
import numpy as np

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_disable_most_optimizations", True)

import train  # noqa: E402 (after the config, as the test process)
from tests.train._multihost_setup import setup  # noqa: E402


def main(port: str, num_processes: str, process_id: str, out: str):
  train.initialize(f"localhost:{port}", int(num_processes), int(process_id))
  model, opt, batches, key, batch_size = setup()
  mesh = train.make_mesh()  # every device of every process on the data axis
  state = train.init_train_state(model, opt, key, batch_size)
  shardings = train.state_shardings(state, mesh, opt)
  state = train.put_sharded(state, shardings)
  step = train.make_sharded_train_step(model, opt, mesh, shardings)
  rows = train.process_rows(mesh, batch_size)
  losses = []
  for i, batch in enumerate(batches):
    # This process reads only its own rows of each batch.
    local = train.Window(*(np.asarray(a)[rows] for a in batch))
    state, metrics = step(state, train.global_batch(local, mesh, batch_size),
                          jax.random.fold_in(key, i))
    losses.append(float(metrics["loss"]))
  from jax.experimental import multihost_utils
  all_rows = multihost_utils.process_allgather(rows)
  leaves = [np.asarray(leaf.addressable_shards[0].data) for leaf in jax.tree.leaves(state.params)]
  if jax.process_index() == 0:
    np.savez(out, losses=np.asarray(losses), rows=np.asarray(all_rows),
             devices=np.asarray(jax.device_count()), processes=np.asarray(jax.process_count()),
             **{f"param_{i}": leaf for i, leaf in enumerate(leaves)})
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
