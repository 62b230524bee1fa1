"""Checkpoints of a training run with orbax: atomic, the last k and the best kept, exact resume.

A run folder holds:

```
DIR/config.json        the run's configuration (JSON), and the settings of every resume
DIR/vocab.json         the vocabulary (`train.Vocab.save`)
DIR/checkpoints/<step>/ orbax checkpoints: the `TrainState` and the loop's counters (JSON)
DIR/metrics.jsonl      the metrics log; DIR/metrics.png its plot
DIR/damaged/<step>/    checkpoints found damaged when the run was resumed, set aside
```

Orbax writes each checkpoint into a temporary folder (`<step>.orbax-checkpoint-tmp-...`) and
renames it to `<step>` only once every file is written, so a process killed during a save leaves
the previous checkpoints intact and the half-written folder is never read as a checkpoint.
"""

import atexit
import json
import logging
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from train._step import TrainState, dense_opt_layout, sparse_opt_layout

CHECKPOINTS = "checkpoints"
DAMAGED = "damaged"
CONFIG = "config.json"
VOCAB = "vocab.json"
METRIC = "valid_ppl"
_ITEMS = ("state", "loop")
_CONFIG_FORMAT = "train.config"


class CorruptCheckpoint(ValueError):
  """A checkpoint that cannot be read: a file of it is missing, empty or garbled.

  Attributes:
    step: the checkpoint's step.
    path: the file or folder that could not be read.
  """

  def __init__(self, message: str, *, step: int, path: pathlib.Path):
    super().__init__(message)
    self.step = step
    self.path = path


def _warn_stderr(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


class _SkipSteps:
  """orbax's standard step names (`<step>` folders), without the steps in `skip`.

  The checkpoint manager reads the metrics of every step it finds when it opens; one damaged
  checkpoint would keep it from opening at all. Damaged steps are left out of what it finds.
  """

  def __init__(self, skip: set):
    self._base = ocp.path.step.standard_name_format()
    self.skip = skip

  def __getattr__(self, name):  # the base's attributes (e.g. single_host_load_and_broadcast)
    return getattr(self._base, name)

  def build_name(self, step: int) -> str:
    return self._base.build_name(step)

  def find_all(self, base_path):
    return (m for m in self._base.find_all(base_path) if m.step not in self.skip)

  def find_step(self, base_path, step: int):
    if step in self.skip:
      raise ValueError(f"the checkpoint of step {step} is damaged.")
    return self._base.find_step(base_path, step)


class Checkpoints:
  """The checkpoints of a run: orbax's `CheckpointManager` over `DIR/checkpoints`.

  Keeps the last `keep` checkpoints and the one with the lowest validation perplexity (its
  metric), whatever its age. Saves are synchronous and atomic: orbax writes a step into
  `<step>.orbax-checkpoint-tmp` and renames it to `<step>` when complete; a process that dies
  during a save leaves only that temporary folder, which is never listed as a checkpoint and is
  deleted when the folder is next opened for writing.

  A damaged checkpoint (a file of it missing, empty or garbled) is skipped with a warning that
  names the file: opening the folder reads the metadata of every checkpoint, and a restore that
  fails reports the checkpoint damaged. Opened for writing, a damaged checkpoint is moved to
  `DIR/damaged/<step>` (never deleted), so that a new checkpoint of the same step can be written.

  Example:

  ```python
  ckpts = train.Checkpoints(run_dir, keep=3)
  ckpts.save(state, {"step": 100}, valid_ppl=123.4)
  state, loop = ckpts.restore(state_like, ckpts.latest_step())
  ```
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, read_only: bool = False,
               warn: Callable[[str], None] | None = None):
    """Opens (and, unless `read_only`, creates) the checkpoint folder `directory/checkpoints`.

    Args:
      directory: the run folder, absolute or relative to the working directory.
      keep: how many of the latest checkpoints to keep (the best is kept besides).
      read_only: only read: no folder is created, moved or cleaned, nothing can be saved.
      warn: receives one line for every damaged checkpoint skipped (default: a
        `warning: ...` line on stderr).
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
      raise ValueError(f"`keep` must be a positive integer; got {keep!r}.")
    self.directory = pathlib.Path(directory)   # as given: what messages show
    self.path = self.directory / CHECKPOINTS
    self.read_only = bool(read_only)
    self._warn = _warn_stderr if warn is None else warn
    self._root = self.path.absolute()          # orbax wants absolute paths
    _CLOSED_LOOP_CALLBACKS.install()
    self.damaged: dict[int, CorruptCheckpoint] = {}  # step -> why it was skipped
    if not self.read_only:
      remove_tmp_dirs(self.directory)  # half-written saves of a killed process
    self._names = _SkipSteps(set())
    for step in self._all_step_folders():
      try:
        _check_readable(self._root / str(step), self.path / str(step), step)
      except CorruptCheckpoint as e:
        self._set_aside(e)
    policies = ocp.checkpoint_managers
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda metrics: metrics[METRIC], reverse=True, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=lambda metrics: metrics[METRIC], best_mode="min",
        enable_async_checkpointing=False, create=not self.read_only,
        cleanup_tmp_directories=not self.read_only, step_name_format=self._names)
    # Not orbax's `read_only` option, which logs a warning at every open: this class never
    # saves when read-only, and orbax writes nothing until a save.
    self._manager = ocp.CheckpointManager(self._root, options=options, item_names=_ITEMS)

  def _all_step_folders(self) -> list[int]:
    if not self._root.is_dir():
      return []
    return sorted(m.step for m in self._names.find_all(self._root))

  def _set_aside(self, error: CorruptCheckpoint) -> None:
    """Skips a damaged checkpoint from now on (moved to `DIR/damaged/` unless read-only)."""
    step = error.step
    self.damaged[step] = error
    self._names.skip.add(step)
    note = "Skipped."
    if not self.read_only and _distributed_primary():
      target = self.directory / DAMAGED / str(step)
      n = 1
      while target.exists():
        target, n = self.directory / DAMAGED / f"{step}-{n}", n + 1
      target.parent.mkdir(parents=True, exist_ok=True)
      os.replace(self._root / str(step), target)
      note = f"Skipped, and set aside in `{target}`."
    self._warn(f"{error} {note}")
    if hasattr(self, "_manager"):
      self._manager.reload()

  def steps(self) -> list[int]:
    """The steps of the intact checkpoints on disk, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The step of the latest intact checkpoint, or None."""
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
      ValueError: if a checkpoint of this step already exists (it is never overwritten), or the
        folder was opened `read_only`.
      Whatever the write raised (a full disk, ...): the previous checkpoints are intact and the
        temporary folder of this step is deleted.
    """
    if self.read_only:
      raise ValueError(f"`{self.path}` was opened read-only; nothing can be saved.")
    step = int(state.step)
    if step in self._manager.all_steps() or (self._root / str(step)).exists():
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
      CorruptCheckpoint: a `ValueError`, if the checkpoint cannot be read (a file of it is
        missing, empty or garbled); it names the file when it can.
      ValueError: if there is no such checkpoint, or it does not match `like` (another config).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise ValueError(f"no checkpoint to resume from in `{self.path}`.")
    if step in self.damaged:
      raise self.damaged[step]
    if step not in self.steps():
      raise ValueError(f"no checkpoint of step {step} in `{self.path}` (steps: {self.steps()}).")
    where, shown = self._root / str(step), self.path / str(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    split = False
    try:
      _check_saved_tree(where, shown, step, abstract)
    except CorruptCheckpoint:
      raise
    except ValueError as error:
      # A row-sparse `like` and a checkpoint of the dense path's optimizer state (a
      # hierarchical run saved before it trained row-sparsely): the same values, laid out
      # otherwise; read them in that layout and split them.
      dense_like = dense_opt_layout(like) if isinstance(like, TrainState) else None
      if dense_like is None:
        raise
      dense_abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, dense_like)
      try:
        _check_saved_tree(where, shown, step, dense_abstract)
      except ValueError:
        raise error from None  # the first difference from `like` itself
      abstract, split = dense_abstract, True
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                              loop=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # orbax raises many kinds (IO, tensorstore, value errors).
      _CLOSED_LOOP_CALLBACKS.read_failed()
      raise CorruptCheckpoint(f"the checkpoint `{shown}` is damaged ({type(e).__name__}: "
                              f"{_first_line(e)}).", step=step, path=shown) from None
    state, loop = restored.state, restored.loop
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
      if got.shape != want.shape or got.dtype != want.dtype:
        raise ValueError(f"the checkpoint `{shown}` holds an array of shape {got.shape} "
                         f"{got.dtype} where this config has {want.shape} {want.dtype}: it "
                         "comes from another config.")
    if not isinstance(loop, dict) or "step" not in loop:
      raise CorruptCheckpoint(f"the checkpoint `{shown}` is damaged: its loop record is "
                              "missing.", step=step, path=shown / "loop")
    if split:
      state = sparse_opt_layout(state)
    return state, loop

  def restore_intact(self, like, *, best: bool = False):
    """Restores the latest (or, with `best`, the best) checkpoint that can be read.

    A damaged checkpoint met on the way is skipped with a warning (and moved to
    `DIR/damaged/` unless read-only), and the next one tried.

    Args:
      like: as for `restore`.
      best: the checkpoint with the lowest validation perplexity instead of the latest.

    Returns:
      `(step, state, loop)`, or None when no intact checkpoint is left.

    Raises:
      ValueError: if a checkpoint does not match `like` (another config).
    """
    while True:
      step = self.best_step() if best else self.latest_step()
      if step is None:
        return None
      try:
        return (step, *self.restore(like, step))
      except CorruptCheckpoint as e:
        self._set_aside(e)

  def close(self) -> None:
    """Waits for pending work and releases the manager."""
    self._manager.close()


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  # tensorstore appends its whole spec (hundreds of characters of JSON) to its errors.
  text = text[0].split(" [tensorstore_spec=")[0] if text else ""
  return text[:300]


def _distributed_primary() -> bool:
  return jax.process_index() == 0


class _ClosedLoopCallbacks:
  """Drops the callbacks that a failed orbax read leaves to run after its event loop closed.

  When one array of a read fails, orbax closes its event loop while tensorstore still holds the
  reads of the other arrays; as they complete, their callbacks call `call_soon_threadsafe` on
  the closed loop and raise `RuntimeError: Event loop is closed` as unraisable exceptions, each
  printed as a traceback on stderr, at any later time and often at exit. Those, and only those,
  are dropped (every other unraisable exception goes to the previous hook), with asyncio's
  reports of the abandoned reads that failed too; after a failed read the process waits at exit
  until the callbacks stop coming, while the hook can still drop them.
  """

  def __init__(self):
    self.installed = False
    self.failed = False
    self.dropped = 0
    self.last = 0.0

  def install(self) -> None:
    if self.installed:
      return
    previous = sys.unraisablehook

    def hook(unraisable):
      error = unraisable.exc_value
      if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        self.dropped += 1
        self.last = time.monotonic()
        return
      previous(unraisable)

    sys.unraisablehook = hook
    # The tasks and futures of those reads that failed as well are reported when collected.
    logging.getLogger("asyncio").addFilter(
        lambda record: not (self.failed and record.getMessage().startswith(
            ("Task exception was never retrieved", "Future exception was never retrieved"))))
    self.installed = True

  def read_failed(self, *, quiet_s: float = 0.2, most_s: float = 2.0) -> None:
    """Notes a failed read: at exit, wait until no callback came for `quiet_s` (`most_s` in all)."""
    if self.failed:
      return
    self.failed = True

    def settle():
      start = time.monotonic()
      self.last = max(self.last, start)
      while time.monotonic() - self.last < quiet_s and time.monotonic() - start < most_s:
        time.sleep(quiet_s / 4)

    atexit.register(settle)


_CLOSED_LOOP_CALLBACKS = _ClosedLoopCallbacks()


def _named_file(item: pathlib.Path, shown: pathlib.Path) -> pathlib.Path:
  """The one data file of an orbax item folder (JSON items hold one), else the folder."""
  try:
    files = [p for p in item.iterdir() if p.is_file() and p.name != "commit_success.txt"]
  except OSError:
    return shown
  return shown / files[0].name if len(files) == 1 else shown


def _check_readable(where: pathlib.Path, shown: pathlib.Path, step: int) -> None:
  """Reads what opening a checkpoint folder reads: the metrics, the loop record and the arrays'
  metadata (orbax's own readers, not the arrays).

  Raises:
    CorruptCheckpoint: naming the file that cannot be read.
  """
  readers = (
      ("metrics", lambda path: ocp.JsonCheckpointHandler(filename="metrics").restore(path)
       if path.exists() else None),
      ("loop", lambda path: ocp.JsonCheckpointHandler().restore(path)),
      ("state", lambda path: ocp.StandardCheckpointHandler().metadata(path)),
  )
  for item, read in readers:
    try:
      read(where / item)
    except Exception as e:  # orbax raises many kinds (IO, JSON, value errors).
      _CLOSED_LOOP_CALLBACKS.read_failed()
      name = _named_file(where / item, shown / item)
      raise CorruptCheckpoint(f"the checkpoint `{shown}` is damaged: `{name}` cannot be read "
                              f"({type(e).__name__}: {_first_line(e)}).", step=step,
                              path=name) from None


def _path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return ".".join(parts)


def _check_saved_tree(where: pathlib.Path, shown: pathlib.Path, step: int, abstract) -> None:
  """Compares the saved arrays' names and shapes with `abstract` (reads orbax's metadata only).

  Args:
    where: the step folder (absolute).
    shown: the same, as messages show it.
    step: its step.
    abstract: the expected tree of `jax.ShapeDtypeStruct`s.

  Raises:
    CorruptCheckpoint: if the metadata is unreadable.
    ValueError: naming the first difference (another config).
  """
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(where / "state")
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    saved = {leaf.name: tuple(leaf.shape) for leaf in jax.tree.leaves(tree)}
  except Exception as e:  # orbax raises many kinds (IO, JSON, value errors).
    _CLOSED_LOOP_CALLBACKS.read_failed()
    raise CorruptCheckpoint(f"the checkpoint `{shown}` is damaged: `{shown / 'state'}` cannot "
                            f"be read ({type(e).__name__}: {_first_line(e)}).", step=step,
                            path=shown / "state") from None
  want = {_path_name(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  for name in sorted(set(saved) | set(want)):
    if name not in saved:
      raise ValueError(f"the checkpoint `{shown}` lacks the array `{name}` that this config "
                       "has: it comes from another config.")
    if name not in want:
      raise ValueError(f"the checkpoint `{shown}` holds an array `{name}` that this config "
                       "lacks: it comes from another config.")
    if saved[name] != want[name]:
      raise ValueError(f"the checkpoint `{shown}` holds `{name}` of shape {saved[name]} where "
                       f"this config has {want[name]}: it comes from another config.")


def has_run(directory: str | os.PathLike) -> bool:
  """Whether `directory` already holds a run (a config file or a checkpoint folder)."""
  directory = pathlib.Path(directory)
  return (directory / CONFIG).exists() or (directory / CHECKPOINTS).exists()


def has_checkpoints(directory: str | os.PathLike) -> bool:
  """Whether the run folder holds a checkpoint, intact or damaged (a half-written save aside)."""
  directory = pathlib.Path(directory)
  for folder in (directory / CHECKPOINTS, directory / DAMAGED):
    if folder.is_dir() and any(".orbax-checkpoint-tmp" not in p.name
                               for p in folder.iterdir()):
      return True
  return False


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def save_config(directory: str | os.PathLike, config: Mapping[str, Any]) -> None:
  """Writes the run's configuration as `DIR/config.json` (atomically), with no resume yet."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  data = {"format": _CONFIG_FORMAT, "config": dict(config), "resumes": []}
  _write_atomic(directory / CONFIG, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_config_file(directory: str | os.PathLike) -> dict:
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
  return data


def load_config(directory: str | os.PathLike) -> dict:
  """Reads the run's configuration from `DIR/config.json` (as of its latest resume).

  Raises:
    ValueError: if it is missing or not a config written by `save_config`.
  """
  return _read_config_file(directory)["config"]


def load_resumes(directory: str | os.PathLike) -> list[dict]:
  """The resumes `record_resume` wrote in `DIR/config.json`, oldest first."""
  return list(_read_config_file(directory).get("resumes", []))


def record_resume(directory: str | os.PathLike, step: int,
                  settings: Mapping[str, Any]) -> None:
  """Records a resume in `DIR/config.json` (atomically).

  The config takes the new `settings` (the flags a resume may change), and `resumes` gets
  `{"step": step, **settings}`: the step the run continued from and the settings it continued
  with, so the file tells what every stretch of the run ran with.
  """
  data = _read_config_file(directory)
  data["config"].update(settings)
  data["resumes"] = list(data.get("resumes", [])) + [{"step": int(step), **settings}]
  path = pathlib.Path(directory) / CONFIG
  _write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


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
