"""The `memory` suite: peak memory and step time of BPTT for long sequences, with and without remat.

One LSTM training step for T up to 10,000 in four variants (`grad="autodiff"` or `"manual"`,
each with and without `remat`): XLA's buffer assignment of the compiled step, the RSS increase
of one step in a fresh process (CPU only) and the median step time, the variants interleaved.
Settings and how to read the table are described in `benchmarks/README.md`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp

from benchmarks import _harness as h

VARIANTS = (("autodiff", False), ("autodiff", True), ("manual", False), ("manual", True))


@dataclasses.dataclass(frozen=True)
class Settings:
  batch: int
  hidden: int                     # H = D
  lengths: tuple[int, ...]
  rss_lengths: tuple[int, ...]    # the T at which RSS is probed
  repeats: int
  budget_s: float                 # seconds of timed rounds per T, never below MIN_REPEATS rounds


FULL = Settings(batch=16, hidden=256, lengths=(100, 1000, 10000),
                rss_lengths=(100, 1000, 10000), repeats=5, budget_s=60.0)
QUICK = Settings(batch=4, hidden=64, lengths=(100, 1000), rss_lengths=(1000,), repeats=2,
                 budget_s=5.0)
MIN_REPEATS = 3


def _name(grad: str, remat: bool) -> str:
  return f"{grad}{' + remat' if remat else ''}"


def _step(grad: str, remat: bool, hidden: int):
  """`step(params, xs) -> (loss, d params)`: one LSTM training step's value and gradient."""
  import rnn
  cell = rnn.lstm(hidden)

  def loss(params, xs):
    state = cell.initial_state(params, xs.shape[:1])
    ys, _ = rnn.unroll(cell, params, xs, state, grad=grad, remat=remat)
    return 0.5 * jnp.mean(ys * ys)

  return cell, jax.value_and_grad(loss)


def _inputs(cell, batch: int, length: int, hidden: int, seed: int):
  k_params, k_xs = jax.random.split(jax.random.key(seed))
  params = cell.init(k_params, hidden)
  xs = jax.random.normal(k_xs, (batch, length, hidden), jnp.float32)
  return params, xs


def _settle(*, poll_s: float = 0.05, quiet_polls: int = 4, timeout_s: float = 10.0) -> None:
  """Waits until the resident set stops shrinking (less than 1 MiB in `quiet_polls` polls).

  XLA frees a step's buffers after its outputs are ready, and unmapping gigabytes takes a
  while (about 0.5 s for 4 GiB here): read at once, the resident set "before" a step would
  still hold most of the previous step's buffers.
  """
  last = h._status_kib("VmRSS")
  if last is None:
    time.sleep(1.0)
    return
  quiet, deadline = 0, time.perf_counter() + timeout_s
  while quiet < quiet_polls and time.perf_counter() < deadline:
    time.sleep(poll_s)
    now = h._status_kib("VmRSS")
    quiet = quiet + 1 if last - now < 1024 else 0
    last = now


def probe(spec: dict[str, Any]):
  """RSS probe target: compiles one training step from `spec`; returns a callable running it.

  The callable blocks on the step's outputs and then waits for its buffers to be returned to
  the system (`_settle`), so that the probe's "before" is the resident set between steps.
  """
  cell, step = _step(spec["grad"], spec["remat"], spec["hidden"])
  params, xs = _inputs(cell, spec["batch"], spec["T"], spec["hidden"], spec["seed"])
  call = h.aot(step, params, xs).call

  def run():
    out = jax.block_until_ready(call(params, xs))
    _settle()
    return out

  return run


def _measure(ctx: h.Context, s: Settings, bar, length: int, probe_rss: bool) -> list[dict]:
  rows, calls = {}, {}
  for grad, remat in VARIANTS:
    name = _name(grad, remat)
    cell, step = _step(grad, remat, s.hidden)
    params, xs = _inputs(cell, s.batch, length, s.hidden, ctx.seed)
    c = h.aot(step, params, xs, bar=bar)
    rows[name] = {"variant": name, "grad": grad, "remat": remat, "T": length, "B": s.batch,
                  "H": s.hidden, "xla": c.memory, "compile_s": c.compile_s, "rss": None}
    calls[name] = (lambda c, p, x: lambda: c(p, x))(c.call, params, xs)
  if probe_rss:
    bar.set_postfix_str(f"T={length} RSS probes")
    jobs = [(f"{__name__}:probe", {"grad": r["grad"], "remat": r["remat"], "batch": s.batch,
                                   "T": length, "hidden": s.hidden, "seed": ctx.seed})
            for r in rows.values()]
    # Two probes side by side while they fit easily; one at a time for the longest sequences.
    parallel = 2 if length * s.batch * s.hidden <= 1000 * 16 * 256 else 1
    for row, rss in zip(rows.values(), h.rss_probes(jobs, threads=ctx.threads,
                                                     parallel=parallel, bar=bar)):
      row["rss"] = rss
  bar.set_postfix_str(f"T={length} timing")
  stats = h.interleave(calls, repeats=ctx.repeats(full=s.repeats, quick=s.repeats), warmup=1,
                       budget_s=ctx.budget(s.budget_s), min_repeats=MIN_REPEATS, bar=bar)
  base = stats[_name("autodiff", False)].median
  for name, row in rows.items():
    row["step_stats"] = stats[name]
    row["step_s"] = stats[name].median
    row["tok_s"] = stats[name].rate(s.batch * length)
    row["speed_vs_autodiff"] = base / stats[name].median
  del calls
  return list(rows.values())


def _slopes(rows: list[dict], lengths) -> dict[str, float]:
  """Bytes of XLA temp per time step, between the two longest sequences, per variant."""
  if len(lengths) < 2:
    return {}
  t0, t1 = lengths[-2], lengths[-1]
  out = {}
  for grad, remat in VARIANTS:
    name = _name(grad, remat)
    a = next(r for r in rows if r["variant"] == name and r["T"] == t0)["xla"].get("temp")
    b = next(r for r in rows if r["variant"] == name and r["T"] == t1)["xla"].get("temp")
    if a is not None and b is not None:
      out[name] = (b - a) / (t1 - t0)
  return out


def _table(rows: list[dict]) -> str:
  out = []
  for r in rows:
    rss = r["rss"]
    if rss is None:
      rss_s = "not probed"
    elif "delta" in rss:
      rss_s = h.fmt_bytes(rss["delta"])
    else:
      rss_s = f"failed ({rss.get('error', '')})"
    floor = 2 * r["T"] * r["B"] * 4 * r["H"] * 4
    out.append((r["T"], r["variant"], h.fmt_bytes(r["xla"].get("temp")),
                h.fmt_bytes(r["xla"].get("total")), rss_s, h.fmt_bytes(floor),
                f"{h.fmt_seconds(r['step_s'])} (±{100 * r['step_stats'].iqr_rel / 2:.0f}%, "
                f"n={r['step_stats'].n})",
                h.fmt_rate(r["tok_s"]), h.fmt_ratio(r["speed_vs_autodiff"]),
                h.fmt_seconds(r["compile_s"])))
  return h.md_table(["T", "variant", "XLA temp", "XLA total", "RSS increase",
                     "xw + its gradient", "step s (median)", "tok/s", "speed vs autodiff",
                     "compile s"], out)


def _plot(s: Settings, rows: list[dict]):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  lengths = list(s.lengths)
  for i, (grad, remat) in enumerate(VARIANTS):
    name = _name(grad, remat)
    rs = [next(r for r in rows if r["variant"] == name and r["T"] == t) for t in lengths]
    style = dict(color=f"C{i}", ls="--" if remat else "-", marker="o")
    axes[0].loglog(lengths, [r["xla"].get("total", np.nan) / 2**20 for r in rs],
                   label=f"{name} (XLA total)", **style)
    rss = [(r["T"], r["rss"]["delta"] / 2**20) for r in rs
           if r["rss"] is not None and "delta" in r["rss"]]
    if rss:
      axes[0].scatter(*zip(*rss), color=f"C{i}", marker="x", s=60,
                      label=f"{name} (RSS increase)")
    axes[1].loglog(lengths, [r["step_s"] for r in rs], label=name, **style)
  floor = [2 * t * s.batch * 4 * s.hidden * 4 / 2**20 for t in lengths]
  axes[0].loglog(lengths, floor, color="k", ls=":", label="xw and its gradient")
  axes[0].set_ylabel("peak memory of one step (MiB)")
  axes[1].set_ylabel("step time (s, median)")
  for ax in axes:
    ax.set_xlabel("sequence length T")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  axes[0].set_title(f"LSTM B={s.batch}, H=D={s.hidden}: memory of fwd+bwd")
  axes[1].set_title("step time (shared machine, low priority)")
  fig.tight_layout()
  return fig


@h.suite("memory")
def run(ctx: h.Context) -> list[h.SummaryRow]:
  """Runs the memory suite; writes `memory.md`, `memory.json`, `memory_peak.png`."""
  s = QUICK if ctx.quick else FULL
  on_cpu = ctx.machine.platform == "cpu"
  rss_lengths = s.rss_lengths if on_cpu else ()
  repeats = ctx.repeats(full=s.repeats, quick=s.repeats)
  total = sum(len(VARIANTS) * (1 + (1 + repeats) + (t in rss_lengths)) for t in s.lengths)
  bar = ctx.progress("memory", total)
  rows: list[dict] = []
  try:
    for length in s.lengths:
      rows += _measure(ctx, s, bar, length, length in rss_lengths)
  finally:
    bar.close()
  slopes = _slopes(rows, s.lengths)

  md = ctx.header(
      "memory: peak memory and step time of BPTT for long sequences",
      shapes=f"LSTM, B={s.batch}, D=H={s.hidden}, T in {list(s.lengths)}",
      dtype="float32",
      seeds=f"{ctx.seed} (params and inputs)",
      method=(f"one training step: value and gradient w.r.t. all weights of 0.5 * mean(ys^2); "
              f"median of up to {repeats} timed rounds (at least {min(repeats, MIN_REPEATS)}, "
              f"cut to about {s.budget_s:.0f} s per T) after 1 warm-up round, the four variants "
              f"interleaved with a {h.PAUSE_S * 1000:.0f} ms pause after each call; compile "
              "time apart"),
      extra=["**timings were taken on a shared machine at low priority (`nice -n 19`, other "
             "jobs running): read the step times as rough, the memory numbers as exact**"]
      if not ctx.quick else [])
  md += ("\n## Memory and time against T\n\n"
         "XLA temp / total: the compiled step's buffer assignment (`memory_analysis()`; total = "
         "arguments + outputs - donated + temp). RSS increase: the peak resident set of one step "
         "in a fresh process minus the resident set before it (inputs built, step compiled and "
         "run once, and its buffers returned to the system: XLA frees them after the outputs "
         "are ready, which takes up to a second at T=10,000)" + (
             "" if on_cpu else "; not probed on this device, whose memory RSS does not see") +
         ". xw + its gradient: the `[T, B, 4H]` input projection and its gradient, which "
         "autodiff holds in full (the floor its remat cannot remove). `manual` keeps the gates' "
         "gradients `[T, B, 4H]` for the weight gradients' GEMMs over all steps; without remat "
         "it stores the gate activations `[T, B, 4H]` for the backward pass, with remat only the "
         "state before each step, and it recomputes each step, input product included. "
         "Speed vs autodiff: the median time of `autodiff` at the same T / the variant's "
         "(above 1: faster).\n\n" + _table(rows))
  if slopes:
    t0, t1 = s.lengths[-2], s.lengths[-1]
    md += (f"\nXLA temp per time step (slope between T={t0} and T={t1}; xw and its gradient "
           f"alone: {h.fmt_bytes(2 * s.batch * 4 * s.hidden * 4)}): "
           + ", ".join(f"{k} {h.fmt_bytes(v)}" for k, v in slopes.items()) + ".\n")
  md += "\nPlot: `memory_peak.png` (memory and step time against T, log-log).\n"
  paths = ctx.write("memory", md, {"settings": dataclasses.asdict(s), "rows": rows,
                                   "temp_bytes_per_step": slopes},
                    figures={"peak": _plot(s, rows)})

  longest = s.lengths[-1]
  at = {r["variant"]: r for r in rows if r["T"] == longest}
  return [
      h.SummaryRow("memory", f"LSTM T={longest} B={s.batch} H={s.hidden}: XLA total",
                   ", ".join(f"{k} {h.fmt_bytes(r['xla'].get('total'))}" for k, r in at.items())),
      h.SummaryRow("memory", f"LSTM T={longest}: step time",
                   ", ".join(f"{k} {h.fmt_seconds(r['step_s'])} s" for k, r in at.items())),
      h.SummaryRow("memory", "table", h.display_path(paths[0])),
  ]
