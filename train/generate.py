"""`python -m train.generate`: text from a trained run, by sampling or beam search.

```
python -m train.generate --checkpoint RUN_DIR --words 100 --temperature 0.8 --top-k 40
python -m train.generate --checkpoint RUN_DIR --words 20 --beam 5
```

The model of the run folder written by `python -m train --save RUN_DIR` (its config, vocabulary
and best checkpoint) is stepped one token at a time with its exact normalized distribution
(`LanguageModel.step`), and `train.sample` or `train.beam_search` extend the prompt.
"""

import argparse
import functools
import pathlib
import sys

import jax
import numpy as np

from train._checkpoint import Checkpoints, load_config, load_vocab
from train._cli import (_HelpFormatter, _Parser, _float, _non_negative_int, _positive_int,
                        model_from_config)
from train._generation import beam_search, sample
from train._loop import train_keys
from train._step import init_train_state, optimizer


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of `python -m train.generate`."""
  p = _Parser(prog="python -m train.generate", allow_abbrev=False,
              formatter_class=_HelpFormatter,
              description="Generate text from a run saved by `python -m train --save DIR`.")
  p.add_argument("--checkpoint", required=True, help="the run folder (python -m train --save)")
  p.add_argument("--step", type=_non_negative_int, default=None,
                 help="the checkpoint step to load (default: the best by valid perplexity)")
  p.add_argument("--words", type=_positive_int, default=100, help="tokens to generate")
  p.add_argument("--prompt", default=None,
                 help="the text to continue (default: <eos>, or the most frequent token)")
  p.add_argument("--temperature", type=_float(0.0, low_open=False), default=1.0,
                 help="sampling temperature (0: greedy)")
  p.add_argument("--top-k", type=_positive_int, default=None,
                 help="sample among the k most probable tokens only")
  p.add_argument("--beam", type=_positive_int, default=None,
                 help="beam search with this many beams instead of sampling")
  p.add_argument("--seed", type=_non_negative_int, default=0, help="sampling seed")
  return p


def _prompt_ids(text, vocab, level: str) -> np.ndarray:
  if text is None:
    first = vocab.eos_id if vocab.eos_id is not None else (
        vocab.index("\n") if level == "char" and "\n" in vocab else 0)
    return np.array([first], np.int32)
  tokens = list(text) if level == "char" else text.split()
  if not tokens:
    raise ValueError("--prompt is empty.")
  return vocab.encode(tokens)


def _detokenize(tokens, level: str) -> str:
  if level == "char":
    return "".join(tokens)
  return " ".join("\n" if t == "<eos>" else t for t in tokens).replace(" \n ", "\n")


def generate(args: argparse.Namespace) -> list[str]:
  """Loads the run and returns the generated texts (one, or `--beam` of them, best first)."""
  run_dir = pathlib.Path(args.checkpoint)
  if not run_dir.is_dir():
    raise ValueError(f"--checkpoint `{run_dir}` is not a run folder.")
  config = load_config(run_dir)
  vocab = load_vocab(run_dir)
  if args.top_k is not None and args.top_k > len(vocab):
    raise ValueError(f"--top-k {args.top_k} is larger than the run's vocabulary "
                     f"({len(vocab)} tokens).")
  model = model_from_config(config, vocab)
  level = "char" if config.get("level") == "char" else "word"
  opt = optimizer(config["optimizer"], config["lr"], clip=config["clip"] or None,
                  sparse_output=not config["dense_output"])
  like = init_train_state(model, opt, train_keys(config["seed"])[0], config["batch_size"])
  checkpoints = Checkpoints(run_dir, read_only=True)
  try:
    if args.step is None:
      found = checkpoints.restore_intact(like, best=True)
      if found is None:
        what = "intact checkpoint" if checkpoints.damaged else "checkpoint yet"
        raise ValueError(f"`{run_dir}` holds no {what}.")
      state = found[1]
    else:
      state, _ = checkpoints.restore(like, args.step)
  finally:
    checkpoints.close()
  params = state.params
  prompt = _prompt_ids(args.prompt, vocab, level)[None, :]
  carry = model.initial_state(params, 1)
  step_fn = functools.partial(model.step, params)
  if args.beam:
    run = jax.jit(lambda carry, prompt: beam_search(step_fn, carry, prompt, args.words,
                                                   beam_size=args.beam))
    sequences, scores = run(carry, prompt)
    return [f"[{float(s):.2f}] " + _detokenize(vocab.decode(np.asarray(seq)), level)
            for seq, s in zip(sequences[0], scores[0])]
  run = jax.jit(lambda carry, prompt, key: sample(
      step_fn, carry, prompt, args.words, key=key, temperature=args.temperature,
      top_k=args.top_k))
  tokens = run(carry, prompt, jax.random.key(args.seed))
  return [_detokenize(vocab.decode(np.asarray(tokens[0])), level)]


def main(argv=None) -> int:
  """Runs `python -m train.generate`; returns the exit status (2 for a user's mistake)."""
  parser = build_parser()
  try:
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
  except SystemExit as e:
    return int(e.code or 0)
  try:
    texts = generate(args)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for text in texts:
    print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
