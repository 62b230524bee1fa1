"""Checkpoints of a training run with orbax: atomic, the last k and the best kept, exact resume.

A run folder holds:

```
DIR/config.json        the run's configuration (JSON), written once at the start
DIR/vocab.json         the vocabulary (`train.Vocab.save`)
DIR/checkpoints/<step>/ orbax checkpoints: the `TrainState` and the loop's counters (JSON)
DIR/metrics.jsonl      the metrics log; DIR/metrics.png its plot
```

Orbax writes each checkpoint into a temporary folder (`<step>.orbax-checkpoint-tmp-...`) and
renames it to `<step>` only once every file is written, so a process killed during a save leaves
the previous checkpoints intact and the half-written folder is never read as a checkpoint.
"""

import json
import os
import pathlib
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from train._step import TrainState, dense_opt_layout, sparse_opt_layout

CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
VOCAB = "vocab.json"
METRIC = "valid_ppl"
_ITEMS = ("state", "loop")
_CONFIG_FORMAT = "train.config"


class Checkpoints:
  """The checkpoints of a run: orbax's `CheckpointManager` over `DIR/checkpoints`.

  Keeps the last `keep` checkpoints and the one with the lowest validation perplexity (its
  metric), whatever its age. Saves are synchronous and atomic: orbax writes a step into
  `<step>.orbax-checkpoint-tmp` and renames it to `<step>` when complete; a process that dies
  during a save leaves only that temporary folder, which is never listed as a checkpoint and is
  deleted when the folder is next opened.

  Example:

  ```python
  ckpts = train.Checkpoints(run_dir, keep=3)
  ckpts.save(state, {"step": 100}, valid_ppl=123.4)
  state, loop = ckpts.restore(state_like, ckpts.latest_step())
  ```
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3):
    """Opens (and creates) the checkpoint folder `directory/checkpoints`.

    Args:
      directory: the run folder.
      keep: how many of the latest checkpoints to keep (the best is kept besides).
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
      raise ValueError(f"`keep` must be a positive integer; got {keep!r}.")
    self.directory = pathlib.Path(directory)
    self.path = self.directory / CHECKPOINTS
    remove_tmp_dirs(self.directory)  # half-written saves of a killed process
    policies = ocp.checkpoint_managers
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda metrics: metrics[METRIC], reverse=True, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=lambda metrics: metrics[METRIC], best_mode="min",
        enable_async_checkpointing=False, create=True,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.path.absolute(), options=options,
                                          item_names=_ITEMS)

  def steps(self) -> list[int]:
    """The steps of the checkpoints on disk, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The step of the latest checkpoint, or None."""
    return self._manager.latest_step()

  def metric(self, step: int) -> float | None:
    """The validation perplexity saved with the checkpoint of `step`, or None."""
    metrics = self._manager.metrics(step)
    if not metrics or metrics.get(METRIC) is None:
      return None
    return float(metrics[METRIC])

  def best_step(self) -> int | None:
    """The step of the checkpoint with the lowest validation perplexity (the latest if none
    has one), or None when there is no checkpoint."""
    scored = [(m, s) for s in self.steps() if (m := self.metric(s)) is not None]
    if scored:
      return min(scored)[1]
    return self.latest_step()

  def save(self, state, loop: Mapping[str, Any], *, valid_ppl: float | None = None) -> None:
    """Writes a checkpoint of `state` (any pytree of arrays) at step `int(state.step)`.

    Args:
      state: the `TrainState`.
      loop: the loop's counters, JSON-serialisable (step, best perplexity, ...).
      valid_ppl: the validation perplexity of `state.params`, the metric the best checkpoint is
        chosen by; None for a checkpoint that is only the latest.

    Raises:
      ValueError: if a checkpoint of this step already exists (it is never overwritten).
      Whatever the write raised (a full disk, ...): the previous checkpoints are intact and the
        temporary folder of this step is deleted.
    """
    step = int(state.step)
    if step in self._manager.all_steps():
      raise ValueError(f"a checkpoint of step {step} already exists in `{self.path}`; "
                       "it is never overwritten.")
    metrics = None if valid_ppl is None else {METRIC: float(valid_ppl)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              loop=ocp.args.JsonSave(dict(loop)))
    try:
      self._manager.save(step, args=args, metrics=metrics, force=True)
      self._manager.wait_until_finished()
    except BaseException:
      # A failed save leaves no checkpoint of this step (orbax only renames a complete one);
      # let its writers stop, then delete the half-written temporary folder.
      try:
        self._manager.wait_until_finished()
      except Exception:  # the same failure, reported again
        pass
      remove_tmp_dirs(self.directory)
      raise

  def restore(self, like, step: int | None = None):
    """Reads the checkpoint of `step` (default: the latest) into the structure of `like`.

    Args:
      like: a `TrainState` (or its `jax.ShapeDtypeStruct`s) of the same config: it fixes the
        tree structure, shapes and dtypes expected. A row-sparse `like` (a `SparseOptState`)
        also reads a checkpoint of the same config's dense optimizer state (`--dense-output`,
        or a hierarchical run saved before it trained row-sparsely), split into its layout.
      step: the step to read; None for the latest.

    Returns:
      `(state, loop)`: the restored state and the loop's counters.

    Raises:
      ValueError: if there is no checkpoint, or it does not match `like` (another config), or it
        cannot be read (a corrupt checkpoint).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise ValueError(f"no checkpoint to resume from in `{self.path}`.")
    where = self.path / str(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    split = False
    try:
      _check_saved_tree(where, abstract)
    except ValueError as error:
      # A row-sparse `like` and a checkpoint of the dense path's optimizer state (a
      # hierarchical run saved before it trained row-sparsely): the same values, laid out
      # otherwise; read them in that layout and split them.
      dense_like = dense_opt_layout(like) if isinstance(like, TrainState) else None
      if dense_like is None:
        raise
      dense_abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, dense_like)
      try:
        _check_saved_tree(where, dense_abstract)
      except ValueError:
        raise error from None  # the first difference from `like` itself
      abstract, split = dense_abstract, True
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                              loop=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # orbax raises many kinds (IO, tensorstore, value errors).
      raise ValueError(f"the checkpoint `{where}` is corrupt or unreadable "
                       f"({type(e).__name__}: {_first_line(e)}).") from None
    state, loop = restored.state, restored.loop
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
      if got.shape != want.shape or got.dtype != want.dtype:
        raise ValueError(f"the checkpoint `{where}` holds an array of shape {got.shape} "
                         f"{got.dtype} where this config has {want.shape} {want.dtype}: it "
                         "comes from another config.")
    if not isinstance(loop, dict) or "step" not in loop:
      raise ValueError(f"the checkpoint `{where}` is corrupt: its loop record is missing.")
    if split:
      state = sparse_opt_layout(state)
    return state, loop

  def close(self) -> None:
    """Waits for pending work and releases the manager."""
    self._manager.close()


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else ""


def _path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return ".".join(parts)


def _check_saved_tree(where: pathlib.Path, abstract) -> None:
  """Compares the saved arrays' names and shapes with `abstract` (reads orbax's metadata only).

  Raises:
    ValueError: naming the first difference (another config), or if the metadata is unreadable.
  """
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(where / "state")
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    saved = {leaf.name: tuple(leaf.shape) for leaf in jax.tree.leaves(tree)}
  except Exception as e:  # orbax raises many kinds (IO, JSON, value errors).
    raise ValueError(f"the checkpoint `{where}` is corrupt or unreadable "
                     f"({type(e).__name__}: {_first_line(e)}).") from None
  want = {_path_name(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  for name in sorted(set(saved) | set(want)):
    if name not in saved:
      raise ValueError(f"the checkpoint `{where}` lacks the array `{name}` that this config "
                       "has: it comes from another config.")
    if name not in want:
      raise ValueError(f"the checkpoint `{where}` holds an array `{name}` that this config "
                       "lacks: it comes from another config.")
    if saved[name] != want[name]:
      raise ValueError(f"the checkpoint `{where}` holds `{name}` of shape {saved[name]} where "
                       f"this config has {want[name]}: it comes from another config.")


def has_run(directory: str | os.PathLike) -> bool:
  """Whether `directory` already holds a run (a config file or a checkpoint folder)."""
  directory = pathlib.Path(directory)
  return (directory / CONFIG).exists() or (directory / CHECKPOINTS).exists()


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def save_config(directory: str | os.PathLike, config: Mapping[str, Any]) -> None:
  """Writes the run's configuration as `DIR/config.json` (atomically)."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  data = {"format": _CONFIG_FORMAT, "config": dict(config)}
  _write_atomic(directory / CONFIG, json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_config(directory: str | os.PathLike) -> dict:
  """Reads `DIR/config.json`.

  Raises:
    ValueError: if it is missing or not a config written by `save_config`.
  """
  path = pathlib.Path(directory) / CONFIG
  if not path.is_file():
    raise ValueError(f"`{directory}` holds no run: `{path}` is missing.")
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"`{path}` is corrupt: {e}") from None
  if not isinstance(data, dict) or data.get("format") != _CONFIG_FORMAT \
      or not isinstance(data.get("config"), dict):
    raise ValueError(f"`{path}` is corrupt: not a run configuration.")
  return data["config"]


def save_vocab(directory: str | os.PathLike, vocab) -> None:
  """Writes the vocabulary as `DIR/vocab.json` (atomically)."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tmp = directory / (VOCAB + ".tmp")
  vocab.save(tmp)
  os.replace(tmp, directory / VOCAB)


def load_vocab(directory: str | os.PathLike):
  """Reads `DIR/vocab.json` (`ValueError` if missing or corrupt)."""
  from train._vocab import Vocab
  path = pathlib.Path(directory) / VOCAB
  if not path.is_file():
    raise ValueError(f"`{directory}` holds no vocabulary: `{path}` is missing.")
  return Vocab.load(path)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       ignore=()) -> list[str]:
  """The keys whose values differ between two configs, as `key: saved -> current` strings."""
  keys = sorted((set(saved) | set(current)) - set(ignore))
  out = []
  for key in keys:
    a, b = saved.get(key), current.get(key)
    if _normalise(a) != _normalise(b):
      out.append(f"{key}: {a!r} -> {b!r}")
  return out


def _normalise(value):
  if isinstance(value, (list, tuple)):
    return [_normalise(v) for v in value]
  if isinstance(value, float) and value.is_integer():
    return int(value)
  if isinstance(value, np.generic):
    return value.item()
  return value


def remove_tmp_dirs(directory: str | os.PathLike) -> list[str]:
  """Deletes half-written checkpoint folders left by a killed save; returns their names."""
  path = pathlib.Path(directory) / CHECKPOINTS
  removed = []
  if path.is_dir():
    for child in path.iterdir():
      if child.is_dir() and ".orbax-checkpoint-tmp" in child.name:
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child.name)
  return removed
