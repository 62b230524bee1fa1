"""The `gradients` suite: the vanishing and exploding gradient story, measured.

Four experiments on synthetic tasks (no data files): gradient norms (`rnn.gradient_norms`), the
adding problem (Hochreiter and Schmidhuber 1997; Le et al. 2015), truncation (`rnn.truncated`
against a known lag) and exploding gradients with and without clipping. Training runs a chunk of
steps per compiled call (`jax.lax.scan` over steps, the batches drawn inside from `jax.random`),
so a step costs no Python; every number comes from one seed. Tasks, settings and how to read the
tables are described in `benchmarks/README.md`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple

import numpy as np

import jax
import jax.numpy as jnp

from benchmarks import _harness as h

CELLS = ("tanh", "irnn", "lstm", "gru")
CELL_NAMES = {"tanh": "tanh RNN", "irnn": "IRNN", "lstm": "LSTM", "gru": "GRU"}
BASELINE_MSE = 1.0 / 6.0
"""The adding problem's MSE of always answering 1: the variance of the sum of two U(0, 1)."""
SOLVED_MSE = 0.01


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every size and budget of the suite (`FULL` and `QUICK`)."""
  hidden: int                   # H of every cell
  adding_lengths: tuple[int, ...]
  adding_batch: int
  adding_steps: int
  adding_lr: float              # Adam, after clip_by_global_norm(adding_clip)
  adding_clip: float
  adding_test: int              # sequences in the fixed test set
  eval_every: int               # steps per compiled chunk, and between two evaluations
  norms_length: int             # T of the gradient-norm plot (one of adding_lengths)
  norms_batch: int
  lag: int                      # the truncation source's dependency
  lag_length: int               # T of its sequences
  lag_keys: int
  lag_noise: int
  lag_hidden: int
  lag_batch: int
  lag_steps: int
  lag_lr: float
  lag_k2: tuple[int | None, ...]  # None: full BPTT
  lag_test: int
  explode_hidden: int
  explode_length: int
  explode_batch: int
  explode_steps: int
  explode_lr: float             # plain SGD
  explode_scale: float          # w_hh ~ N(0, scale^2 / H)
  explode_clip: float           # clip_by_global_norm
  explode_clip_delta: float     # rnn.unroll(..., clip_delta=...)


FULL = Settings(
    hidden=64, adding_lengths=(50, 100, 200), adding_batch=50, adding_steps=3000,
    adding_lr=3e-3, adding_clip=1.0, adding_test=500, eval_every=250, norms_length=100,
    norms_batch=100,
    lag=15, lag_length=60, lag_keys=8, lag_noise=8, lag_hidden=64, lag_batch=16,
    lag_steps=2000, lag_lr=3e-3, lag_k2=(5, 10, 20, 50, None), lag_test=512,
    explode_hidden=64, explode_length=50, explode_batch=50, explode_steps=400, explode_lr=0.05,
    explode_scale=2.0, explode_clip=1.0, explode_clip_delta=1e-3)

QUICK = dataclasses.replace(
    FULL, hidden=32, adding_lengths=(30,), adding_steps=300, adding_test=200, eval_every=100,
    norms_length=30, norms_batch=50,
    lag=6, lag_length=24, lag_hidden=32, lag_steps=300, lag_k2=(4, None), lag_test=256,
    explode_hidden=32, explode_length=30, explode_steps=100)


# --------------------------------------------------------------------------------------------
# The synthetic tasks (pure functions, tested in tests/test_benchmarks_gradients_memory.py).

def adding_problem(key: jax.Array, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
  """Sequences of the adding problem and their targets.

  Each step carries two features: a value drawn from U(0, 1) and a marker. Exactly two steps
  are marked, one drawn uniformly from the first half of the sequence (`t < length // 2`) and
  one from the second; the target is the sum of the two marked values. Always answering 1
  scores an MSE of 1/6.

  Args:
    key: a `jax.random.key`.
    batch: B.
    length: T, at least 2.

  Returns:
    `(xs [B, T, 2] float32, targets [B] float32)`; `xs[..., 0]` the values, `xs[..., 1]` the
    markers.

  References:
    Hochreiter and Schmidhuber, Long short-term memory, 1997.
      https://doi.org/10.1162/neco.1997.9.8.1735
    Le, Jaitly and Hinton, A simple way to initialize recurrent networks of rectified linear
      units, 2015. https://arxiv.org/abs/1504.00941
  """
  if isinstance(length, bool) or not isinstance(length, int) or length < 2:
    raise ValueError(f"`length` must be an int >= 2; got {length!r}.")
  k_values, k_first, k_second = jax.random.split(key, 3)
  values = jax.random.uniform(k_values, (batch, length), jnp.float32)
  half = length // 2
  first = jax.random.randint(k_first, (batch, 1), 0, half)
  second = jax.random.randint(k_second, (batch, 1), half, length)
  t = jnp.arange(length)[None]
  markers = ((t == first) | (t == second)).astype(jnp.float32)
  targets = jnp.sum(values * markers, axis=1)
  return jnp.stack([values, markers], axis=-1), targets


def lag_source(key: jax.Array, batch: int, length: int, *, lag: int, num_keys: int,
               num_noise: int) -> tuple[jax.Array, jax.Array]:
  """Token streams whose only predictable tokens repeat the token seen `lag` steps back.

  The stream is a run of blocks of `lag + 1` tokens:

  ```
  position:  0      1 .. lag-2              lag-1   lag
  token:     key    noise (uniform)         MARK    key (the same as at position 0)
  ```

  with ids `0 .. num_noise-1` for noise, `num_noise .. num_noise+num_keys-1` for keys (each
  block's key uniform) and `num_noise + num_keys` for MARK, a vocabulary of
  `num_noise + num_keys + 1`. Each sequence starts at a uniform offset into its first block. A
  language model that reads `tokens[:, :-1]` and predicts `tokens[:, 1:]` can predict the
  recalled key (after MARK) only by carrying the key `lag - 1` steps; the noise and the new
  keys are unpredictable.

  Args:
    key: a `jax.random.key`.
    batch: B.
    length: T, the number of predictions per sequence.
    lag: the distance L between a key and its recall, at least 2.
    num_keys, num_noise: the sizes of the key and noise alphabets.

  Returns:
    `(tokens [B, T + 1] int32, recall [B, T] bool)`: `recall[b, t]` is True where the target
    `tokens[b, t + 1]` is a recalled key whose first occurrence lies inside the sequence.
  """
  for name, v, low in (("length", length, 1), ("lag", lag, 2), ("num_keys", num_keys, 1),
                       ("num_noise", num_noise, 1)):
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ValueError(f"`{name}` must be an int >= {low}; got {v!r}.")
  period = lag + 1
  num_blocks = -(-(length + 1 + period) // period)
  k_keys, k_noise, k_offset = jax.random.split(key, 3)
  keys = jax.random.randint(k_keys, (batch, num_blocks, 1), num_noise, num_noise + num_keys)
  noise = jax.random.randint(k_noise, (batch, num_blocks, lag - 2), 0, num_noise)
  mark = jnp.full((batch, num_blocks, 1), num_noise + num_keys, keys.dtype)
  stream = jnp.concatenate([keys, noise, mark, keys], axis=-1).reshape(batch, -1)
  offset = jax.random.randint(k_offset, (batch,), 0, period)
  tokens = jax.vmap(lambda s, o: jax.lax.dynamic_slice(s, (o,), (length + 1,)))(stream, offset)
  j = jnp.arange(1, length + 1)[None]  # the target's index into tokens
  recall = ((j + offset[:, None]) % period == lag) & (j >= lag)
  return tokens.astype(jnp.int32), recall


# --------------------------------------------------------------------------------------------
# Models and training.

class Model(NamedTuple):
  """A recurrent cell and a linear readout `y_t @ w.T + b`."""
  cell: Any
  w: jax.Array  # [O, H]
  b: jax.Array  # [O]


def make_cell(kind: str, hidden: int):
  """`tanh` (Elman), `irnn` (ReLU, identity recurrent init), `lstm` or `gru`."""
  import rnn
  if kind == "tanh":
    return rnn.simple(hidden)
  if kind == "irnn":
    return rnn.simple(hidden, activation=jax.nn.relu)
  if kind == "lstm":
    return rnn.lstm(hidden)
  if kind == "gru":
    return rnn.gru(hidden)
  raise ValueError(f"`kind` must be one of {CELLS}; got {kind!r}.")


def _init_model(cell, key, input_size: int, output_size: int) -> Model:
  k_cell, k_w = jax.random.split(key)
  scale = 1.0 / math.sqrt(cell.output_size)
  w = jax.random.uniform(k_w, (output_size, cell.output_size), jnp.float32, -scale, scale)
  return Model(cell.init(k_cell, input_size), w, jnp.zeros((output_size,), jnp.float32))


def _readout(model: Model, ys: jax.Array) -> jax.Array:
  return ys @ model.w.T + model.b


def _final_prediction(cell, model: Model, xs, **unroll_kw) -> jax.Array:
  """The adding problem's answer: the readout of the last step, `[B]`."""
  import rnn
  state = cell.initial_state(model.cell, xs.shape[:1])
  ys, _ = rnn.unroll(cell, model.cell, xs, state, **unroll_kw)
  return _readout(model, ys[:, -1])[:, 0]


def _train(loss_fn: Callable, model: Model, opt, sample: Callable, *, steps: int, chunk: int,
           key: jax.Array, evaluate: Callable | None = None, bar=None):
  """Trains `steps` steps, `chunk` per compiled call; evaluates after every chunk.

  Args:
    loss_fn: `loss_fn(model, batch) -> scalar`.
    model: the initial params.
    opt: an optax transformation.
    sample: `sample(key) -> batch`, traced inside the compiled chunk.
    steps, chunk: the budget and the steps per call (steps is rounded up to whole chunks).
    key: the data key.
    evaluate: `evaluate(model) -> dict of scalars`, jitted, run after every chunk.
    bar: an optional tqdm bar, advanced by one per chunk.

  Returns:
    `(model, history)`: `history["loss"] [steps]`, `history["grad_norm"] [steps]` (before any
    clipping), `history["evals"]` a list of `{"step": n, **evaluate(model)}`, `history["compile_s"]`
    and `history["train_s"]`.
  """
  import optax

  def one_step(carry, k):
    m, s = carry
    loss, grads = jax.value_and_grad(loss_fn)(m, sample(k))
    updates, s = opt.update(grads, s, m)
    return (optax.apply_updates(m, updates), s), (loss, optax.global_norm(grads))

  def run_chunk(m, s, k):
    (m, s), (losses, norms) = jax.lax.scan(one_step, (m, s), jax.random.split(k, chunk))
    return m, s, losses, norms

  opt_state = opt.init(model)
  t0 = time.perf_counter()
  compiled = jax.jit(run_chunk).lower(model, opt_state, key).compile()
  ev = jax.jit(evaluate) if evaluate is not None else None
  compile_s = time.perf_counter() - t0
  losses, norms, evals = [], [], []
  if ev is not None:
    evals.append({"step": 0, **{k: float(v) for k, v in ev(model).items()}})
  t0 = time.perf_counter()
  for i in range(-(-steps // chunk)):
    key, k = jax.random.split(key)
    model, opt_state, l, g = compiled(model, opt_state, k)
    losses.append(np.asarray(l))
    norms.append(np.asarray(g))
    if ev is not None:
      evals.append({"step": (i + 1) * chunk, **{k: float(v) for k, v in ev(model).items()}})
    if bar is not None:
      bar.update(1)
  return model, {"loss": np.concatenate(losses), "grad_norm": np.concatenate(norms),
                 "evals": evals, "compile_s": compile_s,
                 "train_s": time.perf_counter() - t0}


def _adam(lr: float, clip: float):
  import optax
  return optax.chain(optax.clip_by_global_norm(clip), optax.adam(lr))


# --------------------------------------------------------------------------------------------
# 1 and 2: the adding problem, and the gradient norms at init and after training.

def _adding(ctx: h.Context, s: Settings, bar, kind: str, length: int) -> dict:
  cell = make_cell(kind, s.hidden)
  k_model, k_data, k_test = jax.random.split(jax.random.fold_in(jax.random.key(ctx.seed), length),
                                             3)
  model0 = _init_model(cell, k_model, 2, 1)
  xs_test, y_test = adding_problem(k_test, s.adding_test, length)

  def loss_fn(m, batch):
    xs, y = batch
    return jnp.mean((_final_prediction(cell, m, xs) - y) ** 2)

  def evaluate(m):
    return {"test_mse": loss_fn(m, (xs_test, y_test))}

  model, hist = _train(loss_fn, model0, _adam(s.adding_lr, s.adding_clip),
                       lambda k: adding_problem(k, s.adding_batch, length),
                       steps=s.adding_steps, chunk=s.eval_every, key=k_data, evaluate=evaluate,
                       bar=bar)
  mses = [e["test_mse"] for e in hist["evals"]]
  solved_at = next((e["step"] for e in hist["evals"] if e["test_mse"] < SOLVED_MSE), None)
  bad = np.flatnonzero(~np.isfinite(hist["loss"]))
  return {"cell": kind, "T": length, "test_mse": mses[-1], "solved_at_step": solved_at,
          "first_nonfinite_step": int(bad[0]) + 1 if bad.size else None,
          "evals": hist["evals"], "loss": hist["loss"], "compile_s": hist["compile_s"],
          "train_s": hist["train_s"], "model0": model0, "model": model}


def _norms(s: Settings, kind: str, model0: Model, model: Model, key: jax.Array) -> dict:
  import rnn
  cell = make_cell(kind, s.hidden)
  xs, y = adding_problem(key, s.norms_batch, s.norms_length)

  @jax.jit
  def norms_of(m):
    def loss_fn(ys, final):
      return jnp.mean((_readout(m, ys[:, -1])[:, 0] - y) ** 2)
    return rnn.gradient_norms(cell, m.cell, xs, cell.initial_state(m.cell, xs.shape[:1]),
                              loss_fn)

  # Reversed: index d is the distance from the loss, T - 1 - t.
  return {stage: np.asarray(norms_of(m))[::-1] for stage, m in (("init", model0),
                                                                ("trained", model))}


# --------------------------------------------------------------------------------------------
# 3: truncation.

def _k1_of(k2: int) -> int:
  """BPTT(k1, k2) with k1 = ceil(k2 / 2): each loss's gradient reaches k2 - k1 .. k2 - 1 back."""
  return -(-k2 // 2)


def _truncation(ctx: h.Context, s: Settings, bar, k2: int | None) -> dict:
  import rnn
  vocab = s.lag_noise + s.lag_keys + 1
  cell = make_cell("lstm", s.lag_hidden)
  k_model, k_data, k_test = jax.random.split(jax.random.fold_in(jax.random.key(ctx.seed), 7), 3)
  model0 = _init_model(cell, k_model, vocab, vocab)
  source = dict(lag=s.lag, num_keys=s.lag_keys, num_noise=s.lag_noise)
  tokens_test, recall_test = lag_source(k_test, s.lag_test, s.lag_length, **source)

  def nll(m, ys, targets):
    logp = jax.nn.log_softmax(_readout(m, ys))
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

  def loss_fn(m, batch):
    tokens, recall = batch
    xs = jax.nn.one_hot(tokens[:, :-1], vocab, dtype=jnp.float32)
    targets = tokens[:, 1:]
    weight = recall.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    state = cell.initial_state(m.cell, xs.shape[:1])
    if k2 is None:
      ys, _ = rnn.unroll(cell, m.cell, xs, state)
      return jnp.sum(nll(m, ys, targets) * weight) / count
    step_loss = lambda y_t, t: jnp.sum(nll(m, y_t, targets[:, t]) * weight[:, t])
    total, _ = rnn.truncated(cell, m.cell, xs, state, step_loss, k1=_k1_of(k2), k2=k2)
    return total / count

  def evaluate(m):
    xs = jax.nn.one_hot(tokens_test[:, :-1], vocab, dtype=jnp.float32)
    ys, _ = rnn.unroll(cell, m.cell, xs, cell.initial_state(m.cell, xs.shape[:1]))
    targets = tokens_test[:, 1:]
    losses = nll(m, ys, targets)
    hit = (jnp.argmax(_readout(m, ys), axis=-1) == targets).astype(jnp.float32)
    r = recall_test.astype(jnp.float32)
    return {"recall_nll": jnp.sum(losses * r) / jnp.sum(r),
            "recall_acc": jnp.sum(hit * r) / jnp.sum(r)}

  model, hist = _train(loss_fn, model0, _adam(s.lag_lr, 1.0),
                       lambda k: lag_source(k, s.lag_batch, s.lag_length, **source),
                       steps=s.lag_steps, chunk=s.eval_every, key=k_data, evaluate=evaluate,
                       bar=bar)
  last = hist["evals"][-1]
  return {"k2": k2, "k1": None if k2 is None else _k1_of(k2),
          "recall_acc": last["recall_acc"], "recall_ppl": math.exp(last["recall_nll"]),
          "evals": hist["evals"], "compile_s": hist["compile_s"], "train_s": hist["train_s"]}


# --------------------------------------------------------------------------------------------
# 4: exploding gradients.

EXPLODE_VARIANTS = ("no clipping", "clip_by_global_norm", "clip_delta")


def _exploding(ctx: h.Context, s: Settings, bar, variant: str) -> dict:
  import optax
  import rnn
  cell = rnn.simple(s.explode_hidden)  # tanh
  k_model, k_w, k_data = jax.random.split(jax.random.fold_in(jax.random.key(ctx.seed), 11), 3)
  model0 = _init_model(cell, k_model, 2, 1)
  w_hh = (s.explode_scale / math.sqrt(s.explode_hidden)
          * jax.random.normal(k_w, (s.explode_hidden, s.explode_hidden), jnp.float32))
  model0 = model0._replace(cell=model0.cell._replace(w_hh=w_hh))
  clip_delta = s.explode_clip_delta if variant == "clip_delta" else None
  opt = optax.sgd(s.explode_lr)
  if variant == "clip_by_global_norm":
    opt = optax.chain(optax.clip_by_global_norm(s.explode_clip), opt)

  def loss_fn(m, batch):
    xs, y = batch
    pred = _final_prediction(cell, m, xs, grad="manual", clip_delta=clip_delta)
    return jnp.mean((pred - y) ** 2)

  _, hist = _train(loss_fn, model0, opt,
                   lambda k: adding_problem(k, s.explode_batch, s.explode_length),
                   steps=s.explode_steps, chunk=s.explode_steps, key=k_data, bar=bar)
  loss = hist["loss"]
  bad = np.flatnonzero(~np.isfinite(loss))
  tail = loss[-max(1, len(loss) // 10):]
  return {"variant": variant, "loss": loss, "grad_norm": hist["grad_norm"],
          "first_nonfinite_step": int(bad[0]) + 1 if bad.size else None,
          "nonfinite_steps": int(bad.size),
          "final_loss": float(np.mean(tail)) if np.all(np.isfinite(tail)) else float("nan"),
          "max_grad_norm": float(np.nanmax(np.where(np.isfinite(hist["grad_norm"]),
                                                    hist["grad_norm"], np.nan)))
          if np.any(np.isfinite(hist["grad_norm"])) else float("nan"),
          "compile_s": hist["compile_s"], "train_s": hist["train_s"]}


# --------------------------------------------------------------------------------------------
# Output.

def _fmt(x: float | None, digits: int = 3) -> str:
  if x is None or not math.isfinite(x):
    return "NaN" if x is not None else "—"
  return f"{x:.{digits}g}"


def _figures(s: Settings, adding: list[dict], norms: dict, trunc: list[dict],
             explode: list[dict]):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colors = {k: f"C{i}" for i, k in enumerate(CELLS)}
  figs = {}

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
  for ax, stage in zip(axes, ("init", "trained")):
    for kind in CELLS:
      n = norms[kind][stage]
      ratio = n / n[0] if n[0] > 0 else n
      ax.semilogy(np.arange(len(n)), ratio, color=colors[kind], label=CELL_NAMES[kind])
    ax.set_xlabel("distance from the loss, T - 1 - t")
    ax.set_title(f"{'at initialisation' if stage == 'init' else 'after training'} "
                 f"(adding problem, T={s.norms_length})")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("||dL/dh_t|| / ||dL/dh_(T-1)||")
  axes[0].legend()
  fig.tight_layout()
  figs["norms"] = fig

  lengths = sorted({r["T"] for r in adding})
  fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False,
                           sharey=True)
  for ax, length in zip(axes[0], lengths):
    for r in adding:
      if r["T"] == length:
        ev = r["evals"]
        ax.semilogy([e["step"] for e in ev], [e["test_mse"] for e in ev],
                    color=colors[r["cell"]], label=CELL_NAMES[r["cell"]])
    ax.axhline(BASELINE_MSE, color="k", ls="--", lw=0.8, label="always 1 (1/6)")
    ax.axhline(SOLVED_MSE, color="k", ls=":", lw=0.8, label=f"solved ({SOLVED_MSE})")
    ax.set_title(f"adding problem, T={length}")
    ax.set_xlabel("training step")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("test MSE")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  figs["adding"] = fig

  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  labels = [_k2_label(r["k2"]) for r in trunc]
  axes[0].bar(labels, [r["recall_acc"] for r in trunc], color="C2")
  axes[0].axhline(1.0 / s.lag_keys, color="k", ls="--", lw=0.8,
                  label=f"chance among the keys (1/{s.lag_keys})")
  axes[0].set_xlabel("k2 (BPTT(k1, k2), k1 = ceil(k2/2))")
  axes[0].set_ylabel("accuracy on the recalled tokens")
  axes[0].set_title(f"recall {s.lag} steps back, after {s.lag_steps} steps")
  axes[0].legend(fontsize=8)
  for i, r in enumerate(trunc):
    ev = r["evals"]
    axes[1].plot([e["step"] for e in ev], [e["recall_acc"] for e in ev],
                 ls=("-", "--", "-.", ":")[i % 4], marker="o", ms=3, lw=1.2,
                 label=f"k2={_k2_label(r['k2'])}")
  axes[1].set_xlabel("training step")
  axes[1].set_ylabel("recall accuracy (test)")
  axes[1].set_title(f"LSTM H={s.lag_hidden}, lag {s.lag}")
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  figs["truncation"] = fig

  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  for i, r in enumerate(explode):
    steps = np.arange(1, len(r["loss"]) + 1)
    for ax, key in zip(axes, ("loss", "grad_norm")):
      y = np.asarray(r[key], np.float64)
      ax.semilogy(steps, np.where(np.isfinite(y), y, np.nan), color=f"C{i}",
                  label=r["variant"], lw=0.9)
      if r["first_nonfinite_step"] is not None:
        ax.axvline(r["first_nonfinite_step"], color=f"C{i}", ls=":", lw=0.9)
  finite = np.concatenate([np.asarray(r["loss"], np.float64) for r in explode])
  finite = finite[np.isfinite(finite) & (finite > 0)]
  if finite.size:  # the diverging run leaves the plot: the clipped runs stay readable
    axes[0].set_ylim(0.5 * finite.min(), 1e3)
  axes[0].set_ylabel("training MSE (per step; cut at 1e3)")
  axes[1].set_ylabel("global gradient norm before clipping")
  for ax in axes:
    ax.set_xlabel("step (dotted: first non-finite loss)")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_title(f"tanh RNN, w_hh ~ N(0, {s.explode_scale:g}^2/H), SGD lr {s.explode_lr:g}")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  figs["exploding"] = fig
  return figs


def _k2_label(k2: int | None) -> str:
  return "full" if k2 is None else str(k2)


@h.suite("gradients")
def run(ctx: h.Context) -> list[h.SummaryRow]:
  """Runs the gradients suite; writes `gradients.md`, `gradients.json` and four plots."""
  s = QUICK if ctx.quick else FULL
  n_chunks = -(-s.adding_steps // s.eval_every)
  total = (len(s.adding_lengths) * len(CELLS) * n_chunks
           + len(s.lag_k2) * -(-s.lag_steps // s.eval_every) + len(EXPLODE_VARIANTS))
  bar = ctx.progress("gradients", total)
  t_start = time.perf_counter()
  adding, trunc, explode = [], [], []
  norms: dict[str, dict] = {}
  try:
    for length in s.adding_lengths:
      for kind in CELLS:
        bar.set_postfix_str(f"adding T={length} {CELL_NAMES[kind]}")
        adding.append(_adding(ctx, s, bar, kind, length))
    for r in adding:
      if r["T"] == s.norms_length:
        norms[r["cell"]] = _norms(s, r["cell"], r["model0"], r["model"],
                                  jax.random.fold_in(jax.random.key(ctx.seed), 3))
    for k2 in s.lag_k2:
      bar.set_postfix_str(f"truncation k2={_k2_label(k2)}")
      trunc.append(_truncation(ctx, s, bar, k2))
    for variant in EXPLODE_VARIANTS:
      bar.set_postfix_str(f"exploding: {variant}")
      explode.append(_exploding(ctx, s, bar, variant))
  finally:
    bar.close()
  wall = time.perf_counter() - t_start

  md = ctx.header(
      "gradients: vanishing and exploding gradients, measured",
      shapes=(f"H={s.hidden}; adding problem T in {list(s.adding_lengths)}, batch "
              f"{s.adding_batch}, {s.adding_steps} steps; truncation: LSTM H={s.lag_hidden}, "
              f"T={s.lag_length}, lag {s.lag}, batch {s.lag_batch}, {s.lag_steps} steps; "
              f"exploding: tanh RNN H={s.explode_hidden}, T={s.explode_length}, batch "
              f"{s.explode_batch}, {s.explode_steps} steps"),
      dtype="float32",
      seeds=f"{ctx.seed} (one seed per experiment: init, training batches, test set)",
      method=("every model trained from scratch on synthetic data drawn inside the compiled "
              f"training step; {s.eval_every} steps per compiled call; test sets fixed; "
              f"suite wall time {wall:.0f} s (shared machine, low priority)"))

  md += _adding_section(s, adding, ctx.quick)
  md += _norms_section(s, norms)
  md += _truncation_section(s, trunc)
  md += _exploding_section(s, explode)

  data = {
      "settings": dataclasses.asdict(s),
      "adding": [{k: v for k, v in r.items() if k not in ("model0", "model")} for r in adding],
      "norms": {k: {st: v.tolist() for st, v in d.items()} for k, d in norms.items()},
      "truncation": trunc,
      "exploding": explode,
  }
  paths = ctx.write("gradients", md, data, figures=_figures(s, adding, norms, trunc, explode))

  longest = max(s.adding_lengths)
  at = {r["cell"]: r for r in adding if r["T"] == longest}
  summary = [h.SummaryRow("gradients", f"adding problem T={longest}, test MSE",
                          ", ".join(f"{CELL_NAMES[k]} {_fmt(at[k]['test_mse'])}" for k in CELLS)),
             h.SummaryRow("gradients", f"truncation, recall accuracy (lag {s.lag}) by k2",
                          ", ".join(f"{_k2_label(r['k2'])}: {r['recall_acc']:.2f}"
                                    for r in trunc)),
             h.SummaryRow("gradients", "exploding: final loss",
                          ", ".join(f"{r['variant']} {_fmt(r['final_loss'])}" for r in explode)),
             h.SummaryRow("gradients", "table", h.display_path(paths[0]))]
  return summary


def _adding_section(s: Settings, adding: list[dict], quick: bool) -> str:
  lengths = sorted({r["T"] for r in adding})
  by = {(r["cell"], r["T"]): r for r in adding}
  rows = []
  for length in lengths:
    cells = []
    for kind in CELLS:
      r = by[(kind, length)]
      note = ""
      if r["first_nonfinite_step"] is not None:
        note = f" (diverged: loss not finite from step {r['first_nonfinite_step']})"
      elif r["solved_at_step"] is not None:
        note = f" (< {SOLVED_MSE} at step {r['solved_at_step']})"
      cells.append(f"{_fmt(r['test_mse'])}{note}")
    rows.append([str(length)] + cells)
  out = (f"\n## The adding problem: test MSE after {s.adding_steps} steps\n\n"
         f"Every cell: H={s.hidden}, a linear readout of the last step, batch {s.adding_batch}, "
         f"Adam (lr {s.adding_lr:g}) after `clip_by_global_norm({s.adding_clip:g})`, "
         f"{s.adding_steps} steps, fresh batches every step; test MSE on {s.adding_test} fixed "
         f"sequences. Always answering 1 scores {BASELINE_MSE:.3f}; in brackets, the first "
         f"evaluation (every {s.eval_every} steps) below {SOLVED_MSE}.\n\n")
  out += h.md_table(["T"] + [CELL_NAMES[k] for k in CELLS], rows)
  longest = max(lengths)
  if quick or longest < 200:
    out += (f"\nThe bar (at T=200, LSTM and GRU below {SOLVED_MSE}, the tanh RNN not) is judged "
            "only in the full run; this smoke run uses a short T and a small budget.\n")
  else:
    ok = (by[("lstm", longest)]["test_mse"] < SOLVED_MSE
          and by[("gru", longest)]["test_mse"] < SOLVED_MSE
          and not by[("tanh", longest)]["test_mse"] < SOLVED_MSE)
    out += (f"\nThe bar, at T={longest}: LSTM and GRU below {SOLVED_MSE} and the tanh RNN not: "
            f"**{'met' if ok else 'not met'}**.\n")
  times = ", ".join(f"{CELL_NAMES[k]} {sum(by[(k, t)]['train_s'] for t in lengths):.0f} s"
                    for k in CELLS)
  out += f"\nTraining time over all T (excluding compilation): {times}.\n"
  return out


def _norms_section(s: Settings, norms: dict) -> str:
  T = s.norms_length
  dists = [d for d in (1, 10, 25, 50, T - 1) if d < T]
  rows = []
  for kind in CELLS:
    for stage in ("init", "trained"):
      n = norms[kind][stage]
      rows.append([CELL_NAMES[kind], stage, f"{n[0]:.2e}"]
                  + [("0 (underflow)" if n[d] == 0 else f"{n[d] / n[0]:.1e}") if n[0] > 0
                     else "—" for d in dists])
  return (f"\n## Gradient norms: ||dL/dh_t|| over T={T}, loss on the last step\n\n"
          f"`rnn.gradient_norms` on {s.norms_batch} adding-problem sequences (loss: the MSE of "
          "the readout of the last step), with the initial params and with the params trained "
          f"above at T={T}. Columns: the norm at distance 0 (dL/dh_(T-1)), then the ratio "
          "||dL/dh_(T-1-d)|| / ||dL/dh_(T-1)|| at distance d: how much of the error signal "
          "reaches d steps back. Below 1e-6 the step receives nothing usable (vanishing); "
          "above 1 it is amplified (exploding); 0: below float32's smallest number. Plot: "
          "`gradients_norms.png`.\n\n"
          + h.md_table(["cell", "params", "norm at d=0"] + [f"ratio d={d}" for d in dists], rows))


def _truncation_section(s: Settings, trunc: list[dict]) -> str:
  rows = []
  for r in trunc:
    if r["k2"] is None:
      reach, kk = "all (to step 0)", "full BPTT"
    else:
      reach, kk = f"{r['k2'] - r['k1']} .. {r['k2'] - 1}", f"BPTT({r['k1']}, {r['k2']})"
    rows.append([kk, reach, f"{r['recall_acc']:.3f}", f"{r['recall_ppl']:.2f}",
                 f"{r['train_s']:.0f}"])
  vocab = s.lag_noise + s.lag_keys + 1
  return (f"\n## Truncation: BPTT(k1, k2) on a dependency {s.lag} steps long\n\n"
          f"`lag_source`: blocks of a key, {s.lag - 2} noise tokens, MARK and the key again "
          f"({s.lag_keys} keys, {s.lag_noise} noise tokens, vocabulary {vocab}); the recalled key "
          f"repeats the token seen {s.lag} tokens back, so predicting it means carrying the key "
          f"{s.lag - 1} steps. LSTM H={s.lag_hidden}, one-hot inputs, a softmax readout; the "
          "loss is the next-token cross-entropy on the recalled keys (the only predictable "
          f"tokens), T={s.lag_length}, batch {s.lag_batch}, Adam (lr {s.lag_lr:g}) after "
          f"`clip_by_global_norm(1)`, {s.lag_steps} steps. The gradient is "
          "`rnn.truncated(..., k1, k2)` with k1 = ceil(k2/2): the loss at a step reaches the "
          "inputs between k2 - k1 and k2 - 1 steps back (column 2), so no recall's gradient "
          f"reaches its key when k2 < {s.lag}, and every recall's does when "
          f"k2 - k1 >= {s.lag - 1}. Evaluated with a full forward pass on {s.lag_test} fixed "
          f"sequences: accuracy and perplexity on the recalled keys (chance: 1/{s.lag_keys} and "
          f"{s.lag_keys}). Plot: `gradients_truncation.png`.\n\n"
          + h.md_table(["gradient", "steps back a loss reaches", "recall accuracy",
                        "recall perplexity", "train s"], rows))


def _exploding_section(s: Settings, explode: list[dict]) -> str:
  setting = {"no clipping": "—",
             "clip_by_global_norm": f"`optax.clip_by_global_norm({s.explode_clip:g})`",
             "clip_delta": ("`rnn.unroll(..., grad=\"manual\", "
                            f"clip_delta={s.explode_clip_delta:g})`")}
  rows = []
  for r in explode:
    rows.append([r["variant"], setting[r["variant"]], _fmt(r["final_loss"]),
                 "none" if r["first_nonfinite_step"] is None else str(r["first_nonfinite_step"]),
                 str(r["nonfinite_steps"]), _fmt(r["max_grad_norm"])])
  return (f"\n## Exploding gradients: clipping\n\n"
          f"A tanh RNN (H={s.explode_hidden}) whose recurrent matrix starts at "
          f"N(0, {s.explode_scale:g}^2/H) (spectral radius about {s.explode_scale:g}), on the "
          f"adding problem at T={s.explode_length}, plain SGD with lr {s.explode_lr:g}, batch "
          f"{s.explode_batch}, {s.explode_steps} steps, the same init and batches for the three "
          "runs. Final loss: the mean training MSE over the last tenth of the steps (NaN if any "
          "is not finite). Plot: `gradients_exploding.png`.\n\n"
          + h.md_table(["run", "clipping", "final loss", "first non-finite step",
                        "non-finite steps", "max gradient norm (before clipping)"], rows))
