"""`python -m benchmarks [--quick] [--suite NAME ...] [--out DIR] [--threads N] [--repeats R]`.

The thread count is put in the environment here, before JAX or PyTorch is imported, because
both size their thread pools when they start:

  * XLA's CPU client sizes its intra-op (Eigen) pool from `PJRT_NPROC` (else `NPROC`, else the
    CPUs in the process's affinity mask); with one thread, `--xla_cpu_multi_thread_eigen=false`
    also keeps XLA's own matmuls and convolutions single-threaded.
  * PyTorch reads `OMP_NUM_THREADS` / `MKL_NUM_THREADS` at start and `torch.set_num_threads` is
    called again once it is imported; OpenBLAS (NumPy) reads `OPENBLAS_NUM_THREADS`.
"""

import argparse
import os
import sys

SUITE_MODULES = (
    "benchmarks._rnn",
    "benchmarks._softmax",
    "benchmarks._quality",
    "benchmarks._peers",
    "benchmarks._recipe",
    "benchmarks._precision",
    "benchmarks._gradients",
    "benchmarks._memory",
    "benchmarks._scaling",
)
"""Modules that register a suite with `@_harness.suite(name)`, in the order suites run."""


def _parse(argv):
  p = argparse.ArgumentParser(
      prog="python -m benchmarks",
      description="Speed and memory of rnn and softmax_alts against the full softmax, "
                  "PyTorch and Flax. Writes markdown, JSON and PNG under --out.")
  p.add_argument("--quick", action="store_true",
                 help="small shapes and few repeats: a smoke run of every suite in minutes")
  p.add_argument("--suite", action="append", default=None, metavar="NAME",
                 help="suite to run (repeatable, or a comma list); default: all registered")
  p.add_argument("--out", default=None, metavar="DIR",
                 help="output folder (default: benchmarks/results/<machine>/, "
                      "and <machine>/quick/ with --quick)")
  p.add_argument("--threads", type=int, default=2, metavar="N",
                 help="intra-op threads for XLA and PyTorch alike (default: 2)")
  p.add_argument("--repeats", type=int, default=None, metavar="R",
                 help="timed rounds per measurement (default: each suite's own, fewer with "
                      "--quick)")
  p.add_argument("--seed", type=int, default=0, help="seed of every random input (default: 0)")
  p.add_argument("--max-vocab", type=int, default=None, metavar="V",
                 help="time vocabulary sweeps only up to V (larger sizes are listed as not run; "
                      "memory analysis, which only compiles, still covers them); default: all")
  p.add_argument("--data-root", default=None, metavar="DIR",
                 help="folder of the real corpora (wikitext-2/, ptb/) for the quality and peers "
                      "suites (default: ../shared/data beside the repository; sets "
                      "BENCHMARKS_DATA_ROOT); a corpus that is absent is skipped")
  args = p.parse_args(argv)
  if args.threads < 1:
    p.error(f"--threads must be >= 1; got {args.threads}.")
  if args.max_vocab is not None and args.max_vocab < 1:
    p.error(f"--max-vocab must be >= 1; got {args.max_vocab}.")
  if args.repeats is not None and args.repeats < 1:
    p.error(f"--repeats must be >= 1; got {args.repeats}.")
  return args


def _configure_threads(n: int) -> None:
  """Sets the thread count of XLA, PyTorch and the BLAS libraries; must run before their import."""
  already = [m for m in ("jax", "torch") if m in sys.modules]
  if already:
    raise RuntimeError(f"{', '.join(already)} imported before the thread count was set.")
  for var in ("PJRT_NPROC", "NPROC", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
              "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(n)
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_cpu_multi_thread_eigen")]
  if n == 1:
    flags.append("--xla_cpu_multi_thread_eigen=false")
  if flags:
    os.environ["XLA_FLAGS"] = " ".join(flags)
  else:
    os.environ.pop("XLA_FLAGS", None)


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  _configure_threads(args.threads)
  if args.data_root is not None:
    os.environ["BENCHMARKS_DATA_ROOT"] = os.path.abspath(args.data_root)
  import importlib
  from benchmarks import _harness
  for module in SUITE_MODULES:
    importlib.import_module(module)
  try:
    return _harness.run(suites=args.suite, quick=args.quick, threads=args.threads,
                        seed=args.seed, repeats=args.repeats, out=args.out,
                        max_vocab=args.max_vocab)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
