"""`rnn.unroll` against the Python-loop reference, for every cell, grad mode and option."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnn
from tests.rnn._util import CELLS, assert_trees_close, scalar_loss, setup

# Every option appears with and without the others; "plain" is the case with none.
OPTIONS = {
    "plain": {},
    "lengths": {"lengths": True},
    "reverse_lengths": {"reverse": True, "lengths": True},
    "time_major_unroll3": {"time_major": True, "unroll": 3},
    "remat_reverse_lengths": {"remat": True, "reverse": True, "lengths": True},
    "remat_time_major": {"remat": True, "time_major": True},
}


# Every cell with the hardest combination; every option with the cells whose step differs most
# (a plain state, a tuple state with a projection, a user's own cell).
CASES = ([(name, "remat_reverse_lengths") for name in CELLS]
         + [(name, option) for name in ("lstmp", "gru", "user") for option in OPTIONS
            if option != "remat_reverse_lengths"])


@pytest.mark.parametrize("name, option", CASES)
def test_unroll_equals_python_loop(name, option, key):
  cell, params, xs, state = setup(name, key)
  opts = dict(OPTIONS[option])
  lengths = jnp.array([7, 3, 0]) if opts.pop("lengths", False) else None
  time_major = opts.pop("time_major", False)
  reverse = opts.get("reverse", False)

  def reference(p, x, s):
    return rnn.static_unroll(cell, p, x, s, lengths=lengths, reverse=reverse)

  ys_ref, final_ref = jax.jit(reference)(params, xs, state)
  grads_ref = jax.jit(jax.grad(lambda *a: scalar_loss(*reference(*a)), argnums=(0, 1, 2)))(
      params, xs, state)

  for grad in ("autodiff", "manual"):
    def ours(p, x, s):
      x_in = jnp.swapaxes(x, 0, 1) if time_major else x
      ys, final = rnn.unroll(cell, p, x_in, s, lengths=lengths, time_major=time_major,
                             grad=grad, **opts)
      return (jnp.swapaxes(ys, 0, 1) if time_major else ys), final

    ys, final = ours(params, xs, state)
    chex.assert_shape(ys, xs.shape[:2] + (cell.output_size,))
    assert_trees_close((ys, final), (ys_ref, final_ref), atol=1e-6)
    grads = jax.jit(jax.grad(lambda *a: scalar_loss(*ours(*a)), argnums=(0, 1, 2)))(
        params, xs, state)
    assert_trees_close(grads, grads_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
@pytest.mark.parametrize("name", ["lstm", "gru", "tanh"])
def test_lengths_equal_sliced_sequences(name, grad, key):
  cell, params, xs, state = setup(name, key, batch=4, steps=6)
  lengths = jnp.array([6, 2, 0, 5])
  for reverse in (False, True):
    ys, final = rnn.unroll(cell, params, xs, state, lengths=lengths, reverse=reverse, grad=grad)
    for b, n in enumerate(np.asarray(lengths)):
      one = jax.tree.map(lambda s: s[b:b + 1], state)
      if n == 0:
        assert_trees_close(jax.tree.map(lambda s: s[b:b + 1], final), one, atol=0.0)
        np.testing.assert_array_equal(ys[b], 0.0)
        continue
      ys_b, final_b = rnn.unroll(cell, params, xs[b:b + 1, :n], one, reverse=reverse, grad=grad)
      np.testing.assert_allclose(ys[b, :n], ys_b[0], atol=1e-6)
      np.testing.assert_array_equal(ys[b, n:], 0.0)
      assert_trees_close(jax.tree.map(lambda s: s[b:b + 1], final), final_b, atol=1e-6)


def test_length_zero_returns_initial_state_and_no_gradient_from_padding(key):
  cell, params, xs, state = setup("lstm", key, batch=2)
  lengths = jnp.array([0, 0])
  ys, final = rnn.unroll(cell, params, xs, state, lengths=lengths)
  assert_trees_close(final, state, atol=0.0)
  np.testing.assert_array_equal(ys, 0.0)
  for grad in ("autodiff", "manual"):
    gx = jax.grad(lambda x: scalar_loss(*rnn.unroll(cell, params, x, state, lengths=lengths,
                                                    grad=grad)))(xs)
    np.testing.assert_array_equal(gx, 0.0)


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
@pytest.mark.parametrize("name", ["lstm", "gru_cho", "tanh"])
def test_jit_equals_eager_and_vmap_equals_batched(name, grad, key):
  cell, params, xs, state = setup(name, key, batch=6)
  f = lambda p, x, s: rnn.unroll(cell, p, x, s, grad=grad)
  eager = f(params, xs, state)
  jitted = jax.jit(f)(params, xs, state)
  assert_trees_close(eager, jitted, atol=1e-6)
  # An extra leading axis through vmap, and through the batch shape itself.
  xs2 = xs.reshape((2, 3) + xs.shape[1:])
  state2 = jax.tree.map(lambda s: s.reshape((2, 3) + s.shape[1:]), state)
  mapped = jax.vmap(f, in_axes=(None, 0, 0))(params, xs2, state2)
  two_axes = f(params, xs2, state2)
  flat = jax.tree.map(lambda a: a.reshape((6,) + a.shape[2:]), mapped)
  assert_trees_close(flat, eager, atol=1e-6)
  assert_trees_close(two_axes, mapped, atol=1e-6)
  g = jax.grad(lambda p: scalar_loss(*f(p, xs, state)))
  assert_trees_close(g(params), jax.jit(g)(params), atol=1e-5)


def test_unbatched_sequence(key):
  cell, params, xs, state = setup("gru", key, batch=1)
  ys, final = rnn.unroll(cell, params, xs[0], jax.tree.map(lambda s: s[0], state), grad="manual")
  ys_b, final_b = rnn.unroll(cell, params, xs, state)
  np.testing.assert_allclose(ys, ys_b[0], atol=1e-6)
  assert_trees_close(final, jax.tree.map(lambda s: s[0], final_b), atol=1e-6)


@pytest.mark.parametrize("time_major", [False, True])
@pytest.mark.parametrize("grad", ["autodiff", "manual"])
def test_empty_sequence_returns_initial_state(grad, time_major, key):
  cell, params, xs, state = setup("lstm", key)
  state = jax.tree.map(lambda s: s + 0.5, state)
  xs = jnp.moveaxis(xs, 1, 0)[:0] if time_major else xs[:, :0]
  ys, final = rnn.unroll(cell, params, xs, state, grad=grad, time_major=time_major)
  assert ys.shape == xs.shape[:-1] + (cell.output_size,)
  assert_trees_close(final, state, atol=0)
  d_state = jax.grad(lambda s: jnp.sum(rnn.unroll(cell, params, xs, s, grad=grad,
                                                  time_major=time_major)[1].hidden))(state)
  np.testing.assert_array_equal(d_state.hidden, jnp.ones_like(state.hidden))


def test_step_accepts_any_batch_shape(key):
  cell, params, _, _ = setup("lstm", key)
  state = cell.initial_state(params, (2, 3))
  xw = cell.project(params, jnp.ones((2, 3, 5)))
  new_state, y = cell.step(params, state, xw)
  chex.assert_shape(y, (2, 3, 8))
  chex.assert_shape(new_state.cell, (2, 3, 8))


def _clip_grad(x, c):
  """Identity whose cotangent is clipped to [-c, c]: the reference for `clip_delta`."""
  @jax.custom_vjp
  def f(x):
    return x
  f.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -c, c),))
  return f(x)


def test_clip_delta_clips_the_error_signal_at_the_gates(key):
  cell, params, xs, state = setup("lstm", key, steps=9)
  c = 0.05

  def reference(p, x, s):
    ys = []
    for t in range(x.shape[1]):
      z = _clip_grad(x[:, t] @ p.w_ih.T + (p.b_ih + p.b_hh)[None] + s.hidden @ p.w_hh.T, c)
      i, f, g, o = jnp.split(z, 4, axis=-1)
      cc = jax.nn.sigmoid(f) * s.cell + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(cc)
      s = rnn.LSTMState(h, cc)
      ys.append(h)
    return jnp.stack(ys, 1), s

  ours = lambda p, x, s: rnn.unroll(cell, p, x, s, grad="manual", clip_delta=c)
  g = jax.grad(lambda *a: scalar_loss(*ours(*a)), argnums=(0, 1, 2))(params, xs, state)
  g_ref = jax.grad(lambda *a: scalar_loss(*reference(*a)), argnums=(0, 1, 2))(params, xs, state)
  assert_trees_close(g, g_ref, atol=2e-5, rtol=1e-5)
  g_free = jax.grad(lambda p: scalar_loss(*rnn.unroll(cell, p, xs, state, grad="manual")))(params)
  assert not np.allclose(g[0].w_hh, g_free.w_hh, atol=1e-4)  # the clip did act


def test_bad_input_raises_value_error(key):
  cell, params, xs, state = setup("lstm", key)
  with pytest.raises(ValueError, match="`xs` must have 5 features"):
    rnn.unroll(cell, params, xs[..., :4], state)
  with pytest.raises(ValueError, match="`state`"):
    rnn.unroll(cell, params, xs, cell.initial_state(params, (2,)))
  with pytest.raises(ValueError, match="`lengths`"):
    rnn.unroll(cell, params, xs, state, lengths=jnp.array([1, 2]))
  with pytest.raises(ValueError, match="`lengths` must be integers"):
    rnn.unroll(cell, params, xs, state, lengths=jnp.array([1.0, 2.0, 3.0]))
  with pytest.raises(ValueError, match="`grad`"):
    rnn.unroll(cell, params, xs, state, grad="fast")
  with pytest.raises(ValueError, match="`clip_delta`"):
    rnn.unroll(cell, params, xs, state, clip_delta=1.0)
  with pytest.raises(ValueError, match="`xs` must be"):
    rnn.unroll(cell, params, xs[0, 0], state)
  with pytest.raises(ValueError, match="`unroll`"):
    rnn.unroll(cell, params, xs, state, unroll=0)
  with pytest.raises(ValueError, match="`hidden_size`"):
    rnn.lstm(0)
  with pytest.raises(ValueError, match="`proj_size`"):
    rnn.lstm(8, proj_size=8)
  with pytest.raises(ValueError, match="`input_size`"):
    cell.init(key, -1)
