"""The `peers` suite: our language model against PyTorch's, same model, same data, same training.

Our LSTM language model (`train.fit`) and PyTorch's word_language_model recipe
(`benchmarks/_torch_lm.py`) start from the same weights (`rnn.to_torch`) and are measured twice,
interleaved: one training step of each (`_harness.interleave`, on copies of the models) and the
two trained epoch by epoch in alternation. Settings and columns are described in
`benchmarks/README.md`.
"""

from __future__ import annotations

import copy
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from benchmarks import _harness as h
from benchmarks import _quality as q

BUDGET_S = 60.0      # seconds of timed rounds for the step throughput ...
MIN_REPEATS = 10     # ... but never fewer rounds than this
BAR_SPEED, BAR_PPL = 1.0, 0.03   # ours >= 1.0x torch's tokens/s at a perplexity within 3%


def _data(ctx: h.Context, s: q.Settings):
  """WikiText-2 (a slice of it in quick mode), or the synthetic source when it is absent."""
  wt2 = next(c for c in q.CORPORA if c.name == "wikitext-2")
  if ctx.quick:
    data = q.load(wt2, s, max_vocab=2000, max_tokens=4000)
  else:
    data = q.load(wt2, s)
  if isinstance(data, q.Data):
    return data, None
  note = f"WikiText-2 skipped ({data}); the synthetic source is used instead"
  print(f"peers: {note}", flush=True)
  return q.load(q.CORPORA[0], s), note


def _step_calls(ours: q.Run, lm, data: q.Data, s: q.Settings):
  """Zero-argument training steps on copies of both models, cycling over the first windows."""
  from benchmarks import _torch_lm as tlm
  count = min(8, ours.per_epoch)
  state = {"ours": jax.tree.map(jnp.copy, ours.state), "i": 0, "j": 0}

  def ours_step():
    i = state["i"] % count
    state["i"] += 1
    state["ours"], metrics = ours.train_step(state["ours"], ours.windows[i],
                                             jax.random.fold_in(ours.step_key, i))
    return state["ours"], metrics

  trainer = tlm.trainer(copy.deepcopy(lm), data.train, bptt=s.bptt, lr=s.lr, clip=s.clip)

  def torch_step():
    j = state["j"] % count
    state["j"] += 1
    return tlm.train_step(trainer, *trainer.windows[j])

  return {"ours": ours_step, "torch": torch_step}


@h.suite("peers")
def run(ctx: h.Context) -> list[h.SummaryRow]:
  """Runs the peers suite; writes `peers.md` and `peers.json`."""
  with q.quick_compiles(ctx.quick):
    return _run(ctx)


def prepare(ctx: h.Context, suite: str, s: q.Settings):
  """The data and our run of a suite against PyTorch, after checking torch is there.

  Returns:
    `(torch, data, note, ours, load_start)`: the torch module (seeded with `s.seed`), the
    `Data`, a note when the synthetic source replaced WikiText-2 (else None), our `Run` of the
    full softmax, and the machine's load before anything ran.
  """
  torch = h.optional_torch()
  if torch is None:
    raise RuntimeError(f"the {suite} suite compares against PyTorch; install torch (CPU build).")
  load_start = q.machine_note(ctx)
  data, note = _data(ctx, s)
  ours = q.Run("full", data, s)
  torch.manual_seed(s.seed)
  return torch, data, note, ours, load_start


def _run(ctx: h.Context) -> list[h.SummaryRow]:
  from benchmarks import _torch_lm as tlm
  s = q.QUICK._replace(seed=ctx.seed) if ctx.quick else q.FULL._replace(seed=ctx.seed)
  torch, data, note, ours, load_start = prepare(ctx, "peers", s)
  lm = tlm.from_ours(ours.model, ours.state.params)
  trainer = tlm.trainer(lm, data.train, bptt=s.bptt, lr=s.lr, clip=s.clip)
  repeats = ctx.repeats(full=60, quick=3)
  warmup = 1 if ctx.quick else 2
  bar = ctx.progress("peers", 1 + 2 * (warmup + repeats) + 2 * s.epochs + 2)
  try:
    bar.set_postfix_str("compile")
    ours.compile(data.valid)
    bar.update(1)

    bar.set_postfix_str("step throughput")
    calls = _step_calls(ours, lm, data, s)
    stats = h.interleave(calls, repeats=repeats, warmup=warmup, budget_s=ctx.budget(BUDGET_S),
                         min_repeats=MIN_REPEATS, bar=bar)

    side = alternate(ours, trainer, data, s, bar)
  finally:
    bar.close()
  load_end = q.machine_note(ctx)

  tokens_step = s.batch_size * s.bptt
  mine = ours.result()
  rows = {
      "ours": {"framework": "ours (`train.language_model`, full softmax, `train.fit`)",
               "step": stats["ours"], "step_tok_s": stats["ours"].rate(tokens_step),
               "train_tok_s": mine["train_tok_s"], "train_steps_s": mine["train_steps_s"],
               "train_tokens": mine["train_tokens"],
               "epoch_tok_s": [t / sec for t, sec in zip(
                   _epoch_tokens(ours, s.epochs), mine["epoch_train_steps_s"])],
               "valid_curve": mine["valid_curve"][1:], "best_valid_ppl": mine["best_valid_ppl"],
               "test_ppl": mine["test_ppl"], "compile_s": mine["compile_s"],
               "test_eval_s": mine["test_eval_s"]},
      "torch": {"framework": f"PyTorch {torch.__version__} (word_language_model recipe, eager)",
                "step": stats["torch"], "step_tok_s": stats["torch"].rate(tokens_step),
                "train_tok_s": trainer.state["tokens"] / trainer.state["train_s"],
                "train_steps_s": trainer.state["train_s"],
                "train_tokens": trainer.state["tokens"],
                "valid_curve": side.valid_curve, "best_valid_ppl": trainer.state["best_valid"],
                "test_ppl": side.test.perplexity, "compile_s": None,
                "test_eval_s": side.test_s},
  }
  step_ratio = stats["torch"].median / stats["ours"].median
  train_ratio = rows["ours"]["train_tok_s"] / rows["torch"]["train_tok_s"]
  ppl_ratio = rows["ours"]["test_ppl"] / rows["torch"]["test_ppl"]
  met = step_ratio >= BAR_SPEED and abs(ppl_ratio - 1) <= BAR_PPL

  md = ctx.header(
      "Peers: our LSTM language model against PyTorch's, trained side by side",
      shapes=shapes(data, s, f"batch {s.batch_size} x bptt {s.bptt}, {s.optimizer} lr "
                    f"{s.lr:g} clip {s.clip:g}, {s.epochs} epoch(s), lr / {s.lr_decay:g} after "
                    f"each epoch from epoch {s.decay_after} on"),
      dtype="float32", seeds=f"{s.seed} (our initial weights, copied into torch)",
      method=("step throughput: `_harness.interleave` of one training step each, medians; "
              "training run: the two alternated epoch by epoch with 50 ms pauses, tokens/s "
              "over the training steps only; test ppl exact, best-validation parameters"),
      extra=([note] if note else []) + [
          f"machine load: at the start {load_start}; at the end {load_end}. A load above "
          "the core count means other jobs shared the machine, making absolute times "
          "pessimistic; the two frameworks ran interleaved under the same conditions, so their ratio is the "
          "number to read"])
  table = []
  for name in ("ours", "torch"):
    r = rows[name]
    table.append((r["framework"], h.fmt_stat(r["step"], tokens_step),
                  h.fmt_ratio(stats["torch"].median / r["step"].median),
                  h.fmt_rate(r["train_tok_s"]),
                  h.fmt_ratio(r["train_tok_s"] / rows["torch"]["train_tok_s"]),
                  h.fmt_seconds(r["train_steps_s"]),
                  ", ".join(f"{v:.2f}" for v in r["valid_curve"]), f"{r['test_ppl']:.2f}",
                  f"{r['test_ppl'] / rows['torch']['test_ppl']:.3f}",
                  h.fmt_seconds(r["compile_s"])))
  md += "\n" + h.md_table(
      ["framework", "step tok/s (median)", "step: vs torch", "training-run tok/s",
       "run: vs torch", "training steps (s)", "valid ppl per epoch", "test ppl",
       "ppl / torch", "compile s"], table)
  md += (f"\n**Bar** (ours >= {BAR_SPEED:g}x torch's tokens/s at a test perplexity within "
         f"{BAR_PPL:.0%}): step throughput {step_ratio:.2f}x, training run {train_ratio:.2f}x, "
         f"perplexity {ppl_ratio:.3f}x torch's: {'met' if met else 'NOT met'}.\n")
  paths = ctx.write("peers", md, {**described(s, data, note), "rows": rows,
                                  "step_ratio": step_ratio, "train_ratio": train_ratio,
                                  "ppl_ratio": ppl_ratio, "bar_met": met})
  return [
      h.SummaryRow("peers", "ours vs torch LSTM LM, step tok/s", h.fmt_ratio(step_ratio)),
      h.SummaryRow("peers", "ours vs torch LSTM LM, training-run tok/s", h.fmt_ratio(train_ratio)),
      h.SummaryRow("peers", "test ppl ours / torch",
                   f"{rows['ours']['test_ppl']:.2f} / {rows['torch']['test_ppl']:.2f} "
                   f"({ppl_ratio:.3f}x); bar {'met' if met else 'NOT met'}"),
      h.SummaryRow("peers", "table", h.display_path(paths[0])),
  ]


def shapes(data: q.Data, s: q.Settings, training: str) -> str:
  """The header's shapes line of a run against PyTorch: corpus, model, then `training`."""
  return (f"{data.spec.title}, V = {len(data.corpus.vocab):,}, tokens train "
          f"{data.sizes['train']:,} / valid {data.sizes['valid']:,} / test "
          f"{data.sizes['test']:,}; LSTM {s.nlayers}x{s.nhid}, emsize {s.emsize}, dropout "
          f"{s.dropout:g}, full softmax, {training}")


def described(s: q.Settings, data: q.Data, note: str | None) -> dict:
  """The settings and the data of a run against PyTorch, as its JSON file records them."""
  return {"settings": s._asdict(), "corpus": data.spec.name,
          "vocab_size": len(data.corpus.vocab), "tokens": data.sizes, "note": note}


class TorchSide(NamedTuple):
  """What `alternate` measured of the torch model.

  Attributes:
    valid_curve: the validation perplexity after every epoch.
    valid_s: seconds of those evaluations.
    epoch_s: seconds of the training steps of every epoch.
    test: the `train.Evaluation` of the test split, best-validation parameters.
    test_s: its seconds.
  """

  valid_curve: list
  valid_s: float
  epoch_s: list
  test: Any
  test_s: float


def alternate(ours: q.Run, trainer, data: q.Data, s: q.Settings, bar) -> TorchSide:
  """Trains ours and the torch model epoch by epoch, alternating, then tests both.

  Each epoch, the two train in turn (the order swapped every epoch, `_harness.PAUSE_S` after
  each): ours by `train.fit` to the epoch's end (its validation included), the torch model one
  `_torch_lm.train_epoch`, its validation and `_torch_lm.end_epoch` with the settings' schedule.
  Both are then tested with their best-validation parameters. `bar` advances once per epoch of
  each and once per test.
  """
  from benchmarks import _torch_lm as tlm
  valid_curve, valid_s, epoch_s = [], 0.0, []
  for epoch in range(1, s.epochs + 1):
    order = ("ours", "torch") if epoch % 2 else ("torch", "ours")
    for who in order:
      bar.set_postfix_str(f"epoch {epoch}/{s.epochs} {who}")
      if who == "ours":
        ours.train_epoch(epoch, data)
      else:
        epoch_s.append(tlm.train_epoch(trainer))
        t0 = time.perf_counter()
        ppl = tlm.evaluate(trainer.lm, data.valid, bptt=s.bptt).perplexity
        valid_s += time.perf_counter() - t0
        valid_curve.append(ppl)
        tlm.end_epoch(trainer, ppl, decay=s.decay, lr_decay=s.lr_decay,
                      decay_after=s.decay_after)
      time.sleep(h.PAUSE_S)
      bar.update(1)
  bar.set_postfix_str("test")
  ours.finish(data)
  bar.update(1)
  t0 = time.perf_counter()
  test = tlm.evaluate(trainer.lm, data.test, bptt=s.bptt, state_dict=trainer.state["best_state"])
  test_s = time.perf_counter() - t0
  bar.update(1)
  return TorchSide(valid_curve, valid_s, epoch_s, test, test_s)


def _epoch_tokens(run: q.Run, epochs: int) -> list[int]:
  per_epoch = sum(int(w.mask.sum()) for w in run.windows)
  return [per_epoch] * epochs
