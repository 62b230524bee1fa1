"""Parity with `torch.nn.RNN`, `nn.LSTM` (also `proj_size`) and `nn.GRU` through `rnn.from_torch`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnn
from tests.rnn._util import assert_trees_close

torch = pytest.importorskip("torch")

B, T, D, H = 4, 9, 6, 10


def _torch_module(name, num_layers=1, bidirectional=False):
  torch.manual_seed(0)
  kw = dict(input_size=D, hidden_size=H, batch_first=True, num_layers=num_layers,
            bidirectional=bidirectional)
  if name == "tanh":
    return torch.nn.RNN(nonlinearity="tanh", **kw)
  if name == "relu":
    return torch.nn.RNN(nonlinearity="relu", **kw)
  if name == "lstm":
    return torch.nn.LSTM(**kw)
  if name == "lstmp":
    return torch.nn.LSTM(proj_size=4, **kw)
  return torch.nn.GRU(**kw)


def _cell(name):
  return {"tanh": lambda: rnn.simple(H), "relu": lambda: rnn.simple(H, activation=jax.nn.relu),
          "lstm": lambda: rnn.lstm(H), "lstmp": lambda: rnn.lstm(H, proj_size=4),
          "gru": lambda: rnn.gru(H)}[name]()


def _state_to_torch(name, final):
  if name.startswith("lstm"):
    return final.hidden, final.cell
  return final.hidden


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
@pytest.mark.parametrize("name", ["tanh", "relu", "lstm", "lstmp", "gru"])
def test_outputs_states_and_gradients_match_torch(name, grad):
  module = _torch_module(name)
  cell = _cell(name)
  tensors = {k: v.detach().numpy() for k, v in module.state_dict().items()}
  params = rnn.from_torch(cell, tensors)
  rng = np.random.default_rng(0)
  xs = rng.standard_normal((B, T, D)).astype(np.float32)
  weights = rng.standard_normal((B, T, cell.output_size)).astype(np.float32)

  x_t = torch.tensor(xs, requires_grad=True)
  ys_t, final_t = module(x_t)
  (ys_t * torch.tensor(weights)).sum().backward()

  state = cell.initial_state(params, (B,))

  def loss(p, x):
    ys, _ = rnn.unroll(cell, p, x, state, grad=grad)
    return jnp.sum(ys * weights)

  ys, final = rnn.unroll(cell, params, jnp.asarray(xs), state, grad=grad)
  np.testing.assert_allclose(ys, ys_t.detach().numpy(), atol=1e-5)
  final_torch = final_t if isinstance(final_t, tuple) else (final_t,)
  for ours, theirs in zip(jax.tree.leaves(_state_to_torch(name, final)), final_torch):
    np.testing.assert_allclose(ours, theirs.detach().numpy()[0], atol=1e-5)

  g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(xs))
  np.testing.assert_allclose(g_x, x_t.grad.numpy(), atol=1e-5)
  ours = rnn.to_torch(cell, g_params)
  for k, v in module.named_parameters():
    np.testing.assert_allclose(ours[k], v.grad.numpy(), atol=1e-5, err_msg=k)


def test_multilayer_bidirectional_lstm_matches_torch():
  module = _torch_module("lstm", num_layers=2, bidirectional=True)
  cell = rnn.stack([rnn.bidirectional(rnn.lstm(H), rnn.lstm(H)),
                    rnn.bidirectional(rnn.lstm(H), rnn.lstm(H))])
  params = rnn.from_torch(cell, {k: v.detach().numpy() for k, v in module.state_dict().items()})
  xs = np.random.default_rng(1).standard_normal((B, T, D)).astype(np.float32)
  ys_t, (h_t, c_t) = module(torch.tensor(xs))
  ys, final = rnn.unroll(cell, params, jnp.asarray(xs), cell.initial_state(params, (B,)),
                         grad="manual")
  np.testing.assert_allclose(ys, ys_t.detach().numpy(), atol=1e-5)
  # PyTorch orders h_n as (layer 0 fwd, layer 0 bwd, layer 1 fwd, layer 1 bwd).
  ours_h = [s.hidden for layer in final for s in (layer.forward, layer.backward)]
  np.testing.assert_allclose(np.stack(ours_h), h_t.detach().numpy(), atol=1e-5)


def test_to_torch_round_trips_and_loads_into_torch(key):
  cell = rnn.stack([rnn.lstm(H, proj_size=4), rnn.gru(7)])
  params = cell.init(key, D)
  tensors = rnn.to_torch(cell, params)
  assert_trees_close(rnn.from_torch(cell, tensors), params, atol=0.0)
  module = torch.nn.LSTM(D, H, proj_size=4, batch_first=True)
  module.load_state_dict({k[:-1] + "0": torch.tensor(v) for k, v in tensors.items()
                          if k.endswith("_l0")})


def test_from_torch_rejects_wrong_shapes_and_missing_names():
  cell = rnn.lstm(H)
  tensors = {k: v.detach().numpy() for k, v in _torch_module("lstm").state_dict().items()}
  with pytest.raises(ValueError, match=r"tensors\['weight_ih_l0'\]` must have shape \(44, 6\)"):
    rnn.from_torch(rnn.lstm(H + 1), tensors)
  with pytest.raises(ValueError, match="lacks 'weight_ih_l0'"):
    rnn.from_torch(cell, {k: v for k, v in tensors.items() if k != "weight_ih_l0"})
  with pytest.raises(ValueError, match="weight_hr_l0"):
    rnn.from_torch(cell, dict(tensors, weight_hr_l0=np.zeros((4, H), np.float32)))


@pytest.mark.parametrize("name", ["tanh", "lstm", "gru"])
def test_bias_false_matches_torch_and_refuses_given_biases(name):
  torch.manual_seed(0)
  module = {"tanh": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[name](
      D, H, batch_first=True, bias=False)
  cell = {"tanh": rnn.simple, "lstm": rnn.lstm, "gru": rnn.gru}[name](H, bias=False)
  tensors = {k: v.detach().numpy() for k, v in module.state_dict().items()}
  params = rnn.from_torch(cell, tensors)
  assert params.b_ih is None and params.b_hh is None
  assert sorted(rnn.to_torch(cell, params)) == sorted(tensors)
  xs = np.random.default_rng(2).standard_normal((B, T, D)).astype(np.float32)
  ys_t, _ = module(torch.tensor(xs))
  for grad in ("autodiff", "manual"):
    ys, _ = rnn.unroll(cell, params, jnp.asarray(xs), cell.initial_state(params, (B,)), grad=grad)
    np.testing.assert_allclose(ys, ys_t.detach().numpy(), atol=1e-5)
  with pytest.raises(ValueError, match="has 'bias_ih_l0' but the cell has no b_ih"):
    rnn.from_torch(cell, dict(tensors, bias_ih_l0=np.zeros(params.w_ih.shape[:1], np.float32)))
