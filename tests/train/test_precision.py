"""Tests of bfloat16 training: float32 master parameters and optimizer state, bfloat16 compute."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from train._model import ModelConfig, language_model

VOCAB = 19
COUNTS = np.sort(np.random.default_rng(1).integers(1, 300, VOCAB))[::-1]


def _models(**kwargs):
  config = dict(vocab_size=VOCAB, emsize=8, nhid=8, num_samples=4, dropout=0.0)
  config.update(kwargs)
  return [language_model(ModelConfig(**config, precision=p), COUNTS)
          for p in ("float32", "bfloat16")]


def _window(key, batch=3, steps=6):
  tokens = np.asarray(jax.random.randint(key, (batch, steps + 1), 0, VOCAB))
  return train.Window(tokens[:, :-1], tokens[:, 1:], np.ones((batch, steps), bool))


def _dtypes(tree):
  return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.parametrize("softmax, cell, sparse", [("full", "lstm", False),
                                                   ("sampled", "gru", True),
                                                   ("hsm-huffman", "lstm", True)])
def test_bfloat16_step_is_close_to_float32_and_keeps_float32_state(softmax, cell, sparse, key):
  window = _window(jax.random.fold_in(key, 1))
  results = []
  for model in _models(softmax=softmax, cell=cell):
    opt = train.optimizer("adam", 0.01, clip=1.0, sparse_output=sparse)
    state = train.init_train_state(model, opt, key, 3)
    assert isinstance(state.opt_state, train.SparseOptState) == sparse
    step = train.make_train_step(model, opt)
    losses = []
    for i in range(3):
      state, metrics = step(state, window, jax.random.fold_in(key, i))
      assert metrics["loss"].dtype == jnp.float32
      losses.append(float(metrics["loss"]))
    # The master parameters, the optimizer state and the carry stay float32.
    assert _dtypes(state.params) == _dtypes(state.opt_state) == _dtypes(state.carry) \
        == {np.dtype(jnp.float32)}
    results.append(losses)
  f32, bf16 = np.asarray(results)
  # Same parameters, same window: bfloat16 rounding (8 bits of mantissa) moves the loss little.
  np.testing.assert_allclose(bf16, f32, rtol=2e-2)
  assert f32[-1] < f32[0] and bf16[-1] < bf16[0]


def test_bfloat16_computes_in_bfloat16_and_scores_in_float32(key):
  f32, bf16 = _models(softmax="full", tied=True)
  params = f32.init(key)
  inputs = np.asarray(jax.random.randint(key, (2, 5), 0, VOCAB))
  carry = bf16.initial_state(params, 2)
  hidden, final = bf16.apply(params, inputs, carry)
  assert hidden.dtype == jnp.bfloat16 and bf16.embed(params, inputs).dtype == jnp.bfloat16
  assert _dtypes(final) == {np.dtype(jnp.float32)}
  logp, _ = bf16.log_prob(params, inputs, inputs, carry)
  logp_f32, _ = f32.log_prob(params, inputs, inputs, carry)
  assert logp.dtype == jnp.float32
  np.testing.assert_allclose(logp, logp_f32, rtol=2e-2, atol=2e-2)
  # The gradient w.r.t. the float32 parameters is float32 and close to float32's.
  window = _window(key, batch=2, steps=5)

  def grads(model):
    def objective(p):
      return model.loss(p, window.inputs, window.targets, window.mask, carry, key=key)[0]
    return jax.grad(objective)(params)

  g32, g16 = grads(f32), grads(bf16)
  assert _dtypes(g16) == {np.dtype(jnp.float32)}
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
    np.testing.assert_allclose(b, a, atol=0.05 * float(np.abs(a).max()) + 1e-6)
  # Generation: one step, exact float32 log-probabilities.
  new, logps = bf16.step(params, carry, inputs[:, 0])
  assert logps.dtype == jnp.float32 and _dtypes(new) == {np.dtype(jnp.float32)}
  np.testing.assert_allclose(jnp.exp(logps).sum(-1), 1.0, rtol=1e-5)


def test_precision_is_checked():
  with pytest.raises(ValueError, match="`precision` must be one of float32, bfloat16"):
    language_model(ModelConfig(vocab_size=VOCAB, precision="float16"), COUNTS)


def test_a_bfloat16_run_saves_resumes_and_generates(tmp_path, capsys):
  from tests.train._tiny import TINY
  from train import _cli, generate
  run = tmp_path / "run"
  argv = TINY + ["--precision", "bfloat16", "--save", str(run)]
  assert _cli.main(argv + ["--max-steps", "4"]) == 0
  assert "bfloat16" in capsys.readouterr().out
  saved = json.loads((run / "config.json").read_text())["config"]
  assert saved["precision"] == saved["model"]["precision"] == "bfloat16"
  # A resume keeps the run's precision; the checkpoint holds float32 either way.
  assert _cli.main(TINY + ["--save", str(run), "--resume", "--max-steps", "6"]) == 0
  out = capsys.readouterr().out
  assert "| resume | step 4" in out and "bfloat16" in out and "test ppl" in out
  # Another precision on resume works too (the parameters are float32 in both) and is recorded.
  assert _cli.main(TINY + ["--save", str(run), "--resume", "--max-steps", "8",
                           "--precision", "float32"]) == 0
  capsys.readouterr()
  resumes = json.loads((run / "config.json").read_text())["resumes"]
  assert [(r["step"], r["precision"]) for r in resumes] == [(4, "bfloat16"), (6, "float32")]
  assert generate.main(["--checkpoint", str(run), "--words", "5", "--seed", "1"]) == 0
  assert len(capsys.readouterr().out.split()) == 5
