"""Test configuration, in the manner of equinox: silent broadcasting and dtype promotion are errors."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
# Tests check values, not speed: XLA's lighter optimisation compiles about a third faster.
jax.config.update("jax_disable_most_optimizations", True)


# Tests that each run for tens of seconds (subprocesses, simulated devices) start first, so that
# with `pytest -n 2` none of them is left to run alone at the end.
LONG_FIRST = ("tests/train/test_readme.py", "tests/softmax_alts/test_parallel.py",
              "tests/train/test_distributed.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONG_FIRST))


@pytest.fixture
def key():
    """A fresh `jax.random.key` for each test; split it, never reuse it."""
    return jax.random.key(0)
