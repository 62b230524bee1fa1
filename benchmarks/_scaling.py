"""The `scaling` suite: throughput and per-device memory of the sharded training step against the
number of devices and the shape of the mesh.

Each device count D runs in a fresh process (on a CPU the D devices are simulated with
`--xla_force_host_platform_device_count=D`, fixed when XLA starts) and times
`train.make_sharded_train_step` on every mesh of D devices, interleaved, against the plain
`train.make_train_step`; memory is the partitioned program's buffer assignment per device.
Meshes, settings and what simulated devices can show are described in `benchmarks/README.md`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

from benchmarks import _harness as h

FULL_DEVICES = (1, 2, 4, 8)
QUICK_DEVICES = (1, 8)
FULL_SHAPE = dict(vocab=16_384, hidden=256, batch=32, bptt=35)
QUICK_SHAPE = dict(vocab=2_048, hidden=64, batch=16, bptt=20)
PLAIN = "one device, no mesh"
BUDGET_S = 60.0
MIN_REPEATS = 5


def _meshes(devices: int) -> list[tuple[int, int]]:
  """The meshes of `devices` devices timed (one device: the plain step only)."""
  if devices == 1:
    return []
  meshes = [(devices, 1), (1, devices)]
  if devices >= 4:
    meshes.append((devices // 2, 2))
  return meshes


def _layout(data: int, model: int) -> str:
  if model == 1:
    return "data parallel"
  return "vocab parallel" if data == 1 else "data + vocab parallel"


# --------------------------------------------------------------------------------------------
# The worker: one process with D devices.

def measure(spec: dict[str, Any]) -> dict[str, Any]:
  """Times every mesh of `spec["devices"]` devices; runs in its own process (see `run`)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  import train
  from train._model import ModelConfig, language_model

  devices = spec["devices"]
  if jax.device_count() != devices:
    raise RuntimeError(f"expected {devices} devices; JAX sees {jax.device_count()}.")
  vocab, hidden, batch, bptt = (spec["shape"][k] for k in ("vocab", "hidden", "batch", "bptt"))
  counts = np.maximum(np.round(1e9 / np.arange(1, vocab + 1)), 1.0)
  config = ModelConfig(vocab_size=vocab, emsize=hidden, nhid=hidden, dropout=0.0,
                       softmax="full")
  opt = train.optimizer("adam", 1e-3, clip=1.0)
  rng = np.random.default_rng(spec["seed"])
  tokens = rng.integers(0, vocab, (batch, bptt + 1)).astype(np.int32)
  window = train.Window(tokens[:, :-1], tokens[:, 1:], np.ones((batch, bptt), bool))
  init_key = jax.random.key(spec["seed"])

  rows: dict[str, dict[str, Any]] = {}
  calls = {}

  def add(name, compiled, compile_s, state, batch_arrays, key, meta):
    box = [state]

    def call():
      box[0], metrics = compiled(box[0], batch_arrays, key)
      return metrics

    first = call()  # the first step's loss: the same on every mesh
    rows[name] = {**meta, "compile_s": compile_s, "xla": h.memory_of(compiled),
                  "first_loss": float(first["loss"])}
    calls[name] = call

  if devices == 1:
    model = language_model(config, counts)
    step = train.make_train_step(model, opt)
    state = train.init_train_state(model, opt, init_key, batch)
    batch_arrays = train.Window(*(jnp.asarray(a) for a in window))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_arrays, init_key).compile()
    add(PLAIN, compiled, time.perf_counter() - t0, state, batch_arrays, init_key,
        {"devices": 1, "data": 1, "model": 1, "layout": PLAIN})
  for data, model_size in _meshes(devices):
    mesh = train.make_mesh(data=data, model=model_size)
    model = train.sharded_language_model(config, counts, mesh)
    state = train.init_train_state(model, opt, init_key, batch)
    shardings = train.state_shardings(state, mesh, opt)
    state = train.put_sharded(state, shardings)
    step = train.make_sharded_train_step(model, opt, mesh, shardings)
    batch_arrays = train.Window(*(jax.device_put(a, train.batch_sharding(mesh)) for a in window))
    key = jax.device_put(init_key, NamedSharding(mesh, P()))
    t0 = time.perf_counter()
    compiled = step.jitted.lower(state, batch_arrays, key).compile()
    add(f"data={data} x model={model_size}", compiled, time.perf_counter() - t0, state,
        batch_arrays, key, {"devices": devices, "data": data, "model": model_size,
                            "layout": _layout(data, model_size)})
  stats = h.interleave(calls, repeats=spec["repeats"], warmup=spec["warmup"],
                       budget_s=spec["budget_s"], min_repeats=MIN_REPEATS)
  tokens_per_step = batch * bptt
  for name, row in rows.items():
    row["name"] = name
    row["stats"] = dataclasses.asdict(stats[name])
    row["tok_s"] = stats[name].rate(tokens_per_step)
  return {"rows": list(rows.values())}


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
  """Runs `measure(spec)` in a fresh process with `spec["devices"]` CPU devices."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={spec['devices']}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = os.pathsep.join([str(h.REPO_ROOT)] + [p for p in env.get(
      "PYTHONPATH", "").split(os.pathsep) if p])
  proc = subprocess.run([sys.executable, "-m", "benchmarks._scaling", json.dumps(spec)],
                        env=env, cwd=str(h.REPO_ROOT), capture_output=True, text=True,
                        timeout=3600)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"the {spec['devices']}-device process failed (exit {proc.returncode}): "
                       + " | ".join(tail))
  return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# Output.

def _table(rows: list[dict], tokens: int) -> str:
  base = next(r for r in rows if r["layout"] == PLAIN)["stats"]["median"]
  out = []
  for r in rows:
    stats = h.Stats(**{k: (tuple(v) if k == "times" else v) for k, v in r["stats"].items()})
    out.append((r["devices"], f"{r['data']} x {r['model']}", r["layout"],
                h.fmt_stat(stats, tokens), h.fmt_ratio(base / stats.median),
                h.fmt_seconds(r["compile_s"]), h.fmt_bytes(r["xla"].get("argument")),
                h.fmt_bytes(r["xla"].get("temp")), f"{r['first_loss']:.6f}"))
  return h.md_table(["devices", "data x model", "layout", "tok/s", "vs one device",
                     "compile s", "XLA arguments / device", "XLA temp / device",
                     "first-step loss"], out)


def _plot(rows: list[dict]):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  layouts = ("data parallel", "vocab parallel", "data + vocab parallel")
  base = [r for r in rows if r["layout"] == PLAIN]
  for layout in layouts:
    chosen = sorted([r for r in rows if r["layout"] == layout or r["layout"] == PLAIN],
                    key=lambda r: r["devices"])
    if not any(r["layout"] == layout for r in chosen):
      continue
    xs = [r["devices"] for r in chosen]
    axes[0].plot(xs, [r["tok_s"] for r in chosen], "o-", label=layout)
    axes[1].plot(xs, [r["xla"].get("argument", np.nan) / 2**20 for r in chosen], "o-",
                 label=layout)
  if base:  # every line starts from the plain single-device step
    axes[0].axhline(base[0]["tok_s"], color="k", lw=0.8, ls="--", label=PLAIN)
  for ax, label in zip(axes, ("tokens / s (simulated devices: shared cores)",
                              "XLA arguments per device (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("devices")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
  axes[0].set_title("training-step throughput")
  axes[1].set_title("parameters + optimizer state + batch per device")
  fig.tight_layout()
  return fig


@h.suite("scaling")
def run(ctx: h.Context) -> list[h.SummaryRow]:
  """Runs the scaling suite; writes `scaling.md`, `scaling.json`, `scaling_devices.png`."""
  import jax
  device_counts = QUICK_DEVICES if ctx.quick else FULL_DEVICES
  shape = QUICK_SHAPE if ctx.quick else FULL_SHAPE
  repeats = ctx.repeats(full=20, quick=5)
  warmup = 1 if ctx.quick else 2
  platform = jax.devices()[0].platform
  if platform != "cpu":
    device_counts = tuple(d for d in device_counts if d <= jax.device_count())
  bar = ctx.progress("scaling", len(device_counts))
  rows: list[dict] = []
  try:
    for devices in device_counts:
      bar.set_postfix_str(f"{devices} device(s)")
      spec = {"devices": devices, "shape": shape, "seed": ctx.seed, "repeats": repeats,
              "warmup": warmup, "budget_s": ctx.budget(BUDGET_S)}
      rows += _spawn(spec)["rows"]
      bar.update(1)
  finally:
    bar.close()

  tokens = shape["batch"] * shape["bptt"]
  simulated = platform == "cpu"
  md = ctx.header(
      "scaling: the sharded training step against the number of devices",
      shapes=(f"LSTM LM, V={shape['vocab']}, E=H={shape['hidden']}, global batch "
              f"{shape['batch']} x bptt {shape['bptt']} ({tokens} tokens per step), full "
              "softmax, Adam"),
      dtype="float32",
      seeds=f"{ctx.seed} (tokens and initialisation; the same on every mesh)",
      method=(f"one process per device count; in it, every mesh of that many devices timed "
              f"interleaved: median of up to {repeats} rounds after {warmup} warm-up round(s), "
              f"{h.PAUSE_S * 1000:.0f} ms pause after each call, `±` half the interquartile "
              "range relative to the median; compile time apart; XLA arguments / temp: the "
              "compiled step's buffer assignment per device"),
      extra=[("devices: SIMULATED CPU devices (`--xla_force_host_platform_device_count=D`) "
              f"sharing the machine's {ctx.machine.cores} cores: compute cannot grow past the "
              "cores, so throughput cannot scale with D as on D accelerators; the times show "
              "the cost of partitioning and collectives. The per-device memory is real."
              if simulated else f"devices: {ctx.machine.device}"),
             "each device count runs in its own process: rows of different device counts were "
             "not interleaved with each other (only the meshes of one count were)",
             "the machine was shared with other jobs while this ran: timings are noisy",
             "vs one device: the plain single-device step's median time / the variant's "
             "(above 1: faster)",
             "first-step loss: the loss of the first step on each mesh, equal up to float32 "
             "rounding (the sharded step computes the same function)"])
  md += "\n" + _table(rows, tokens)
  md += ("\nSimulated devices share the same cores, so the times above are no speed-up "
         "measurement: each device's program runs on its own thread, so up to the number of "
         "cores simulated devices can run side by side, and past it they queue; the collectives "
         "of data parallelism (an all-reduce of every gradient) and of vocabulary parallelism "
         "(a few scalars per token, plus resharding the hidden vectors) become in-process "
         "copies. What they do show is the memory: with the vocabulary split over `model`, each "
         "device holds 1/M of the output table, the embedding and their Adam moments, and with "
         "the batch split over `data` each device's activations shrink (XLA temp). Real "
         "speed-ups need real devices: run this suite on a machine with several "
         "accelerators.\n")
  fig = _plot(rows)
  paths = ctx.write("scaling", md, {"shape": shape, "simulated": simulated, "rows": rows},
                    figures={"devices": fig})

  base = next(r for r in rows if r["layout"] == PLAIN)
  largest = max(device_counts)
  summary = []
  for r in rows:
    if r["devices"] == largest:
      summary.append(h.SummaryRow(
          "scaling", f"{r['name']} ({'simulated ' if simulated else ''}{largest} devices)",
          f"{h.fmt_ratio(base['stats']['median'] / r['stats']['median'])} vs one device; "
          f"{h.fmt_bytes(r['xla'].get('argument'))} arguments per device (one device: "
          f"{h.fmt_bytes(base['xla'].get('argument'))})"))
  summary.append(h.SummaryRow("scaling", "table", h.display_path(paths[0])))
  return summary


if __name__ == "__main__":
  print(json.dumps(measure(json.loads(sys.argv[1])), default=h._json_default))
