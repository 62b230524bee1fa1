"""PyTorch's word_language_model `main.py` and ours with `--recipe pytorch` train alike.

The `recipe` suite's PyTorch side (`benchmarks._torch_lm` with plain SGD and the plateau rule)
is `main.py`'s loop; ours is `train.fit` with the preset's settings. From the same initial
weights (copied with `_torch_lm.from_ours`) and without dropout (whose masks the two frameworks
draw differently), they give the same validation perplexity after every epoch, anneal the
learning rate at the same epochs and end with the same parameters, to float rounding: the
windows (the last one shorter), the mean loss over a window's tokens, the clipping, the SGD
step, the state carried across windows and reset every epoch, and the schedule all agree.
"""

import jax
import numpy as np
import pytest

import train
from train import _cli

torch = pytest.importorskip("torch")
from benchmarks import _torch_lm as tlm  # noqa: E402  (needs torch)

V, E, H, B, T = 40, 12, 12, 4, 10


def test_the_pytorch_recipe_trains_as_main_py_does():
  recipe = _cli.RECIPES["pytorch"]
  rng = np.random.default_rng(0)
  # Uniform random tokens: the validation perplexity soon stops improving, so the learning
  # rate is annealed within a few epochs. Rows of 57 tokens: 5 windows of 10, a last one of 6.
  train_data = train.batchify(rng.integers(0, V, B * 57), B)
  valid_data = train.batchify(rng.integers(0, V, 2 * 40), 2)
  counts = np.arange(V, 0, -1)
  config = train.ModelConfig(V, emsize=E, nhid=H, nlayers=recipe["nlayers"], dropout=0.0,
                             init=recipe["init"])
  model = train.language_model(config, counts)
  opt = train.optimizer(recipe["optimizer"], recipe["lr"], clip=recipe["clip"])
  state = train.init_train_state(model, opt, jax.random.key(0), B)
  lm = tlm.from_ours(model, state.params)
  loop = train.LoopConfig(epochs=1, bptt=T, decay=recipe["decay"], lr_decay=recipe["lr_decay"],
                          patience=recipe["patience"])
  evaluate = train.make_evaluator(model, bptt=T)
  trainer = tlm.trainer(lm, train_data, bptt=T, lr=recipe["lr"], clip=recipe["clip"],
                        optimizer=recipe["optimizer"])
  ours_curve, torch_curve, ours_lr, torch_lr = [], [], [], []
  record, best, loop_record = [], None, None
  for epoch in range(1, 7):
    result = train.fit(model, opt, state, train_data, valid_data,
                       config=loop._replace(epochs=epoch), loop=loop_record, best=best,
                       quiet=True, evaluate=evaluate, echo=record.append)
    state, loop_record, best = result.state, result.loop, (result.best_params, result.best_valid)
    ours_curve.append(float(record[-1].split("valid ppl")[1].split("|")[0]))
    ours_lr.append(train.learning_rate(state))
    tlm.train_epoch(trainer)
    ppl = tlm.evaluate(lm, valid_data, bptt=T).perplexity
    tlm.end_epoch(trainer, ppl, decay=recipe["decay"], lr_decay=recipe["lr_decay"])
    torch_curve.append(ppl)
    torch_lr.append(tlm.learning_rate(trainer))
  np.testing.assert_allclose(ours_curve, torch_curve, rtol=1e-4)
  assert ours_lr == pytest.approx(torch_lr, rel=1e-6)
  assert 20.0 > min(ours_lr) and ours_lr[0] == 20.0  # annealed at least once, not at once
  test_data = train.batchify(rng.integers(0, V, 2 * 30), 2)
  ours_test = evaluate(best[0], test_data).perplexity
  torch_test = tlm.evaluate(lm, test_data, bptt=T, state_dict=trainer.state["best_state"])
  assert ours_test == pytest.approx(torch_test.perplexity, rel=1e-4)
  final = tlm.from_ours(model, state.params).state_dict()
  for name, tensor in lm.state_dict().items():
    np.testing.assert_allclose(final[name].numpy(), tensor.numpy(), atol=2e-4, err_msg=name)
