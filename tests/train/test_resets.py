"""Tests of the document-boundary resets: the state returns to its initial value after <eos>."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from tests.train.test_cli import corpus_dir  # noqa: F401 (a fixture)
from train import _cli
from train._model import ModelConfig, language_model

VOCAB = 11
EOS = 3
COUNTS = np.arange(VOCAB, 0, -1) * 10
# Two rows of 13 tokens, read in windows of 4: <eos> as the last input of a window (row 0,
# position 3), twice in a row (5, 6), as the first input (row 1, 0), and mid-window (9).
EOS_AT = {0: (3, 5, 6), 1: (0, 9)}


def _data(key):
  data = np.array(jax.random.randint(key, (2, 13), 4, VOCAB))
  for row, positions in EOS_AT.items():
    data[row, list(positions)] = EOS
  return data


def _reference_logp(plain, params, row):
  """`log p(row[t+1] | ...)` with each document (up to and with its <eos>) run on its own from
  the initial state, by a model that never resets."""
  inputs, targets = row[:-1], row[1:]
  starts = [0] + [t + 1 for t in range(inputs.size) if inputs[t] == EOS]
  ends = starts[1:] + [inputs.size]
  out = []
  for s, e in zip(starts, ends):
    if e > s:
      logp, _ = plain.log_prob(params, inputs[None, s:e], targets[None, s:e],
                               plain.initial_state(params, 1))
      out.append(np.asarray(logp[0]))
  return np.concatenate(out)


@pytest.mark.parametrize("cell, grad", [("lstm", "autodiff"), ("gru", "manual")])
def test_resets_equal_running_each_document_alone(cell, grad, key):
  config = ModelConfig(vocab_size=VOCAB, emsize=6, nhid=6, nlayers=2, cell=cell, grad=grad)
  plain = language_model(config, COUNTS)
  model = language_model(config._replace(reset_id=EOS), COUNTS)
  params = model.init(key)
  data = _data(jax.random.fold_in(key, 1))
  expected = np.stack([_reference_logp(plain, params, row) for row in data])
  # Windows of 4 with the state carried across them, as training and evaluation read a stream.
  carry, got = model.initial_state(params, 2), []
  for start in range(0, 12, 4):
    logp, carry = model.log_prob(params, data[:, start:start + 4], data[:, start + 1:start + 5],
                                 carry)
    got.append(np.asarray(logp))
  np.testing.assert_allclose(np.concatenate(got, axis=1), expected, rtol=1e-5, atol=1e-6)
  # Without resets the state leaks across documents: the answer differs.
  leaky, _ = plain.log_prob(params, data[:, :-1], data[:, 1:], plain.initial_state(params, 2))
  assert np.abs(np.asarray(leaky) - expected).max() > 1e-3
  # The evaluator (windows of 5, the last padded) gives the same total.
  evaluation = train.make_evaluator(model, bptt=5)(params, data)
  assert evaluation.nll == pytest.approx(-expected.sum(), rel=1e-5)
  # Generation: a step whose input is <eos> hands on the initial state.
  new, _ = model.step(params, carry, jnp.array([EOS, 5]))
  old, _ = plain.step(params, carry, jnp.array([EOS, 5]))
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
    assert not np.any(a[0]) and np.any(b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("softmax, sparse", [("full", False), ("hsm-huffman", True)])
def test_the_train_step_resets_at_eos(softmax, sparse, key):
  config = ModelConfig(vocab_size=VOCAB, emsize=6, nhid=6, softmax=softmax)
  plain = language_model(config, COUNTS)
  model = language_model(config._replace(reset_id=EOS), COUNTS)
  opt = train.optimizer("sgd", 1e-30, sparse_output=sparse)  # the params do not move
  state = train.init_train_state(model, opt, key, 2)
  params = jax.tree.map(jnp.copy, state.params)
  data = _data(jax.random.fold_in(key, 1))
  expected = np.stack([_reference_logp(plain, params, row) for row in data])
  step = train.make_train_step(model, opt)
  for i, start in enumerate(range(0, 12, 4)):
    window = train.Window(data[:, start:start + 4], data[:, start + 1:start + 5],
                          np.ones((2, 4), bool))
    state, metrics = step(state, window, jax.random.fold_in(key, i))
    assert float(metrics["loss"]) == pytest.approx(-expected[:, start:start + 4].mean(),
                                                   rel=1e-5)


def test_reset_id_is_checked():
  with pytest.raises(ValueError, match="`reset_id` must be a token id in"):
    language_model(ModelConfig(vocab_size=VOCAB, reset_id=VOCAB), COUNTS)


def test_a_run_with_reset_at_eos_records_it_and_resumes(corpus_dir, tmp_path, capsys):  # noqa: F811
  run = tmp_path / "run"
  small = ["--data", str(corpus_dir), "--emsize", "8", "--nhid", "8", "--batch-size", "4",
           "--bptt", "6", "--eval-batch-size", "2", "--quiet", "--reset-at-eos", "--save",
           str(run)]
  assert _cli.main(small + ["--max-steps", "4"]) == 0
  out = capsys.readouterr().out
  assert "reset at <eos>" in out and "test ppl" in out
  saved = json.loads((run / "config.json").read_text())
  vocab = train.Vocab.load(run / "vocab.json")
  assert saved["config"]["reset_at_eos"] is True
  assert saved["config"]["model"]["reset_id"] == vocab.eos_id is not None
  assert _cli.main(small + ["--max-steps", "6", "--resume"]) == 0
  assert "| resume | step 4" in capsys.readouterr().out
