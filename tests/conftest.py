"""Test configuration, in the manner of equinox: silent broadcasting and dtype promotion are errors."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
# Tests check values, not speed: XLA's lighter optimisation compiles about a third faster.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def key():
    """A fresh `jax.random.key` for each test; split it, never reuse it."""
    return jax.random.key(0)
