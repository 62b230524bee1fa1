"""Bad input raises a `ValueError` that names the argument, at trace time, for every way in."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnn
from tests.rnn._util import setup

GRADS = ["autodiff", "manual"]


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_state_of_the_wrong_width(name, grad, key):
  cell, params, xs, state = setup(name, key)
  narrow = jax.tree.map(lambda s: s[..., 1:], state)
  with pytest.raises(ValueError, match=r"`state` must have the shapes .*`state.hidden` must be "
                                        r"\(3, 8\); got \(3, 7\)"):
    rnn.unroll(cell, params, xs, narrow, grad=grad)


@pytest.mark.parametrize("grad", GRADS)
def test_state_of_the_wrong_structure(grad, key):
  cell, params, xs, state = setup("lstm", key)
  with pytest.raises(ValueError, match="`state` must be LSTMState .*got GRUState"):
    rnn.unroll(cell, params, xs, rnn.GRUState(state.hidden), grad=grad)
  with pytest.raises(ValueError, match="`state` must be LSTMState .*got tuple"):
    rnn.unroll(cell, params, xs, tuple(state), grad=grad)


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("name,other", [("lstm", "gru"), ("gru", "lstm")])
def test_params_of_another_cell(name, other, grad, key):
  cell, _, xs, state = setup(name, key)
  wrong = getattr(rnn, other)(8).init(key, 5)
  with pytest.raises(ValueError, match=f"`params` must be {type(cell.init(key, 5)).__name__} .*"
                                       f"got {type(wrong).__name__}"):
    rnn.unroll(cell, wrong, xs, state, grad=grad)


def test_params_of_another_hidden_size(key):
  cell, _, xs, state = setup("gru", key)
  with pytest.raises(ValueError, match=r"`params.w_ih` must be \(24, 5\); got \(18, 5\)"):
    rnn.unroll(cell, rnn.gru(6).init(key, 5), xs, state)


@pytest.mark.parametrize("lengths", [[8, 3, 0], [7, -1, 2]])
def test_lengths_outside_zero_to_t(lengths, key):
  cell, params, xs, state = setup("lstm", key)
  with pytest.raises(ValueError, match=r"`lengths` must be in \[0, 7\]"):
    rnn.unroll(cell, params, xs, state, lengths=jnp.array(lengths))


def test_lengths_under_jit_are_clamped(key):
  cell, params, xs, state = setup("lstm", key)
  run = jax.jit(lambda lengths: rnn.unroll(cell, params, xs, state, lengths=lengths))
  clamped = run(jnp.array([9, -2, 4]))
  expected = run(jnp.array([7, 0, 4]))
  for a, b in zip(jax.tree.leaves(clamped), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_integer_xs(key):
  cell, params, xs, state = setup("lstm", key)
  with pytest.raises(ValueError, match="`xs` must be floating point.*got dtype int32"):
    rnn.unroll(cell, params, xs.astype(jnp.int32), state)


def test_resets_of_the_wrong_shape_or_dtype(key):
  cell, params, xs, state = setup("gru", key)
  with pytest.raises(ValueError, match=r"`resets` must have shape \(3, 7\)"):
    rnn.unroll(cell, params, xs, state, resets=jnp.zeros((7, 3), bool))
  with pytest.raises(ValueError, match="`resets` must be bool"):
    rnn.unroll(cell, params, xs, state, resets=jnp.zeros((3, 7), jnp.int32))


def test_fast_paths_the_cell_does_not_have(key):
  cell, params, xs, state = setup("lstm", key)
  plain = cell._replace(pointwise=None)
  with pytest.raises(ValueError, match="`grad='manual'` needs the cell's `pointwise` field"):
    rnn.unroll(plain, params, xs, state, grad="manual")
  with pytest.raises(ValueError, match="`parallel=True` needs the cell's `linear` field"):
    rnn.unroll(cell, params, xs, state, parallel=True)
  cell, params, xs, state = setup("min_gru", key)
  with pytest.raises(ValueError, match="`parallel=True` .* got grad='manual'"):
    rnn.unroll(cell, params, xs, state, parallel=True, grad="manual")


def test_not_a_cell_nor_a_layer(key):
  _, params, xs, state = setup("lstm", key)
  with pytest.raises(ValueError, match="`cell` must be an rnn.Cell or a layer"):
    rnn.unroll(lambda *a: a, params, xs, state)
  with pytest.raises(ValueError, match=r"`cells\[1\]` must be an rnn.Cell or a layer"):
    rnn.stack([rnn.lstm(4), "lstm"])


def test_layer_params_and_state_of_the_wrong_structure(key):
  stacked = rnn.stack([rnn.lstm(4), rnn.gru(4)])
  params = stacked.init(key, 5)
  xs = jnp.ones((2, 3, 5))
  state = stacked.initial_state(params, (2,))
  with pytest.raises(ValueError, match=r"`params` of a stack must be a tuple with one entry per "
                                        r"layer \(2\); got tuple of length 1"):
    rnn.unroll(stacked, params[:1], xs, state)
  with pytest.raises(ValueError, match="`state` of a stack"):
    rnn.unroll(stacked, params, xs, state[:1])
  pair = rnn.bidirectional(rnn.gru(4), rnn.gru(4))
  with pytest.raises(ValueError, match="`params` of a bidirectional layer"):
    rnn.unroll(pair, tuple(pair.init(key, 5)), xs, pair.initial_state(pair.init(key, 5), (2,)))


def test_factories_reject_non_float_dtypes():
  with pytest.raises(ValueError, match="`dtype` must be a floating dtype"):
    rnn.lstm(4, dtype=jnp.int32)
  with pytest.raises(ValueError, match="`param_dtype` must be a floating dtype"):
    rnn.min_gru(4, param_dtype="int8")
