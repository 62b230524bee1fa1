"""The `precision` suite: the README's default training run at float32 and at bfloat16.

`python -m train --precision P` for P in float32 and bfloat16, one after the other in fresh
processes, from the same seed; the table gives each one's exact test perplexity, its ratio to
the best perplexity any model can reach on the synthetic source, and the run's seconds. Settings
and the bar are described in `benchmarks/README.md`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from benchmarks import _harness as h

PRECISIONS = ("float32", "bfloat16")
BAR = 0.02                    # bfloat16's test perplexity within 2% of float32's
QUICK_FLAGS = ("--synthetic-tokens", "20000", "--epochs", "1")
_END = re.compile(r"\| end of training \| step (\d+) \| test ppl ([\d.]+) \| valid ppl ([\d.]+) "
                  r"\| best possible ([\d.]+) \| ratio [\d.]+ \| unigram [\d.]+ \| ([\d.]+) s")


def command(precision: str, seed: int, quick: bool) -> list[str]:
  """The command line of one run."""
  return (["python", "-m", "train", "--quiet", "--precision", precision, "--seed", str(seed)]
          + list(QUICK_FLAGS if quick else ()))


def parse_end(stdout: str) -> dict:
  """The numbers of a run's `| end of training | ...` line (`ValueError` if there is none)."""
  match = _END.search(stdout)
  if match is None:
    raise ValueError(f"no end-of-training line in the run's output:\n{stdout[-2000:]}")
  step, test, valid, best, seconds = match.groups()
  return {"steps": int(step), "test_ppl": float(test), "valid_ppl": float(valid),
          "best_possible": float(best), "seconds": float(seconds)}


@h.suite("precision")
def run(ctx: h.Context) -> list[h.SummaryRow]:
  """Runs the precision suite; writes `precision.md` and `precision.json`."""
  bar = ctx.progress("precision", len(PRECISIONS))
  results = {}
  try:
    for precision in PRECISIONS:
      bar.set_postfix_str(precision)
      args = command(precision, ctx.seed, ctx.quick)
      done = subprocess.run([sys.executable] + args[1:], capture_output=True, text=True,
                            env=os.environ.copy(), check=False)
      if done.returncode:
        raise RuntimeError(f"`{' '.join(args)}` exited {done.returncode}: {done.stderr[-2000:]}")
      results[precision] = {"command": " ".join(args), **parse_end(done.stdout)}
      bar.update(1)
  finally:
    bar.close()
  reference = results["float32"]["test_ppl"]
  for r in results.values():
    r["ppl_vs_float32"] = r["test_ppl"] / reference
    r["ratio_to_best"] = r["test_ppl"] / r["best_possible"]
  met = abs(results["bfloat16"]["ppl_vs_float32"] - 1) <= BAR
  md = ctx.header(
      "Precision: the default training run at float32 and at bfloat16",
      shapes="the README's default `python -m train` (synthetic Zipfian HMM source, LSTM, full "
             "softmax, Adam)" + (f", quick: `{' '.join(QUICK_FLAGS)}`" if ctx.quick else ""),
      dtype="float32 and bfloat16 compute; float32 parameters, optimizer state and losses",
      seeds=f"{ctx.seed} (the same for both)",
      method="each run in a fresh process, one after the other; test ppl exact, of the "
             "best-validation parameters; seconds: the whole run (compilation and evaluations "
             "included)",
      extra=[f"bar: bfloat16's test perplexity within {BAR:.0%} of float32's: "
             f"{'met' if met else 'not met'}"])
  md += "\n" + h.md_table(
      ["precision", "command", "test ppl", "vs float32", "ppl / best possible", "steps",
       "seconds"],
      [(p, f"`{r['command']}`", f"{r['test_ppl']:.3f}", f"{r['ppl_vs_float32']:.5f}x",
        f"{r['ratio_to_best']:.4f}", r["steps"], f"{r['seconds']:.1f}")
       for p, r in results.items()])
  paths = ctx.write("precision", md, {"results": results, "bar": BAR, "met": met})
  bf16 = results["bfloat16"]
  return [
      h.SummaryRow("precision", "test ppl bfloat16 / float32",
                   f"{bf16['test_ppl']:.3f} / {reference:.3f} ({bf16['ppl_vs_float32']:.5f}x); "
                   f"bar {'met' if met else 'not met'}"),
      h.SummaryRow("precision", "run seconds bfloat16 / float32",
                   f"{bf16['seconds']:.1f} / {results['float32']['seconds']:.1f}"),
      h.SummaryRow("precision", "table", h.display_path(paths[0])),
  ]
