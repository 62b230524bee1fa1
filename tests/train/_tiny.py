"""Shared settings of the training tests: a tiny synthetic corpus and model (a few seconds)."""

import json
import re
import pathlib

# 3000 training tokens over V = 31 ids (30 words and <unk>), 4 rows: 94 windows of 8 per epoch.
TINY = ["--synthetic-tokens", "3000", "--synthetic-vocab", "30", "--emsize", "16", "--nhid", "16",
        "--batch-size", "4", "--bptt", "8", "--eval-batch-size", "4", "--log-interval", "5",
        "--dropout", "0", "--quiet"]


def valid_lines(stdout):
  """`(step, valid perplexity)` of every evaluation line a run printed."""
  out = []
  for line in stdout.splitlines():
    match = re.match(r"\| eval \|.*\| step +(\d+) \| valid ppl +([0-9.]+)", line)
    if match:
      out.append((int(match.group(1)), float(match.group(2))))
  return out


def records(run_dir, event=None):
  """The metrics log of a run folder, optionally only one kind of event."""
  lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
  out = [json.loads(line) for line in lines]
  return [r for r in out if event is None or r["event"] == event]


def files_snapshot(run_dir):
  """Every file under `run_dir` with its bytes (to prove nothing was written)."""
  root = pathlib.Path(run_dir)
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
