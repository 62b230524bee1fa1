"""The `quality` suite: exact test perplexity against training time for every output layer.

The same LSTM language model is trained with each `python -m train --softmax` choice by
`train.fit` itself (so each row is what the command written in the table computes), the methods
of a corpus interleaved epoch by epoch, compile apart; the test perplexity is exact, of the
best-validation parameters. Corpora, settings and columns are described in
`benchmarks/README.md`; the table follows Table 1 of Grave et al. (2017).

References:
  Grave, Joulin, Cisse, Grangier and Jegou, Efficient softmax approximation for GPUs, 2017.
    https://arxiv.org/abs/1609.04309
"""

from __future__ import annotations

import math
import os
import pathlib
import time
from typing import Any, NamedTuple

import numpy as np

import jax
import jax.numpy as jnp

import train
from benchmarks import _harness as h
from train._loop import train_keys
from train._model import SOFTMAXES

DATA_ENV = "BENCHMARKS_DATA_ROOT"
"""Environment variable naming the folder of the real corpora (set by `--data-root`)."""
HELD_OUT = 0.05
"""Share of the training tokens held out for validation, as `python -m train` does."""
BAR_WITHIN, BAR_SPEEDUP = 0.05, 2.0      # adaptive vs full on WikiText-2: the bar ...
GOAL_WITHIN, GOAL_SPEEDUP = 0.03, 2.5    # ... and the goal
STEP_BUDGET_S = 60.0   # seconds of interleaved single-step timing per corpus ...
STEP_MIN_REPEATS = 5   # ... but never fewer rounds than this


class Settings(NamedTuple):
  """The model and training settings shared by every method (`python -m train` flag names)."""
  emsize: int = 256
  nhid: int = 256
  nlayers: int = 1
  dropout: float = 0.5
  batch_size: int = 20
  eval_batch_size: int = 10
  bptt: int = 35
  optimizer: str = "adam"
  lr: float = 5e-3
  clip: float = 0.25
  epochs: int = 3
  lr_decay: float = 4.0
  decay_after: int = 1
  patience: int = 3
  seed: int = 0
  synthetic_tokens: int = 100_000
  init: str = "default"
  decay: str = "epoch"


FULL = Settings()
QUICK = Settings(emsize=32, nhid=32, batch_size=8, eval_batch_size=4, bptt=10, epochs=1,
                 synthetic_tokens=1_600)


class CorpusSpec(NamedTuple):
  """A corpus of the suite: its folder under the data root and the files used."""
  name: str
  title: str
  folder: str | None
  train_file: str | None
  test_file: str | None


CORPORA = (
    CorpusSpec("synthetic", "Synthetic source (Zipfian hidden Markov, known best perplexity)",
               None, None, None),
    CorpusSpec("wikitext-2", "WikiText-2 (train valid.txt, test test.txt)", "wikitext-2",
               "valid.txt", "test.txt"),
    CorpusSpec("ptb", "Penn Treebank (train ptb.valid.txt, test ptb.test.txt)", "ptb",
               "ptb.valid.txt", "ptb.test.txt"),
)


class Data(NamedTuple):
  """A corpus ready to train on: the vocabulary and the batchified splits."""
  spec: CorpusSpec
  corpus: Any                     # train.Corpus or train.SyntheticCorpus
  train: np.ndarray               # [B, L] ids
  valid: np.ndarray               # [B', L'] ids
  test: np.ndarray                # [B', L''] ids
  sizes: dict[str, int]           # tokens of each split
  cli_data: str                   # the `python -m train` data flags


# --------------------------------------------------------------------------------------------
# Data.

def data_root() -> pathlib.Path:
  """The folder of the real corpora: `$BENCHMARKS_DATA_ROOT`, else `../shared/data`."""
  root = os.environ.get(DATA_ENV)
  return pathlib.Path(root) if root else h.REPO_ROOT.parent / "shared" / "data"


def shown(path: pathlib.Path) -> str:
  """`path` relative to the repository root (`../shared/data/...`), never an absolute path."""
  try:
    return os.path.relpath(os.path.abspath(path), h.REPO_ROOT)
  except ValueError:
    return pathlib.Path(path).name


def load(spec: CorpusSpec, s: Settings, *, max_vocab: int | None = None,
         max_tokens: int | None = None) -> Data | str:
  """Reads a corpus and batchifies its splits, or returns why it cannot (a missing folder).

  Args:
    spec: the corpus.
    s: the settings (batch sizes, the synthetic corpus's length).
    max_vocab: keep only the most frequent words (`python -m train --max-vocab`).
    max_tokens: cut the training split to this many tokens and valid and test to a tenth of it.

  Returns:
    The `Data`, or a one-line reason it was skipped.
  """
  if spec.folder is None:
    n = s.synthetic_tokens
    held = max(n // 10, 2)
    corpus = train.synthetic_corpus(0, train_length=n, valid_length=held, test_length=held)
    flags = "" if n == 500_000 else f" --synthetic-tokens {n}"
    train_ids, valid_ids, test_ids = corpus.train, corpus.valid, corpus.test
    cli = f"--data synthetic{flags}"
  else:
    folder = data_root() / spec.folder
    files = [folder / spec.train_file, folder / spec.test_file]
    missing = [f for f in files if not f.is_file()]
    if missing:
      return (f"{', '.join(f'`{shown(f)}`' for f in missing)} not found; pass "
              f"`--data-root DIR` (or set {DATA_ENV}) to the folder holding `{spec.folder}/`")
    corpus = train.read_corpus(folder, train_split=spec.train_file, test_split=spec.test_file,
                               max_size=max_vocab)
    cut = int(corpus.train.size * (1 - HELD_OUT))  # as `python -m train` without --valid-split
    train_ids, valid_ids, test_ids = corpus.train[:cut], corpus.train[cut:], corpus.test
    vocab_flag = "" if max_vocab is None else f" --max-vocab {max_vocab}"
    cli = (f"--data {shown(folder)} --train-split {spec.train_file} --eval-split "
           f"{spec.test_file}{vocab_flag}")
  if max_tokens is not None:
    train_ids = train_ids[:max_tokens]
    valid_ids = valid_ids[:max(max_tokens // 10, 2 * s.eval_batch_size)]
    test_ids = test_ids[:valid_ids.size]  # one evaluation shape: one compile
    cli += " (sliced)"
  sizes = {"train": int(train_ids.size), "valid": int(valid_ids.size), "test": int(test_ids.size)}
  return Data(spec, corpus, train.batchify(train_ids, s.batch_size),
              train.batchify(valid_ids, s.eval_batch_size),
              train.batchify(test_ids, s.eval_batch_size), sizes, cli)


# --------------------------------------------------------------------------------------------
# One method, trained epoch by epoch with `train.fit`.

class _Recorder:
  """A `train.MetricsLog` stand-in that keeps the records in memory."""

  def __init__(self):
    self.records: list[dict] = []

  def write(self, **record):
    self.records.append(record)
    return record


class Run:
  """One output layer on one corpus: its model, step, evaluator and `train.fit` state."""

  def __init__(self, method: str, data: Data, s: Settings):
    vocab = data.corpus.vocab
    self.method = method
    self.settings = s
    config = train.ModelConfig(vocab_size=len(vocab), cell="lstm", emsize=s.emsize,
                               nhid=s.nhid, nlayers=s.nlayers, dropout=s.dropout, softmax=method,
                               init=s.init)
    self.model = train.language_model(config, vocab.counts)
    self.opt = train.optimizer(s.optimizer, s.lr, clip=s.clip or None, sparse_output=True)
    self.train_step = train.make_train_step(self.model, self.opt)
    self.evaluate = train.make_evaluator(self.model, bptt=s.bptt)
    init_key, self.step_key = train_keys(s.seed)
    self.state = train.init_train_state(self.model, self.opt, init_key, s.batch_size)
    self.windows = train.bptt_windows(data.train, s.bptt, last="pad")
    self.loop_config = train.LoopConfig(
        epochs=s.epochs, bptt=s.bptt, decay=s.decay, lr_decay=s.lr_decay,
        decay_after=s.decay_after, patience=s.patience, seed=s.seed)
    self.loop = None
    self.best = None
    self.log = _Recorder()
    self.compile_s = self.eval_compile_s = self.test_eval_s = None
    self.step_stats = None
    self.test = None
    self.valid_curve: list[float] = []
    self.epoch_train_s: list[float] = []

  @property
  def per_epoch(self) -> int:
    return len(self.windows)

  def compile(self, valid) -> None:
    """Compiles the step (one step on a copy of the state) and the evaluator (one evaluation)."""
    t0 = time.perf_counter()
    copy = jax.tree.map(jnp.copy, self.state)
    out = self.train_step(copy, self.windows[0], jax.random.fold_in(self.step_key, 0))
    h.block(out)
    self.compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    self.evaluate(self.state.params, valid)
    self.eval_compile_s = time.perf_counter() - t0

  def train_epoch(self, epoch: int, data: Data) -> None:
    """Continues `train.fit` to the end of epoch `epoch` (1-based)."""
    seconds_before = self.train_seconds()
    result = train.fit(self.model, self.opt, self.state, data.train, data.valid,
                       config=self.loop_config._replace(max_steps=epoch * self.per_epoch),
                       loop=self.loop, best=self.best, quiet=True, log=self.log,
                       train_step=self.train_step, evaluate=self.evaluate,
                       echo=lambda line: None)
    self.state, self.loop = result.state, result.loop
    self.best = (result.best_params, result.best_valid)
    self.valid_curve = [r["valid_ppl"] for r in self.log.records if r["event"] == "valid"]
    self.epoch_train_s.append(self.train_seconds() - seconds_before)

  def finish(self, data: Data) -> None:
    t0 = time.perf_counter()
    self.test = self.evaluate(self.best[0], data.test)
    self.test_eval_s = time.perf_counter() - t0

  def tokens(self) -> int:
    """Training tokens seen (the padded steps of the last window excluded)."""
    per_window = [int(w.mask.sum()) for w in self.windows]
    step = int(self.loop["step"]) if self.loop else 0
    full, rest = divmod(step, self.per_epoch)
    return full * sum(per_window) + sum(per_window[:rest])

  def train_seconds(self) -> float:
    """Seconds spent in training steps: each log record's tokens over its tokens/s."""
    per_window = [int(w.mask.sum()) for w in self.windows]
    seconds, previous = 0.0, 0
    for r in self.log.records:
      if r["event"] != "train" or r["tokens_per_s"] is None:  # None: one untimed step alone
        continue
      steps = range(previous, r["step"])
      tokens = sum(per_window[s % self.per_epoch] for s in steps)
      seconds += tokens / r["tokens_per_s"]
      previous = r["step"]
    return seconds

  def settings_text(self) -> str:
    c = self.model.config
    return {
        "full": "softmax over V",
        "hsm-balanced": "balanced binary tree",
        "hsm-huffman": "Huffman tree of the counts",
        "class": f"{c.classes} frequency-binned classes",
        "dsoftmax": "bands " + ", ".join(f"{w}x{d}" for w, d in (c.bands or ())),
        "sampled": f"k={c.num_samples}, {c.sampler}^0.75" if c.sampler == "unigram" else
                   f"k={c.num_samples}, {c.sampler}",
        "nce": f"k={c.num_samples}, {c.sampler}^0.75",
        "ns": f"k={c.num_samples}, {c.sampler}^0.75",
        "adaptive": f"cutoffs {list(c.cutoffs or ())}, div {c.div_value:g}",
        "selfnorm": f"alpha {c.alpha:g}",
    }[self.method]

  def result(self) -> dict:
    train_s = self.train_seconds()
    return {
        "method": self.method, "settings": self.settings_text(),
        "config": self.model.config._asdict(),
        "test_ppl": self.test.perplexity, "test_nll": self.test.nll,
        "test_tokens": self.test.tokens, "best_valid_ppl": self.best[1],
        "valid_curve": self.valid_curve, "steps": int(self.loop["step"]),
        "train_time_s": float(self.loop["wall_time"]), "train_steps_s": train_s,
        "epoch_train_steps_s": self.epoch_train_s,
        "train_tokens": self.tokens(), "train_tok_s": self.tokens() / train_s,
        "compile_s": self.compile_s, "eval_compile_s": self.eval_compile_s,
        "test_eval_s": self.test_eval_s, "step": self.step_stats,
        "step_tok_s": None if self.step_stats is None else self.step_stats.rate(
            self.settings.batch_size * self.settings.bptt),
        "records": self.log.records,
    }


def cli_command(data: Data, s: Settings, method: str) -> str:
  """The `python -m train` command that trains one row (flags at their defaults left out)."""
  from train._cli import build_parser
  defaults = vars(build_parser().parse_args([]))
  flags = {"emsize": s.emsize, "nhid": s.nhid, "nlayers": s.nlayers, "dropout": s.dropout,
           "batch_size": s.batch_size, "eval_batch_size": s.eval_batch_size, "bptt": s.bptt,
           "optimizer": s.optimizer, "lr": s.lr, "clip": s.clip, "epochs": s.epochs,
           "lr_decay": s.lr_decay, "decay_after": s.decay_after, "patience": s.patience,
           "seed": s.seed, "softmax": method, "init": s.init, "decay": s.decay}
  parts = [f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else
           f"--{k.replace('_', '-')} {v}" for k, v in flags.items() if defaults[k] != v]
  return " ".join(["python -m train", data.cli_data.replace(" (sliced)", ""), *parts])


def step_times(runs: list[Run], *, repeats: int, budget: float | None, bar) -> None:
  """Times one training step of every run with `_harness.interleave` (medians), on copies."""
  states = {run.method: jax.tree.map(jnp.copy, run.state) for run in runs}
  count = {run.method: 0 for run in runs}

  def call(run: Run):
    def step():
      i = count[run.method] % min(8, run.per_epoch)
      count[run.method] += 1
      states[run.method], metrics = run.train_step(states[run.method], run.windows[i],
                                                   jax.random.fold_in(run.step_key, i))
      return states[run.method], metrics
    return step

  stats = h.interleave({run.method: call(run) for run in runs}, repeats=repeats, warmup=1,
                       budget_s=budget, min_repeats=STEP_MIN_REPEATS, bar=bar)
  for run in runs:
    run.step_stats = stats[run.method]


def train_all(runs: list[Run], data: Data, s: Settings, bar, *, repeats: int,
              budget: float | None) -> None:
  """Compiles every run, then trains them interleaved epoch by epoch and tests them."""
  for run in runs:
    bar.set_postfix_str(f"{data.spec.name} compile {run.method}")
    run.compile(data.valid)
    bar.update(1)
  for epoch in range(1, s.epochs + 1):
    k = (epoch - 1) % len(runs)
    for run in runs[k:] + runs[:k]:
      bar.set_postfix_str(f"{data.spec.name} epoch {epoch}/{s.epochs} {run.method}")
      run.train_epoch(epoch, data)
      time.sleep(h.PAUSE_S)
      bar.update(1)
  bar.set_postfix_str(f"{data.spec.name} step times")
  step_times(runs, repeats=repeats, budget=budget, bar=bar)
  for run in runs:
    bar.set_postfix_str(f"{data.spec.name} test {run.method}")
    run.finish(data)
    bar.update(1)


# --------------------------------------------------------------------------------------------
# Output.

def machine_note(ctx: h.Context) -> str:
  """The load average and this process's niceness: whether the machine was shared."""
  try:
    load = os.getloadavg()[0]
  except OSError:
    return "load average unknown"
  return (f"1-minute load average {load:.1f} on {ctx.machine.cores} cores, process niceness "
          f"{os.nice(0)}")


def _corpus_table(rows: list[dict], best: float | None) -> str:
  full = next((r for r in rows if r["method"] == "full"), None)
  out = []
  for r in rows:
    ppl_ratio = r["test_ppl"] / full["test_ppl"] if full else float("nan")
    speedup = full["train_time_s"] / r["train_time_s"] if full else float("nan")
    step_speedup = (full["step"].median / r["step"].median if full and r["step"] is not None
                    and full["step"] is not None else float("nan"))
    cells = [f"`{r['method']}`", r["settings"], f"{r['test_ppl']:.2f}"]
    if best is not None:
      cells.append(f"{r['test_ppl'] / best:.3f}")
    cells += [f"{ppl_ratio:.3f}", h.fmt_seconds(r["train_time_s"]), h.fmt_ratio(speedup),
              h.fmt_rate(r["train_tok_s"]),
              "—" if r["step"] is None else
              f"{h.fmt_rate(r['step_tok_s'])} (±{100 * r['step'].iqr_rel / 2:.0f}%, "
              f"n={r['step'].n})",
              h.fmt_ratio(step_speedup), f"{r['best_valid_ppl']:.2f}",
              h.fmt_seconds(r["compile_s"])]
    out.append(cells)
  headers = ["output layer", "settings", "test ppl"]
  if best is not None:
    headers.append("ppl / best possible")
  headers += ["ppl / full", "training time (s)", "time: full / this", "train tok/s",
              "step tok/s (interleaved median)", "step: full / this", "best valid ppl",
              "compile s"]
  return h.md_table(headers, out)


def bar_verdict(rows: list[dict]) -> dict | None:
  """Adaptive against full on one corpus: the perplexity ratio, the speed-up, bar and goal."""
  full = next((r for r in rows if r["method"] == "full"), None)
  adaptive = next((r for r in rows if r["method"] == "adaptive"), None)
  if full is None or adaptive is None:
    return None
  ratio = adaptive["test_ppl"] / full["test_ppl"]
  speedup = full["train_time_s"] / adaptive["train_time_s"]
  step_speedup = (full["step"].median / adaptive["step"].median
                  if full["step"] is not None and adaptive["step"] is not None else float("nan"))
  # Judged on the smaller of the two speed-ups: a burst of load during one method's epochs
  # moves its wall time, not the interleaved step medians.
  judged = min(speedup, step_speedup) if math.isfinite(step_speedup) else speedup
  return {"ppl_ratio": ratio, "speedup": speedup, "step_speedup": step_speedup,
          "judged_speedup": judged,
          "bar_met": ratio <= 1 + BAR_WITHIN and judged >= BAR_SPEEDUP,
          "goal_met": ratio <= 1 + GOAL_WITHIN and judged >= GOAL_SPEEDUP}


def _plot(results: dict[str, dict]):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  done = [(name, r) for name, r in results.items() if "rows" in r]
  fig, axes = plt.subplots(1, max(1, len(done)), figsize=(6 * max(1, len(done)), 4.5),
                           squeeze=False)
  for ax, (name, r) in zip(axes[0], done):
    for row in r["rows"]:
      ax.scatter(row["train_time_s"], row["test_ppl"], s=30,
                 marker="s" if row["method"] == "full" else "o")
      ax.annotate(row["method"], (row["train_time_s"], row["test_ppl"]), fontsize=8,
                  xytext=(4, 3), textcoords="offset points")
    if r.get("best_perplexity"):
      ax.axhline(r["best_perplexity"], color="k", ls="--", lw=0.8, label="best possible")
      ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("training time (s, log scale)")
    ax.set_ylabel("exact test perplexity")
    ax.set_title(r["title"], fontsize=9)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


class quick_compiles:
  """With `--quick`, XLA's lighter optimisation (compiles about a third faster) inside the block.

  A smoke run's timings mean nothing, its compile time is most of its cost; the flag is put
  back on exit so the suites that run next are unaffected.
  """

  def __init__(self, quick: bool):
    self.quick = quick
    self.saved = None

  def __enter__(self):
    if self.quick:
      self.saved = jax.config.read("jax_disable_most_optimizations")
      jax.config.update("jax_disable_most_optimizations", True)
    return self

  def __exit__(self, *exc):
    if self.quick:
      jax.config.update("jax_disable_most_optimizations", self.saved)


@h.suite("quality")
def run(ctx: h.Context) -> list[h.SummaryRow]:
  """Runs the quality suite; writes `quality.md`, `quality.json`, `quality_ppl_vs_time.png`."""
  with quick_compiles(ctx.quick):
    return _run(ctx)


def _run(ctx: h.Context) -> list[h.SummaryRow]:
  s = QUICK._replace(seed=ctx.seed) if ctx.quick else FULL._replace(seed=ctx.seed)
  specs = CORPORA[:1] if ctx.quick else CORPORA
  load_start = machine_note(ctx)
  loaded = {spec.name: load(spec, s) for spec in specs}
  present = [d for d in loaded.values() if isinstance(d, Data)]
  repeats = ctx.repeats(full=30, quick=3)
  per_corpus = (3 + s.epochs + repeats) * len(SOFTMAXES)
  bar = ctx.progress("quality", per_corpus * len(present))
  results: dict[str, dict] = {}
  try:
    for spec in specs:
      data = loaded[spec.name]
      if not isinstance(data, Data):
        print(f"quality: {spec.title} skipped: {data}", flush=True)
        results[spec.name] = {"title": spec.title, "skipped": data}
        continue
      runs = [Run(method, data, s) for method in SOFTMAXES]
      train_all(runs, data, s, bar, repeats=repeats, budget=ctx.budget(STEP_BUDGET_S))
      best = getattr(data.corpus, "best_perplexity", None)
      results[spec.name] = {
          "title": spec.title, "vocab_size": len(data.corpus.vocab), "tokens": data.sizes,
          "best_perplexity": best,
          "unigram_perplexity": getattr(data.corpus, "unigram_perplexity", None),
          "command": cli_command(data, s, "adaptive"),
          "rows": [r.result() for r in runs]}
      del runs
  finally:
    bar.close()
  load_end = machine_note(ctx)

  md = ctx.header(
      "Quality: exact test perplexity against training time, every output layer",
      shapes=(f"LSTM {s.nlayers}x{s.nhid}, emsize {s.emsize}, dropout {s.dropout:g}, batch "
              f"{s.batch_size} x bptt {s.bptt}, {s.optimizer} lr {s.lr:g} clip {s.clip:g}, "
              f"{s.epochs} epoch(s), lr / {s.lr_decay:g} after each epoch from epoch "
              f"{s.decay_after} on; evaluation batch {s.eval_batch_size}"),
      dtype="float32", seeds=f"{s.seed} (parameters, dropout, negatives)",
      method=("`train.fit` per method, the methods of a corpus interleaved epoch by epoch "
              "(order rotated each epoch, 50 ms pause between runs); compile apart; training "
              "time = `train.fit` wall time (training steps and the per-epoch validation); "
              "train tok/s = training steps only; step tok/s = one training step of every method "
              "timed with `_harness.interleave` after training (medians, on copies of the "
              "states): the speed measure least sensitive to the machine's load; test ppl "
              "exact, of the best-validation parameters"),
      extra=[f"machine load: at the start {load_start}; at the end {load_end}. A load "
             "above the core count means other jobs shared the machine, making absolute "
             "times pessimistic; the methods of a corpus shared the same conditions, so their "
             "ratios are the numbers to read",
             "validation: the last 5% of the training split's tokens, as `python -m train` "
             "holds out when no validation split is named"])
  md += ("\nColumns as Table 1 of Grave et al. (2017): test perplexity and training time of "
         "each output layer. *ppl / full* and *time: full / this* compare with the full "
         "softmax trained in the same interleaved run (time above 1x: faster); *step: full / "
         "this* compares the interleaved single-step medians, which a burst of load on the "
         "machine does not move. Every perplexity is the exact normalized one: `ns` (negative "
         "sampling) trains unnormalized scores and `nce` only approximately self-normalized "
         "ones, so their softmax perplexity is not what they optimise.\n")
  summary: list[h.SummaryRow] = []
  for spec in specs:
    r = results[spec.name]
    md += f"\n## {r['title']}\n\n"
    if "skipped" in r:
      md += f"Skipped: {r['skipped']}.\n"
      summary.append(h.SummaryRow("quality", spec.name, f"skipped: {r['skipped']}"))
      continue
    tok = r["tokens"]
    md += (f"V = {r['vocab_size']:,}; tokens: train {tok['train']:,}, valid {tok['valid']:,}, "
           f"test {tok['test']:,}.")
    if r["best_perplexity"]:
      md += (f" Best possible test perplexity (the source's own, forward algorithm) "
             f"{r['best_perplexity']:.2f}; unigram {r['unigram_perplexity']:.2f}.")
    md += f" One row: `{r['command']}` (with that row's `--softmax`).\n\n"
    md += _corpus_table(r["rows"], r["best_perplexity"])
    verdict = bar_verdict(r["rows"])
    if verdict is not None:
      r["adaptive_vs_full"] = verdict
      text = (f"adaptive: ppl {verdict['ppl_ratio']:.3f}x full, training {verdict['speedup']:.2f}x "
              f"faster ({verdict['step_speedup']:.2f}x per step)")
      if spec.name == "wikitext-2":
        text += (f"; bar (within {BAR_WITHIN:.0%} at >= {BAR_SPEEDUP:g}x): "
                 f"{'met' if verdict['bar_met'] else 'NOT met'}; goal (within "
                 f"{GOAL_WITHIN:.0%} at >= {GOAL_SPEEDUP:g}x): "
                 f"{'met' if verdict['goal_met'] else 'not met'}; judged on the smaller "
                 "speed-up")
        md += f"\n**Bar** — {text}.\n"
      summary.append(h.SummaryRow("quality", spec.name, text))
    fastest = min(r["rows"], key=lambda row: row["train_time_s"])
    best_row = min(r["rows"], key=lambda row: row["test_ppl"])
    summary.append(h.SummaryRow(
        "quality", f"{spec.name} best / fastest",
        f"best ppl {best_row['method']} {best_row['test_ppl']:.2f}; fastest "
        f"{fastest['method']} {fastest['train_time_s']:.0f} s"))
  fig = _plot(results)
  paths = ctx.write("quality", md, {"settings": s._asdict(), "corpora": results},
                    {"ppl_vs_time": fig})
  summary.append(h.SummaryRow("quality", "table", h.display_path(paths[0])))
  return summary
