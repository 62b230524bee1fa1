"""The cell contract: a user's cell (`tests/rnn/_util.trace_cell`, and the README's example) runs
through `rnn.unroll` and the hand-derived BPTT; `bias=False`; layers are not cells."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnn
from tests.rnn._util import assert_trees_close, scalar_loss, setup

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_example_of_a_cell_of_ones_own_runs():
  text = README.read_text()
  blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "rnn.Pointwise(" in b]
  assert len(blocks) == 1
  scope = {}
  exec(blocks[0], scope)  # defines `my_cell` and runs it
  cell = scope["my_cell"](6)
  params = cell.init(jax.random.key(0), 3)
  xs = jax.random.normal(jax.random.key(1), (2, 5, 3))
  state = cell.initial_state(params, (2,))
  lengths = jnp.array([5, 3])
  loss = lambda p, g: scalar_loss(*rnn.unroll(cell, p, xs, state, grad=g, lengths=lengths))
  assert_trees_close(jax.grad(loss)(params, "manual"), jax.grad(loss)(params, "autodiff"),
                     atol=1e-6)


def test_a_cell_with_only_a_step_runs_every_autodiff_option(key):
  base, params, xs, state = setup("user", key)
  plain = rnn.Cell(base.init, base.initial_state, base.project, base.step, base.output_size)
  lengths = jnp.array([7, 2, 5])
  resets = jnp.zeros((3, 7), bool).at[:, 3].set(True)
  for opts in (dict(reverse=True, remat=True), dict(time_major=True)):
    x = jnp.swapaxes(xs, 0, 1) if opts.get("time_major") else xs
    r = resets.T if opts.get("time_major") else resets
    ys, final = rnn.unroll(plain, params, x, state, lengths=lengths, resets=r, **opts)
    ys_m, final_m = rnn.unroll(base, params, x, state, lengths=lengths, resets=r, grad="manual",
                               **opts)
    assert_trees_close((ys, final), (ys_m, final_m), atol=1e-6)


@pytest.mark.parametrize("grad", ["autodiff", "manual"])
@pytest.mark.parametrize("name", ["simple", "lstm", "gru", "min_gru"])
def test_bias_false_has_no_biases_and_equals_zero_biases(name, grad, key):
  factory = getattr(rnn, name)
  cell, with_bias = factory(6, bias=False), factory(6)
  params = cell.init(key, 4)
  assert params.b_ih is None and getattr(params, "b_hh", None) is None
  zeros = with_bias.init(key, 4)._replace(
      **{f: None if getattr(params, f) is None and f.startswith("w") else jnp.zeros_like(v)
         for f, v in with_bias.init(key, 4)._asdict().items() if f.startswith("b")})
  zeros = zeros._replace(**{f: getattr(params, f) for f in params._fields if f.startswith("w")})
  xs = jax.random.normal(jax.random.key(1), (2, 5, 4))
  state = cell.initial_state(params, (2,))
  run = lambda c, p: rnn.unroll(c, p, xs, state, grad=grad)
  assert_trees_close(run(cell, params), run(with_bias, zeros), atol=1e-6)
  g = jax.grad(lambda p: scalar_loss(*run(cell, p)))(params)
  g_ref = jax.grad(lambda p: scalar_loss(*run(with_bias, p)))(zeros)
  for field in params._fields:
    if getattr(params, field) is not None:
      np.testing.assert_allclose(getattr(g, field), getattr(g_ref, field), atol=1e-6)


def test_layers_are_sequence_level_objects(key):
  stacked = rnn.stack([rnn.lstm(4), rnn.bidirectional(rnn.gru(3), rnn.min_gru(2))])
  assert isinstance(stacked, rnn.Stack) and isinstance(stacked, rnn.Layer)
  assert not isinstance(stacked, rnn.Cell) and not isinstance(rnn.lstm(4), rnn.Layer)
  assert isinstance(stacked.layers[1], rnn.BidirectionalLayer)
  assert stacked.output_size == 5
  params = stacked.init(key, 3)
  assert isinstance(params[1], rnn.Bidirectional)
  # A steppable stack steps one step at a time (generation) as its unroll does.
  steppable = rnn.stack([rnn.lstm(4), rnn.min_gru(3)])
  params = steppable.init(key, 3)
  xs = jax.random.normal(key, (2, 1, 3))
  state = steppable.initial_state(params, (2,))
  _, y = steppable.step(params, state, steppable.project(params, xs[:, 0]))
  np.testing.assert_allclose(y, rnn.unroll(steppable, params, xs, state)[0][:, 0], atol=1e-6)
