"""`rnn.stack` and `rnn.bidirectional`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnn
from tests.rnn._util import assert_trees_close, scalar_loss


def test_stack_equals_layer_by_layer_and_step_by_step(key):
  cell = rnn.stack([rnn.lstm(8), rnn.gru(6), rnn.simple(5)])
  params = cell.init(key, 4)
  xs = jax.random.normal(jax.random.key(1), (3, 7, 4))
  state = cell.initial_state(params, (3,))
  lengths = jnp.array([7, 4, 1])
  for grad in ("autodiff", "manual"):
    ys, final = rnn.unroll(cell, params, xs, state, lengths=lengths, grad=grad)
    h = xs
    for c, p, s, f in zip(cell.layers, params, state, final):
      h, f_ref = rnn.unroll(c, p, h, s, lengths=lengths)
      assert_trees_close(f, f_ref, atol=1e-6)
    np.testing.assert_allclose(ys, h, atol=1e-6)
  ys_ref, final_ref = rnn.static_unroll(cell, params, xs, state, lengths=lengths)
  np.testing.assert_allclose(ys, ys_ref, atol=1e-6)
  assert_trees_close(final, final_ref, atol=1e-6)


def test_stack_dropout_needs_a_key_and_drops_between_layers(key):
  cell = rnn.stack([rnn.lstm(16), rnn.lstm(16)], dropout=0.5)
  params = cell.init(key, 4)
  xs = jax.random.normal(jax.random.key(1), (2, 5, 4))
  state = cell.initial_state(params, (2,))
  plain, _ = rnn.unroll(rnn.stack(cell.layers), params, xs, state)
  no_key, _ = rnn.unroll(cell, params, xs, state)
  np.testing.assert_array_equal(no_key, plain)
  a, _ = rnn.unroll(cell, params, xs, state, key=jax.random.key(2))
  b, _ = rnn.unroll(cell, params, xs, state, key=jax.random.key(3))
  assert not np.allclose(a, plain) and not np.allclose(a, b)
  # The dropped layer-0 outputs are exactly what layer 1 reads.
  k0 = jax.random.split(jax.random.key(2), 2)[0]
  h0, _ = rnn.unroll(cell.layers[0], params[0], xs, state[0])
  keep = jax.random.bernoulli(k0, 0.5, h0.shape)
  h0 = jnp.where(keep, h0 / 0.5, 0.0)
  h1, _ = rnn.unroll(cell.layers[1], params[1], h0, state[1])
  np.testing.assert_allclose(a, h1, atol=1e-6)
  with pytest.raises(ValueError, match="`dropout`"):
    rnn.stack(cell.layers, dropout=1.0)


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
def test_bidirectional_reads_each_sequence_backwards_within_its_length(grad, key):
  fwd, bwd = rnn.gru(6), rnn.lstm(5)
  cell = rnn.bidirectional(fwd, bwd)
  params = cell.init(key, 4)
  xs = jax.random.normal(jax.random.key(1), (3, 6, 4))
  state = cell.initial_state(params, (3,))
  lengths = jnp.array([6, 2, 4])
  ys, final = rnn.unroll(cell, params, xs, state, lengths=lengths, grad=grad)
  assert ys.shape == (3, 6, 11) and cell.output_size == 11
  for b, n in enumerate(np.asarray(lengths)):
    xb = xs[b:b + 1, :n]
    one = jax.tree.map(lambda s: s[b:b + 1], state)
    yf, _ = rnn.unroll(fwd, params.forward, xb, one.forward)
    yb, fb = rnn.unroll(bwd, params.backward, xb[:, ::-1], one.backward)
    np.testing.assert_allclose(ys[b, :n, :6], yf[0], atol=1e-6)
    np.testing.assert_allclose(ys[b, :n, 6:], yb[0, ::-1], atol=1e-6)
    assert_trees_close(jax.tree.map(lambda s: s[b:b + 1], final.backward), fb, atol=1e-6)
  g = jax.grad(lambda p: scalar_loss(*rnn.unroll(cell, p, xs, state, lengths=lengths,
                                                  grad=grad)))(params)
  g_ref = jax.grad(lambda p: scalar_loss(*rnn.unroll(cell, p, xs, state, lengths=lengths)))(params)
  assert_trees_close(g, g_ref, atol=2e-5)
  # A sequence-level layer: no step of its own, and a stack holding it cannot be stepped.
  assert not hasattr(cell, "step")
  with pytest.raises(ValueError, match="cannot be stepped"):
    rnn.stack([cell]).step((params,), (state,), xs[:, 0])
