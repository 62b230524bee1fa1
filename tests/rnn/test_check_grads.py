"""Finite-difference gradient checks in float64: the hand-derived BPTT for every cell, autodiff
for the cells whose step has the most parts (autodiff equals the manual path in test_unroll)."""

import jax
import jax.numpy as jnp
import pytest
from jax.test_util import check_grads

import rnn
from tests.rnn._util import CELLS, scalar_loss, setup


@pytest.mark.parametrize("name, grad", [(name, "manual") for name in CELLS]
                         + [(name, "autodiff") for name in ("lstmp", "gru_cho", "user",
                                                             "min_lstm")])
def test_check_grads_float64(name, grad, key):
  with jax.enable_x64(True):
    cell, params, xs, state = setup(name, key, batch=2, steps=4, features=3, hidden=5,
                                    dtype=jnp.float64)
    if name == "irnn":  # keep relu away from its kink, where finite differences disagree
      params = params._replace(b_ih=params.b_ih + 3.0)
    lengths = jnp.array([4, 2])

    def loss(p, x, s):
      return scalar_loss(*rnn.unroll(cell, p, x, s, lengths=lengths, grad=grad))

    check_grads(loss, (params, xs, state), order=1, modes=("rev",), eps=1e-6, atol=1e-6,
                rtol=1e-6)
