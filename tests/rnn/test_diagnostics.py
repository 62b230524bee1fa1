"""`rnn.gradient_norms`: the vanishing-gradient measurement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnn

T, B, H = 40, 4, 32


def _last_step_loss(ys, final):
  return jnp.sum(ys[:, -1] ** 2)


def test_tanh_rnn_with_small_recurrent_weights_decays_geometrically(key):
  cell = rnn.simple(H)
  k1, k2, k3 = jax.random.split(key, 3)
  params = cell.init(k1, 8)
  q, _ = jnp.linalg.qr(jax.random.normal(k2, (H, H)))
  scale = 0.5
  params = params._replace(w_hh=scale * q)  # every singular value 0.5
  xs = 0.1 * jax.random.normal(k3, (B, T, 8))
  norms = rnn.gradient_norms(cell, params, xs, cell.initial_state(params, (B,)), _last_step_loss)
  assert norms.shape == (T,)
  ratios = np.asarray(norms[:-1] / norms[1:])  # one step further from the loss, per step
  # ||dL/dh_{t-1}|| = ||W^T diag(1 - h^2) dL/dh_t|| <= 0.5 ||dL/dh_t||; with small inputs
  # tanh' is near 1, so the measured per-step factor sits just under 0.5.
  assert np.all(ratios <= scale + 1e-6)
  assert np.all(ratios > 0.4)
  assert norms[0] / norms[-1] < scale ** (T - 1) * 1.01


def test_lstm_with_forget_bias_decays_much_more_slowly(key):
  k1, k2 = jax.random.split(key)
  xs = 0.1 * jax.random.normal(k2, (B, T, 8))
  tanh = rnn.simple(H)
  p_tanh = tanh.init(k1, 8)
  p_tanh = p_tanh._replace(w_hh=0.5 * jnp.linalg.qr(jax.random.normal(k1, (H, H)))[0])
  n_tanh = rnn.gradient_norms(tanh, p_tanh, xs, tanh.initial_state(p_tanh, (B,)),
                              _last_step_loss)
  lstm = rnn.lstm(H, forget_bias=3.0)
  p_lstm = lstm.init(k1, 8)
  n_lstm = rnn.gradient_norms(lstm, p_lstm, xs, lstm.initial_state(p_lstm, (B,)),
                              _last_step_loss)
  decay_tanh = float(n_tanh[0] / n_tanh[-1])
  decay_lstm = float(n_lstm[0] / n_lstm[-1])
  assert decay_tanh < 1e-10
  assert decay_lstm > 1e-4
  # Far from the loss the LSTM's per-step factor stays near 1 (the memory path through an open
  # forget gate, sigmoid(3) ~ 0.95, plus the gates' own paths), where tanh's is under 0.5.
  per_step = (n_lstm[0] / n_lstm[20]) ** (1 / 20)
  assert 0.8 < per_step < 1.2


def test_gradient_norms_match_autodiff_of_the_hidden_states(key):
  cell = rnn.gru(6)
  params = cell.init(key, 3)
  xs = jax.random.normal(jax.random.key(1), (2, 5, 3))
  state = cell.initial_state(params, (2,))
  loss = lambda ys, final: jnp.sum(jnp.sin(ys)) + jnp.sum(final.hidden ** 2)
  norms = rnn.gradient_norms(cell, params, xs, state, loss)
  # dL/dh_3 by hand: run to step 3, then differentiate the rest with respect to h_3.
  ys_head, s3 = rnn.unroll(cell, params, xs[:, :4], state)

  def rest(h3):
    ys_tail, final = rnn.unroll(cell, params, xs[:, 4:], rnn.GRUState(h3))
    ys = jnp.concatenate([ys_head[:, :3], h3[:, None], ys_tail], axis=1)
    return loss(ys, final)

  np.testing.assert_allclose(norms[3], jnp.linalg.norm(jax.grad(rest)(s3.hidden)), rtol=1e-5)
  with pytest.raises(ValueError, match="single cell"):
    rnn.gradient_norms(rnn.stack([cell]), (params,), xs, (state,), loss)
