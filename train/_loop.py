"""The training loop: epochs of TBPTT windows, evaluation, learning-rate decay, early stopping.

Everything the loop decides is a function of the step count and of the saved counters, so a run
resumed from a checkpoint continues exactly as if it had never stopped: the window is
`step mod windows_per_epoch`, the key of step s is `fold_in(key, s)`, the recurrent state is
reset at the start of every epoch and otherwise carried in the checkpoint, and the learning rate
lives in the optimizer state.
"""

import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from train._batching import bptt_windows
from train._metrics import perplexity, progress_bar
from train._model import LanguageModel
from train._step import (Optimizer, TrainState, learning_rate, make_evaluator, make_train_step,
                         reset_carry, set_learning_rate)

DECAYS = ("epoch", "plateau", "none")


class LoopConfig(NamedTuple):
  """The loop's static configuration.

  Attributes:
    epochs: passes over the training split.
    max_steps: stop once the step count reaches this (None: no limit).
    bptt: the window length.
    eval_interval: also evaluate every this many steps (0: only at the end of each epoch).
    decay: "epoch" (Zaremba et al.: divide the learning rate by `lr_decay` at the end of every
      epoch from epoch `decay_after` on), "plateau" (PyTorch's word_language_model: divide it
      when the validation perplexity did not improve) or "none".
    lr_decay: the divisor of the learning rate, > 1.
    decay_after: with `decay="epoch"`, the number of epochs at the initial learning rate.
    patience: stop after this many evaluations in a row without a new best validation
      perplexity (0: never).
    log_interval: steps between two train records of the metrics log and progress updates.
    seed: the seed of the per-step keys (dropout, negatives).
  """

  epochs: int = 4
  max_steps: int | None = None
  bptt: int = 35
  eval_interval: int = 0
  decay: str = "epoch"
  lr_decay: float = 4.0
  decay_after: int = 2
  patience: int = 3
  log_interval: int = 100
  seed: int = 0


class FitResult(NamedTuple):
  """What `fit` returns.

  Attributes:
    state: the final `TrainState`.
    best_params: the parameters with the lowest validation perplexity seen.
    best_valid: that perplexity.
    loop: the loop's counters (as saved in checkpoints).
  """

  state: TrainState
  best_params: Any
  best_valid: float
  loop: dict


def new_loop_record() -> dict:
  """The loop's counters at step 0."""
  return {"step": 0, "best_valid": None, "evals_since_best": 0, "wall_time": 0.0,
          "stopped": False}


def train_keys(seed: int):
  """`(init_key, step_key)`: the key of the parameters and the root of the per-step keys."""
  return tuple(jax.random.split(jax.random.key(seed)))


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def fit(model: LanguageModel, opt: Optimizer, state: TrainState, train_data, valid_data, *,
        config: LoopConfig, loop: dict | None = None, checkpoints=None, log=None,
        best: tuple | None = None, quiet: bool = False, train_step: Callable | None = None,
        evaluate: Callable | None = None, echo: Callable[[str], None] = print) -> FitResult:
  """Trains `state` on `train_data` with truncated BPTT, evaluating on `valid_data`.

  Each epoch reads the rows of `train_data` in windows of `config.bptt` steps (the last one
  padded and masked), the recurrent state reset at the epoch's start and carried from window to
  window. At the end of each epoch (and every `eval_interval` steps) the exact validation
  perplexity is measured, the learning rate decayed per `config.decay`, early stopping checked,
  and a checkpoint written (with the perplexity as its metric). When the loop ends between two
  evaluations, the final state is evaluated and saved too, so a resumed run starts from it.

  Args:
    model: the `LanguageModel`.
    opt: the `Optimizer`.
    state: the `TrainState` to start from (step 0, or restored).
    train_data: `[B, L]` batchified training ids, B the state's batch.
    valid_data: `[B', L']` batchified validation ids.
    config: the `LoopConfig`.
    loop: the loop's counters restored with the state (None: a new run).
    checkpoints: a `train.Checkpoints`, or None to save nothing.
    log: a `train.MetricsLog`, or None.
    best: `(params, valid_ppl)` of the best checkpoint when resuming, or None.
    quiet: no progress bar and no periodic lines (evaluations are still printed).
    train_step: the `make_train_step(model, opt)` function to use (one is made when None).
    evaluate: the `make_evaluator(model, bptt=config.bptt)` function to use (one is made when
      None; pass one to share its compiled programs with a later test evaluation).
    echo: where the evaluation lines go.

  Returns:
    A `FitResult`.
  """
  loop = dict(new_loop_record() if loop is None else loop)
  windows = bptt_windows(np.asarray(train_data), config.bptt, last="pad")
  per_epoch = len(windows)
  total = config.epochs * per_epoch
  if config.max_steps is not None:
    total = min(total, config.max_steps)
  if train_step is None:
    train_step = make_train_step(model, opt)
  if evaluate is None:
    evaluate = make_evaluator(model, bptt=config.bptt)
  _, step_key = train_keys(config.seed)

  step = int(state.step)
  if step != loop["step"]:
    raise ValueError(f"the loop record is at step {loop['step']} but the state at {step}.")
  # The step donates the state's buffers: best parameters that share them (a resumed run whose
  # latest checkpoint is its best) would be deleted by the first step.
  best_params, best_valid = (None, None) if best is None else (_copy(best[0]), best[1])
  last_saved = checkpoints.latest_step() if checkpoints is not None else None
  start = time.perf_counter()
  wall0 = float(loop["wall_time"])
  last_valid = last_eval = None

  def wall():
    return wall0 + time.perf_counter() - start

  def epoch_of(s):
    return s / per_epoch

  def record_eval(ppl, improved_any):
    nonlocal best_params, best_valid
    if improved_any:
      best_params, best_valid = _copy(state.params), ppl
    if log is not None:
      log.write(event="valid", step=step, epoch=epoch_of(step), wall_time=wall(), valid_ppl=ppl,
                lr=learning_rate(state))

  def save(ppl):
    nonlocal last_saved
    if checkpoints is not None and last_saved != step:
      loop["step"], loop["wall_time"] = step, wall()
      checkpoints.save(state, loop, valid_ppl=ppl)
      last_saved = step

  if loop["stopped"]:
    total = step
  if step == 0 and total > 0:
    # The starting point of the curves; it is no candidate for the best parameters.
    ppl = evaluate(state.params, valid_data).perplexity
    if log is not None:
      log.write(event="valid", step=0, epoch=0, wall_time=wall(), valid_ppl=ppl,
                lr=learning_rate(state))
    echo(f"| eval | epoch   0.00 | step      0 | valid ppl {ppl:9.3f} | initial")
  bar = progress_bar(total, min(step, total), quiet=quiet)
  plain_echo = echo

  def echo(line):  # lines written while the bar is drawn clear it first and redraw it after
    if bar.disable:
      plain_echo(line)
    else:
      with bar.external_write_mode():
        plain_echo(line)
  pending, t_log, postfix = [], time.perf_counter(), {}
  untimed = None  # how many leading steps of `pending` the rate leaves out
  try:
    while step < total:
      if step % per_epoch == 0:
        state = reset_carry(model, state)
      state, metrics = train_step(state, windows[step % per_epoch],
                                  jax.random.fold_in(step_key, step))
      step += 1
      pending.append(metrics)
      if untimed is None:
        # The first step of a loop compiles the step function (or finds it compiled): the rate
        # is timed from its end, so that it measures training, never compilation.
        jax.block_until_ready(metrics)
        t_log, untimed = time.perf_counter(), len(pending)
      bar.update(1)
      if step % config.log_interval == 0 or step == total:
        fetched = jax.device_get(pending)
        tokens = sum(int(m["tokens"]) for m in fetched[untimed:])
        now = time.perf_counter()
        rate = tokens / max(now - t_log, 1e-9) if tokens else None
        loss = float(np.mean([m["loss"] for m in fetched]))
        train_ppl = perplexity(float(np.mean([m["nll"] for m in fetched]))) \
            if "nll" in fetched[0] else None
        lr = learning_rate(state)
        pending, t_log, untimed = [], now, 0
        if log is not None:
          log.write(event="train", step=step, epoch=epoch_of(step), wall_time=wall(),
                    train_loss=loss, train_ppl=train_ppl, lr=lr, tokens_per_s=rate)
        postfix.clear()
        postfix.update({"ppl" if train_ppl else "loss": f"{train_ppl or loss:.2f}",
                        "valid": f"{last_valid:.2f}" if last_valid else "-", "lr": f"{lr:.2e}",
                        "tok/s": "-" if rate is None else f"{rate:,.0f}"})
        bar.set_postfix(postfix, refresh=False)
        if bar.disable and not quiet:
          what = f"ppl {train_ppl:8.2f}" if train_ppl else f"loss {loss:6.3f}"
          speed = "        -" if rate is None else f"{rate:9,.0f}"
          echo(f"| epoch {epoch_of(step):6.2f} | step {step:6d}/{total} | lr {lr:.2e} | "
               f"{speed} tok/s | {what}")
      epoch_end = step % per_epoch == 0
      if not (epoch_end or (config.eval_interval and step % config.eval_interval == 0)):
        continue
      t_eval = time.perf_counter()
      ppl = evaluate(state.params, valid_data).perplexity
      last_valid, last_eval = ppl, (step, ppl)
      if postfix:
        postfix["valid"] = f"{ppl:.2f}"
        bar.set_postfix(postfix, refresh=False)
      improved = loop["best_valid"] is None or ppl < loop["best_valid"]
      if improved:
        loop["best_valid"], loop["evals_since_best"] = ppl, 0
      else:
        loop["evals_since_best"] += 1
      lr = learning_rate(state)
      record_eval(ppl, best_valid is None or ppl < best_valid)
      note = " (best)" if improved else ""
      echo(f"| eval | epoch {epoch_of(step):6.2f} | step {step:6d} | valid ppl {ppl:9.3f} | "
           f"lr {lr:.2e} | {wall():7.1f} s{note}")
      decayed = ((config.decay == "plateau" and not improved) or
                 (config.decay == "epoch" and epoch_end
                  and step // per_epoch >= config.decay_after))
      if decayed:
        state = set_learning_rate(state, lr / config.lr_decay)
      if config.patience and loop["evals_since_best"] >= config.patience:
        loop["stopped"] = True
        echo(f"| early stop | no improvement in {config.patience} evaluations")
      save(ppl)
      t_log += time.perf_counter() - t_eval  # the rate counts training time only
      if loop["stopped"]:
        break
  finally:
    bar.close()
  ppl = None
  if last_eval is not None and last_eval[0] == step:
    ppl = last_eval[1]
  elif checkpoints is not None and last_saved == step:
    ppl = checkpoints.metric(step)
  if ppl is None:
    ppl = evaluate(state.params, valid_data).perplexity
    record_eval(ppl, best_valid is None or ppl < best_valid)
    echo(f"| eval | epoch {epoch_of(step):6.2f} | step {step:6d} | valid ppl {ppl:9.3f} | "
         f"final state")
  elif best_valid is None:
    best_params, best_valid = _copy(state.params), ppl
  save(ppl)
  loop["step"], loop["wall_time"] = step, wall()
  return FitResult(state=state, best_params=best_params, best_valid=best_valid, loop=loop)
