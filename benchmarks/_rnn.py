"""The `rnn` suite: LSTM and GRU speed against PyTorch and Flax, memory with `remat`, and minGRU /
minLSTM unrolled by the scan or in parallel over time.

Every variant runs the same weights (PyTorch's initialisation, copied with `rnn.from_torch` and
mapped onto Flax's names); fwd+bwd is the gradient of `mean(ys * R)` with respect to every weight
and the inputs. Outputs and gradients are compared with torch's before timing; memory is XLA's
buffer assignment and the RSS increase of one step (see `_harness`). Shapes, variants and columns
are described in `benchmarks/README.md`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import jax
import jax.numpy as jnp

from benchmarks import _harness as h

FULL_SHAPES = ((20, 35, 650), (64, 100, 512), (32, 200, 1024))
QUICK_SHAPES = ((8, 20, 128),)
FULL_MEMORY = (20, 1000, 256)    # (B, T, H=D)
QUICK_MEMORY = (4, 200, 64)
FULL_MIN = ((32, 100, 512), (32, 1000, 512))    # (B, T, H=D)
QUICK_MIN = ((4, 100, 64), (4, 1000, 64))
CELLS = ("lstm", "gru")
MIN_CELLS = ("min_gru", "min_lstm")
MIN_VARIANTS = ("scan", "parallel")
OURS = ("ours-autodiff", "ours-manual", "ours-autodiff-bf16", "ours-manual-bf16")
VARIANTS = OURS + ("flax", "torch")
CELL_NAMES = {"lstm": "LSTM", "gru": "GRU", "min_gru": "minGRU", "min_lstm": "minLSTM"}
BUDGET_S = 90.0    # seconds of timed rounds per measurement, beyond which rounds are cut ...
MIN_REPEATS = 5    # ... but never below this many


# --------------------------------------------------------------------------------------------
# Building the same layer in every framework.

def _inputs(B: int, T: int, D: int, H: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`xs [B, T, D]` and the loss weights `R [B, T, H]`, float32 normal."""
  rng = np.random.default_rng(seed)
  xs = rng.standard_normal((B, T, D), dtype=np.float32)
  r = rng.standard_normal((B, T, H), dtype=np.float32)
  return xs, r


def _torch_layer(kind: str, D: int, H: int, seed: int):
  """`torch.nn.LSTM`/`GRU` (single layer, batch_first) with PyTorch's own seeded init."""
  import torch
  torch.manual_seed(seed)
  cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
  return cls(D, H, num_layers=1, batch_first=True).to(h.torch_device())


def _torch_tensors(layer) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in layer.state_dict().items()}


def _ours(kind: str, H: int):
  import rnn
  return {"lstm": rnn.lstm, "gru": rnn.gru, "min_gru": rnn.min_gru,
          "min_lstm": rnn.min_lstm}[kind](H)


def _flax_module(kind: str, H: int):
  import flax.linen as nn
  cell = nn.OptimizedLSTMCell(H) if kind == "lstm" else nn.GRUCell(H)
  return nn.RNN(cell)


def _flax_params(kind: str, t: dict[str, np.ndarray]) -> dict[str, Any]:
  """PyTorch's weights on Flax's names (gate order LSTM i, f, g, o; GRU r, z, n).

  Flax's cells have one bias per gate where PyTorch has two; the sum is exact for the LSTM
  and for the GRU's r and z gates, and the GRU's n gate keeps both, as PyTorch does
  (`n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`).
  """
  w_ih, w_hh = t["weight_ih_l0"], t["weight_hh_l0"]
  b_ih, b_hh = t["bias_ih_l0"], t["bias_hh_l0"]
  H = w_hh.shape[1]

  def rows(a, k):
    return a[k * H:(k + 1) * H]

  cell: dict[str, Any] = {}
  if kind == "lstm":
    for k, g in enumerate("ifgo"):
      cell[f"i{g}"] = {"kernel": rows(w_ih, k).T}
      cell[f"h{g}"] = {"kernel": rows(w_hh, k).T, "bias": rows(b_ih, k) + rows(b_hh, k)}
  else:
    for k, g in enumerate("rz"):
      cell[f"i{g}"] = {"kernel": rows(w_ih, k).T, "bias": rows(b_ih, k) + rows(b_hh, k)}
      cell[f"h{g}"] = {"kernel": rows(w_hh, k).T}
    cell["in"] = {"kernel": rows(w_ih, 2).T, "bias": rows(b_ih, 2)}
    cell["hn"] = {"kernel": rows(w_hh, 2).T, "bias": rows(b_hh, 2)}
  return {"params": {"cell": jax.tree.map(jnp.asarray, cell)}}


def _flax_grads_to_torch(kind: str, g: dict[str, Any]) -> dict[str, np.ndarray]:
  """Flax's gradients on PyTorch's names (the biases PyTorch splits get the same gradient)."""
  c = jax.tree.map(np.asarray, g["params"]["cell"])
  if kind == "lstm":
    gates = "ifgo"
    b = np.concatenate([c[f"h{x}"]["bias"] for x in gates])
    return {"weight_ih_l0": np.concatenate([c[f"i{x}"]["kernel"].T for x in gates]),
            "weight_hh_l0": np.concatenate([c[f"h{x}"]["kernel"].T for x in gates]),
            "bias_ih_l0": b, "bias_hh_l0": b}
  return {"weight_ih_l0": np.concatenate([c[f"i{x}"]["kernel"].T for x in "rzn"]),
          "weight_hh_l0": np.concatenate([c[f"h{x}"]["kernel"].T for x in "rzn"]),
          "bias_ih_l0": np.concatenate([c["ir"]["bias"], c["iz"]["bias"], c["in"]["bias"]]),
          "bias_hh_l0": np.concatenate([c["ir"]["bias"], c["iz"]["bias"], c["hn"]["bias"]])}


def _dtype(variant: str):
  """The dtype of a variant's weights and inputs."""
  return jnp.bfloat16 if variant.endswith("-bf16") else jnp.float32


def _jax_fns(variant: str, kind: str, H: int, r: jax.Array, *, remat: bool = False,
             parallel: bool = False):
  """`(fwd(params, xs) -> ys, fwdbwd(params, xs) -> (loss, (d_params, d_xs)))` for a variant."""
  if variant in OURS or kind in MIN_CELLS:
    import rnn
    cell = _ours(kind, H)
    mode = variant.split("-")[1] if variant in OURS else "autodiff"

    def fwd(params, xs):
      state = cell.initial_state(params, xs.shape[:1])
      return rnn.unroll(cell, params, xs, state, grad=mode, remat=remat, parallel=parallel)[0]
  else:
    module = _flax_module(kind, H)

    def fwd(params, xs):
      return module.apply(params, xs)

  def loss(params, xs):
    return jnp.mean(fwd(params, xs).astype(jnp.float32) * r)

  return fwd, jax.value_and_grad(loss, argnums=(0, 1))


def _jax_params(variant: str, kind: str, H: int, tensors):
  if variant in OURS:
    import rnn
    params = rnn.from_torch(_ours(kind, H), tensors)
    return jax.tree.map(lambda a: a.astype(_dtype(variant)), params)
  return _flax_params(kind, tensors)


def _torch_calls(layer, xs: np.ndarray, r: np.ndarray):
  """`(fwd() -> ys, fwdbwd() -> (loss, d_xs, {name: d_weight}))` for a torch layer."""
  import torch
  dev = h.torch_device()
  x = torch.from_numpy(xs).to(dev)
  xg = x.clone().requires_grad_(True)
  rt = torch.from_numpy(r).to(dev)

  def fwd():
    with torch.no_grad():
      return layer(x)[0]

  def fwdbwd():
    layer.zero_grad(set_to_none=True)
    xg.grad = None
    loss = (layer(xg)[0] * rt).mean()
    loss.backward()
    return loss, xg.grad, {k: p.grad for k, p in layer.named_parameters()}

  return fwd, fwdbwd


# --------------------------------------------------------------------------------------------
# Agreement with torch.

def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _rel(a, b) -> float:
  scale = float(np.max(np.abs(np.asarray(b, np.float64))))
  return _max_abs(a, b) / scale if scale > 0 else _max_abs(a, b)


def _agreement(variant, kind, H, jax_out, jax_grads, torch_ys, torch_dx, torch_dw) -> dict:
  """Max abs diff of outputs and max relative diff of input and weight gradients vs torch."""
  d_params, d_xs = jax_grads
  if variant in OURS:
    import rnn
    dw = rnn.to_torch(_ours(kind, H), d_params)
  else:
    dw = _flax_grads_to_torch(kind, d_params)
  grad_diff = max([_rel(d_xs, torch_dx)] + [_rel(dw[k], torch_dw[k]) for k in torch_dw])
  return {"ys_max_abs_diff": _max_abs(jax_out, torch_ys), "grad_max_rel_diff": grad_diff}


# --------------------------------------------------------------------------------------------
# Part 1: speed.

def _time_both(bar, label: str, fwd_calls: dict, bwd_calls: dict, repeats: int, warmup: int,
               budget: float | None):
  """`(fwd_stats, fwdbwd_stats)`: the variants' fwd calls interleaved, then their fwd+bwd calls."""
  stats = []
  for what, calls in (("fwd", fwd_calls), ("fwd+bwd", bwd_calls)):
    bar.set_postfix_str(f"{label} {what}")
    stats.append(h.interleave(calls, repeats=repeats, warmup=warmup, budget_s=budget,
                              min_repeats=MIN_REPEATS, bar=bar))
  return tuple(stats)


def _speed(ctx: h.Context, bar, B: int, T: int, D: int, kind: str, repeats: int,
           warmup: int, budget: float | None) -> list[dict]:
  H = D
  xs_np, r_np = _inputs(B, T, D, H, ctx.seed)
  layer = _torch_layer(kind, D, H, ctx.seed)
  tensors = _torch_tensors(layer)
  xs, r = jnp.asarray(xs_np), jnp.asarray(r_np)
  t_fwd, t_fwdbwd = _torch_calls(layer, xs_np, r_np)

  torch_ys = t_fwd().cpu().numpy()
  _, t_dx, t_dw = t_fwdbwd()
  torch_dx = t_dx.cpu().numpy()
  torch_dw = {k: v.cpu().numpy() for k, v in t_dw.items()}

  rows: dict[str, dict] = {}
  fwd_calls: dict[str, Any] = {}
  bwd_calls: dict[str, Any] = {}
  for variant in VARIANTS[:-1]:
    params = _jax_params(variant, kind, H, tensors)
    x = xs.astype(_dtype(variant))
    fwd, fwdbwd = _jax_fns(variant, kind, H, r)
    cf = h.aot(fwd, params, x, bar=bar)
    cb = h.aot(fwdbwd, params, x, bar=bar)
    ys = cf.call(params, x)
    _, grads = cb.call(params, x)
    rows[variant] = {"compile_fwd_s": cf.compile_s, "compile_fwdbwd_s": cb.compile_s,
                     **_agreement(variant, kind, H, ys, grads, torch_ys, torch_dx, torch_dw)}
    fwd_calls[variant] = (lambda c, p, x: lambda: c(p, x))(cf.call, params, x)
    bwd_calls[variant] = (lambda c, p, x: lambda: c(p, x))(cb.call, params, x)
  rows["torch"] = {"compile_fwd_s": None, "compile_fwdbwd_s": None,
                   "ys_max_abs_diff": 0.0, "grad_max_rel_diff": 0.0}
  fwd_calls["torch"] = t_fwd
  bwd_calls["torch"] = t_fwdbwd

  fwd_stats, bwd_stats = _time_both(bar, f"{CELL_NAMES[kind]} {(B, T, D)}", fwd_calls, bwd_calls,
                                    repeats, warmup, budget)

  out = []
  tokens = B * T
  for variant in VARIANTS:
    f, b = fwd_stats[variant], bwd_stats[variant]
    out.append({
        "cell": kind, "shape": [B, T, D], "variant": variant, **rows[variant],
        "fwd_tok_s": f.rate(tokens), "fwdbwd_tok_s": b.rate(tokens),
        "fwd_ratio_to_torch": fwd_stats["torch"].median / f.median,
        "fwdbwd_ratio_to_torch": bwd_stats["torch"].median / b.median,
        "fwd_stats": f, "fwdbwd_stats": b,
    })
  return out


# --------------------------------------------------------------------------------------------
# Part 2: memory with and without remat.

MEMORY_VARIANTS = (("ours-autodiff", False), ("ours-autodiff", True), ("ours-manual", False),
                   ("ours-manual", True), ("flax", False), ("torch", False))


def probe(spec: dict[str, Any]):
  """RSS probe target: builds one fwd+bwd step from `spec` and returns a callable running it."""
  kind, variant, remat = spec["kind"], spec["variant"], spec["remat"]
  B, T, H, seed = spec["B"], spec["T"], spec["H"], spec["seed"]
  xs_np, r_np = _inputs(B, T, H, H, seed)
  if variant == "torch":
    return _torch_calls(_torch_layer(kind, H, H, seed), xs_np, r_np)[1]
  xs, r = jnp.asarray(xs_np), jnp.asarray(r_np)
  key = jax.random.key(seed)  # the weights' values do not change the memory: no torch import
  if variant in OURS:
    params = _ours(kind, H).init(key, H)
  else:
    params = _flax_module(kind, H).init(key, xs)
  call = h.aot(_jax_fns(variant, kind, H, r, remat=remat)[1], params, xs).call
  return lambda: call(params, xs)


def _memory(ctx: h.Context, bar, kind: str, B: int, T: int, H: int, repeats: int,
            warmup: int) -> list[dict]:
  xs_np, r_np = _inputs(B, T, H, H, ctx.seed)
  layer = _torch_layer(kind, H, H, ctx.seed)
  tensors = _torch_tensors(layer)
  xs, r = jnp.asarray(xs_np), jnp.asarray(r_np)
  rows: dict[str, dict] = {}
  calls: dict[str, Any] = {}
  for variant, remat in MEMORY_VARIANTS:
    name = f"{variant}{' remat' if remat else ''}"
    rows[name] = {"cell": kind, "shape": [B, T, H], "variant": variant, "remat": remat}
    if variant == "torch":
      calls[name] = _torch_calls(layer, xs_np, r_np)[1]
      rows[name]["xla"] = {}
      rows[name]["compile_fwdbwd_s"] = None
    else:
      params = _jax_params(variant, kind, H, tensors)
      c = h.aot(_jax_fns(variant, kind, H, r, remat=remat)[1], params, xs, bar=bar)
      calls[name] = (lambda c, p: lambda: c(p, xs))(c.call, params)
      rows[name]["xla"] = c.memory
      rows[name]["compile_fwdbwd_s"] = c.compile_s
  skipped = ("not measured with --quick" if ctx.quick  # a probe costs more than the quick run
             else "host memory; on this device read XLA" if ctx.machine.platform != "cpu" else None)
  if skipped:
    for row in rows.values():
      row["rss"] = {"skipped": skipped}
    bar.update(len(rows))
  else:
    bar.set_postfix_str(f"{CELL_NAMES[kind]} T={T} RSS probes")
    jobs = [(f"{__name__}:probe", {"kind": kind, "variant": row["variant"],
                                   "remat": row["remat"], "B": B, "T": T, "H": H,
                                   "seed": ctx.seed})
            for row in rows.values()]
    for row, rss in zip(rows.values(), h.rss_probes(jobs, threads=ctx.threads, parallel=2,
                                                     bar=bar)):
      row["rss"] = rss
  bar.set_postfix_str(f"{CELL_NAMES[kind]} T={T} fwd+bwd")
  stats = h.interleave(calls, repeats=repeats, warmup=warmup, bar=bar)
  base = stats["ours-autodiff"].median
  for name, row in rows.items():
    row["fwdbwd_tok_s"] = stats[name].rate(B * T)
    row["speed_vs_autodiff"] = base / stats[name].median
    row["fwdbwd_stats"] = stats[name]
  return list(rows.values())


# --------------------------------------------------------------------------------------------
# Part 3: minGRU / minLSTM, the scan against the associative scan.

def _minimal(ctx: h.Context, bar, kind: str, B: int, T: int, H: int, repeats: int,
             warmup: int, budget: float | None) -> list[dict]:
  xs_np, r_np = _inputs(B, T, H, H, ctx.seed)
  xs, r = jnp.asarray(xs_np), jnp.asarray(r_np)
  params = _ours(kind, H).init(jax.random.key(ctx.seed), H)
  rows: dict[str, dict] = {}
  fwd_calls: dict[str, Any] = {}
  bwd_calls: dict[str, Any] = {}
  outputs = {}
  for variant in MIN_VARIANTS:
    fwd, fwdbwd = _jax_fns(variant, kind, H, r, parallel=variant == "parallel")
    cf = h.aot(fwd, params, xs, bar=bar)
    cb = h.aot(fwdbwd, params, xs, bar=bar)
    outputs[variant] = (cf.call(params, xs), cb.call(params, xs)[1])
    rows[variant] = {"cell": kind, "shape": [B, T, H], "variant": variant,
                     "compile_fwd_s": cf.compile_s, "compile_fwdbwd_s": cb.compile_s}
    fwd_calls[variant] = (lambda c: lambda: c(params, xs))(cf.call)
    bwd_calls[variant] = (lambda c: lambda: c(params, xs))(cb.call)
  (ys_s, g_s), (ys_p, g_p) = outputs["scan"], outputs["parallel"]
  rows["parallel"]["ys_max_abs_diff"] = _max_abs(ys_p, ys_s)
  rows["parallel"]["grad_max_rel_diff"] = max(
      _rel(a, b) for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_s)))
  fwd_stats, bwd_stats = _time_both(bar, f"{CELL_NAMES[kind]} {(B, T, H)}", fwd_calls, bwd_calls,
                                    repeats, warmup, budget)
  for variant, row in rows.items():
    row.update(fwd_stats=fwd_stats[variant], fwdbwd_stats=bwd_stats[variant],
               fwd_tok_s=fwd_stats[variant].rate(B * T),
               fwdbwd_tok_s=bwd_stats[variant].rate(B * T),
               fwd_vs_scan=fwd_stats["scan"].median / fwd_stats[variant].median,
               fwdbwd_vs_scan=bwd_stats["scan"].median / bwd_stats[variant].median)
  return list(rows.values())


def _minimal_table(rows: list[dict]) -> str:
  out = []
  for row in rows:
    tokens = row["shape"][0] * row["shape"][1]
    agree = ("reference" if row["variant"] == "scan" else
             f"{row['ys_max_abs_diff']:.1e} / {row['grad_max_rel_diff']:.1e}")
    out.append((CELL_NAMES[row["cell"]], "({}, {}, {})".format(*row["shape"]), row["variant"],
                h.fmt_stat(row["fwd_stats"], tokens), h.fmt_stat(row["fwdbwd_stats"], tokens),
                h.fmt_ratio(row["fwd_vs_scan"]), h.fmt_ratio(row["fwdbwd_vs_scan"]),
                f"{row['compile_fwd_s']:.2f} / {row['compile_fwdbwd_s']:.2f}", agree))
  return h.md_table(["cell", "(B, T, D=H)", "unroll", "fwd tok/s", "fwd+bwd tok/s",
                     "fwd vs scan", "fwd+bwd vs scan", "compile s (fwd / fwd+bwd)",
                     "max diff vs scan (ys abs / grads rel)"], out)


# --------------------------------------------------------------------------------------------
# Output.

def _speed_table(rows: list[dict]) -> str:
  out = []
  for row in rows:
    tokens = row["shape"][0] * row["shape"][1]
    compile_s = ("—" if row["compile_fwd_s"] is None else
                 f"{row['compile_fwd_s']:.2f} / {row['compile_fwdbwd_s']:.2f}")
    agree = ("reference" if row["variant"] == "torch" else
             f"{row['ys_max_abs_diff']:.1e} / {row['grad_max_rel_diff']:.1e}")
    out.append((CELL_NAMES[row["cell"]], "({}, {}, {})".format(*row["shape"]), row["variant"],
                h.fmt_stat(row["fwd_stats"], tokens), h.fmt_stat(row["fwdbwd_stats"], tokens),
                h.fmt_ratio(row["fwd_ratio_to_torch"]), h.fmt_ratio(row["fwdbwd_ratio_to_torch"]),
                compile_s, agree))
  return h.md_table(["cell", "(B, T, D=H)", "variant", "fwd tok/s", "fwd+bwd tok/s",
                     "fwd vs torch", "fwd+bwd vs torch", "compile s (fwd / fwd+bwd)",
                     "max diff vs torch (ys abs / grads rel)"], out)


def _memory_table(rows: list[dict]) -> str:
  out = []
  for row in rows:
    rss = row["rss"]
    rss_s = (h.fmt_bytes(rss["delta"]) if "delta" in rss
             else f"— ({rss['skipped']})" if "skipped" in rss
             else f"failed ({rss.get('error', '')})")
    tokens = row["shape"][0] * row["shape"][1]
    out.append((CELL_NAMES[row["cell"]], "({}, {}, {})".format(*row["shape"]), row["variant"],
                "yes" if row["remat"] else "no",
                h.fmt_bytes(row["xla"].get("temp")), h.fmt_bytes(row["xla"].get("total")), rss_s,
                h.fmt_stat(row["fwdbwd_stats"], tokens), h.fmt_ratio(row["speed_vs_autodiff"]),
                h.fmt_seconds(row["compile_fwdbwd_s"])))
  return h.md_table(["cell", "(B, T, D=H)", "variant", "remat", "XLA temp", "XLA total",
                     "RSS increase", "fwd+bwd tok/s", "speed vs ours-autodiff", "compile s"], out)


def _plot(rows: list[dict], shapes):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(CELLS), figsize=(6 * len(CELLS), 4), squeeze=False)
  width = 0.8 / len(VARIANTS)
  for ax, kind in zip(axes[0], CELLS):
    for i, variant in enumerate(VARIANTS):
      vals = [next((r["fwdbwd_ratio_to_torch"] for r in rows if r["cell"] == kind
                    and r["variant"] == variant and tuple(r["shape"]) == tuple(s)), np.nan)
              for s in shapes]
      ax.bar(np.arange(len(shapes)) + (i - (len(VARIANTS) - 1) / 2) * width, vals, width,
             label=variant)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(shapes)), ["({}, {}, {})".format(*s) for s in shapes])
    ax.set_xlabel("(B, T, D=H)")
    ax.set_ylabel("fwd+bwd throughput / torch")
    ax.set_title(f"{CELL_NAMES[kind]}: fwd+bwd speed relative to torch (higher is faster)")
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


@h.suite("rnn")
def run(ctx: h.Context) -> list[h.SummaryRow]:
  """Runs the rnn suite; writes `rnn.md`, `rnn.json`, `rnn_speed.png`."""
  if h.optional_torch() is None:
    raise RuntimeError("the rnn suite compares against PyTorch; install torch (CPU build).")
  shapes = QUICK_SHAPES if ctx.quick else FULL_SHAPES
  mem_shape = QUICK_MEMORY if ctx.quick else FULL_MEMORY
  min_shapes = QUICK_MIN if ctx.quick else FULL_MIN
  mem_cells = ("lstm",) if ctx.quick else CELLS
  repeats = ctx.repeats(full=20, quick=5)
  warmup = 1 if ctx.quick else 3
  mem_repeats = ctx.repeats(full=5, quick=2)
  n_jax = len(VARIANTS) - 1
  n_mem_jax = sum(v != "torch" for v, _ in MEMORY_VARIANTS)
  total = (len(shapes) * len(CELLS) * (2 * n_jax + 2 * (warmup + repeats) * len(VARIANTS))
           + len(mem_cells) * (n_mem_jax + len(MEMORY_VARIANTS)
                               + (1 + mem_repeats) * len(MEMORY_VARIANTS))
           + len(min_shapes) * len(MIN_CELLS) * len(MIN_VARIANTS) * (2 + 2 * (warmup + repeats)))
  bar = ctx.progress("rnn", total)
  speed_rows: list[dict] = []
  memory_rows: list[dict] = []
  min_rows: list[dict] = []
  try:
    for (B, T, D) in shapes:
      for kind in CELLS:
        speed_rows += _speed(ctx, bar, B, T, D, kind, repeats, warmup,
                             ctx.budget(BUDGET_S))
    for kind in mem_cells:
      memory_rows += _memory(ctx, bar, kind, *mem_shape, mem_repeats, 1)
    for (B, T, H) in min_shapes:
      for kind in MIN_CELLS:
        min_rows += _minimal(ctx, bar, kind, B, T, H, repeats, warmup, ctx.budget(BUDGET_S))
  finally:
    bar.close()

  shapes_s = ", ".join("({}, {}, {})".format(*s) for s in shapes)
  md = ctx.header(
      "rnn: LSTM and GRU speed and memory against PyTorch and Flax",
      shapes=f"(B, T, D=H) in {shapes_s}; memory at (B, T, D=H) = {tuple(mem_shape)}",
      dtype="float32 (torch, Flax, ours); bfloat16 weights and inputs for ours-*-bf16",
      seeds=f"{ctx.seed} (inputs, loss weights R and torch's initialisation, copied to all)",
      method=(f"median of n timed rounds after {warmup} warm-up round(s), n = {repeats} or, where "
              f"those would take over {BUDGET_S:.0f} s, as many as fit but at least "
              f"{min(repeats, MIN_REPEATS)}; variants interleaved in one process with a "
              f"{h.PAUSE_S * 1000:.0f} ms pause after each call, outputs blocked on; `±` is half "
              "the interquartile range relative to the median; compile time "
              "(`jit(...).lower().compile()`) measured apart"),
      extra=["fwd: the layer over `xs [B, T, D]` from a zero state (torch under `no_grad`); "
             "fwd+bwd: the value and gradient of `mean(ys * R)` w.r.t. all weights and `xs`",
             "vs torch: torch's median time / the variant's (above 1: faster than torch)",
             "max diff vs torch: max |ys - ys_torch|, and the max over `xs` and every weight of "
             "max |g - g_torch| / max |g_torch|"])
  md += "\n## Speed\n\n" + _speed_table(speed_rows)
  md += ("\n## Memory: fwd+bwd at a long sequence, with and without `remat`\n\n"
         "XLA temp / total: the compiled executable's buffer assignment (`memory_analysis()`; "
         "total = arguments + outputs - donated + temporaries). RSS increase: peak resident set "
         "of one fwd+bwd step in a fresh process minus the resident set just before it (inputs "
         "built and, for JAX, compiled; one warm-up step run). Speed vs ours-autodiff: its median "
         "time without remat / the variant's (above 1: faster). Times are medians of "
         f"{mem_repeats} interleaved calls.\n\n" + _memory_table(memory_rows))
  min_s = ", ".join("({}, {}, {})".format(*s) for s in min_shapes)
  md += ("\n## minGRU and minLSTM: the scan against the associative scan\n\n"
         f"(B, T, D=H) in {min_s}, float32, our own initialisation; `scan`: `rnn.unroll` (a "
         "`jax.lax.scan` over the steps), `parallel`: `rnn.unroll(..., parallel=True)` (the "
         "linear recurrence h_t = a_t h_(t-1) + b_t by `jax.lax.associative_scan`); same timing "
         "method and loss as above; vs scan: the scan's median time / the variant's.\n\n"
         + _minimal_table(min_rows))
  fig = _plot(speed_rows, shapes)
  paths = ctx.write("rnn", md, {"speed": speed_rows, "memory": memory_rows,
                                "minimal": min_rows}, figures={"speed": fig})

  summary = []
  B, T, D = shapes[-1]
  for kind in CELLS:
    best = {r["variant"]: r for r in speed_rows
            if r["cell"] == kind and tuple(r["shape"]) == (B, T, D)}
    summary.append(h.SummaryRow(
        "rnn", f"{CELL_NAMES[kind]} ({B}, {T}, {D}) fwd+bwd vs torch",
        ", ".join(f"{v} {h.fmt_ratio(best[v]['fwdbwd_ratio_to_torch'])}" for v in VARIANTS[:-1])))
  for kind in mem_cells:
    mem = {(r["variant"], r["remat"]): r for r in memory_rows if r["cell"] == kind}
    summary.append(h.SummaryRow(
        "rnn", f"{CELL_NAMES[kind]} T={mem_shape[1]} XLA total, remat off -> on",
        "; ".join(f"{v} {h.fmt_bytes(mem[(v, False)]['xla'].get('total'))} -> "
                  f"{h.fmt_bytes(mem[(v, True)]['xla'].get('total'))}"
                  for v in ("ours-autodiff", "ours-manual"))))
  worst = max((max(r["ys_max_abs_diff"], r["grad_max_rel_diff"]) for r in speed_rows
               if not r["variant"].endswith("-bf16")))
  summary.append(h.SummaryRow("rnn", "max disagreement with torch (float32)", f"{worst:.1e}"))
  for kind in MIN_CELLS:
    par = [r for r in min_rows if r["cell"] == kind and r["variant"] == "parallel"]
    summary.append(h.SummaryRow(
        "rnn", f"{CELL_NAMES[kind]} fwd+bwd, parallel vs scan",
        ", ".join(f"T={r['shape'][1]} {h.fmt_ratio(r['fwdbwd_vs_scan'])}" for r in par)))
  summary.append(h.SummaryRow("rnn", "table", h.display_path(paths[0])))
  return summary
