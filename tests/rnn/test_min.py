"""minGRU and minLSTM (Feng et al. 2024): the paper's equations, and the parallel-in-time unroll
(`jax.lax.associative_scan`) against the scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnn
from tests.rnn._util import assert_trees_close, scalar_loss, setup


def _paper(name, params, xs, h):
  """The equations of Feng et al. 2024 as written there, one step at a time."""
  size = h.shape[-1]
  ys = []
  for t in range(xs.shape[1]):
    k = xs[:, t] @ params.w_ih.T + params.b_ih[None]
    if name == "min_gru":
      z = jax.nn.sigmoid(k[:, :size])
      h = (1 - z) * h + z * k[:, size:]
    else:
      f, i = jax.nn.sigmoid(k[:, :size]), jax.nn.sigmoid(k[:, size:2 * size])
      h = f / (f + i) * h + i / (f + i) * k[:, 2 * size:]
    ys.append(h)
  return jnp.stack(ys, 1), h


@pytest.mark.parametrize("name", ["min_gru", "min_lstm"])
def test_min_cells_follow_the_paper(name, key):
  cell, params, xs, state = setup(name, key)
  ys_ref, h_ref = _paper(name, params, xs, state.hidden)
  for grad in ("autodiff", "manual"):
    for parallel in ((False, True) if grad == "autodiff" else (False,)):
      ys, final = rnn.unroll(cell, params, xs, state, grad=grad, parallel=parallel)
      np.testing.assert_allclose(ys, ys_ref, atol=1e-6)
      np.testing.assert_allclose(final.hidden, h_ref, atol=1e-6)


OPTIONS = {
    "plain": {},
    "lengths_reverse": {"lengths": True, "reverse": True},
    "time_major_lengths": {"time_major": True, "lengths": True},
    "remat_lengths": {"remat": True, "lengths": True},
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", ["min_gru", "min_lstm"])
def test_parallel_equals_scan(name, option, key):
  cell, params, xs, state = setup(name, key)
  opts = dict(OPTIONS[option])
  lengths = jnp.array([7, 3, 0]) if opts.pop("lengths", False) else None
  if opts.get("time_major"):
    xs = jnp.swapaxes(xs, 0, 1)

  def run(p, x, s, parallel):
    return rnn.unroll(cell, p, x, s, lengths=lengths, parallel=parallel, **opts)

  grad = lambda parallel: jax.grad(lambda *a: scalar_loss(*run(*a, parallel)), argnums=(0, 1, 2))
  assert_trees_close(run(params, xs, state, True), run(params, xs, state, False), atol=1e-6)
  assert_trees_close(grad(True)(params, xs, state), grad(False)(params, xs, state), atol=1e-5,
                     rtol=1e-5)


def test_parallel_over_a_long_sequence_and_its_float64_gradient(key):
  cell = rnn.min_lstm(16)
  params = cell.init(key, 4)
  xs = jax.random.normal(jax.random.key(1), (2, 1000, 4))
  state = cell.initial_state(params, (2,))
  unroll = jax.jit(rnn.unroll, static_argnums=0, static_argnames="parallel")
  ys_p, final_p = unroll(cell, params, xs, state, parallel=True)
  ys_s, final_s = unroll(cell, params, xs, state)
  np.testing.assert_allclose(ys_p, ys_s, atol=2e-5)
  np.testing.assert_allclose(final_p.hidden, final_s.hidden, atol=2e-5)
  with jax.enable_x64(True):
    cell, params, xs, state = setup("min_gru", key, batch=2, steps=5, features=3, hidden=4,
                                    dtype=jnp.float64)
    loss = lambda p, x, s: scalar_loss(*rnn.unroll(cell, p, x, s, parallel=True,
                                                   lengths=jnp.array([5, 2]), reverse=True))
    check_grads(loss, (params, xs, state), order=1, modes=("rev",), eps=1e-6, atol=1e-6,
                rtol=1e-6)
