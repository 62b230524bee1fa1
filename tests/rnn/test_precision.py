"""bfloat16: parameters and inputs each bfloat16 or float32, GEMMs accumulating in float32, the LSTM
memory in float32, both grad modes, within a stated tolerance of float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnn
from tests.rnn._util import scalar_loss, setup

BF16, F32 = jnp.bfloat16, jnp.float32
# bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.002 per value stored); over 7 steps
# of a unit-scale cell the outputs and the gradients, relative to their largest entry, stay within:
TOLERANCE = 0.03


def _f32_loss(ys, final):
  return scalar_loss(*jax.tree.map(lambda a: a.astype(F32), (ys, final)))


def _max_rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


@pytest.mark.parametrize("param_dtype,x_dtype", [(BF16, BF16), (BF16, F32), (F32, BF16)])
@pytest.mark.parametrize("grad", ["autodiff", "manual"])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_bfloat16_params_or_inputs_stay_close_to_float32(name, grad, param_dtype, x_dtype, key):
  cell, params, xs, state = setup(name, key)
  state = cell.initial_state(params, (xs.shape[0],))

  def run(p, x):
    s = cell.initial_state(p, (x.shape[0],))
    ys, final = rnn.unroll(cell, p, x, s, lengths=jnp.array([7, 4, 2]), grad=grad)
    return ys, final

  low_params = jax.tree.map(lambda a: a.astype(param_dtype), params)
  ys, final = run(low_params, xs.astype(x_dtype))
  ys_ref, final_ref = run(params, xs)
  mixed = param_dtype != x_dtype
  assert ys.dtype == (F32 if mixed else param_dtype)  # the promotion of the two, as Flax's
  if name == "lstm":
    assert final.cell.dtype == F32  # the memory stays float32 whatever the rest
  assert _max_rel(ys, ys_ref) < TOLERANCE
  loss = lambda p, x: _f32_loss(*run(p, x))
  grads = jax.grad(loss, argnums=(0, 1))(low_params, xs.astype(x_dtype))
  grads_ref = jax.grad(loss, argnums=(0, 1))(params, xs)
  for g, g_ref, p in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref),
                         jax.tree.leaves((low_params, xs.astype(x_dtype)))):
    assert g.dtype == p.dtype
    assert _max_rel(g, g_ref) < TOLERANCE


def _dots(jaxpr):
  """Every `dot_general` in a jaxpr and the jaxprs nested in its equations (scans, vjps)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _dots(sub)


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("name", ["lstm", "gru", "min_gru"])
def test_computation_dtype_and_float32_accumulation(name, remat, key):
  factory = {"lstm": rnn.lstm, "gru": rnn.gru, "min_gru": rnn.min_gru}[name]
  cell = factory(8, dtype=BF16)  # float32 parameters, bfloat16 computation
  params = cell.init(key, 5)
  assert all(p.dtype == F32 for p in jax.tree.leaves(params))
  xs = jax.random.normal(key, (3, 7, 5))
  state = cell.initial_state(params, (3,))
  assert state.hidden.dtype == BF16
  for grad in ("autodiff", "manual"):
    run = lambda p, x: rnn.unroll(cell, p, x, state, grad=grad, remat=remat)
    ys, _ = run(params, xs)
    assert ys.dtype == BF16
    # Every GEMM of the forward pass takes bfloat16 operands and accumulates in float32.
    dots = list(_dots(jax.make_jaxpr(run)(params, xs).jaxpr))
    assert dots
    for eqn in dots:
      assert [v.aval.dtype for v in eqn.invars] == [BF16, BF16]
      assert eqn.params["preferred_element_type"] == F32


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
def test_bfloat16_manual_equals_autodiff(grad, key):
  cell = rnn.gru(8, param_dtype=BF16)
  params = cell.init(key, 5)
  xs = jax.random.normal(key, (3, 7, 5), BF16)
  state = cell.initial_state(params, (3,))
  loss = lambda p, g: _f32_loss(*rnn.unroll(cell, p, xs, state, grad=g))
  manual = jax.grad(loss)(params, "manual")
  auto = jax.grad(loss)(params, "autodiff")
  for a, b in zip(jax.tree.leaves(manual), jax.tree.leaves(auto)):
    assert _max_rel(a, b) < TOLERANCE
