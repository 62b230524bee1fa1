"""The benchmark harness: suite registry, timing, memory, machine description and output files.

A suite is a function `run(ctx: Context) -> list[SummaryRow]` registered with `@suite("name")`
in its own module (`benchmarks/_rnn.py`, ...), and that module is listed in
`benchmarks/__main__.py`. A suite writes its own table, JSON and plots with `ctx.write(...)`
and returns a few headline rows for the summary printed at the end of the run.

Timing (`interleave`): every variant is a zero-argument callable that runs one step; the
harness blocks on its outputs (`jax.block_until_ready`, or a CUDA synchronize for torch). After
`warmup` untimed rounds, each of `repeats` rounds times one call of every variant, in an order
rotated by one each round, with a pause of `PAUSE_S` after every call: the worker threads of
XLA and PyTorch keep spinning for a while after a call returns and would slow whichever variant
runs next. With a time budget, the rounds are cut to as many as fit (judged from the last
warm-up round) but never below a floor. Python's garbage collector is off while timing.
Statistics are the median, the quartiles and the minimum of the repeats.

Compile time (`aot`) is measured apart: `jax.jit(f).lower(*args).compile()`, timed once; the
returned executable is the one that is timed, so no step includes compilation.

Memory, two measurements, always labelled:
  * XLA (`memory_of`): the compiled executable's buffer assignment
    (`compiled.memory_analysis()`): argument + output - aliased (donated) + temporary bytes.
    Exact for what the executable holds, known before running it, and free of allocator noise;
    it does not count the runtime's own overhead.
  * RSS (`rss_probe`): a fresh Python subprocess builds the inputs (and compiles, for JAX),
    runs the step once to warm up, records its resident set size, resets the kernel's peak-RSS
    mark (`/proc/self/clear_refs`), runs the step again and reads the new peak (`VmHWM`); the
    result is peak - before (where the mark cannot be reset, psutil polls the RSS every 1 ms).
    glibc's mmap threshold is pinned (`MALLOC_MMAP_THRESHOLD_`) so that large buffers go back
    to the system when freed. This is the measure that works for PyTorch and JAX alike (host
    memory only: on a GPU it does not see device memory).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import pathlib
import platform
import re
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

import jax

PAUSE_S = 0.05
"""Seconds of sleep after every timed call (lets the other framework's spinning threads idle)."""

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


# --------------------------------------------------------------------------------------------
# Registry.

SUITES: dict[str, Callable[["Context"], list["SummaryRow"]]] = {}
"""Registered suites, name -> `run(ctx)`, in registration order."""


def suite(name: str):
  """Registers `run(ctx) -> list[SummaryRow]` as the suite `name`."""
  def register(run):
    if name in SUITES:
      raise ValueError(f"suite {name!r} is registered twice.")
    SUITES[name] = run
    return run
  return register


@dataclasses.dataclass(frozen=True)
class SummaryRow:
  """One headline line of the run summary."""
  suite: str
  measurement: str
  result: str


# --------------------------------------------------------------------------------------------
# Machine and versions.

def _slug(text: str) -> str:
  """`Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz` -> `intel-xeon-platinum-8480`."""
  text = re.sub(r"\((r|tm|c)\)", " ", text, flags=re.IGNORECASE)
  text = re.sub(r"@.*$", " ", text)
  text = re.sub(r"\bcpu\b", " ", text, flags=re.IGNORECASE)
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown CPU"


def _cores() -> int:
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _version(module: str) -> str:
  try:
    return importlib.import_module(module).__version__
  except Exception:  # a peer that is not installed is reported, not fatal
    return "not installed"


@dataclasses.dataclass(frozen=True)
class Machine:
  """Where the benchmark ran."""
  slug: str
  cpu_model: str
  cores: int
  memory_gib: float
  platform: str
  device: str
  versions: dict[str, str]

  @classmethod
  def detect(cls) -> "Machine":
    import psutil
    dev = jax.devices()[0]
    cpu, cores = _cpu_model(), _cores()
    if dev.platform == "cpu":
      slug = f"cpu-{cores}core-{_slug(cpu)}"
      device = f"CPU ({cpu}, {cores} cores)"
    else:
      kind = "gpu" if dev.platform in ("gpu", "cuda", "rocm") else dev.platform
      slug = f"{kind}-{_slug(dev.device_kind)}"
      device = f"{dev.platform.upper()}: {dev.device_kind} x{jax.device_count()}"
    versions = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "torch": _version("torch"),
        "numpy": np.__version__,
    }
    return cls(slug=slug, cpu_model=cpu, cores=cores,
               memory_gib=psutil.virtual_memory().total / 2**30,
               platform=dev.platform, device=device, versions=versions)


RECORDED_ENV = ("XLA_FLAGS", "JAX_DEFAULT_MATMUL_PRECISION", "NVIDIA_TF32_OVERRIDE",
                "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION")
"""Environment variables that change what is measured; results record those that are set."""


def environment() -> str:
  """`NAME=value` for each of `RECORDED_ENV` that is set."""
  return ", ".join(f"`{k}={os.environ[k]}`" for k in RECORDED_ENV if os.environ.get(k))


# --------------------------------------------------------------------------------------------
# Run context handed to every suite.

@dataclasses.dataclass
class Context:
  """What a suite needs: options, the machine, the output folder and a progress bar factory."""
  quick: bool
  threads: int
  seed: int
  repeats_override: int | None
  out_dir: pathlib.Path
  machine: Machine
  started: str
  max_vocab: int | None = None

  def vocabs(self, sizes: Sequence[int]) -> tuple[int, ...]:
    """The sizes of a vocabulary sweep that `--max-vocab` lets run."""
    return tuple(v for v in sizes if self.max_vocab is None or v <= self.max_vocab)

  def repeats(self, full: int, quick: int) -> int:
    """The number of timed rounds: `--repeats` if given, else `quick` or `full`."""
    if self.repeats_override is not None:
      return self.repeats_override
    return quick if self.quick else full

  def budget(self, seconds: float) -> float | None:
    """The time budget of one interleaved measurement, or None when `--repeats` was given."""
    return None if self.repeats_override is not None else seconds

  def progress(self, suite_name: str, total: int):
    """A tqdm bar for one suite; `total` counts compiles, timed or warm-up calls and probes."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=suite_name, unit="step", dynamic_ncols=True, leave=True)

  def header(self, title: str, *, shapes: str, dtype: str, seeds: str,
             method: str, extra: Sequence[str] = ()) -> str:
    """The markdown preamble of a results file: machine, versions, shapes, timing method."""
    m = self.machine
    versions = ", ".join(f"{k} {v}" for k, v in m.versions.items())
    lines = [
        f"# {title}",
        "",
        f"- machine: {m.cpu_model}, {m.cores} cores, {m.memory_gib:.0f} GiB RAM",
        f"- device: {m.device}",
        f"- versions: {versions}",
        f"- shapes: {shapes}",
        f"- dtype: {dtype}",
        f"- threads: {self.threads} (XLA intra-op pool and PyTorch intra-op threads)",
        f"- seeds: {seeds}",
        f"- date: {self.started}" + (" (`--quick` smoke run: small shapes, few repeats)"
                                     if self.quick else ""),
        f"- method: {method}",
    ]
    env = environment()
    if env:
      lines.append(f"- environment: {env}")
    lines += [f"- {line}" for line in extra]
    return "\n".join(lines) + "\n"

  def write(self, name: str, markdown: str, data: dict[str, Any],
            figures: dict[str, Any] | None = None) -> list[pathlib.Path]:
    """Writes `<name>.md`, `<name>.json` and each figure as `<name>_<key>.png`."""
    self.out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    md = self.out_dir / f"{name}.md"
    md.write_text(markdown)
    paths.append(md)
    meta = {"machine": dataclasses.asdict(self.machine), "threads": self.threads,
            "seed": self.seed, "quick": self.quick, "date": self.started}
    js = self.out_dir / f"{name}.json"
    js.write_text(json.dumps({"meta": meta, **data}, indent=1, default=_json_default) + "\n")
    paths.append(js)
    for key, fig in (figures or {}).items():
      png = self.out_dir / f"{name}_{key}.png"
      fig.savefig(png, dpi=120, bbox_inches="tight")
      import matplotlib.pyplot as plt
      plt.close(fig)
      paths.append(png)
    return paths


def display_path(path: pathlib.Path) -> str:
  """`path` relative to the repository root when inside it (results name no machine paths)."""
  try:
    return str(pathlib.Path(path).resolve().relative_to(REPO_ROOT))
  except ValueError:
    return pathlib.Path(path).name


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  return str(x)


# --------------------------------------------------------------------------------------------
# Timing.

@dataclasses.dataclass(frozen=True)
class Stats:
  """Seconds per call over the timed repeats."""
  median: float
  q1: float
  q3: float
  min: float
  n: int
  times: tuple[float, ...]

  @classmethod
  def of(cls, times: Sequence[float]) -> "Stats":
    t = np.asarray(times, dtype=np.float64)
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return cls(median=float(med), q1=float(q1), q3=float(q3), min=float(t.min()), n=len(t),
               times=tuple(float(x) for x in t))

  @property
  def iqr_rel(self) -> float:
    """Interquartile range relative to the median."""
    return (self.q3 - self.q1) / self.median if self.median > 0 else float("nan")

  def rate(self, items: float) -> float:
    """Items per second at the median."""
    return items / self.median


def block(tree) -> None:
  """Waits until every array in `tree` is computed (JAX arrays, and torch tensors on CUDA)."""
  cuda = False
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array):
      leaf.block_until_ready()
    elif type(leaf).__module__.startswith("torch") and getattr(leaf, "is_cuda", False):
      cuda = True
  if cuda:
    import torch
    torch.cuda.synchronize()


def interleave(calls: dict[str, Callable[[], Any]], *, repeats: int, warmup: int,
               pause: float = PAUSE_S, budget_s: float | None = None, min_repeats: int = 3,
               bar=None) -> dict[str, Stats]:
  """Times every callable, interleaved: `for r in repeats: for variant in variants: time one`.

  Args:
    calls: name -> zero-argument callable running one step; its return value is blocked on.
    repeats: timed rounds (at most, with `budget_s`).
    warmup: untimed rounds before (each variant has been compiled already; this warms caches,
      allocators and thread pools).
    pause: seconds slept after every call.
    budget_s: if given (and `warmup >= 1`), the timed rounds are cut to as many as fit in about
      this many seconds, judged from the last warm-up round, but never fewer than `min_repeats`.
    min_repeats: the floor of timed rounds under `budget_s`.
    bar: an optional tqdm bar, advanced by one per call; rounds cut by the budget are credited
      to it at the end.

  Returns:
    name -> `Stats` of seconds per call (`Stats.n` is the number of timed rounds).
  """
  names = list(calls)
  times: dict[str, list[float]] = {n: [] for n in names}
  gc.collect()
  gc_was_enabled = gc.isenabled()
  gc.disable()
  try:
    round_s = None
    for _ in range(warmup):
      t0 = time.perf_counter()
      for n in names:
        block(calls[n]())
        time.sleep(pause)
        if bar is not None:
          bar.update(1)
      round_s = time.perf_counter() - t0
    rounds = repeats
    if budget_s is not None and round_s is not None:
      rounds = max(min(repeats, min_repeats), min(repeats, int(budget_s / round_s)))
    for r in range(rounds):
      k = r % len(names)
      for n in names[k:] + names[:k]:
        t0 = time.perf_counter()
        block(calls[n]())
        times[n].append(time.perf_counter() - t0)
        time.sleep(pause)
        if bar is not None:
          bar.update(1)
    if bar is not None and rounds < repeats:
      bar.update((repeats - rounds) * len(names))
  finally:
    if gc_was_enabled:
      gc.enable()
  return {n: Stats.of(times[n]) for n in names}


@dataclasses.dataclass
class Compiled:
  """An ahead-of-time compiled JAX function, its compile time and its buffer sizes."""
  call: Callable[..., Any]
  compile_s: float
  memory: dict[str, int]


def aot(fn: Callable[..., Any], *args, donate_argnums: Sequence[int] = (), bar=None) -> Compiled:
  """Jits `fn`, lowers and compiles it for `args` (arrays or `jax.ShapeDtypeStruct`s), timed."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=tuple(donate_argnums)).lower(*args).compile()
  seconds = time.perf_counter() - t0
  if bar is not None:
    bar.update(1)
  return Compiled(call=compiled, compile_s=seconds, memory=memory_of(compiled))


def memory_of(compiled) -> dict[str, int]:
  """Buffer sizes of a compiled executable (bytes); `total` = argument + output - alias + temp."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # a backend without the analysis: report nothing rather than guess
    return {}
  if ma is None:
    return {}
  out = {
      "argument": int(ma.argument_size_in_bytes),
      "output": int(ma.output_size_in_bytes),
      "alias": int(ma.alias_size_in_bytes),
      "temp": int(ma.temp_size_in_bytes),
  }
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  peak = getattr(ma, "peak_memory_in_bytes", 0)
  if peak:
    out["xla_peak"] = int(peak)
  return out


def gemm_rates(*, m: int = 2048, k: int = 2048, n: int = 2048, repeats: int = 5,
               with_torch: bool = True, bar=None) -> dict[str, float]:
  """The machine's float32 matmul rate in GFLOP/s, measured in JAX and (if installed) PyTorch."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((m, k), dtype=np.float32)
  b = rng.standard_normal((k, n), dtype=np.float32)
  ja, jb = jax.device_put(a), jax.device_put(b)
  mm = aot(lambda x, y: x @ y, ja, jb, bar=bar).call
  calls: dict[str, Callable[[], Any]] = {"jax": lambda: mm(ja, jb)}
  torch = optional_torch()
  if with_torch and torch is not None:
    dev = torch_device()
    ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
    calls["torch"] = lambda: torch.mm(ta, tb)
  stats = interleave(calls, repeats=repeats, warmup=2, bar=bar)
  return {name: 2.0 * m * k * n / s.median / 1e9 for name, s in stats.items()}


# --------------------------------------------------------------------------------------------
# PyTorch, optional.

def optional_torch():
  """The `torch` module, or None where it is not installed (peers are then skipped)."""
  try:
    import torch
  except ImportError:
    return None
  return torch


def torch_device() -> str:
  """Where the torch peer runs: CUDA when JAX runs on a GPU and torch sees one, else CPU."""
  torch = optional_torch()
  on_gpu = jax.devices()[0].platform in ("gpu", "cuda")
  if torch is not None and on_gpu and torch.cuda.is_available():
    return "cuda"
  return "cpu"


# --------------------------------------------------------------------------------------------
# Resident-set-size probes in a subprocess.

def _status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    return None
  return None


def _reset_peak_rss() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


class _RssSampler:
  """Fallback peak-RSS tracker where the kernel's peak mark cannot be reset: polls every 1 ms."""

  def __init__(self):
    import psutil
    self._proc = psutil.Process()
    self.peak = self._proc.memory_info().rss
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)

  def _poll(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._proc.memory_info().rss)
      time.sleep(0.001)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._proc.memory_info().rss)


def rss_probe(target: str, spec: dict[str, Any], *, threads: int,
              timeout: float = 1800.0, bar=None) -> dict[str, Any]:
  """Peak RSS increase of one step, measured in a fresh subprocess.

  Args:
    target: `"module:function"`; `function(spec)` builds the inputs (and compiles) and returns a
      zero-argument callable that runs the step once (it is called twice: warm-up, measured).
    spec: JSON-serializable arguments for `function`.
    threads: the thread count for PyTorch in the subprocess (XLA's comes from the environment).
    timeout: seconds before the subprocess is abandoned.
    bar: an optional tqdm bar, advanced by one.

  Returns:
    `{"delta": bytes, "before": bytes, "peak": bytes, "how": ...}` or `{"error": message}`.
  """
  env = dict(os.environ)
  env["MALLOC_MMAP_THRESHOLD_"] = "65536"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in
                                       env.get("PYTHONPATH", "").split(os.pathsep) if p])
  cmd = [sys.executable, "-m", "benchmarks._harness", target, json.dumps(spec), str(threads)]
  try:
    proc = subprocess.run(cmd, env=env, cwd=str(REPO_ROOT), capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    result: dict[str, Any] = {"error": f"timed out after {timeout:.0f} s"}
  else:
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode == 0 and lines:
      result = json.loads(lines[-1])
    else:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      result = {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
  if bar is not None:
    bar.update(1)
  return result


def rss_probes(jobs: Sequence[tuple[str, dict[str, Any]]], *, threads: int, parallel: int = 1,
               timeout: float = 1800.0, bar=None) -> list[dict[str, Any]]:
  """`rss_probe` for each `(target, spec)`, `parallel` subprocesses at a time (results in order).

  Running probes side by side does not change what each one measures (its own resident set),
  only the wall time; keep `parallel=1` where two probes together would not fit in memory.
  """
  if parallel <= 1 or len(jobs) <= 1:
    return [rss_probe(t, s, threads=threads, timeout=timeout, bar=bar) for t, s in jobs]
  from concurrent.futures import ThreadPoolExecutor
  with ThreadPoolExecutor(max_workers=parallel) as pool:
    futures = [pool.submit(rss_probe, t, s, threads=threads, timeout=timeout, bar=bar)
               for t, s in jobs]
    return [f.result() for f in futures]


def _settled_rss_kib(timeout_s: float = 5.0) -> int | None:
  """The resident set once it stops shrinking: XLA returns a step's buffers asynchronously
  after its outputs are ready (about 0.5 s for 4 GiB), so reading it at once would count the
  warm-up step's buffers as already held."""
  rss = _status_kib("VmRSS")
  deadline = time.perf_counter() + timeout_s
  while rss is not None and time.perf_counter() < deadline:
    time.sleep(0.05)
    now = _status_kib("VmRSS")
    if now >= rss:
      return now
    rss = now
  return rss


def _probe_main(argv: Sequence[str]) -> None:
  target, spec, threads = argv
  module, func = target.split(":")
  run = getattr(importlib.import_module(module), func)(json.loads(spec))
  if "torch" in sys.modules:  # imported only by the probes that need it (it costs seconds)
    sys.modules["torch"].set_num_threads(int(threads))
  block(run())  # warm-up: thread pools, code pages and lazy initialisation are not the step's
  gc.collect()
  before = _settled_rss_kib()
  if before is not None and _reset_peak_rss():
    out = run()
    block(out)
    peak = _status_kib("VmHWM")
    how = "VmHWM after clear_refs"
    before_b, peak_b = before * 1024, peak * 1024
  else:
    import psutil
    before_b = psutil.Process().memory_info().rss
    with _RssSampler() as sampler:
      out = run()
      block(out)
    peak_b = sampler.peak
    how = "psutil RSS polled every 1 ms"
  print(json.dumps({"delta": peak_b - before_b, "before": before_b, "peak": peak_b, "how": how}))


# --------------------------------------------------------------------------------------------
# Formatting.

def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  """A GitHub markdown table."""
  head = "| " + " | ".join(headers) + " |"
  sep = "| " + " | ".join("---" for _ in headers) + " |"
  body = ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join([head, sep, *body]) + "\n"


def fmt_bytes(n: float | None) -> str:
  """`1.5 GiB`, `320 MiB`, ... ; an em dash for unknown."""
  if n is None or (isinstance(n, float) and math.isnan(n)):
    return "—"
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.3g} {unit}"
  return f"{int(n)} B"


def fmt_rate(x: float | None) -> str:
  """Three significant digits with thousands separators: `12,300`; an em dash for unknown."""
  if x is None or not math.isfinite(x):
    return "—"
  if x >= 1000:
    return f"{float(f'{x:.3g}'):,.0f}"
  return f"{x:.3g}"


def fmt_stat(stats: Stats | None, items: float) -> str:
  """Items per second at the median, with half the IQR relative to the median, and n."""
  if stats is None:
    return "—"
  return f"{fmt_rate(stats.rate(items))} (±{100 * stats.iqr_rel / 2:.0f}%, n={stats.n})"


def fmt_ratio(x: float | None) -> str:
  if x is None or not math.isfinite(x):
    return "—"
  return f"{x:.2f}x"


def fmt_seconds(x: float | None) -> str:
  if x is None or not math.isfinite(x):
    return "—"
  return f"{x:.3g}" if x < 100 else f"{x:.0f}"


# --------------------------------------------------------------------------------------------
# The run.

def default_out_dir(machine: Machine, quick: bool) -> pathlib.Path:
  """`benchmarks/results/<machine>/`, and `.../<machine>/quick/` for a smoke run."""
  out = PACKAGE_DIR / "results" / machine.slug
  return out / "quick" if quick else out


def select(names: Sequence[str] | None) -> list[str]:
  """Suite names from `--suite` (repeatable, comma lists); all registered ones by default."""
  if not names:
    return list(SUITES)
  chosen: list[str] = []
  for item in names:
    for name in item.split(","):
      name = name.strip()
      if not name:
        continue
      if name not in SUITES:
        raise ValueError(f"--suite: unknown suite {name!r}; registered: {', '.join(SUITES)}.")
      if name not in chosen:
        chosen.append(name)
  return chosen


def _summary_rows(path: pathlib.Path) -> list[SummaryRow]:
  """The rows of a summary.md written by `run` (none if there is no such file)."""
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines()[2:]:
    cells = line.strip().strip("|").split(" | ")
    if line.startswith("| ") and len(cells) == 3 and cells[0].strip() not in ("suite", "---"):
      rows.append(SummaryRow(*(c.strip() for c in cells)))
  return rows


def run(*, suites: Sequence[str] | None, quick: bool, threads: int, seed: int,
        repeats: int | None, out: str | None, max_vocab: int | None = None) -> int:
  """Runs the chosen suites, then prints and writes the summary table. Returns an exit code."""
  chosen = select(suites)
  torch = optional_torch()
  if torch is not None:
    torch.set_num_threads(threads)
  machine = Machine.detect()
  out_dir = pathlib.Path(out) if out else default_out_dir(machine, quick)
  ctx = Context(quick=quick, threads=threads, seed=seed, repeats_override=repeats,
                out_dir=out_dir, machine=machine,
                started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                max_vocab=max_vocab)
  print(f"benchmarks: {', '.join(chosen)} on {machine.device}, {threads} threads"
        f"{' (quick)' if quick else ''} -> {display_path(out_dir)}", flush=True)
  rows: list[SummaryRow] = []
  failed: list[str] = []
  for name in chosen:
    t0 = time.perf_counter()
    try:
      rows += SUITES[name](ctx)
    except Exception as e:  # one broken suite must not lose the others' results
      import traceback
      traceback.print_exc()
      failed.append(name)
      rows.append(SummaryRow(name, "error", f"{type(e).__name__}: {e}".replace("|", "/")))
    rows.append(SummaryRow(name, "suite wall time",
                           f"{time.perf_counter() - t0:.0f} s (started {ctx.started})"))
  # Suites not run this time keep their rows from the folder's summary, so that the file holds
  # the latest run of every suite.
  kept = [r for r in _summary_rows(out_dir / "summary.md") if r.suite not in chosen]
  order = {name: i for i, name in enumerate(SUITES)}
  table = sorted(kept + rows, key=lambda r: order.get(r.suite, len(order)))
  summary = ctx.header(
      "Benchmark summary", shapes="see each suite's table", dtype="float32", seeds=str(seed),
      method="headline numbers from each suite; the suite's own file has the details; each "
      "suite's 'suite wall time' row says when it ran (the date above is the latest run's)")
  summary += "\n" + md_table(["suite", "measurement", "result"],
                             [(r.suite, r.measurement, r.result) for r in table])
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "summary.md").write_text(summary)
  print("\n" + md_table(["suite", "measurement", "result"],
                        [(r.suite, r.measurement, r.result) for r in rows]), flush=True)
  print(f"written under {display_path(out_dir)}", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  _probe_main(sys.argv[1:])
