"""Metrics of a training run: a JSON-lines log, a progress bar and a plot."""

import json
import math
import os
import pathlib
import sys
from typing import Any, Iterable, Mapping

# Every record of the log has these keys (None where a value does not apply).
FIELDS = ("event", "step", "epoch", "wall_time", "train_loss", "train_ppl", "valid_ppl",
          "test_ppl", "lr", "tokens_per_s")
EVENTS = ("train", "valid", "test")


def perplexity(nll: float | None) -> float | None:
  """`exp(nll)`, or None for None; inf past float range."""
  if nll is None:
    return None
  return math.exp(nll) if nll < 700 else math.inf


class MetricsLog:
  """An append-only log of JSON lines, one record per event.

  Each line is an object with the keys of `FIELDS`: `event` ("train" every log interval,
  "valid" at each evaluation, "test" at the end), `step`, `epoch` (fractional: steps over
  windows per epoch), `wall_time` (seconds of training, summed over resumed runs),
  `train_loss`, `train_ppl` (None when the training loss is not an exact NLL), `valid_ppl`,
  `test_ppl`, `lr` and `tokens_per_s` (training tokens per second of training steps since the
  previous record; the first step of a run or of a resume, which compiles, is not timed, so a
  record with that step alone has None).
  """

  def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None):
    """Opens the log at `path`.

    Args:
      path: the `.jsonl` file.
      resume_step: when resuming from the checkpoint of this step, records after it (written
        by the interrupted run past its last checkpoint) are dropped, so the log reads as one
        run. None starts a new log.
    """
    self.path = pathlib.Path(path)
    kept = []
    if resume_step is not None and self.path.is_file():
      kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step
              and r.get("event") != "test"]
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_name(self.path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      for record in kept:
        f.write(json.dumps(record) + "\n")
    os.replace(tmp, self.path)

  def write(self, **values: Any) -> dict:
    """Appends one record; keys outside `FIELDS` raise `ValueError`."""
    unknown = set(values) - set(FIELDS)
    if unknown:
      raise ValueError(f"unknown metrics fields {sorted(unknown)}; expected {FIELDS}.")
    if values.get("event") not in EVENTS:
      raise ValueError(f"`event` must be one of {EVENTS}; got {values.get('event')!r}.")
    record = {k: _jsonable(values.get(k)) for k in FIELDS}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    return record


def _jsonable(value):
  if value is None:
    return None
  if isinstance(value, str):
    return value
  value = float(value)
  if value.is_integer() and abs(value) < 2 ** 53:
    return int(value)
  return value if math.isfinite(value) else None


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """Reads a metrics log (skipping a torn last line)."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def plot_metrics(records: Iterable[Mapping[str, Any]], path: str | os.PathLike, *,
                 best_perplexity: float | None = None, title: str = "") -> bool:
  """Plots train and valid perplexity against step and against wall time, as a PNG.

  matplotlib is imported here, not at the package's import; when it is missing, a note goes to
  stderr and nothing is written.

  Args:
    records: the metrics log's records.
    path: the PNG to write.
    best_perplexity: drawn as a horizontal line (the synthetic corpus's best possible).
    title: the figure's title.

  Returns:
    True if the plot was written.
  """
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("note: matplotlib is not installed; skipping the metrics plot "
          "(pip install matplotlib).", file=sys.stderr)
    return False
  records = list(records)
  train = [r for r in records if r.get("event") == "train" and r.get("train_ppl")]
  valid = [r for r in records if r.get("event") == "valid" and r.get("valid_ppl")]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, x_key, x_label in ((axes[0], "step", "step"), (axes[1], "wall_time", "wall time (s)")):
    if train:
      ax.plot([r[x_key] for r in train], [r["train_ppl"] for r in train], label="train")
    if valid:
      ax.plot([r[x_key] for r in valid], [r["valid_ppl"] for r in valid], "o-", label="valid")
    if best_perplexity:
      ax.axhline(best_perplexity, color="gray", linestyle="--", label="best possible")
    ax.set_xlabel(x_label)
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path = pathlib.Path(path)
  tmp = path.with_name(path.stem + ".tmp.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
  return True


def progress_bar(total: int, initial: int, *, quiet: bool):
  """A tqdm bar over steps, on stderr; disabled with `quiet` or when stderr is not a TTY."""
  from tqdm import tqdm
  disable = quiet or not sys.stderr.isatty()
  return tqdm(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True,
              leave=False, file=sys.stderr)
