"""Scale-out on JAX's own runtime: a `data` x `model` device mesh, the sharded step, many hosts.

```
mesh  = train.make_mesh(data=4, model=2)              # 8 devices: batch over data, vocab over model
model = train.sharded_language_model(config, counts, mesh)   # vocab-parallel output layer
state = train.init_train_state(model, opt, key, batch_size)
shardings = train.state_shardings(state, mesh, opt)   # tables split along V, the rest replicated
state = train.put_sharded(state, shardings)
step  = train.make_sharded_train_step(model, opt, mesh, shardings)
state, metrics = step(state, window, key)             # the same step, data- and vocab-parallel
```

The step is `train.make_train_step`'s, jitted again with the shardings: the batch rows are split
over `data` (each device runs the network on its rows; the compiler adds the all-reduce of the
gradients), the recurrent state is split the same way, and the word-indexed tables (the output
table, the embedding, the adaptive softmax's tails and their optimizer moments) are split along V
over `model`, where the output layer is the vocabulary-parallel one of `softmax_alts`. Every
other parameter is replicated; pass your own `shardings` to choose otherwise. The result equals
the single-device step up to the order of floating-point sums.

Many hosts: call `initialize` (`jax.distributed.initialize`) first in every process; the mesh
then spans the devices of all processes, and each process feeds only the rows of the batch that
live on its own devices (`process_rows`, `global_batch`). On CPU the processes exchange data
through gloo (JAX's CPU collectives).
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import softmax_alts
from train._batching import Window
from train._model import (LanguageModel, ModelConfig, _make_sampler, check_config,
                          default_cutoffs, language_model)
from train._step import Optimizer, SparseOptState, TrainState, _uses_sparse, make_train_step

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)
# The output layers with a vocabulary-parallel form (`softmax_alts.vocab_parallel_*`).
VOCAB_PARALLEL = ("full", "selfnorm", "sampled", "nce", "ns", "adaptive")


def parse_mesh(text: str) -> dict[str, int]:
  """Parses `"data=4,model=2"` (either axis may be left out) into `{"data": 4, "model": 2}`.

  Raises:
    ValueError: for an unknown axis, a repeated one, or a size that is not a positive integer.
  """
  sizes: dict[str, int] = {}
  for item in str(text).split(","):
    if not item.strip():
      continue
    name, sep, value = item.partition("=")
    name = name.strip()
    if not sep or name not in AXES:
      raise ValueError(f"--mesh must be axis=size pairs over {', '.join(AXES)}, e.g. "
                       f"data=4,model=2; got {text!r}.")
    if name in sizes:
      raise ValueError(f"--mesh names the axis {name!r} twice; got {text!r}.")
    try:
      size = int(value)
    except ValueError:
      size = 0
    if size < 1:
      raise ValueError(f"--mesh sizes must be positive integers; got {name}={value.strip()!r}.")
    sizes[name] = size
  if not sizes:
    raise ValueError(f"--mesh must name at least one axis, e.g. data=4,model=2; got {text!r}.")
  return sizes


def make_mesh(data: int | None = None, model: int = 1, *, devices=None) -> Mesh:
  """A `(data, model)` mesh over `devices` (default: every device of every process).

  Args:
    data: the size of the `data` axis (default: all the devices not used by `model`).
    model: the size of the `model` axis (the vocabulary is split over it).
    devices: the devices, or None for `jax.devices()`.

  Returns:
    A `jax.sharding.Mesh` with axes ("data", "model"), both automatic (the compiler partitions
    everything but the vocabulary-parallel layers, which are written per device).

  Raises:
    ValueError: if `data * model` is not the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  count = len(devices)
  for name, value in (("data", data), ("model", model)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
      raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
  if data is None:
    if count % model:
      raise ValueError(f"the model axis size {model} does not divide the {count} devices.")
    data = count // model
  if data * model != count:
    platform = devices[0].platform if devices else "none"
    hint = (" (for simulated CPU devices set XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{data * model} before JAX starts)" if platform == "cpu" else "")
    raise ValueError(f"the mesh data={data},model={model} needs {data * model} devices; found "
                     f"{count} ({platform}){hint}.")
  return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def initialize(coordinator_address: str, num_processes: int, process_id: int, **kwargs) -> None:
  """Joins this process to a multi-process run (`jax.distributed.initialize`).

  Call it in every process before anything else touches JAX's devices. Afterwards
  `jax.devices()` lists the devices of all processes and a mesh built from them spans the hosts.
  On CPU the processes run collectives through gloo.

  Args:
    coordinator_address: `host:port` of process 0, which every process can reach.
    num_processes: the number of processes.
    process_id: this process's index in `[0, num_processes)`.
    **kwargs: passed to `jax.distributed.initialize` (e.g. `local_device_ids`).
  """
  if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
    raise ValueError(f"`coordinator_address` must be host:port; got {coordinator_address!r}.")
  if not (isinstance(num_processes, int) and num_processes >= 1):
    raise ValueError(f"`num_processes` must be a positive integer; got {num_processes!r}.")
  if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
    raise ValueError(f"`process_id` must be in [0, {num_processes}); got {process_id!r}.")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id, **kwargs)


def _round_cutoffs(cutoffs, vocab_size: int, shards: int) -> tuple[int, ...]:
  """Cutoffs moved to multiples of `shards` (strictly increasing, in (0, V)), so that every
  cluster of the adaptive softmax splits evenly over the model axis."""
  out: list[int] = []
  for c in cutoffs:
    c = min(max(shards * round(c / shards), shards), vocab_size - shards)
    if c > (out[-1] if out else 0):
      out.append(c)
  if not out:
    raise ValueError(f"the adaptive softmax over V = {vocab_size} words cannot be split over a "
                     f"model axis of size {shards}: V must be at least {2 * shards}.")
  return tuple(out)


def _model_axis(mesh: Mesh) -> int:
  return int(mesh.shape[MODEL]) if MODEL in mesh.axis_names else 1


def vocab_parallel_config(config: ModelConfig, counts, mesh: Mesh) -> ModelConfig:
  """Checks that `config` can be split over the mesh's `model` axis and fills in its options.

  With a model axis of size M > 1: the output layer must have a vocabulary-parallel form, V a
  multiple of M, and the adaptive softmax's clusters multiples of M (automatic cutoffs are
  moved to multiples of M; given ones must already be).

  Returns:
    The checked config (as `check_config` returns it).

  Raises:
    ValueError: naming what does not split and how to fix it.
  """
  shards = _model_axis(mesh)
  if shards > 1:
    if config.softmax not in VOCAB_PARALLEL:
      raise ValueError(f"--softmax {config.softmax} has no vocabulary-parallel form; with a "
                       f"model axis use one of {', '.join(VOCAB_PARALLEL)}, or put every device "
                       "on the data axis (--mesh data=N).")
    if config.vocab_size % shards:
      raise ValueError(f"the vocabulary of V = {config.vocab_size} words does not split over the "
                       f"model axis of size {shards}: V must be a multiple of {shards} (choose "
                       "--max-vocab for a corpus or --synthetic-vocab to make it so, or another model "
                       "size).")
    if config.softmax == "adaptive":
      if config.cutoffs is None:
        config = config._replace(cutoffs=_round_cutoffs(default_cutoffs(counts),
                                                        config.vocab_size, shards))
      bounds = list(config.cutoffs) + [config.vocab_size]
      sizes = [b - a for a, b in zip(bounds, bounds[1:])]
      if any(size % shards for size in sizes):
        raise ValueError(f"the adaptive softmax's clusters {sizes} (cutoffs "
                         f"{list(config.cutoffs)}) must be multiples of the model axis size "
                         f"{shards}: choose cutoffs that are multiples of {shards}.")
  return check_config(config, counts)


def vocab_parallel_layer(config: ModelConfig, counts, mesh: Mesh):
  """The vocabulary-parallel `OutputLayer` that `config.softmax` names, split over `model`.

  Args:
    config: a config checked by `vocab_parallel_config`.
    counts: `[V]` token counts.
    mesh: the mesh.

  Returns:
    A `softmax_alts.vocab_parallel_*` layer (the plain layer where the model axis has size 1).
  """
  kw = {"mesh": mesh, "axis": MODEL}
  name = config.softmax
  if name == "full":
    return softmax_alts.vocab_parallel_full(**kw)
  if name == "selfnorm":
    return softmax_alts.vocab_parallel_self_normalized(config.alpha, **kw)
  if name == "adaptive":
    return softmax_alts.vocab_parallel_adaptive(config.cutoffs, div_value=config.div_value, **kw)
  sampler = _make_sampler(config, np.asarray(counts))
  if name == "sampled":
    return softmax_alts.vocab_parallel_sampled(config.num_samples, sampler, **kw)
  if name == "nce":
    return softmax_alts.vocab_parallel_nce(config.num_samples, sampler, **kw)
  if name == "ns":
    return softmax_alts.vocab_parallel_negative_sampling(config.num_samples, sampler, **kw)
  raise ValueError(f"--softmax {name} has no vocabulary-parallel form.")


def sharded_language_model(config: ModelConfig, counts, mesh: Mesh) -> LanguageModel:
  """`train.language_model` whose output layer is split along V over the mesh's `model` axis.

  With a model axis of size 1 this is `language_model(config, counts)` (data parallelism needs
  no change to the model). The parameters are those of the unsharded model, so checkpoints move
  freely between meshes and a single device.

  Raises:
    ValueError: see `vocab_parallel_config`.
  """
  if _model_axis(mesh) == 1:
    return language_model(config, counts)
  config = vocab_parallel_config(config, counts, mesh)
  return language_model(config, counts, layer=vocab_parallel_layer(config, counts, mesh))


def _param_specs(params, shards: int):
  """PartitionSpecs of `LMParams`: the output layer's tables and the embedding along V over
  `model`, everything else replicated."""
  output = params.output
  if isinstance(output, (softmax_alts.FullParams, softmax_alts.AdaptiveParams)):
    output_specs = softmax_alts.vocab_parallel_specs(output, axis=MODEL)
  else:
    output_specs = jax.tree.map(lambda _: P(), output)
  embedding = params.embedding
  embedding_spec = None
  if embedding is not None:
    embedding_spec = P(MODEL, None) if embedding.shape[0] % shards == 0 else P()
  return params._replace(embedding=embedding_spec, rnn=jax.tree.map(lambda _: P(), params.rnn),
                         output=output_specs)


def state_shardings(state: TrainState, mesh: Mesh, opt: Optimizer):
  """The `NamedSharding` of every array of a `TrainState` on `mesh`.

  The recurrent state is split along its batch rows over `data`; the word-indexed tables (the
  embedding, the output table or the adaptive softmax's tails) along V over `model`, and the
  optimizer's moments of them likewise (found with `optax.tree_map_params`); everything else,
  the step counter and the learning rate included, is replicated. With a model axis of size 1
  the parameters are replicated: plain data parallelism.

  Args:
    state: a `TrainState` (arrays or `jax.ShapeDtypeStruct`s).
    mesh: the mesh (axes "data" and "model").
    opt: the `Optimizer` the state was made with.

  Returns:
    A `TrainState` of `NamedSharding`s.
  """
  shards = _model_axis(mesh)
  specs = _param_specs(state.params, shards)
  if shards == 1:
    specs = jax.tree.map(lambda _: P(), specs, is_leaf=lambda x: isinstance(x, P))

  def on_params(tree, param_specs):
    return optax.tree_map_params(opt.transform, lambda _, spec: spec, tree, param_specs,
                                 transform_non_params=lambda _: P(),
                                 is_leaf=lambda x: isinstance(x, P))

  if isinstance(state.opt_state, SparseOptState):
    opt_specs = SparseOptState(dense=on_params(state.opt_state.dense,
                                               specs._replace(output=None)),
                               rows=on_params(state.opt_state.rows, specs.output))
  else:
    opt_specs = on_params(state.opt_state, specs)
  tree = TrainState(params=specs, opt_state=opt_specs,
                    carry=jax.tree.map(lambda _: P(DATA), state.carry), step=P())
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of a `[B, T]` batch: rows split over `data`, replicated over `model`."""
  return NamedSharding(mesh, P(DATA, None))


def process_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
  """The rows of a `[B, ...]` batch that live on this process's devices, ascending.

  A data loader on many hosts reads only these rows of each global batch and hands them to
  `global_batch`. With one process, every row.
  """
  sharding = NamedSharding(mesh, P(DATA))
  rows = set()
  for index in sharding.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(batch_size)[index[0]])
  return np.asarray(sorted(rows), np.int64)


def global_batch(local: Window, mesh: Mesh, batch_size: int) -> Window:
  """A global batch from the rows this process holds (`process_rows`), split over `data`.

  Args:
    local: a `Window` of this process's rows, `[len(process_rows(mesh, B)), T]` each.
    mesh: the mesh.
    batch_size: B, the global number of rows.

  Returns:
    A `Window` of `jax.Array`s of shape `[B, T]` with `batch_sharding(mesh)`.
  """
  sharding = batch_sharding(mesh)
  count = len(process_rows(mesh, batch_size))

  def build(part):
    part = np.asarray(part)
    if part.shape[0] != count:
      raise ValueError(f"this process holds {count} of the {batch_size} batch rows; got "
                       f"{part.shape[0]} rows.")
    return jax.make_array_from_process_local_data(sharding, part,
                                                  (batch_size,) + part.shape[1:])

  return Window(*(build(part) for part in local))


def put_sharded(tree, shardings):
  """Puts every array of `tree` on its sharding (a `device_put` that also works across hosts).

  An array already placed so is left as it is. With many processes, every process must pass
  the same values for arrays that are not yet global (a fresh state, a learning rate set on
  the host): each process then fills in the shards its devices hold.
  """
  multi = jax.process_count() > 1

  def put(x, sharding):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = put(jax.random.key_data(x), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if not multi or (isinstance(x, jax.Array) and not x.is_fully_addressable):
      return jax.device_put(x, sharding)
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(put, tree, shardings)


def make_sharded_train_step(model: LanguageModel, opt: Optimizer, mesh: Mesh,
                            shardings) -> Callable:
  """The training step of `train.make_train_step`, data- and vocabulary-parallel on `mesh`.

  Args:
    model: the model, from `sharded_language_model` when the model axis is larger than 1.
    opt: the `Optimizer`.
    mesh: the mesh.
    shardings: a `TrainState` of `NamedSharding`s (`state_shardings`, or your own).

  Returns:
    `train_step(state, batch, key) -> (state, metrics)`, the state donated. `batch` is a
    `Window` of global arrays (`global_batch`) or of host arrays holding the whole batch, of
    which each process takes its own rows. The state and key are placed on their shardings
    first when they are not already there (after `set_learning_rate`, `reset_carry`, ...).
    Its attribute `jitted` is the underlying `jax.jit` with the shardings (for AOT
    compilation and `memory_analysis()`), which takes global arrays only.
  """
  step = make_train_step(model, opt)
  replicated = NamedSharding(mesh, P())
  rows = batch_sharding(mesh)
  jitted = jax.jit(step, in_shardings=(shardings, Window(rows, rows, rows), replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)

  def to_global(batch: Window) -> Window:
    if all(isinstance(a, jax.Array) and not a.is_fully_addressable for a in batch):
      return batch
    if jax.process_count() == 1:
      return Window(*(jax.device_put(a, rows) for a in batch))
    batch_size = np.shape(batch.inputs)[0]
    mine = process_rows(mesh, batch_size)
    return global_batch(Window(*(np.asarray(a)[mine] for a in batch)), mesh, batch_size)

  def train_step(state: TrainState, batch: Window, key):
    batch_size = np.shape(batch.inputs)[0]
    data = int(mesh.shape[DATA])
    if batch_size % data:
      raise ValueError(f"the batch of {batch_size} rows does not split over the data axis of "
                       f"size {data}: --batch-size must be a multiple of {data}.")
    state = put_sharded(state, shardings)
    return jitted(state, to_global(batch), put_sharded(key, replicated))

  train_step.jitted = jitted  # for `.lower(...).compile()`: AOT compiles, memory analysis
  return train_step


def is_primary() -> bool:
  """Whether this is process 0 (the one that writes the run's files)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process gets here (nothing to do with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def mesh_from_flags(mesh: str | None, batch_size: int, coordinator: str | None = None,
                    num_processes: int | None = None,
                    process_id: int | None = None) -> Mesh | None:
  """The mesh of `python -m train` from its flags, or None to run on one device as before.

  Joins the other processes first when `coordinator`, `num_processes` and `process_id` are
  given. Without `--mesh` every device goes on the data axis (in one process, as many devices as
  divide the batch); a mesh of one device is None.

  Raises:
    ValueError: for flags that do not fit the devices or the batch.
  """
  multi = (coordinator, num_processes, process_id)
  if any(v is not None for v in multi):
    if any(v is None for v in multi):
      raise ValueError("--coordinator, --num-processes and --process-id go together; got "
                       f"{coordinator!r}, {num_processes!r} and {process_id!r}.")
    initialize(coordinator, num_processes, process_id)
  count = jax.device_count()
  if mesh is None:
    data, model = math.gcd(count, batch_size), 1
    if jax.process_count() > 1 and data != count:
      raise ValueError(f"--batch-size {batch_size} does not split over the {count} devices of "
                       "the processes; choose a multiple of it or give --mesh.")
  else:
    sizes = parse_mesh(mesh)
    model = sizes.get(MODEL, 1)
    data = sizes.get(DATA, count // model if count % model == 0 else 0)
    if data < 1:
      raise ValueError(f"--mesh model={model} does not divide the {count} devices.")
  if data * model == 1:
    return None
  if batch_size % data:
    raise ValueError(f"--batch-size {batch_size} does not split over the data axis of size "
                     f"{data}: choose a multiple of {data}.")
  devices = jax.devices()
  if data * model < count and jax.process_count() == 1:
    devices = devices[:data * model]  # one process may leave devices out
  return make_mesh(data, model, devices=devices)


def shard_training(model: LanguageModel, opt: Optimizer, mesh: Mesh, state: TrainState):
  """`(state, train_step)`: the state placed on `state_shardings` and the sharded step."""
  shardings = state_shardings(state, mesh, opt)
  return put_sharded(state, shardings), make_sharded_train_step(model, opt, mesh, shardings)


def describe(mesh: Mesh) -> str:
  """`data=4 x model=2 (8 cpu devices, 1 process)`."""
  devices = mesh.devices.flat[0]
  processes = jax.process_count()
  return (f"data={mesh.shape[DATA]} x model={mesh.shape[MODEL]} ({mesh.size} "
          f"{devices.platform} devices, {processes} process{'es' if processes > 1 else ''})")
