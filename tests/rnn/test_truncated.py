"""BPTT(k1, k2) against a brute-force sum of per-step gradient contributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnn
from tests.rnn._util import CELLS

B, T, D, H = 2, 11, 3, 5


def _problem(key, name):
  cell = CELLS[name](H)
  k1, k2, k3 = jax.random.split(key, 3)
  params = cell.init(k1, D)
  xs = jax.random.normal(k2, (B, T, D))
  targets = jax.random.normal(k3, (B, T, cell.output_size))
  state = cell.initial_state(params, (B,))
  loss_fn = lambda y, t: jnp.sum((y - jnp.take(targets, t, axis=1)) ** 2)
  return cell, params, xs, state, loss_fn


def _brute_force(cell, params, xs, state, loss_fn, k1, k2, resets=None):
  """G[s, u] = dL_s / d(params used at step u), with a separate copy of the params per step;
  BPTT(k1, k2) keeps the pairs with u in [max(0, tau(s) - k2 + 1), s]."""
  copies = jax.tree.map(lambda p: jnp.broadcast_to(p, (T,) + p.shape), params)
  init = cell.initial_state(params, (B,))

  def per_step_losses(copies):
    s, losses = state, []
    for t in range(T):
      p_t = jax.tree.map(lambda c: c[t], copies)
      if resets is not None:
        s = jax.tree.map(lambda i, v: jnp.where(resets[:, t, None], i, v), init, s)
      s, y = cell.step(p_t, s, cell.project(p_t, xs[:, t]))
      losses.append(loss_fn(y, t))
    return jnp.stack(losses)

  jac = jax.jacrev(per_step_losses)(copies)  # leaves [T (s), T (u), ...]
  mask = np.zeros((T, T))
  for s in range(T):
    tau = min((s // k1 + 1) * k1, T) - 1
    mask[s, max(0, tau - k2 + 1):s + 1] = 1.0
  return jax.tree.map(lambda j: jnp.tensordot(jnp.asarray(mask), j, axes=([0, 1], [0, 1])), jac)


# Every (k1, k2) regime with the plain cell; two of them with the LSTM's tuple state.
@pytest.mark.parametrize("name,k1,k2", [("tanh", *k) for k in ((1, 1), (3, 3), (2, 5), (4, 7),
                                                                (3, 11), (5, 40))]
                         + [("lstm", 2, 5), ("lstm", 3, 11)])
def test_truncated_equals_brute_force(name, k1, k2, key):
  cell, params, xs, state, loss_fn = _problem(key, name)
  loss, final = rnn.truncated(cell, params, xs, state, loss_fn, k1=k1, k2=k2)
  full_ys, full_final = rnn.unroll(cell, params, xs, state)
  full_loss = sum(loss_fn(full_ys[:, t], t) for t in range(T))
  np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
  np.testing.assert_allclose(final.hidden, full_final.hidden, atol=1e-6)
  grads = jax.grad(lambda p: rnn.truncated(cell, p, xs, state, loss_fn, k1=k1, k2=k2)[0])(params)
  expected = _brute_force(cell, params, xs, state, loss_fn, k1, k2)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_truncated_with_resets_equals_brute_force_for_a_users_cell(key):
  grad = "manual"
  cell, params, xs, state, loss_fn = _problem(key, "user")
  resets = jnp.zeros((B, T), bool).at[0, 4].set(True).at[1, 7].set(True)
  loss, _ = rnn.truncated(cell, params, xs, state, loss_fn, k1=3, k2=5, resets=resets, grad=grad)
  ys, _ = rnn.static_unroll(cell, params, xs, state, resets=resets)
  np.testing.assert_allclose(loss, sum(loss_fn(ys[:, t], t) for t in range(T)), rtol=1e-5)
  grads = jax.grad(lambda p: rnn.truncated(cell, p, xs, state, loss_fn, k1=3, k2=5, resets=resets,
                                           grad=grad)[0])(params)
  expected = _brute_force(cell, params, xs, state, loss_fn, 3, 5, resets=resets)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_full_window_equals_full_bptt(key):
  cell, params, xs, state, loss_fn = _problem(key, "lstm")
  g = jax.grad(lambda p: rnn.truncated(cell, p, xs, state, loss_fn, k1=T, k2=T)[0])(params)
  full = lambda p: sum(loss_fn(y, t) for t, y in enumerate(
      jnp.moveaxis(rnn.unroll(cell, p, xs, state)[0], 1, 0)))
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(jax.grad(full)(params))):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_detach_stops_the_gradient_of_a_carried_state(key):
  cell, params, xs, state, loss_fn = _problem(key, "lstm")

  def two_windows(p, detach):
    _, s = rnn.unroll(cell, p, xs[:, :5], state)
    s = rnn.detach(s) if detach else s
    ys, _ = rnn.unroll(cell, p, xs[:, 5:], s)
    return jnp.sum(ys ** 2)

  def second_only(p):
    _, s = rnn.unroll(cell, params, xs[:, :5], state)  # the first window with frozen params
    ys, _ = rnn.unroll(cell, p, xs[:, 5:], s)
    return jnp.sum(ys ** 2)

  g_detached = jax.grad(two_windows)(params, True)
  for a, b in zip(jax.tree.leaves(g_detached), jax.tree.leaves(jax.grad(second_only)(params))):
    np.testing.assert_allclose(a, b, atol=1e-6)
  g_through = jax.grad(two_windows)(params, False)
  assert not np.allclose(g_through.w_hh, g_detached.w_hh)


def test_bad_k_raises(key):
  cell, params, xs, state, loss_fn = _problem(key, "lstm")
  with pytest.raises(ValueError, match="`k2` must be at least `k1`"):
    rnn.truncated(cell, params, xs, state, loss_fn, k1=4, k2=2)
  with pytest.raises(ValueError, match="`k1`"):
    rnn.truncated(cell, params, xs, state, loss_fn, k1=0, k2=2)
