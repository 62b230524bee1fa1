"""Shared inputs for the tests of the layers over `FullParams`."""

import jax
import jax.numpy as jnp
import numpy as np

import softmax_alts


def full_inputs(key, num_rows, hidden_size, vocab_size, *, scale, dtype=jnp.float32):
  """Params with random biases, hidden and targets, from numpy (no per-shape compiles)."""
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 30)))
  params = softmax_alts.FullParams(
      w=jnp.asarray(rng.normal(size=(vocab_size, hidden_size)) / np.sqrt(hidden_size), dtype),
      b=jnp.asarray(rng.normal(size=(vocab_size,)), dtype))
  hidden = jnp.asarray(scale * rng.normal(size=(num_rows, hidden_size)), dtype)
  targets = jnp.asarray(rng.integers(0, vocab_size, num_rows), jnp.int32)
  return params, hidden, targets
