"""The `recipe` suite: PyTorch's word_language_model recipe in ours and in PyTorch, back to back.

Ours is `python -m train --recipe pytorch --decay none --epochs 6`, run as `train.fit` epoch by
epoch; PyTorch's is `main.py`'s loop (`benchmarks/_torch_lm.py`, `torch.optim.SGD`), each from
its own initialisation, on one vocabulary and the same batchified arrays, alternating epoch by
epoch. Settings, columns and the bar are described in `benchmarks/README.md`.
"""

from __future__ import annotations

from benchmarks import _harness as h
from benchmarks import _peers
from benchmarks import _quality as q
from train._cli import RECIPES

EPOCHS = 6
BAR_SPEED, BAR_PPL = 1.0, 0.03   # ours >= 1.0x torch's training tokens/s at a ppl within 3%


def settings(seed: int) -> q.Settings:
  """The recipe (`python -m train --recipe pytorch`) with the learning rate held constant."""
  r = RECIPES["pytorch"]
  return q.Settings(emsize=r["emsize"], nhid=r["nhid"], nlayers=r["nlayers"], dropout=r["dropout"],
                    batch_size=r["batch_size"], eval_batch_size=r["eval_batch_size"],
                    bptt=r["bptt"], optimizer=r["optimizer"], lr=r["lr"], clip=r["clip"],
                    epochs=EPOCHS, lr_decay=r["lr_decay"], decay_after=0,
                    patience=r["patience"], seed=seed, init=r["init"], decay="none")


@h.suite("recipe")
def run(ctx: h.Context) -> list[h.SummaryRow]:
  """Runs the recipe suite; writes `recipe.md` and `recipe.json`."""
  with q.quick_compiles(ctx.quick):
    return _run(ctx)


def _run(ctx: h.Context) -> list[h.SummaryRow]:
  from benchmarks import _torch_lm as tlm
  s = settings(ctx.seed)
  torch, data, note, ours, load_start = _peers.prepare(ctx, "recipe", s)
  lm = tlm.LSTMLM(len(data.corpus.vocab), s.emsize, s.nhid, s.nlayers, s.dropout)
  trainer = tlm.trainer(lm, data.train, bptt=s.bptt, lr=s.lr, clip=s.clip,
                        optimizer=s.optimizer)
  bar = ctx.progress("recipe", 1 + 2 * s.epochs + 2)
  try:
    bar.set_postfix_str("compile")
    ours.compile(data.valid)
    bar.update(1)
    side = _peers.alternate(ours, trainer, data, s, bar)
  finally:
    bar.close()
  load_end = q.machine_note(ctx)

  mine = ours.result()
  ours_train_s = mine["train_steps_s"]
  ours_fit_s = mine["train_time_s"]  # training steps and the validation evaluations
  ours_compile_s = mine["compile_s"] + mine["eval_compile_s"]
  rows = {
      "ours": {"framework": "ours (`python -m train --recipe pytorch --decay none`)",
               "test_ppl": mine["test_ppl"], "valid_curve": mine["valid_curve"][1:],
               "train_tok_s": mine["train_tok_s"], "train_tokens": mine["train_tokens"],
               "epoch_tok_s": [t / sec for t, sec in zip(
                   _peers._epoch_tokens(ours, s.epochs), mine["epoch_train_steps_s"])],
               "train_s": ours_train_s, "eval_s": ours_fit_s - ours_train_s + mine["test_eval_s"],
               "compile_s": ours_compile_s,
               "wall_s": ours_compile_s + ours_fit_s + mine["test_eval_s"]},
      "torch": {"framework": f"PyTorch {torch.__version__} (`main.py`'s loop, eager)",
                "test_ppl": side.test.perplexity, "valid_curve": side.valid_curve,
                "train_tok_s": trainer.state["tokens"] / trainer.state["train_s"],
                "train_tokens": trainer.state["tokens"],
                "epoch_tok_s": [trainer.state["tokens"] / s.epochs / sec
                                for sec in side.epoch_s],
                "train_s": trainer.state["train_s"], "eval_s": side.valid_s + side.test_s,
                "compile_s": None,
                "wall_s": trainer.state["train_s"] + side.valid_s + side.test_s},
  }
  speed_ratio = rows["ours"]["train_tok_s"] / rows["torch"]["train_tok_s"]
  ppl_ratio = rows["ours"]["test_ppl"] / rows["torch"]["test_ppl"]
  met = speed_ratio >= BAR_SPEED and ppl_ratio <= 1 + BAR_PPL
  command = (f"python -m train --recipe pytorch --decay none --epochs {s.epochs} "
             f"{data.cli_data}")

  md = ctx.header(
      "Recipe: PyTorch's word_language_model recipe, ours and PyTorch's, back to back",
      shapes=_peers.shapes(data, s, f"batch {s.batch_size} (evaluation {s.eval_batch_size}) "
                           f"x bptt {s.bptt}, {s.optimizer} lr {s.lr:g} constant, clip "
                           f"{s.clip:g}, {s.epochs} epochs"),
      dtype="float32", seeds=f"{s.seed} (each framework's own initialisation and dropout)",
      method=("the two alternated epoch by epoch (order swapped every epoch, 50 ms pauses); "
              "training tok/s over the training steps only; test ppl exact, of the "
              "best-validation parameters; wall = training + evaluations + compilation"),
      extra=([note] if note else []) + [
          f"ours: `{command}`",
          f"machine load: at the start {load_start}; at the end {load_end}. A load above the "
          "core count means other jobs shared the machine; the two frameworks alternated "
          "under the same conditions"])
  table = []
  for name in ("ours", "torch"):
    r = rows[name]
    table.append((r["framework"], f"{r['test_ppl']:.2f}",
                  f"{r['test_ppl'] / rows['torch']['test_ppl']:.3f}",
                  ", ".join(f"{v:.2f}" for v in r["valid_curve"]), h.fmt_rate(r["train_tok_s"]),
                  h.fmt_ratio(r["train_tok_s"] / rows["torch"]["train_tok_s"]),
                  h.fmt_seconds(r["train_s"]), h.fmt_seconds(r["eval_s"]),
                  h.fmt_seconds(r["compile_s"]), h.fmt_seconds(r["wall_s"])))
  md += "\n" + h.md_table(
      ["framework", "test ppl", "ppl / torch", "valid ppl per epoch", "training tok/s",
       "tok/s vs torch", "training steps (s)", "evaluations (s)", "compile (s)", "wall (s)"],
      table)
  md += (f"\n**Bar** (test perplexity within {BAR_PPL:.0%} of PyTorch's at >= {BAR_SPEED:g}x "
         f"its training tokens/s): perplexity {ppl_ratio:.3f}x, tokens/s {speed_ratio:.2f}x: "
         f"{'met' if met else 'NOT met'}.\n")
  paths = ctx.write("recipe", md, {**_peers.described(s, data, note), "command": command,
                                   "rows": rows, "speed_ratio": speed_ratio,
                                   "ppl_ratio": ppl_ratio, "bar_met": met})
  return [
      h.SummaryRow("recipe", "test ppl ours / torch",
                   f"{rows['ours']['test_ppl']:.2f} / {rows['torch']['test_ppl']:.2f} "
                   f"({ppl_ratio:.3f}x)"),
      h.SummaryRow("recipe", "training tok/s ours vs torch",
                   f"{h.fmt_ratio(speed_ratio)}; bar {'met' if met else 'NOT met'}"),
      h.SummaryRow("recipe", "table", h.display_path(paths[0])),
  ]
