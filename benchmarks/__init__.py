"""The benchmark suite: `python -m benchmarks` (add `--quick` for a smoke run).

Speed, memory and (in later suites) quality of the `rnn` and `softmax_alts` packages, side by side
with the full softmax and with the peers (PyTorch, Flax), written as markdown tables, JSON and PNG
plots under `benchmarks/results/<machine>/`. See `benchmarks/README.md` for what each suite
measures and how to read it.

This package imports nothing at import time: `python -m benchmarks` must set the thread count of
XLA and PyTorch in the environment before either framework is imported.
"""
