"""`python -m train`: train a recurrent language model with any output layer, from the shell.

The flags follow PyTorch's word_language_model example where it has them (`--data`, `--emsize`,
`--nhid`, `--nlayers`, `--lr`, `--clip`, `--epochs`, `--batch_size` spelled `--batch-size`,
`--bptt`, `--dropout`, `--tied`, `--seed`, `--log-interval`, `--save`). The defaults are tuned
for the built-in synthetic corpus, whose best possible perplexity is known; Zaremba et al.'s
small PTB model is `--optimizer sgd --lr 1 --clip 5 --nlayers 2 --emsize 200 --nhid 200
--epochs 13 --decay-after 4 --lr-decay 2 --dropout 0 --batch-size 20 --bptt 20`.

A user's mistake (a missing file, a size that is not positive, cutoffs that do not fit the
vocabulary, a checkpoint from another config or a corrupt one) ends the program before any
training with a one-line `error: ...` on stderr and exit status 2; no good checkpoint is ever
overwritten.
"""

import argparse
import collections
import math
import pathlib
import sys
import time

import jax
import numpy as np

from train import _distributed
from train._batching import batchify
from train._checkpoint import (Checkpoints, config_differences, has_checkpoints, has_run,
                               load_config, load_vocab, record_resume, save_config, save_vocab)
from train._corpus import DEFAULT_FRACTIONS, read_corpus_named
from train._loop import DECAYS, LoopConfig, fit, new_loop_record, train_keys
from train._metrics import MetricsLog, plot_metrics, read_metrics
from train._model import (CELLS, GRADS, INITS, PRECISIONS, SAMPLERS, SOFTMAXES, ModelConfig,
                          language_model)
from train._step import (OPTIMIZERS, init_train_state, make_evaluator, make_train_step,
                         optimizer)
from train._synthetic import SyntheticCorpus, synthetic_corpus

SYNTHETIC = "synthetic"
SPLIT_FLAGS = {"train": "--train-split", "valid": "--valid-split", "test": "--eval-split"}
# Flags that may take a new value when a run is resumed; every other flag must match the run's.
RESUMABLE = ("epochs", "max_steps", "patience", "log_interval", "keep",
             "eval_batch_size", "precision")
# Flags that describe this invocation, not the run: never saved.
TRANSIENT = ("save", "resume", "quiet", "mesh", "coordinator", "num_processes", "process_id")
# Presets of flag defaults (flags given explicitly still win). "pytorch": PyTorch's
# word_language_model example (examples/word_language_model/main.py) at its defaults, its LSTM
# and its training loop: plain SGD, clipping, the learning rate divided by 4 whenever the
# validation loss does not improve, no early stop, its initialisation.
RECIPES = {
    "pytorch": {"cell": "lstm", "emsize": 200, "nhid": 200, "nlayers": 2, "dropout": 0.2,
                "tied": False, "init": "pytorch", "optimizer": "sgd", "lr": 20.0, "clip": 0.25,
                "epochs": 40, "batch_size": 20, "eval_batch_size": 10, "bptt": 35,
                "decay": "plateau", "lr_decay": 4.0, "patience": 0, "eval_interval": 0},
}
METRICS_LOG = "metrics.jsonl"
METRICS_PLOT = "metrics.png"
# With no validation split, this fraction of the training tokens is held out as one.
HELD_OUT = 0.05


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Appends "(default: ...)" to every flag's help unless the help already says it."""

  def _get_help_string(self, action):
    if "(default:" in (action.help or ""):
      return action.help
    return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
  """argparse, but a usage error is one line, `error: ...`, with exit status 2."""

  def error(self, message):
    self.exit(2, f"error: {message}\n")


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}") from None
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
  return value


def _int_at_least(low: int, why: str):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {text!r}") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"must be at least {low} ({why}); got {value}")
    return value
  return parse


def _non_negative_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be a non-negative integer; got {text!r}") from None
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be a non-negative integer; got {value}")
  return value


def _float(low: float, *, low_open: bool, high: float | None = None):
  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    bad_low = value <= low if low_open else value < low
    bad_high = high is not None and value >= high
    if bad_low or bad_high or not math.isfinite(value):
      span = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g})'}"
      raise argparse.ArgumentTypeError(f"must be in {span}; got {text}")
    return value
  return parse


def _cutoffs(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"must be comma-separated increasing ids, e.g. 2000,10000; got {text!r}") from None
  if not values:
    raise argparse.ArgumentTypeError(f"must hold at least one id; got {text!r}")
  return values


def _bands(text: str) -> list[list[int]]:
  try:
    pairs = [[int(x) for x in item.split(":")] for item in text.split(",") if item.strip()]
  except ValueError:
    pairs = None
  if not pairs or any(len(p) != 2 for p in pairs):
    raise argparse.ArgumentTypeError(
        f"must be comma-separated num_words:dim pairs, e.g. 2000:256,8000:128; got {text!r}")
  return pairs


def _recipe_text(name: str) -> str:
  flags = []
  for key, value in RECIPES[name].items():
    flag = "--" + key.replace("_", "-")
    flags.append(flag if value is True else f"{flag} {value:g}" if isinstance(value, float)
                 else None if value is False else f"{flag} {value}")
  return " ".join(f for f in flags if f)


def build_parser(recipe: str | None = None) -> argparse.ArgumentParser:
  """The argument parser of `python -m train` (every flag documented with its default).

  Args:
    recipe: a name of `RECIPES` whose values become the defaults, or None.
  """
  p = _Parser(prog="python -m train", allow_abbrev=False,
              formatter_class=_HelpFormatter,
              description="Train a recurrent language model with any softmax alternative; "
                          "report the exact test perplexity.")
  p.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                 help="set the other flags' defaults to a recipe's (flags given explicitly "
                      "still win); pytorch: PyTorch's word_language_model main.py at its "
                      f"defaults, {_recipe_text('pytorch')}")
  data = p.add_argument_group("data")
  data.add_argument("--data", default=SYNTHETIC,
                    help="a corpus folder (train.txt/valid.txt/test.txt, ptb.*.txt, "
                         "wiki.*.tokens, or a lone input.txt), a text file, or 'synthetic' "
                         "(a Zipfian hidden Markov source with a known best perplexity)")
  data.add_argument("--train-split", default=None,
                    help="the training split's file or split name (default: from the layout)")
  data.add_argument("--valid-split", default=None,
                    help="the validation split's file or split name; with none, the last 5%% "
                         "of the training tokens are held out")
  data.add_argument("--eval-split", default=None,
                    help="the test split's file or split name")
  data.add_argument("--level", choices=("word", "char"), default="word",
                    help="tokens are words (one <eos> per line) or characters")
  data.add_argument("--max-vocab", type=_int_at_least(2, "<unk> and <eos> are always kept"),
                    default=None,
                    help="keep the most frequent words only (<unk> and <eos> included)")
  data.add_argument("--synthetic-tokens", type=_positive_int, default=500_000,
                    help="training tokens of the synthetic corpus (valid and test: a tenth)")
  data.add_argument("--synthetic-vocab", type=_positive_int, default=500,
                    help="vocabulary size of the synthetic source")

  model = p.add_argument_group("model")
  model.add_argument("--cell", choices=CELLS, default="lstm", help="the recurrent cell")
  model.add_argument("--emsize", type=_positive_int, default=128, help="word embedding size")
  model.add_argument("--nhid", type=_positive_int, default=128, help="hidden units per layer")
  model.add_argument("--nlayers", type=_positive_int, default=1, help="number of layers")
  model.add_argument("--proj", type=_positive_int, default=None,
                     help="LSTM projection size (LSTMP, Sak et al. 2014); lstm only, < nhid")
  model.add_argument("--dropout", type=_float(0.0, low_open=False, high=1.0), default=0.2,
                     help="dropout on the embedding, between layers and before the output "
                          "layer (Zaremba et al. 2014)")
  model.add_argument("--tied", action="store_true",
                     help="tie the embedding to the output table (Press and Wolf 2017); needs "
                          "emsize = nhid (or proj) and softmax full, sampled, nce, ns or "
                          "selfnorm")
  model.add_argument("--grad", choices=GRADS, default="autodiff",
                     help="BPTT by autodiff or by the hand-derived recursion")
  model.add_argument("--init", choices=INITS, default="default",
                     help="initial parameters: default (the LSTM's forget-gate bias 1, the "
                          "softmax table N(0, 1/H)) or pytorch (word_language_model's: every "
                          "recurrent tensor U(-1/sqrt(H), 1/sqrt(H)), the table U(-0.1, 0.1), "
                          "zero output biases)")
  model.add_argument("--precision", choices=tuple(PRECISIONS), default="float32",
                     help="compute dtype: bfloat16 runs the embedding, the recurrent GEMMs "
                          "(float32 accumulation) and the output layer's input in bfloat16, "
                          "with float32 parameters, optimizer state, losses and metrics")
  model.add_argument("--reset-at-eos", action="store_true",
                     help="word level: return the recurrent state to its initial value after "
                          "every <eos>, so each line (document) starts afresh, in training and "
                          "evaluation")

  out = p.add_argument_group("output layer")
  out.add_argument("--softmax", choices=SOFTMAXES, default="full",
                   help="the output layer (evaluation is always the exact softmax)")
  out.add_argument("--num-samples", type=_positive_int, default=64,
                   help="negatives per batch for sampled, nce and ns")
  out.add_argument("--sampler", choices=SAMPLERS, default="unigram",
                   help="distribution of the negatives (unigram: counts^0.75)")
  out.add_argument("--cutoffs", type=_cutoffs, default=None,
                   help="adaptive softmax cutoffs, e.g. 2000,10000 (default: where the "
                        "cumulative frequency passes 80%% and 95%%)")
  out.add_argument("--div-value", type=_float(0.0, low_open=True), default=4.0,
                   help="adaptive softmax: tail i has H / div_value**(i+1) units")
  out.add_argument("--bands", type=_bands, default=None,
                   help="D-softmax bands num_words:dim,... with the words summing to V and "
                        "the dims to H (default: cut at 80%% and 95%% of the tokens, dims H/2, "
                        "H/4, H/4)")
  out.add_argument("--classes", type=_positive_int, default=None,
                   help="class-based softmax: number of classes (default: round(sqrt(V)))")
  out.add_argument("--alpha", type=_float(0.0, low_open=False), default=0.1,
                   help="selfnorm: weight of the (log Z)^2 penalty")
  out.add_argument("--dense-output", action="store_true",
                   help="sampled/nce/ns/hsm-balanced/hsm-huffman: update the output table "
                        "densely (exact dense Adam) instead of row-sparsely (lazy Adam)")

  opt = p.add_argument_group("optimization")
  opt.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="the optimizer")
  opt.add_argument("--lr", type=_float(0.0, low_open=True), default=5e-3,
                   help="initial learning rate")
  opt.add_argument("--clip", type=_float(0.0, low_open=False), default=0.25,
                   help="gradient clipping: largest global norm (0: no clipping)")
  opt.add_argument("--epochs", type=_positive_int, default=4, help="passes over the train split")
  opt.add_argument("--max-steps", type=_positive_int, default=None,
                   help="stop after this many steps in all (across resumes)")
  opt.add_argument("--batch-size", type=_positive_int, default=32, help="rows per batch")
  opt.add_argument("--eval-batch-size", type=_positive_int, default=10,
                   help="rows per batch in evaluation")
  opt.add_argument("--bptt", type=_positive_int, default=35, help="TBPTT window length")
  opt.add_argument("--decay", choices=DECAYS, default="epoch",
                   help="epoch: divide the lr by --lr-decay after every epoch past "
                        "--decay-after (Zaremba et al.); plateau: when the valid perplexity "
                        "does not improve (PyTorch's example); none")
  opt.add_argument("--lr-decay", type=_float(1.0, low_open=True), default=4.0,
                   help="the divisor of the learning rate")
  opt.add_argument("--decay-after", type=_non_negative_int, default=2,
                   help="epochs at the initial learning rate (--decay epoch)")
  opt.add_argument("--eval-interval", type=_non_negative_int, default=0,
                   help="also evaluate every this many steps (0: at the end of each epoch)")
  opt.add_argument("--patience", type=_non_negative_int, default=3,
                   help="early stop after this many evaluations without improvement (0: off)")
  opt.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seed of the parameters, dropout and negatives")

  run = p.add_argument_group("run")
  run.add_argument("--save", default=None,
                   help="run folder: config, vocabulary, checkpoints (the last --keep and the "
                        "best), metrics log and plot")
  run.add_argument("--resume", action="store_true",
                   help="continue the run in --save exactly where its last checkpoint left it")
  run.add_argument("--keep", type=_positive_int, default=3,
                   help="latest checkpoints kept (the best one is kept besides)")
  run.add_argument("--log-interval", type=_positive_int, default=100,
                   help="steps between progress updates and metrics log records")
  run.add_argument("--quiet", action="store_true",
                   help="no progress bar and no periodic lines (without it: a progress bar when "
                        "stderr is a terminal, else a line on stdout every --log-interval "
                        "steps); the evaluations and the summary are printed either way")

  scale = p.add_argument_group("scale-out (see the README's \"Scaling out\")")
  scale.add_argument("--mesh", default=None,
                     help="device mesh data=D,model=M: the batch rows split over D devices, the "
                          "vocabulary over M (softmax full, selfnorm, sampled, nce, ns, "
                          "adaptive; V a multiple of M) (default: every device on data, as many "
                          "as divide --batch-size)")
  scale.add_argument("--coordinator", default=None,
                     help="many hosts: host:port of process 0; with --num-processes and "
                          "--process-id, joins the processes (jax.distributed.initialize)")
  scale.add_argument("--num-processes", type=_positive_int, default=None,
                     help="many hosts: the number of processes")
  scale.add_argument("--process-id", type=_non_negative_int, default=None,
                     help="many hosts: this process's index, from 0")
  if recipe is not None:
    p.set_defaults(**RECIPES[recipe])
  return p


def _recipe_of(argv) -> str | None:
  """The `--recipe` of a command line, read before the parser whose defaults it sets."""
  pre = _Parser(prog="python -m train", add_help=False, allow_abbrev=False)
  pre.add_argument("--recipe", choices=tuple(RECIPES), default=None)
  return pre.parse_known_args(argv)[0].recipe


def _explicit(parser: argparse.ArgumentParser, argv) -> set[str]:
  """The destinations of the flags written on the command line."""
  by_flag = {s: a.dest for a in parser._actions for s in a.option_strings}
  return {by_flag[t.split("=", 1)[0]] for t in argv
          if t.startswith("--") and t.split("=", 1)[0] in by_flag}


def _run_config(args: argparse.Namespace) -> dict:
  return {k: v for k, v in vars(args).items() if k not in TRANSIENT}


def _merge_resumed(args: argparse.Namespace, explicit: set[str]) -> argparse.Namespace:
  """The saved run's config, with the resumable flags given on this command line."""
  saved = load_config(args.save)
  saved.pop("model", None)
  current = _run_config(args)
  unknown = set(saved) - set(current)
  if unknown:
    raise ValueError(f"`{args.save}` was written with unknown settings {sorted(unknown)}; "
                     "it comes from another version or another program.")
  conflicts = config_differences({k: saved.get(k) for k in explicit if k in current},
                                 {k: current[k] for k in explicit if k in current},
                                 ignore=RESUMABLE)
  if conflicts:
    raise ValueError(f"--resume: the checkpoint in `{args.save}` comes from another config ("
                     f"{'; '.join(conflicts)}); resume with the run's own settings or start "
                     "a new --save folder.")
  merged = dict(saved)
  for key in RESUMABLE:
    if key in explicit or key not in merged:
      merged[key] = current[key]
  for key in current:
    merged.setdefault(key, current[key])
  merged = {k: v for k, v in merged.items() if k not in TRANSIENT}
  return argparse.Namespace(**merged, **{k: getattr(args, k) for k in TRANSIENT})


def _load_corpus(args):
  if args.data == SYNTHETIC:
    if args.level != "word":
      raise ValueError("--level char needs a text corpus; the synthetic corpus is word level.")
    if any(getattr(args, k) for k in ("train_split", "valid_split", "eval_split")):
      raise ValueError("--train-split, --valid-split and --eval-split need a corpus folder; "
                       "got --data synthetic.")
    if args.max_vocab is not None:
      raise ValueError("--max-vocab needs a corpus folder; the synthetic corpus's vocabulary is "
                       "--synthetic-vocab.")
    if args.synthetic_vocab < 2:
      raise ValueError(f"--synthetic-vocab must be at least 2; got {args.synthetic_vocab}.")
    held = max(args.synthetic_tokens // 10, 2)
    return synthetic_corpus(0, train_length=args.synthetic_tokens, valid_length=held,
                            test_length=held, vocab_size=args.synthetic_vocab)
  path = pathlib.Path(args.data)
  if not path.exists():
    raise ValueError(f"--data `{args.data}` does not exist (a corpus folder, a text file, or "
                     "'synthetic').")
  return read_corpus_named(path, level=args.level, train_split=args.train_split,
                           valid_split=args.valid_split, test_split=args.eval_split,
                           fractions=DEFAULT_FRACTIONS, max_size=args.max_vocab, min_count=1,
                           spell=_split_flag)


def _split_flag(split: str, value=None) -> str:
  """How messages write a split argument: by its flag, `--eval-split test.txt`."""
  flag = SPLIT_FLAGS[split]
  return flag if value is None else f"{flag} {value}"


def _splits(corpus, echo):
  train_ids, valid_ids = corpus.train, corpus.valid
  if valid_ids is None:
    cut = int(train_ids.size * (1 - HELD_OUT))
    train_ids, valid_ids = train_ids[:cut], train_ids[cut:]
    echo(f"| note | no validation split: the last {HELD_OUT:.0%} of the training tokens "
         f"({valid_ids.size}) are held out for validation")
  return train_ids, valid_ids, corpus.test


def _model_config(args, vocab) -> ModelConfig:
  reset_id = None
  if getattr(args, "reset_at_eos", False):  # absent from a run saved before the flag existed
    if vocab.eos_id is None:
      raise ValueError("--reset-at-eos needs a word-level corpus, whose vocabulary has <eos>; "
                       "this one has none (--level char or --data synthetic).")
    reset_id = vocab.eos_id
  return ModelConfig(
      vocab_size=len(vocab), cell=args.cell, emsize=args.emsize, nhid=args.nhid,
      nlayers=args.nlayers, proj=args.proj, dropout=args.dropout, tied=args.tied,
      softmax=args.softmax, num_samples=args.num_samples, sampler=args.sampler,
      cutoffs=None if args.cutoffs is None else tuple(args.cutoffs),
      bands=None if args.bands is None else tuple(tuple(b) for b in args.bands),
      classes=args.classes, alpha=args.alpha, div_value=args.div_value, grad=args.grad,
      init=getattr(args, "init", "default"),  # a run saved before --init existed
      precision=getattr(args, "precision", "float32"), reset_id=reset_id)


def model_from_config(config: dict, vocab):
  """The `LanguageModel` of a saved run config (`config.json`'s "config") and its vocabulary."""
  return language_model(_model_config(argparse.Namespace(**config), vocab), vocab.counts)


_COMPILED = collections.OrderedDict()
_COMPILED_SIZE = 8


def _compiled(config: ModelConfig, counts, opt, bptt: int):
  """`(model, train_step, evaluate)`, shared by the runs of one process with the same config.

  The jitted functions close over the model; a model rebuilt from the same config and counts
  computes the same thing, so runs in one process (tests, notebooks) reuse the compiled
  programs instead of compiling them again.
  """
  key = (config, np.asarray(counts).tobytes(), opt.name, opt.clip, opt.sparse_output, bptt)
  if key in _COMPILED:
    _COMPILED.move_to_end(key)
    return _COMPILED[key]
  model = language_model(config, counts)
  entry = (model, make_train_step(model, opt), make_evaluator(model, bptt=bptt))
  _COMPILED[key] = entry
  while len(_COMPILED) > _COMPILED_SIZE:
    _COMPILED.popitem(last=False)
  return entry


def _batches(ids, batch_size: int, name: str, flag: str):
  if ids.size < 2 * batch_size:
    raise ValueError(f"the {name} split has {ids.size} tokens, too few for {flag} {batch_size} "
                     f"(each of the {batch_size} rows needs at least 2 tokens).")
  return batchify(ids, batch_size)


def _count_params(params) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def _describe(model) -> str:
  c = model.config
  layers = f"{c.nlayers}x{c.nhid}" + (f"/proj {c.proj}" if c.proj else "")
  extra = {"adaptive": f" cutoffs {list(c.cutoffs or ())}", "dsoftmax": f" bands {c.bands}",
           "class": f" {c.classes} classes", "selfnorm": f" alpha {c.alpha}"}.get(c.softmax, "")
  if c.softmax in ("sampled", "nce", "ns"):
    extra = f" k={c.num_samples} {c.sampler}"
  tied = ", tied" if c.tied else ""
  resets = ", reset at <eos>" if c.reset_id is not None else ""
  return (f"{c.cell} {layers}, emsize {c.emsize}, dropout {c.dropout:g}{tied}, softmax "
          f"{c.softmax}{extra}, {c.precision}{resets}")


def _start_run(args, model, vocab, run_dir):
  """Writes a new run's config and vocabulary; returns its metrics log."""
  config = _run_config(args)
  config["model"] = model.config._asdict()
  if _distributed.is_primary():  # with many processes, one writes the run's files
    save_config(run_dir, config)
    save_vocab(run_dir, vocab)
  _distributed.barrier("train:run-folder")
  return MetricsLog(run_dir / METRICS_LOG) if _distributed.is_primary() else None


def _open_run(args, model, vocab, state, echo):
  """Opens the run folder: resumes from its latest intact checkpoint, or starts it.

  A damaged checkpoint is skipped with a warning (and set aside in `DIR/damaged/`), the latest
  intact one used. A folder whose run stopped before its first checkpoint starts again from
  step 0 with its saved config.

  Returns:
    `(checkpoints, log, state, loop, best)`.
  """
  run_dir = pathlib.Path(args.save)
  if not args.resume:
    log = _start_run(args, model, vocab, run_dir)
    return Checkpoints(run_dir, keep=args.keep), log, state, new_loop_record(), None
  if load_vocab(run_dir) != vocab:
    raise ValueError(f"--resume: the corpus's vocabulary differs from the one saved in "
                     f"`{run_dir}`; the data changed.")
  checkpoints = Checkpoints(run_dir, keep=args.keep)
  try:
    restored = checkpoints.restore_intact(state)
    if restored is None and has_checkpoints(run_dir):
      raise ValueError(f"--resume: `{run_dir}` holds no intact checkpoint (the damaged ones are "
                       f"in `{run_dir / 'damaged'}`); remove that folder to start the run "
                       "again from step 0.")
    best = None
    if restored is not None:
      step, state, loop = restored
      best_step = checkpoints.best_step()
      if best_step is not None and best_step != step and checkpoints.metric(best_step):
        found = checkpoints.restore_intact(state, best=True)
        best = (found[1].params, checkpoints.metric(found[0]))
      elif checkpoints.metric(step) is not None:
        best = (state.params, checkpoints.metric(step))
  except BaseException:
    checkpoints.close()
    raise
  settings = {k: getattr(args, k) for k in RESUMABLE}
  if restored is None:
    echo(f"| resume | `{run_dir}` holds no checkpoint yet (the run stopped before its first): "
         "starting it from step 0")
    log = _start_run(args, model, vocab, run_dir)
    if _distributed.is_primary():
      record_resume(run_dir, 0, settings)
    return checkpoints, log, state, new_loop_record(), None
  echo(f"| resume | step {step} from `{run_dir}`")
  if _distributed.is_primary():
    record_resume(run_dir, step, settings)
  log = MetricsLog(run_dir / METRICS_LOG, resume_step=step) if _distributed.is_primary() else None
  return checkpoints, log, state, loop, best


def _run(args: argparse.Namespace, explicit: set[str]) -> int:
  echo = print
  t0 = time.perf_counter()
  if args.resume and not args.save:
    raise ValueError("--resume needs --save DIR, the run folder to continue.")
  if args.save and pathlib.Path(args.save).exists() and not pathlib.Path(args.save).is_dir():
    raise ValueError(f"--save `{args.save}` is not a folder.")
  if args.resume:
    args = _merge_resumed(args, explicit)
  mesh = _distributed.mesh_from_flags(args.mesh, args.batch_size, args.coordinator,
                                      args.num_processes, args.process_id)
  if not args.resume and args.save and has_run(args.save):
    if has_checkpoints(args.save):
      raise ValueError(f"--save `{args.save}` already holds a run; pass --resume to continue "
                       "it, or choose another folder (a checkpoint is never overwritten).")
    echo(f"| note | `{args.save}` holds a run that stopped before its first checkpoint: "
         "starting it again")
  _distributed.barrier("train:checked")  # every process has looked before one writes
  if args.proj is not None and args.cell != "lstm":
    raise ValueError(f"--proj needs --cell lstm; got --cell {args.cell}.")

  corpus = _load_corpus(args)
  vocab = corpus.vocab
  train_ids, valid_ids, test_ids = _splits(corpus, echo)
  opt = optimizer(args.optimizer, args.lr, clip=args.clip or None,
                  sparse_output=not args.dense_output)
  if mesh is None:
    model, train_step, evaluate = _compiled(_model_config(args, vocab), vocab.counts, opt,
                                            args.bptt)
  else:
    model = _distributed.sharded_language_model(_model_config(args, vocab), vocab.counts,
                                                mesh)
    evaluate = make_evaluator(model, bptt=args.bptt)
  train_data = _batches(train_ids, args.batch_size, "training", "--batch-size")
  valid_data = _batches(valid_ids, args.eval_batch_size, "validation", "--eval-batch-size")
  test_data = None if test_ids is None else _batches(test_ids, args.eval_batch_size, "test",
                                                    "--eval-batch-size")
  if args.bptt >= train_data.shape[1]:
    raise ValueError(f"--bptt {args.bptt} is not shorter than the training rows "
                     f"({train_data.shape[1]} tokens with --batch-size {args.batch_size}).")
  init_key, _ = train_keys(args.seed)
  state = init_train_state(model, opt, init_key, args.batch_size)
  if mesh is not None:
    state, train_step = _distributed.shard_training(model, opt, mesh, state)
  loop_config = LoopConfig(epochs=args.epochs, max_steps=args.max_steps, bptt=args.bptt,
                           eval_interval=args.eval_interval, decay=args.decay,
                           lr_decay=args.lr_decay, decay_after=args.decay_after,
                           patience=args.patience, log_interval=args.log_interval,
                           seed=args.seed)

  checkpoints = log = best = None
  loop = new_loop_record()
  try:
    if args.save:
      checkpoints, log, state, loop, best = _open_run(args, model, vocab, state, echo)
    sizes = ", ".join(f"{name} {ids.size:,}" for name, ids in
                      (("train", train_ids), ("valid", valid_ids), ("test", test_ids))
                      if ids is not None)
    source = ("synthetic" if isinstance(corpus, SyntheticCorpus)
              else f"{args.data} ({corpus.level})")
    echo(f"| data | {source} | V {len(vocab):,} | tokens: {sizes}")
    echo(f"| model | {_describe(model)} | {_count_params(state.params):,} parameters | "
         f"{args.optimizer} lr {args.lr:g}, clip {args.clip:g} | batch {args.batch_size} x "
         f"bptt {args.bptt} | {jax.devices()[0].platform}"
         + ("" if mesh is None else f" | mesh {_distributed.describe(mesh)}"))
    result = fit(model, opt, state, train_data, valid_data, config=loop_config, loop=loop,
                 checkpoints=checkpoints, log=log, best=best, quiet=args.quiet,
                 train_step=train_step, evaluate=evaluate, echo=echo)
  finally:
    if checkpoints is not None:
      checkpoints.close()

  summary = [f"valid ppl {result.best_valid:.3f}"]
  if test_data is not None:
    test = evaluate(result.best_params, test_data)
    summary.insert(0, f"test ppl {test.perplexity:.3f}")
    if log is not None:
      log.write(event="test", step=result.loop["step"], wall_time=result.loop["wall_time"],
                test_ppl=test.perplexity)
  if isinstance(corpus, SyntheticCorpus) and test_data is not None:
    summary += [f"best possible {corpus.best_perplexity:.3f}",
                f"ratio {test.perplexity / corpus.best_perplexity:.4f}",
                f"unigram {corpus.unigram_perplexity:.3f}"]
  if log is not None:
    best_ppl = corpus.best_perplexity if isinstance(corpus, SyntheticCorpus) else None
    plot_metrics(read_metrics(log.path), pathlib.Path(args.save) / METRICS_PLOT,
                 best_perplexity=best_ppl, title=_describe(model))
  echo(f"| end of training | step {result.loop['step']} | {' | '.join(summary)} | "
       f"{time.perf_counter() - t0:.1f} s")
  return 0


def main(argv=None) -> int:
  """Runs `python -m train` with `argv` (default: `sys.argv[1:]`); returns the exit status.

  0 on success; 2 for a user's mistake (bad flags, missing or unusable data, a checkpoint from
  another config, a corrupt checkpoint), reported as one `error: ...` line on stderr before any
  training; 1 if training diverged or the system failed (a full disk); 130 if interrupted.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    recipe = _recipe_of(argv)
    parser = build_parser(recipe)
    args = parser.parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  try:
    return _run(args, _explicit(parser, argv))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (FloatingPointError, OSError) as e:  # a diverged run; a full disk, a permission
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("interrupted; continue from the last checkpoint with --resume.", file=sys.stderr)
    return 130
