"""The PyTorch peer of the `peers` benchmark computes what our language model computes.

With our initial weights copied into it (`benchmarks._torch_lm.from_ours`) and no dropout, the
PyTorch word_language_model recipe gives the same loss as `train.language_model` with the full
softmax, the same state to carry, and after one step of Adam with global-norm clipping on each
side (`train.make_train_step` and `_torch_lm.train_step`) the same loss on the next window.
"""

import numpy as np
import pytest

import jax

import train

torch = pytest.importorskip("torch")
from benchmarks import _torch_lm as tlm  # noqa: E402  (needs torch)

V, E, H, B, T = 23, 8, 12, 3, 5


def _setup():
  counts = np.arange(V, 0, -1)
  config = train.ModelConfig(vocab_size=V, emsize=E, nhid=H, dropout=0.0, softmax="full")
  model = train.language_model(config, counts)
  opt = train.optimizer("adam", 0.01, clip=0.05)
  state = train.init_train_state(model, opt, jax.random.key(3), B)
  ids = np.random.default_rng(0).integers(0, V, (B, 2 * T + 1)).astype(np.int32)
  return model, opt, state, ids, tlm.from_ours(model, state.params)


def test_torch_lm_matches_ours_loss_state_and_one_adam_step():
  model, opt, state, ids, lm = _setup()
  windows = train.bptt_windows(ids, T, last="keep")
  trainer = tlm.trainer(lm, ids, bptt=T, lr=0.01, clip=0.05)

  # Loss and carried state on the first window, no dropout.
  ours_loss, aux = model.loss(state.params, windows[0].inputs, windows[0].targets,
                              windows[0].mask, state.carry, key=jax.random.key(0))
  inputs, targets = trainer.windows[0]
  with torch.no_grad():
    logits, (h, c) = lm(inputs, lm.init_hidden(B))
    torch_loss = torch.nn.functional.cross_entropy(logits, targets.reshape(-1))
  np.testing.assert_allclose(float(torch_loss), float(ours_loss), rtol=1e-5)
  np.testing.assert_allclose(h[0].numpy(), np.asarray(aux.carry[0].hidden), atol=1e-5)
  np.testing.assert_allclose(c[0].numpy(), np.asarray(aux.carry[0].cell), atol=1e-5)

  # One clipped Adam step each (the clip is active: the gradient norm is above 0.05), then
  # the loss of the second window from the carried state.
  w_before = np.asarray(state.params.output.w).copy()
  step = train.make_train_step(model, opt)
  state, metrics = step(state, windows[0], jax.random.key(0))
  assert float(metrics["grad_norm"]) > 0.05
  tlm.train_step(trainer, *trainer.windows[0])
  ours_next, _ = model.loss(state.params, windows[1].inputs, windows[1].targets,
                            windows[1].mask, state.carry, key=jax.random.key(0))
  with torch.no_grad():
    logits, _ = lm(trainer.windows[1][0], trainer.state["hidden"])
    torch_next = torch.nn.functional.cross_entropy(logits, trainer.windows[1][1].reshape(-1))
  assert np.abs(np.asarray(state.params.output.w) - w_before).max() > 5e-3  # it moved (lr 0.01)
  np.testing.assert_allclose(float(torch_next), float(ours_next), rtol=1e-5)
  np.testing.assert_allclose(lm.decoder.weight.detach().numpy(),
                             np.asarray(state.params.output.w), atol=1e-5)


def test_torch_lm_evaluation_matches_ours():
  model, _, state, ids, lm = _setup()
  ours = train.make_evaluator(model, bptt=T)(state.params, ids)
  theirs = tlm.evaluate(lm, ids, bptt=T)
  assert theirs.tokens == ours.tokens == B * (2 * T)
  np.testing.assert_allclose(theirs.nll, ours.nll, rtol=1e-5)
