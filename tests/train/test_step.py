"""Tests of the training step and exact evaluation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_alts
import train
from train._model import ModelConfig, language_model

VOCAB = 19
COUNTS = np.sort(np.random.default_rng(1).integers(1, 300, VOCAB))[::-1]


_COMPILED = {}


def _setup(key, *, batch=3, steps=6, opt="sgd", lr=0.5, clip=None, sparse=True, **kwargs):
  """A model, its optimizer, a state and a window; the jitted step is shared by the tests that
  use the same config (the learning rate is state, not part of the compiled program)."""
  config = dict(vocab_size=VOCAB, emsize=8, nhid=8, num_samples=4, softmax="full", tied=False,
                dropout=0.0)
  config.update(kwargs)
  cache_key = (tuple(sorted(config.items())), opt, clip, sparse)
  if cache_key not in _COMPILED:
    model = language_model(ModelConfig(**config), COUNTS)
    optimizer = train.optimizer(opt, lr, clip=clip, sparse_output=sparse)
    _COMPILED[cache_key] = (model, optimizer, train.make_train_step(model, optimizer))
  model, optimizer, step = _COMPILED[cache_key]
  state = train.set_learning_rate(train.init_train_state(model, optimizer, key, batch), lr)
  tokens = np.asarray(jax.random.randint(jax.random.fold_in(key, 7), (batch, steps + 1), 0, VOCAB))
  window = train.Window(tokens[:, :-1], tokens[:, 1:], np.ones((batch, steps), bool))
  return model, step, state, window


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _assert_trees_close(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, **tol)


@pytest.mark.parametrize("softmax, tied", [("sampled", False), ("nce", True)])
def test_row_sparse_sgd_equals_dense_sgd(softmax, tied, key):
  results = []
  for sparse in (True, False):
    model, step, state, window = _setup(key, softmax=softmax, tied=tied, sparse=sparse,
                                        clip=0.5)
    for i in range(3):
      state, metrics = step(state, window, jax.random.fold_in(key, i))
    results.append((state, metrics))
  (sparse_state, sparse_metrics), (dense_state, dense_metrics) = results
  assert isinstance(sparse_state.opt_state, train.SparseOptState)
  assert not isinstance(dense_state.opt_state, train.SparseOptState)
  _assert_trees_close(sparse_state.params, dense_state.params, rtol=2e-5, atol=1e-6)
  assert float(sparse_metrics["loss"]) == pytest.approx(float(dense_metrics["loss"]), rel=1e-5)
  assert float(sparse_metrics["grad_norm"]) == pytest.approx(float(dense_metrics["grad_norm"]),
                                                             rel=1e-4)


def test_row_sparse_adam_moves_only_the_rows_it_touched(key):
  model, step, state, window = _setup(key, softmax="sampled", opt="adam", lr=0.01)
  before = _copy(state.params.output)
  step_key = jax.random.key(3)
  new_state, _ = step(state, window, step_key)
  # The same negatives the step drew: it splits its key as `LanguageModel.loss` does.
  _, key_loss = jax.random.split(step_key)
  targets = jnp.asarray(window.targets).reshape(-1)
  hidden = jnp.zeros((targets.shape[0], 8))  # the draw reads only the targets
  samples = model.layer.row_sparse.rows(before, hidden, targets, key=key_loss).ids[1]
  touched = set(np.asarray(window.targets).ravel()) | set(np.asarray(samples).ravel())
  moved = set(np.flatnonzero(np.any(new_state.params.output.w != before.w, axis=1)))
  assert moved == touched
  assert len(touched) < VOCAB


@pytest.mark.parametrize("softmax", ["hsm-huffman", "hsm-balanced"])
def test_hierarchical_row_sparse_sgd_equals_dense_sgd(softmax, key):
  results = []
  for sparse in (True, False):
    model, step, state, window = _setup(key, softmax=softmax, sparse=sparse, clip=0.5)
    for i in range(2):
      state, metrics = step(state, window, jax.random.fold_in(key, i))
    results.append((state, metrics))
  (sparse_state, sparse_metrics), (dense_state, dense_metrics) = results
  assert isinstance(sparse_state.opt_state, train.SparseOptState)
  assert isinstance(sparse_state.params.output, softmax_alts.HierarchicalParams)
  assert not isinstance(dense_state.opt_state, train.SparseOptState)
  _assert_trees_close(sparse_state.params, dense_state.params, rtol=2e-5, atol=1e-6)
  # The hierarchical loss is the exact NLL, on both paths.
  assert float(sparse_metrics["nll"]) == float(sparse_metrics["loss"])
  assert float(sparse_metrics["loss"]) == pytest.approx(float(dense_metrics["loss"]), rel=1e-5)
  assert float(sparse_metrics["grad_norm"]) == pytest.approx(float(dense_metrics["grad_norm"]),
                                                             rel=1e-4)


def test_hierarchical_row_sparse_adam_is_lazy_adam(key):
  # Step 1 on a full window, step 2 on a window whose last 5 of 6 steps are padding. Lazy Adam
  # equals dense Adam on the nodes step 2 touches (the paths of its unpadded targets) and leaves
  # every other node where step 1 put it, where dense Adam's momentum still moves it.
  tree = softmax_alts.huffman_tree(COUNTS)
  runs = {}
  for sparse in (True, False):
    model, step, state, window = _setup(key, softmax="hsm-huffman", opt="adam", lr=0.01,
                                        sparse=sparse)
    first, _ = step(state, window, jax.random.fold_in(key, 0))
    after_first = _copy(first.params)
    padded = train.Window(window.inputs[::-1], window.targets[::-1],
                          np.arange(window.mask.shape[1])[None, :] < np.ones((3, 1), int))
    second, _ = step(first, padded, jax.random.fold_in(key, 1))
    runs[sparse] = (after_first, second.params, window, padded)
  (lazy_first, lazy, window, padded), (dense_first, dense, *_) = runs[True], runs[False]
  _assert_trees_close(lazy_first, dense_first, rtol=2e-5, atol=1e-6)  # fresh moments: equal
  def nodes_read(window):
    read = np.zeros(tree.num_nodes, bool)
    for word in np.asarray(window.targets)[np.asarray(window.mask)]:
      read[tree.paths[word, :tree.lengths[word]]] = True
    return read

  touched, before = nodes_read(padded), nodes_read(window)
  assert 0 < touched.sum() and np.any(before & ~touched)
  np.testing.assert_allclose(lazy.output.nodes[touched], dense.output.nodes[touched], rtol=2e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(lazy.output.nodes[~touched], lazy_first.output.nodes[~touched])
  np.testing.assert_array_equal(lazy.output.bias[~touched], lazy_first.output.bias[~touched])
  moved = np.any(dense.output.nodes != dense_first.output.nodes, axis=1)
  assert np.all(moved[before & ~touched])  # dense Adam's momentum moves them: the two differ
  _assert_trees_close(lazy.rnn, dense.rnn, rtol=2e-5, atol=1e-6)


def test_clipping_bounds_the_sgd_update(key):
  model, step, state, window = _setup(key, softmax="full", clip=1e-3, lr=0.5)
  before = _copy(state.params)
  state, metrics = step(state, window, key)
  assert float(metrics["grad_norm"]) > 1e-3
  deltas = jax.tree.map(lambda a, b: a - b, state.params, before)
  norm = float(jnp.sqrt(sum(jnp.sum(d ** 2) for d in jax.tree.leaves(deltas))))
  assert norm == pytest.approx(0.5 * 1e-3, rel=1e-3)


def test_learning_rate_lives_in_the_state_and_scales_the_update(key):
  model, step, state, window = _setup(key, softmax="full", lr=0.5)
  assert train.learning_rate(state) == pytest.approx(0.5)
  start = _copy(state)
  half = train.set_learning_rate(_copy(start), 0.25)
  assert train.learning_rate(half) == pytest.approx(0.25)
  full_state, _ = step(_copy(start), window, key)
  half_state, _ = step(half, window, key)
  full_delta = full_state.params.rnn[0].w_hh - start.params.rnn[0].w_hh
  half_delta = half_state.params.rnn[0].w_hh - start.params.rnn[0].w_hh
  np.testing.assert_allclose(half_delta, 0.5 * full_delta, rtol=1e-4, atol=1e-7)


def test_step_is_pure_and_carries_the_detached_final_state(key):
  model, step, state, window = _setup(key, softmax="full", opt="adam", lr=0.01, dropout=0.3)
  a, metrics_a = step(_copy(state), window, key)
  b, metrics_b = step(_copy(state), window, key)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert float(metrics_a["loss"]) == float(metrics_b["loss"])
  assert int(a.step) == 1
  # Without dropout, the carried state is the final state of the window under the old params.
  model, step, state, window = _setup(key, softmax="full")
  params, carry = _copy(state.params), _copy(state.carry)
  new_state, metrics = step(state, window, key)
  _, final = jax.jit(model.apply)(params, window.inputs, carry)
  _assert_trees_close(new_state.carry, final, rtol=1e-6, atol=1e-7)
  # The full softmax's training loss is its exact NLL.
  assert float(metrics["nll"]) == float(metrics["loss"])
  reset = train.reset_carry(model, new_state)
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(reset.carry))


def test_padded_steps_change_nothing(key):
  model, step, state, window = _setup(key, softmax="full", steps=6)
  short = train.Window(window.inputs[:, :4], window.targets[:, :4], window.mask[:, :4])
  pad = ((0, 0), (0, 2))
  padded = train.Window(np.pad(short.inputs, pad), np.pad(short.targets, pad),
                        np.pad(short.mask, pad))
  a, metrics_a = step(_copy(state), short, key)
  b, metrics_b = step(_copy(state), padded, key)
  assert float(metrics_a["loss"]) == pytest.approx(float(metrics_b["loss"]), rel=1e-6)
  assert int(metrics_b["tokens"]) == 12
  _assert_trees_close(a.params, b.params, rtol=1e-5, atol=1e-7)
  _assert_trees_close(a.carry, b.carry, rtol=1e-5, atol=1e-7)


def test_metrics_report_the_exact_nll_only_where_it_is_free(key):
  for softmax, has_nll, clip in (("sampled", False, 0.5), ("selfnorm", True, None),
                                 ("full", True, None)):
    model, step, state, window = _setup(key, softmax=softmax, clip=clip)
    _, metrics = step(state, window, key)
    assert ("nll" in metrics) == has_nll
    if softmax == "selfnorm":  # the penalty alpha (log Z)^2 comes on top of the NLL
      assert float(metrics["loss"]) > float(metrics["nll"]) > 0


def _reference_perplexity(model, params, data):
  """exp(mean NLL) by hand: each row as one long sequence, the full softmax in float64."""
  nll, count = 0.0, 0
  w = np.asarray(params.output.w, np.float64)
  b = np.asarray(params.output.b, np.float64)
  for row in np.asarray(data):
    carry = model.initial_state(params, 1)
    hidden, _ = jax.jit(model.apply)(params, row[None, :-1], carry)
    logits = np.asarray(hidden[0], np.float64) @ w.T + b
    log_z = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
    nll += float(np.sum(log_z - logits[np.arange(row.size - 1), row[1:]]))
    count += row.size - 1
  return float(np.exp(nll / count)), count


def test_evaluation_is_exp_mean_nll_of_the_full_softmax(key):
  model, _, state, _ = _setup(key, softmax="sampled", nlayers=2, cell="gru")
  stream = np.asarray(jax.random.randint(key, (4 * 23,), 0, VOCAB))
  data = train.batchify(stream, 4)  # rows of 23 tokens: 22 targets, windows 5+5+5+5+2
  evaluation = train.make_evaluator(model, bptt=5)(state.params, data)
  expected, count = _reference_perplexity(model, state.params, data)
  assert evaluation.tokens == count == 4 * 22
  assert evaluation.perplexity == pytest.approx(expected, rel=1e-5)
  assert evaluation.nll == pytest.approx(count * np.log(expected), rel=1e-5)
  # The window length changes nothing: the state is carried across windows.
  other = train.make_evaluator(model, bptt=22)(state.params, data)
  assert other.perplexity == pytest.approx(evaluation.perplexity, rel=1e-5)


def test_optimizer_rejects_bad_settings():
  with pytest.raises(ValueError, match="optimizer"):
    train.optimizer("rmsprop", 0.1)
  with pytest.raises(ValueError, match="lr"):
    train.optimizer("sgd", 0.0)
  with pytest.raises(ValueError, match="clip"):
    train.optimizer("sgd", 0.1, clip=-1.0)


def _scripted_evaluator(perplexities):
  """An evaluator that returns the given validation perplexities in turn (and records calls)."""
  calls = []

  def evaluate(params, data):
    ppl = perplexities[min(len(calls), len(perplexities) - 1)]
    calls.append(ppl)
    return train.Evaluation(nll=float(np.log(ppl)) * 10, tokens=10, perplexity=ppl)

  return evaluate, calls


def test_plateau_decay_and_early_stopping(key):
  model, step, state, _ = _setup(key, softmax="full", batch=2, lr=1.0)
  stream = np.asarray(jax.random.randint(key, (2 * 41,), 0, VOCAB))
  data = train.batchify(stream, 2)  # rows of 41 tokens: 10 windows of 4 per epoch
  # Step 0 (initial, not scheduled), then evaluations at steps 2, 4, 6, ...
  evaluate, calls = _scripted_evaluator([30.0, 20.0, 15.0, 16.0, 14.0, 14.5, 14.2, 13.0])
  lines = []
  config = train.LoopConfig(epochs=5, bptt=4, eval_interval=2, decay="plateau", lr_decay=4.0,
                            patience=2, log_interval=1000)
  result = train.fit(model, train.optimizer("sgd", 1.0), state, data, data, config=config,
                     train_step=step, evaluate=evaluate, echo=lines.append, quiet=True)
  # 15 -> 16 is no improvement (lr / 4), 14 is, then 14.5 and 14.2 are not (lr / 4 twice) and
  # two evaluations in a row without a new best stop the run at step 12.
  assert int(result.state.step) == 12
  assert result.loop["stopped"] and result.loop["evals_since_best"] == 2
  assert train.learning_rate(result.state) == pytest.approx(1.0 / 64)
  assert result.best_valid == 14.0 and result.loop["best_valid"] == 14.0
  assert any("early stop" in line for line in lines)
  assert calls == [30.0, 20.0, 15.0, 16.0, 14.0, 14.5, 14.2]


def test_epoch_decay_follows_zarembas_schedule(key):
  model, step, state, _ = _setup(key, softmax="full", batch=2, lr=1.0)
  stream = np.asarray(jax.random.randint(key, (2 * 9,), 0, VOCAB))
  data = train.batchify(stream, 2)  # rows of 9 tokens: 2 windows of 4 per epoch
  evaluate, calls = _scripted_evaluator([50.0, 60.0, 70.0, 40.0, 45.0, 46.0])
  lines = []
  config = train.LoopConfig(epochs=5, bptt=4, decay="epoch", lr_decay=2.0, decay_after=2,
                            patience=0, log_interval=1000)
  result = train.fit(model, train.optimizer("sgd", 1.0), state, data, data, config=config,
                     train_step=step, evaluate=evaluate, echo=lines.append, quiet=True)
  # Two epochs at lr 1, then halved after every epoch, whatever the validation perplexity.
  rates = [float(re.search(r"lr ([0-9.e+-]+)", line).group(1)) for line in lines
           if "| eval |" in line and "initial" not in line]
  assert rates == [1.0, 1.0, 0.5, 0.25, 0.125]
  assert train.learning_rate(result.state) == pytest.approx(1 / 16)
  assert int(result.state.step) == 10 and len(calls) == 6  # the initial one and 5 epoch ends
  assert result.best_valid == 40.0
