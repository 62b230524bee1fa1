"""The `softmax` suite: every output layer's training step and exact evaluation, against the full
softmax and PyTorch, from V = 10K to 800K words.

A training step is one jitted function with donated params: the mean loss, its gradient with
respect to the params and the hidden vectors, and an SGD update (the sampling methods and the
hierarchical softmax also through `sparse_loss_and_grads` + `apply_row_update`). Targets follow
a Zipf law over frequency-sorted ids. Where the params of all methods do not fit in memory at
once, variants are packed into groups that fit (XLA's buffer assignment, before allocating) and
each ratio is taken against the full softmax of its own group. Settings and columns are
described in `benchmarks/README.md`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

import jax
import jax.numpy as jnp

from benchmarks import _harness as h

H = 512
N = 1024
N_EVAL_MEMORY = 4096
FULL_VOCABS = (10_000, 100_000, 800_000)
QUICK_VOCABS = (2_000,)
NUM_SAMPLES = 1024
LR = 0.1
ZIPF_EXPONENT = 1.0
SELF_NORMALIZED_ALPHA = 0.1
FULL_CHUNK = 8192
GEMM_N = 32768
GEMM_N_QUICK = 8192
DIV_VALUE = 4.0
REFERENCE = "full"
TORCH_CE = "torch CE"
TORCH_ADAPTIVE = "torch adaptive"
RSS_VARIANTS = (REFERENCE, "adaptive", TORCH_CE, TORCH_ADAPTIVE)
LARGE_V = 500_000      # from here a step of the full softmax takes seconds: fewer repeats
BUDGET_S = 120.0       # seconds of timed rounds per measurement, beyond which rounds are cut ...
BUDGET_S_LARGE = 300.0
MIN_REPEATS = 3        # ... but never below this many
MEMORY_FRACTION = 0.8  # of the memory available at the start of a V, for one group's variants


# --------------------------------------------------------------------------------------------
# Data.

def zipf(V: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(p [V], counts [V], rng)`: a Zipf law over frequency-sorted ids and its expected counts in
  a corpus of 1e9 tokens (at least 1 each)."""
  ranks = np.arange(1, V + 1, dtype=np.float64)
  p = ranks ** -ZIPF_EXPONENT
  p /= p.sum()
  counts = np.maximum(1, np.round(1e9 * p)).astype(np.int64)
  return p, counts, np.random.default_rng(seed)


def inputs(V: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(hidden [n, H] float32, targets [n] int32, counts [V] int64)`."""
  p, counts, rng = zipf(V, seed)
  hidden = np.tanh(rng.standard_normal((n, H), dtype=np.float32))
  targets = rng.choice(V, size=n, p=p).astype(np.int32)
  return hidden, targets, counts


def cutoffs(V: int) -> list[int]:
  """The adaptive softmax's cutoffs, for ours and PyTorch's alike: [V // 50, V // 10]."""
  return [V // 50, V // 10]


def bands(V: int) -> tuple[tuple[int, int], ...]:
  """D-softmax bands (words, dim): the V // 50 most frequent words get H/2, the next up to
  V // 10 get H/4, the rest H/4."""
  a, b = cutoffs(V)
  return ((a, H // 2), (b - a, H // 4), (V - b, H - H // 2 - H // 4))


def num_samples(V: int) -> int:
  """k = 1024 negatives, or V // 4 where the vocabulary is small (the quick run)."""
  return min(NUM_SAMPLES, V // 4)


# --------------------------------------------------------------------------------------------
# The methods.

@dataclasses.dataclass(frozen=True)
class Method:
  """One output layer to benchmark: `build(sa, V, counts) -> OutputLayer` and its settings."""
  name: str
  settings: Callable[[int], str]
  build: Callable[[Any, int, np.ndarray], Any]
  needs: tuple[str, ...]
  step: str = "dense"    # "dense": value_and_grad + SGD; "sparse": softmax_alts' row-sparse path
  dtype: str = "float32"  # of the params and the hidden vectors


def _bfloat16(method: Method) -> Method:
  """The same method with bfloat16 params and hidden vectors (float32 losses)."""
  return dataclasses.replace(
      method, name=method.name[:-1] + ", bfloat16)" if method.name.endswith(")")
      else method.name + " (bfloat16)", dtype="bfloat16",
      settings=lambda V, f=method.settings: f(V) + "; bfloat16 params and hidden")


def _full_strategy(strategy: str) -> Method:
  """The full softmax with an explicit strategy; skipped where it is the default (`full`)."""

  def build(sa, V, counts):
    if sa.default_strategy(N, V) == strategy:
      return None
    return sa.full(strategy=strategy)

  return Method(f"full ({strategy})", lambda V: f"strategy={strategy!r}", build,
                ("full", "default_strategy"))


def _sampling(kind: str, step: str = "dense") -> Method:
  """`sampled`, `nce` or `negative_sampling` with k negatives, dense or row-sparse training."""
  sampler = "unigram^0.75" if kind == "negative_sampling" else "log_uniform"

  def build(sa, V, counts):
    s = sa.unigram(counts, power=0.75) if kind == "negative_sampling" else sa.log_uniform(V)
    return getattr(sa, kind)(num_samples(V), s)

  needs = (kind, "unigram" if kind == "negative_sampling" else "log_uniform")
  if step == "sparse":
    needs += ("sparse_loss_and_grads", "apply_row_update")
  return Method(
      kind + (" (row-sparse)" if step == "sparse" else ""),
      lambda V: (f"k={num_samples(V)}, {sampler} sampler, shared negatives"
                 + ("; sparse_loss_and_grads + apply_row_update" if step == "sparse" else "")),
      build, needs, step)


def _hierarchical(tree: str, step: str = "dense") -> Method:
  """`hierarchical` over a balanced or a Huffman tree, dense or row-sparse training."""
  sparse = "; sparse_loss_and_grads + apply_row_update" if step == "sparse" else ""
  if tree == "balanced":
    settings = lambda V: f"balanced binary tree, depth {math.ceil(math.log2(V))}" + sparse
    build = lambda sa, V, c: sa.hierarchical(sa.balanced_tree(V))
  else:
    settings = lambda V: "Huffman tree of the counts" + sparse
    build = lambda sa, V, c: sa.hierarchical(sa.huffman_tree(c))
  needs = ("hierarchical", f"{tree}_tree")
  if step == "sparse":
    needs += ("sparse_loss_and_grads", "apply_row_update")
  return Method(f"hierarchical ({tree}{', row-sparse' if step == 'sparse' else ''})",
                settings, build, needs, step)


_FULL = Method("full", lambda V: "the default strategy (`softmax_alts.default_strategy`)",
               lambda sa, V, c: sa.full(), ("full",))
_CLASS_BASED = Method(
    "class_based", lambda V: f"{round(math.sqrt(V))} frequency-binned classes",
    lambda sa, V, c: sa.class_based(c, round(math.sqrt(V))), ("class_based",))
_DIFFERENTIATED = Method(
    "differentiated", lambda V: f"bands (words, dim) {list(bands(V))}",
    lambda sa, V, c: sa.differentiated(c, bands(V)), ("differentiated",))
_ADAPTIVE = Method(
    "adaptive", lambda V: f"cutoffs {cutoffs(V)}, div_value {DIV_VALUE}",
    lambda sa, V, c: sa.adaptive(cutoffs(V), div_value=DIV_VALUE), ("adaptive",))

METHODS: tuple[Method, ...] = (
    _FULL,
    _full_strategy("stream"),
    _full_strategy("materialize"),
    Method("full (chunked)", lambda V: f"chunk_size={min(FULL_CHUNK, V)}",
           lambda sa, V, c: sa.full(chunk_size=min(FULL_CHUNK, V)), ("full",)),
    _hierarchical("balanced"),
    _hierarchical("balanced", "sparse"),
    _hierarchical("huffman"),
    _hierarchical("huffman", "sparse"),
    _CLASS_BASED,
    _DIFFERENTIATED,
    _sampling("sampled"),
    _sampling("sampled", "sparse"),
    _sampling("nce"),
    _sampling("nce", "sparse"),
    _sampling("negative_sampling"),
    _sampling("negative_sampling", "sparse"),
    _ADAPTIVE,
    Method("adaptive (stream)", lambda V: f"cutoffs {cutoffs(V)}; strategy='stream'",
           lambda sa, V, c: sa.adaptive(cutoffs(V), div_value=DIV_VALUE, strategy="stream"),
           ("adaptive",)),
    Method("adaptive (materialize)", lambda V: f"cutoffs {cutoffs(V)}; strategy='materialize'",
           lambda sa, V, c: sa.adaptive(cutoffs(V), div_value=DIV_VALUE,
                                        strategy="materialize"), ("adaptive",)),
    Method("self_normalized", lambda V: f"alpha={SELF_NORMALIZED_ALPHA}",
           lambda sa, V, c: sa.self_normalized(SELF_NORMALIZED_ALPHA), ("self_normalized",)),
    *(_bfloat16(m) for m in (_FULL, _CLASS_BASED, _DIFFERENTIATED, _ADAPTIVE,
                             _sampling("sampled", "sparse"))),
)


def _build(method: Method, V: int, counts: np.ndarray):
  """`(layer, None)` or `(None, reason it was skipped)`."""
  try:
    import softmax_alts as sa
  except ImportError as e:
    return None, f"softmax_alts not importable ({e})"
  missing = [n for n in method.needs if not hasattr(sa, n)]
  if missing:
    return None, f"not in softmax_alts yet ({', '.join(missing)})"
  try:
    layer = method.build(sa, V, counts)
  except AttributeError as e:
    return None, f"not available: {e}"
  return (layer, None) if layer is not None else (None, "the default strategy here: see `full`")


# --------------------------------------------------------------------------------------------
# JAX steps.

def _split_float(params):
  leaves, treedef = jax.tree.flatten(params)
  is_float = [jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves]
  return leaves, treedef, is_float


def train_step(layer, kind: str = "dense"):
  """`step((params, key), hidden, targets) -> ((params, key), d_hidden, loss)`, SGD, jit-ready.

  `kind="dense"`: `jax.value_and_grad` of the mean loss with respect to every floating leaf of
  the params and to `hidden` (integer leaves, if a layer keeps any, pass through), then
  `params - lr * grad`. `kind="sparse"`: `softmax_alts.sparse_loss_and_grads` (the gradient of
  the table as touched rows) and `apply_row_update`.
  """
  if kind == "sparse":
    import softmax_alts as sa

    def sparse_step(state, hidden, targets):
      params, key = state
      key, sub = jax.random.split(key)
      values, g_hidden, rows = sa.sparse_loss_and_grads(layer, params, hidden, targets, key=sub)
      return (sa.apply_row_update(params, rows, LR), key), g_hidden, jnp.mean(values)

    return sparse_step

  def step(state, hidden, targets):
    params, key = state
    key, sub = jax.random.split(key)
    leaves, treedef, is_float = _split_float(params)
    floats = [x for x, f in zip(leaves, is_float) if f]

    def objective(floats_, hidden_):
      it = iter(floats_)
      full = [next(it) if f else x for x, f in zip(leaves, is_float)]
      return jnp.mean(layer.loss(jax.tree.unflatten(treedef, full), hidden_, targets, key=sub))

    loss, (g_floats, g_hidden) = jax.value_and_grad(objective, argnums=(0, 1))(floats, hidden)
    it = iter(x - LR * g for x, g in zip(floats, g_floats))
    new = [next(it) if f else x for x, f in zip(leaves, is_float)]
    return (jax.tree.unflatten(treedef, new), key), g_hidden, loss

  return step


def eval_fn(layer):
  """`log_prob(params, hidden, targets) -> [N]`, jit-ready."""
  return lambda params, hidden, targets: layer.log_prob(params, hidden, targets)


def _init(layer, V: int, dtype: str, key):
  """The layer's params, in `dtype` (float32 keeps the layer's own default)."""
  return layer.init(key, H, V) if dtype == "float32" else layer.init(key, H, V,
                                                                       param_dtype=dtype)


def _shapes(layer, V: int, dtype: str = "float32"):
  """Param shapes without allocating them (falls back to a real init if `init` is not traceable)."""
  key = jax.random.key(0)
  try:
    return jax.eval_shape(lambda k: _init(layer, V, dtype, k), key)
  except Exception:  # an init doing host-side work on the key: build it once, keep its shapes
    params = _init(layer, V, dtype, key)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def _nbytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "shape") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


# --------------------------------------------------------------------------------------------
# PyTorch peers.

def _torch_full(w: np.ndarray, b: np.ndarray, hidden: np.ndarray, targets: np.ndarray):
  """`(train(), evaluate())` for a `[V, H]` weight + bias with `cross_entropy` and SGD.

  `w`, `b` are our full softmax's initial params (`FullParams`), so both start equal.
  """
  import torch
  import torch.nn.functional as F
  dev = h.torch_device()
  w = torch.from_numpy(np.array(w)).to(dev).requires_grad_(True)
  b = torch.from_numpy(np.array(b)).to(dev).requires_grad_(True)
  x = torch.from_numpy(np.array(hidden)).to(dev)
  xg = x.clone().requires_grad_(True)
  t = torch.from_numpy(np.array(targets)).long().to(dev)

  def train():
    w.grad = None
    b.grad = None
    xg.grad = None
    loss = F.cross_entropy(torch.addmm(b, xg, w.t()), t)
    loss.backward()
    with torch.no_grad():
      w.sub_(LR * w.grad)
      b.sub_(LR * b.grad)
    return loss, xg.grad

  def evaluate():
    with torch.no_grad():
      return -F.cross_entropy(torch.addmm(b, x, w.t()), t, reduction="none")

  return train, evaluate


def _torch_adaptive_module(V: int, seed: int):
  import torch
  torch.manual_seed(seed)
  layer = torch.nn.AdaptiveLogSoftmaxWithLoss(H, V, cutoffs=cutoffs(V), div_value=DIV_VALUE)
  return layer.to(h.torch_device())


def _torch_adaptive(layer, hidden: np.ndarray, targets: np.ndarray):
  """`(train(), evaluate())` for a `torch.nn.AdaptiveLogSoftmaxWithLoss` with SGD."""
  import torch
  dev = h.torch_device()
  x = torch.from_numpy(np.array(hidden)).to(dev)
  xg = x.clone().requires_grad_(True)
  t = torch.from_numpy(np.array(targets)).long().to(dev)

  def train():
    layer.zero_grad(set_to_none=True)
    xg.grad = None
    loss = layer(xg, t).loss
    loss.backward()
    with torch.no_grad():
      for p in layer.parameters():
        p.sub_(LR * p.grad)
    return loss, xg.grad

  def evaluate():
    with torch.no_grad():
      return layer(x, t).output

  return train, evaluate


def _torch_peer(name: str, layers: dict[str, Any], V: int, hidden, targets, seed: int):
  """`(train(), evaluate())` of a torch peer, with the same initial weights as ours."""
  if name == TORCH_CE:
    params = layers[REFERENCE].init(jax.random.key(seed), H, V)
    w, b = np.asarray(params.w), np.asarray(params.b)
    del params
    return _torch_full(w, b, hidden, targets)
  return _torch_adaptive(_torch_adaptive_module(V, seed), hidden, targets)


def _agreement(layers: dict[str, Any], V: int, hidden, targets, seed: int) -> dict[str, float]:
  """Max |log_prob - torch's| with copied weights: full vs `cross_entropy`, adaptive vs torch's."""
  import softmax_alts as sa
  out: dict[str, float] = {}
  if REFERENCE in layers:
    params = layers[REFERENCE].init(jax.random.key(seed), H, V)
    ours = np.asarray(jax.jit(layers[REFERENCE].log_prob)(params, hidden, targets))
    theirs = _to_numpy(_torch_full(np.asarray(params.w), np.asarray(params.b), np.asarray(hidden),
                                   np.asarray(targets))[1]())
    out[TORCH_CE] = float(np.max(np.abs(ours - theirs)))
    del params
  if "adaptive" in layers and hasattr(sa, "adaptive_from_torch"):
    module = _torch_adaptive_module(V, seed)
    params = sa.adaptive_from_torch({k: _to_numpy(v) for k, v in module.state_dict().items()})
    ours = np.asarray(jax.jit(layers["adaptive"].log_prob)(params, hidden, targets))
    theirs = _to_numpy(_torch_adaptive(module, np.asarray(hidden), np.asarray(targets))[1]())
    out[TORCH_ADAPTIVE] = float(np.max(np.abs(ours - theirs)))
  return out


def _torch_bytes(name: str, V: int, n: int) -> tuple[int, int]:
  """(resident, transient) bytes of a torch peer, estimated: params, then grads and logits."""
  if name == TORCH_CE:
    params = 4 * (V * H + V)
    return params, params + 3 * 4 * n * V
  a, b = cutoffs(V)
  params = 4 * (H * (a + 2) + (b - a) * (H // 4) + H * H // 4 + (V - b) * (H // 16) + H * H // 16)
  return params, 2 * params + 4 * 4 * n * a


# --------------------------------------------------------------------------------------------
# Probes (RSS of one training step in a fresh process).

def probe(spec: dict[str, Any]):
  """RSS probe target: one training step of `spec["variant"]` at `spec["V"]`."""
  V, seed, variant = spec["V"], spec["seed"], spec["variant"]
  hidden, targets, counts = inputs(V, N, seed)
  if variant == TORCH_CE:
    w = np.random.default_rng(seed).standard_normal((V, H), dtype=np.float32) / math.sqrt(H)
    return _torch_full(w, np.zeros(V, np.float32), hidden, targets)[0]
  if variant == TORCH_ADAPTIVE:
    return _torch_adaptive(_torch_adaptive_module(V, seed), hidden, targets)[0]
  method = next(m for m in METHODS if m.name == variant)
  layer, why = _build(method, V, counts)
  if layer is None:
    raise RuntimeError(why)
  state = [(layer.init(jax.random.key(seed), H, V), jax.random.key(seed + 1))]
  hj, tj = jnp.asarray(hidden), jnp.asarray(targets)
  call = h.aot(train_step(layer, method.step), state[0], hj, tj, donate_argnums=(0,)).call

  def run():
    state[0], dh, loss = call(state[0], hj, tj)
    return state[0], dh, loss

  return run


# --------------------------------------------------------------------------------------------
# One vocabulary size.

@dataclasses.dataclass
class Variant:
  name: str
  settings: str
  kind: str                       # "jax" or "torch"
  step: str = "dense"             # "dense" or "sparse" (the training step's form)
  dtype: str = "float32"          # of the params and the hidden vectors
  layer: Any = None
  skipped: str | None = None
  train: h.Compiled | None = None
  evaluate: h.Compiled | None = None
  resident: int = 0               # params
  transient: int = 0              # the rest of one step's peak
  row: dict = dataclasses.field(default_factory=dict)


def _plan_groups(variants: list[Variant], budget: float) -> list[list[Variant]]:
  """Packs variants into groups whose params plus the largest step's transient fit `budget`.

  The reference (our full softmax) is in every group. A variant that does not fit even alone
  with the reference is marked skipped (with the bytes it needs) rather than run into the
  machine's memory limit.
  """
  ref = next(v for v in variants if v.name == REFERENCE)

  def need(group):
    return sum(x.resident for x in group) + max(x.transient for x in group)

  groups: list[list[Variant]] = []
  current = [ref]
  for v in variants:
    if v is ref:
      continue
    if need([ref, v]) > budget:
      v.skipped = (f"needs ~{h.fmt_bytes(v.resident + v.transient)} for one step (beside the "
                   f"full softmax's params), over the {h.fmt_bytes(budget)} allowed here")
      continue
    if need(current + [v]) <= budget:
      current.append(v)
    else:
      groups.append(current)
      current = [ref, v]
  groups.append(current)
  return groups


def _calls_per_v(variants: int, sparse: int, warmup: int, repeats: int) -> int:
  """Progress-bar steps of one group: timed and warm-up train calls, then eval calls."""
  return (warmup + repeats) * (2 * variants - sparse)


def _vocab(ctx: h.Context, bar, V: int, repeats: int, warmup: int, rss: bool) -> list[dict]:
  budget = ctx.budget(BUDGET_S_LARGE if V >= LARGE_V else BUDGET_S)
  import gc

  import psutil
  hidden_np, targets_np, counts = inputs(V, N, ctx.seed)
  hidden, targets = jnp.asarray(hidden_np), jnp.asarray(targets_np)
  hidden_of = {"float32": hidden, "bfloat16": hidden.astype(jnp.bfloat16)}
  key_shape = jax.eval_shape(lambda: jax.random.key(ctx.seed))
  torch = h.optional_torch()

  variants: list[Variant] = []
  for method in METHODS:
    layer, why = _build(method, V, counts)
    settings = method.settings(V)
    n_compiles = 1 if method.step == "sparse" else 2
    if layer is None:
      variants.append(Variant(method.name, settings, "jax", step=method.step, skipped=why))
      bar.update(n_compiles)
      continue
    v = Variant(method.name, settings, "jax", step=method.step, dtype=method.dtype,
                layer=layer)
    bar.set_postfix_str(f"V={V} compile {method.name}")
    try:
      shapes = _shapes(layer, V, method.dtype)
      v.train = h.aot(train_step(layer, method.step), (shapes, key_shape),
                      hidden_of[method.dtype], targets, donate_argnums=(0,), bar=bar)
      if method.step == "dense":  # the row-sparse variants evaluate exactly as the dense ones
        v.evaluate = h.aot(eval_fn(layer), shapes, hidden_of[method.dtype], targets, bar=bar)
    except Exception as e:  # a method that fails to build is reported, not fatal
      v.skipped = f"failed to compile: {type(e).__name__}: {e}"[:300]
      bar.update(n_compiles - (v.train is not None))
      v.train = v.evaluate = None
      variants.append(v)
      continue
    v.resident = _nbytes(shapes)
    v.transient = max(0, v.train.memory.get("total", 0) - v.resident)
    variants.append(v)
  for name in (TORCH_CE, TORCH_ADAPTIVE):
    settings = ("[V, H] weight + bias, addmm + cross_entropy" if name == TORCH_CE else
                f"cutoffs {cutoffs(V)}, div_value {DIV_VALUE}")
    v = Variant(name, settings, "torch")
    if torch is None:
      v.skipped = "torch not installed"
    else:
      v.resident, v.transient = _torch_bytes(name, V, N)
    variants.append(v)

  planned = _calls_per_v(len(variants), sum(m.step == "sparse" for m in METHODS), warmup, repeats)
  runnable = [v for v in variants if v.skipped is None]
  if not any(v.name == REFERENCE for v in runnable):
    for v in variants:
      v.skipped = v.skipped or "the reference (full) is not available"
    bar.update(planned + len(RSS_VARIANTS) * rss)
    return [_row(V, v) for v in variants]
  layers = {v.name: v.layer for v in runnable if v.kind == "jax"}
  if torch is not None:
    bar.set_postfix_str(f"V={V} agreement with torch")
    n_check = min(N, 256)
    for name, diff in _agreement(layers, V, hidden[:n_check], targets[:n_check],
                                 ctx.seed).items():
      next(v for v in variants if v.name == name).row["max_abs_diff_vs_ours"] = diff
  groups = _plan_groups(runnable, MEMORY_FRACTION * psutil.virtual_memory().available)
  runnable = [v for v in runnable if v.skipped is None]
  actual = sum(_calls_per_v(len(g), sum(v.step == "sparse" for v in g), warmup, repeats)
               for g in groups)
  bar.total += actual - planned
  bar.refresh()

  for gi, group in enumerate(groups):
    train_calls: dict[str, Callable[[], Any]] = {}
    eval_calls: dict[str, Callable[[], Any]] = {}
    states: dict[str, list] = {}
    for v in group:
      if v.kind == "torch":
        train_calls[v.name], eval_calls[v.name] = _torch_peer(v.name, layers, V, hidden_np,
                                                              targets_np, ctx.seed)
        continue
      params = _init(v.layer, V, v.dtype, jax.random.key(ctx.seed))
      states[v.name] = [(params, jax.random.key(ctx.seed + 1))]

      def t_call(s=states[v.name], c=v.train.call, x=hidden_of[v.dtype]):
        s[0], dh, loss = c(s[0], x, targets)
        return s[0], dh, loss

      train_calls[v.name] = t_call
      if v.evaluate is not None:
        eval_calls[v.name] = lambda s=states[v.name], c=v.evaluate.call, x=hidden_of[v.dtype]: c(
            s[0][0], x, targets)
    for v in group:  # sanity, at the initial params: finite log-probs <= 0, a finite loss
      if "loss" in v.row:
        continue
      if v.name in eval_calls:
        logp = np.asarray(_to_numpy(eval_calls[v.name]()))
        v.row.update(log_prob_finite=bool(np.isfinite(logp).all() and (logp <= 0).all()),
                     mean_nll=float(-np.mean(logp)))
      out = train_calls[v.name]()
      h.block(out)
      v.row["loss"] = float(_to_numpy(out[-1] if v.kind == "jax" else out[0]))
    bar.set_postfix_str(f"V={V} train step, group {gi + 1}/{len(groups)}")
    train_stats = h.interleave(train_calls, repeats=repeats, warmup=warmup, budget_s=budget,
                               min_repeats=MIN_REPEATS, bar=bar)
    bar.set_postfix_str(f"V={V} log_prob, group {gi + 1}/{len(groups)}")
    eval_stats = h.interleave(eval_calls, repeats=repeats, warmup=warmup, budget_s=budget,
                              min_repeats=MIN_REPEATS, bar=bar)
    ref_t, ref_e = train_stats[REFERENCE], eval_stats[REFERENCE]
    for v in group:
      if v.name == REFERENCE and gi > 0:
        continue
      v.row.update(group=gi, train_stats=train_stats[v.name],
                   train_speedup=ref_t.median / train_stats[v.name].median)
      if v.name in eval_stats:
        v.row.update(eval_stats=eval_stats[v.name],
                     eval_speedup=ref_e.median / eval_stats[v.name].median)
    del train_calls, eval_calls, states
    gc.collect()

  if rss:
    probed = [v for name in RSS_VARIANTS for v in runnable if v.name == name]
    bar.update(len(RSS_VARIANTS) - len(probed))
    bar.set_postfix_str(f"V={V} RSS probes")
    jobs = [(f"{__name__}:probe", {"V": V, "seed": ctx.seed, "variant": v.name}) for v in probed]
    # Side by side only while small: at V = 800K two probes together would not fit in memory.
    parallel = 2 if V <= 100_000 else 1
    for v, result in zip(probed, h.rss_probes(jobs, threads=ctx.threads, parallel=parallel,
                                              bar=bar)):
      v.row["rss"] = result
  return [_row(V, v) for v in variants]


def _to_numpy(x):
  if hasattr(x, "detach"):
    return x.detach().cpu().numpy()
  return np.asarray(x)


def _row(V: int, v: Variant) -> dict:
  row = {"V": V, "method": v.name, "settings": v.settings, "framework": v.kind,
         "skipped": v.skipped, **v.row}
  if v.train is not None:
    row.update(compile_train_s=v.train.compile_s, xla_train=v.train.memory,
               params_bytes=v.resident)
  if v.evaluate is not None:
    row.update(compile_eval_s=v.evaluate.compile_s, xla_eval=v.evaluate.memory)
  elif v.kind == "torch" and v.skipped is None:
    row.update(params_bytes=v.resident)
  return row


# --------------------------------------------------------------------------------------------
# Exact evaluation memory at the largest V.

def _eval_memory(bar, V: int, n: int) -> list[dict]:
  """XLA's buffer assignment of `log_prob` for every method at (V, n): compiled, never run."""
  _, _, counts = inputs(V, 16, 0)
  targets = jax.ShapeDtypeStruct((n,), jnp.int32)
  rows = []
  for method in METHODS:
    if method.step == "sparse":  # evaluates exactly as its dense twin
      continue
    hidden = jax.ShapeDtypeStruct((n, H), method.dtype)
    layer, why = _build(method, V, counts)
    row = {"V": V, "N": n, "method": method.name, "skipped": why}
    if layer is not None:
      bar.set_postfix_str(f"log_prob memory V={V} N={n} {method.name}")
      try:
        c = h.aot(eval_fn(layer), _shapes(layer, V, method.dtype), hidden, targets, bar=bar)
        row.update(xla=c.memory, compile_s=c.compile_s)
      except Exception as e:  # reported in the table
        row["skipped"] = f"failed to compile: {type(e).__name__}: {e}"[:300]
        bar.update(1)
    else:
      bar.update(1)
    rows.append(row)
  return rows


# --------------------------------------------------------------------------------------------
# Output.

def _ms(stats: h.Stats | None) -> str:
  if stats is None:
    return "—"
  return f"{h.fmt_rate(stats.median * 1e3)} (±{100 * stats.iqr_rel / 2:.0f}%, n={stats.n})"


def _train_table(rows: list[dict]) -> str:
  out = []
  for r in rows:
    if r.get("skipped"):
      out.append((f"{r['V']:,}", r["method"], r["settings"], "—", "—", "—", "—", "—", "—",
                  f"skipped: {r['skipped']}"))
      continue
    rss = r.get("rss")
    rss_s = ("—" if rss is None else h.fmt_bytes(rss["delta"]) if "delta" in rss
             else f"failed ({rss.get('error', '')})")
    xla = r.get("xla_train", {})
    notes = []
    if not math.isfinite(r.get("loss", float("nan"))):
      notes.append("non-finite loss")
    if r.get("group", 0) > 0:
      notes.append(f"memory group {r['group'] + 1}")
    if "max_abs_diff_vs_ours" in r:
      ours = "full" if r["method"] == TORCH_CE else "adaptive"
      notes.append(f"log_prob vs ours ({ours}, same weights): max abs diff "
                   f"{r['max_abs_diff_vs_ours']:.1e}")
    out.append((f"{r['V']:,}", r["method"], r["settings"], _ms(r.get("train_stats")),
                h.fmt_rate(N / r["train_stats"].median) if r.get("train_stats") else "—",
                h.fmt_ratio(r.get("train_speedup")),
                h.fmt_seconds(r.get("compile_train_s")), h.fmt_bytes(xla.get("total")), rss_s,
                "; ".join(notes)))
  return h.md_table(["V", "method", "settings", "step ms", "tokens/s", "speed-up vs full",
                     "compile s", "XLA total", "RSS increase", "notes"], out)


def _eval_table(rows: list[dict]) -> str:
  out = []
  for r in rows:
    if r.get("skipped") or r.get("eval_stats") is None:
      continue
    out.append((f"{r['V']:,}", r["method"], h.fmt_rate(N / r["eval_stats"].median),
                h.fmt_ratio(r.get("eval_speedup")), h.fmt_seconds(r.get("compile_eval_s")),
                h.fmt_bytes(r.get("xla_eval", {}).get("total")),
                f"{r['mean_nll']:.3f}", "yes" if r.get("log_prob_finite") else "NO"))
  return h.md_table(["V", "method", "log_prob tokens/s", "speed-up vs full", "compile s",
                     "XLA total", "mean NLL at init (nats)", "finite, <= 0"], out)


def _floor_table(rows: list[dict], rates: dict[str, float]) -> str:
  best = max(rates.values())
  out = []
  for V in sorted({r["V"] for r in rows}):
    flops = 6.0 * N * H * V
    floor = flops / (best * 1e9)
    by = {r["method"]: r for r in rows if r["V"] == V and r.get("train_stats")}
    cells = []
    for name in (REFERENCE, "full (chunked)", TORCH_CE):
      r = by.get(name)
      cells.append("—" if r is None else f"{h.fmt_rate(r['train_stats'].median * 1e3)} "
                                         f"({r['train_stats'].median / floor:.2f}x)")
    out.append((f"{V:,}", h.fmt_rate(flops / 1e9), h.fmt_rate(floor * 1e3), *cells))
  return h.md_table(["V", "6·N·H·V GFLOP", "floor ms", "full ms (x floor)",
                     "full (chunked) ms (x floor)", "torch CE ms (x floor)"], out)


def _memory_table(rows: list[dict]) -> str:
  out = []
  for r in rows:
    if r.get("skipped"):
      out.append((r["method"], "—", "—", "—", f"skipped: {r['skipped']}"))
      continue
    x = r["xla"]
    out.append((r["method"], h.fmt_bytes(x.get("argument")), h.fmt_bytes(x.get("temp")),
                h.fmt_bytes(x.get("total")), ""))
  return h.md_table(["method", "XLA arguments (params + inputs)", "XLA temp", "XLA total",
                     "notes"], out)


def _plot(rows: list[dict]):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = [m.name for m in METHODS] + [TORCH_CE, TORCH_ADAPTIVE]
  colors = plt.get_cmap("tab20").colors
  markers = "osD^vP*Xhp<>"
  fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
  for ax, key, title in ((axes[0], "train_speedup", "training step"),
                         (axes[1], "eval_speedup", "exact log_prob")):
    for i, name in enumerate(names):
      pts = sorted((r["V"], r[key]) for r in rows if r["method"] == name and r.get(key))
      if not pts:
        continue
      style = "--" if name.startswith("torch") or "row-sparse" in name else "-"
      ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colors[i % len(colors)],
              marker=markers[i % len(markers)], label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("vocabulary size V")
    ax.set_ylabel("speed-up over our full softmax")
    ax.set_title(f"{title}, H={H}, N={N}")
    ax.grid(True, which="both", alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
  fig.tight_layout()
  return fig


@h.suite("softmax")
def run(ctx: h.Context) -> list[h.SummaryRow]:
  """Runs the softmax suite; writes `softmax.md`, `softmax.json`, `softmax_speedup.png`."""
  all_vocabs = QUICK_VOCABS if ctx.quick else FULL_VOCABS
  vocabs = ctx.vocabs(all_vocabs)
  not_run = [V for V in all_vocabs if V not in vocabs]
  repeats_for = {V: ctx.repeats(full=5 if V >= LARGE_V else 10, quick=3) for V in vocabs}
  warmup = 1
  n_sparse = sum(m.step == "sparse" for m in METHODS)
  n_variants = len(METHODS) + 2
  # RSS is host memory: on an accelerator it does not see the step's buffers.
  rss_vocabs = () if ctx.machine.platform != "cpu" else vocabs[-1:] if ctx.quick else vocabs
  total = (1 + 7 * 2                                           # GEMM rate: compile + timing
           + sum(2 * len(METHODS) - n_sparse
                 + _calls_per_v(n_variants, n_sparse, warmup, repeats_for[V]) for V in vocabs)
           + len(RSS_VARIANTS) * len(rss_vocabs) + len(METHODS) - n_sparse)
  bar = ctx.progress("softmax", total)
  try:
    bar.set_postfix_str("matmul rate")
    rates = h.gemm_rates(m=N, k=H, n=GEMM_N_QUICK if ctx.quick else GEMM_N, repeats=5, bar=bar)
    rows: list[dict] = []
    for V in vocabs:
      rows += _vocab(ctx, bar, V, repeats_for[V], warmup, rss=V in rss_vocabs)
    mem_rows = _eval_memory(bar, all_vocabs[-1], N_EVAL_MEMORY)
  finally:
    bar.close()

  skipped = sorted({r["method"] for r in rows if r.get("skipped")
                    and not r["skipped"].startswith("the default strategy")})
  md = ctx.header(
      "softmax: output layers against the full softmax and PyTorch",
      shapes=f"H={H}, N={N} tokens, V in {', '.join(f'{V:,}' for V in vocabs)}; exact log_prob "
             f"memory at V={all_vocabs[-1]:,}, N={N_EVAL_MEMORY}",
      dtype="float32 (params, hidden) unless a row says bfloat16; int32 targets; losses and "
            "log-probabilities float32",
      seeds=f"{ctx.seed} (hidden, Zipf targets, params; sampling keys split from seed+1)",
      method=(f"median of n timed rounds after {warmup} warm-up round, n = "
              f"{', '.join(f'{r} at V={V:,}' for V, r in repeats_for.items())} or, where those "
              f"would take over {BUDGET_S:.0f} s ({BUDGET_S_LARGE:.0f} s from V={LARGE_V:,}), as "
              f"many as fit but at least {MIN_REPEATS}; variants interleaved in one process with "
              f"a {h.PAUSE_S * 1000:.0f} ms pause after each call; `±` is half the interquartile "
              "range relative to the median; compile time (`jit(...).lower().compile()`) "
              "measured apart"),
      extra=[f"targets: Zipf, p(i) ~ 1/(i+1)^{ZIPF_EXPONENT:g} over frequency-sorted ids; "
             "counts round(1e9 p), at least 1",
             f"training step: mean loss, gradient w.r.t. params and hidden, SGD (lr {LR}) on "
             "the params, one jitted function with donated params; torch: the same with "
             "`loss.backward()` and in-place updates",
             "speed-up vs full: our full softmax's median / the method's, measured in the same "
             "interleaved group (above 1: faster)",
             f"torch adaptive: `AdaptiveLogSoftmaxWithLoss(H, V, cutoffs=[V//50, V//10], "
             f"div_value={DIV_VALUE})`, the same cutoffs as ours",
             f"matmul rate ([{N}, {H}] x [{H}, {GEMM_N_QUICK if ctx.quick else GEMM_N}], float32): "
             + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()),
             "memory: XLA total is the compiled step's buffer assignment (arguments + outputs - "
             "donated + temporaries), known before running; RSS increase is the peak resident "
             "set of one step in a fresh process minus the resident set before it (after one "
             "warm-up step), for our full and adaptive softmax and the torch peers"]
      + ([f"not yet in softmax_alts, skipped: {', '.join(skipped)}"] if skipped else [])
      + ([f"not timed in this run (`--max-vocab {ctx.max_vocab}`): V = "
          f"{', '.join(f'{V:,}' for V in not_run)}"] if not_run else []))
  md += "\n## Training step\n\n" + _train_table(rows)
  md += ("\n## FLOP floor of the full softmax\n\n"
         f"6·N·H·V flops (2 for the logits, 4 for the gradients of W and of the hidden vectors) at "
         f"the best measured matmul rate ({max(rates.values()):.0f} GFLOP/s); each step time is "
         "followed by its multiple of the floor.\n\n" + _floor_table(rows, rates))
  md += "\n## Exact evaluation: `log_prob` throughput\n\n" + _eval_table(rows)
  md += (f"\n## Exact `log_prob` memory at V={all_vocabs[-1]:,}, N={N_EVAL_MEMORY}\n\n"
         "XLA's buffer assignment of the compiled `log_prob` (compiled, not run): a method that "
         f"materialises the [N, V] logits needs {h.fmt_bytes(4 * N_EVAL_MEMORY * all_vocabs[-1])} "
         "for them alone.\n\n" + _memory_table(mem_rows))
  fig = _plot(rows)
  paths = ctx.write("softmax", md, {"matmul_gflops": rates, "rows": rows,
                                    "log_prob_memory": mem_rows}, figures={"speedup": fig})

  summary = []
  V = vocabs[-1]
  by = {r["method"]: r for r in rows if r["V"] == V and r.get("train_speedup")}
  top = sorted(((r["train_speedup"], m) for m, r in by.items() if m != REFERENCE), reverse=True)
  summary.append(h.SummaryRow("softmax", f"V={V:,} training step speed-up vs full (best 4)",
                              ", ".join(f"{m} {h.fmt_ratio(s)}" for s, m in top[:4]) or "—"))
  for name in (TORCH_CE, TORCH_ADAPTIVE):
    if name in by:
      summary.append(h.SummaryRow("softmax", f"V={V:,} {name} vs our full",
                                  h.fmt_ratio(by[name]["train_speedup"])))
  if skipped:
    summary.append(h.SummaryRow("softmax", "skipped (not in softmax_alts yet)", ", ".join(skipped)))
  summary.append(h.SummaryRow("softmax", "table", h.display_path(paths[0])))
  return summary
