"""State resets (`unroll(..., resets=)`): no state crosses a segment boundary, as ResetCore."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnn
from tests.rnn._util import assert_trees_close, scalar_loss, setup

# Segments of sequence 0 start at 0, 2 and 5; sequence 1's at 0 and 1 (and 6, past its length);
# sequence 2 has one segment, and the given state feeds it.
RESETS = jnp.array([[1, 0, 1, 0, 0, 1, 0],
                    [0, 1, 0, 0, 0, 0, 1],
                    [0, 0, 0, 0, 0, 0, 0]], bool)
LENGTHS = jnp.array([7, 5, 6])


def _segments(resets_b, length):
  """`[(start, stop), ...]` of one sequence's segments within its length."""
  starts = [0] + [t for t in range(1, length) if resets_b[t]]
  return list(zip(starts, starts[1:] + [length]))


def _by_segments(cell, params, xs, state, *, reverse):
  """The reference: every segment run on its own, step by step, from `cell.initial_state` (the
  segment read first starts from the given state, unless forwards it resets at step 0)."""
  ys = np.zeros(xs.shape[:2] + (cell.output_size,), np.float32)
  finals = []
  for b in range(xs.shape[0]):
    segments = _segments(np.asarray(RESETS[b]), int(LENGTHS[b]))
    s = jax.tree.map(lambda v: v[b:b + 1], state)
    for i, (start, stop) in enumerate(segments[::-1] if reverse else segments):
      if i > 0 or (bool(RESETS[b, 0]) and not reverse):
        s = cell.initial_state(params, (1,))
      for t in (range(stop - 1, start - 1, -1) if reverse else range(start, stop)):
        s, y = cell.step(params, s, cell.project(params, xs[b:b + 1, t]))
        ys[b, t] = y[0]
    finals.append(s)
  return jnp.asarray(ys), jax.tree.map(lambda *s: jnp.concatenate(s), *finals)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", ["lstm", "gru_cho", "user", "min_lstm"])
def test_resets_equal_segments_run_apart(name, reverse, key):
  cell, params, xs, state = setup(name, key)
  expected = _by_segments(cell, params, xs, state, reverse=reverse)
  loop = rnn.static_unroll(cell, params, xs, state, lengths=LENGTHS, reverse=reverse,
                           resets=RESETS)
  assert_trees_close(loop, expected, atol=1e-6)
  variants = [dict(grad="autodiff"), dict(grad="manual", remat=True)]
  if cell.linear is not None:
    variants.append(dict(parallel=True))
  for options in variants:
    out = rnn.unroll(cell, params, xs, state, lengths=LENGTHS, reverse=reverse, resets=RESETS,
                     **options)
    assert_trees_close(out, expected, atol=1e-5)


@pytest.mark.parametrize("name,reverse", [("lstm", True), ("user", False), ("min_gru", True)])
def test_resets_gradients_in_every_mode(name, reverse, key):
  cell, params, xs, state = setup(name, key)

  def grads(run):
    return jax.jit(jax.grad(lambda p, x, s: scalar_loss(*run(p, x, s)), argnums=(0, 1, 2)))(
        params, xs, state)

  expected = grads(lambda p, x, s: rnn.static_unroll(cell, p, x, s, lengths=LENGTHS,
                                                     reverse=reverse, resets=RESETS))
  variants = [dict(grad="autodiff", remat=True), dict(grad="manual"),
              dict(grad="manual", remat=True)]
  if cell.linear is not None:
    variants.append(dict(parallel=True))
  for options in variants:
    got = grads(lambda p, x, s: rnn.unroll(cell, p, x, s, lengths=LENGTHS, reverse=reverse,
                                           resets=RESETS, **options))
    assert_trees_close(got, expected, atol=2e-5, rtol=1e-5)


def test_resets_in_a_stack_with_a_bidirectional_layer(key):
  cell = rnn.stack([rnn.bidirectional(rnn.gru(4), rnn.lstm(3)), rnn.min_gru(5)])
  params = cell.init(key, 5)
  xs = jax.random.normal(jax.random.key(1), (3, 7, 5))
  state = cell.initial_state(params, (3,))
  for grad in ("autodiff", "manual"):
    ys, _ = rnn.unroll(cell, params, xs, state, resets=RESETS, lengths=LENGTHS, grad=grad)
    pair, p0, s0 = cell.layers[0], params[0], state[0]
    y0, _ = rnn.unroll(pair, p0, xs, s0, resets=RESETS, lengths=LENGTHS, grad=grad)
    yf, _ = rnn.static_unroll(pair.forward, p0.forward, xs, s0.forward, lengths=LENGTHS,
                              resets=RESETS)
    yb, _ = rnn.static_unroll(pair.backward, p0.backward, xs, s0.backward, lengths=LENGTHS,
                              resets=RESETS, reverse=True)
    np.testing.assert_allclose(y0, jnp.concatenate([yf, yb], -1), atol=1e-6)
    y1, _ = rnn.static_unroll(cell.layers[1], params[1], y0, state[1], lengths=LENGTHS,
                              resets=RESETS)
    np.testing.assert_allclose(ys, y1, atol=1e-6)
