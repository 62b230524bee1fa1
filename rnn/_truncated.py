"""Truncated backpropagation through time: BPTT(k1, k2) and the stream form."""

import jax
import jax.numpy as jnp

from rnn._compose import steppable
from rnn._unroll import _scan_steps, _to_time_major, prepare, unroll


def detach(state):
  """The stream form of truncation: `stop_gradient` on every leaf of a carried state.

  Training on a long stream cut into windows carries the final state of one window into the
  next; detaching it stops the gradient at the window's start (what `train` does).
  """
  return jax.tree.map(jax.lax.stop_gradient, state)


def _states(cell, params, xs, state, *, lengths, resets, time_major):
  """Every step's state (time-major leaves `[T, ...]`), with no gradient."""
  xs, state, mask, before, init = prepare(cell, params, xs, state, lengths=lengths, resets=resets,
                                          reverse=False, time_major=time_major)
  xw = cell.project(params, _to_time_major(xs, time_major))
  states, _ = _scan_steps(cell, params, xw, state, mask, before, init, reverse=False, unroll=1,
                          remat=False, collect="states")
  return detach(states)


def truncated(cell, params, xs: jax.Array, state, loss_fn, *, k1: int, k2: int,
              lengths: jax.Array | None = None, resets: jax.Array | None = None,
              time_major: bool = False, grad: str = "autodiff"):
  """BPTT(k1, k2): every k1 steps, the last k1 steps' losses are backpropagated k2 steps.

  Returns a surrogate objective whose value is the full loss `sum_t loss_fn(y_t, t)` and whose
  gradient is the truncated one of Williams and Peng (their BPTT(h; h') with h = k2, h' = k1):
  the sequence is cut into blocks of k1 steps; the losses of the block ending at step tau reach
  the parameters used at steps `tau - k2 + 1 .. tau` only, the state before them held constant.
  So a loss at step s sends its gradient between `k2 - k1 + 1` and `k2` steps back. Cost: about
  `T * k2 / k1` steps of forward and backward, the blocks batched with `jax.vmap`.

  ```python
  loss, final = rnn.truncated(cell, params, xs, state, step_loss, k1=5, k2=20)
  grads = jax.grad(lambda p: rnn.truncated(cell, p, xs, state, step_loss, k1=5, k2=20)[0])(params)
  ```

  Args:
    cell: an `rnn.Cell`, or an `rnn.stack` of them (anything that can be stepped; not
      `rnn.bidirectional`).
    params: its params.
    xs: `[B, T, D]` inputs (`[T, B, D]` with `time_major`).
    state: the initial state.
    loss_fn: `loss_fn(y_t [B, O], t) -> scalar`, the loss at step t (`t` a traced int: index
      targets with it, e.g. `targets[:, t]`).
    k1: steps between two backward passes, `1 <= k1 <= k2`.
    k2: how far back each backward pass reaches, `k2 >= k1` (clipped to T).
    lengths: optional `[B]` int, as `rnn.unroll`: padded steps keep the state and give
      `y_t = 0` (mask them in `loss_fn`) and no gradient.
    resets: optional `[B, T]` bool (`[T, B]` with `time_major`), as `rnn.unroll`: the first step
      of each segment, before which the state returns to its initial value.
    time_major: `xs` is `[T, B, D]`.
    grad: passed to `rnn.unroll` for each window.

  Returns:
    `(loss, final)`: the scalar surrogate and the state after the last step (detached: the
    stream form carries it on to the next window).

  References:
    Williams and Peng, An efficient gradient-based algorithm for on-line training of recurrent
      network trajectories, 1990. https://doi.org/10.1162/neco.1990.2.4.490
  """
  for name, v in (("k1", k1), ("k2", k2)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"`{name}` must be a positive int; got {v!r}.")
  if k2 < k1:
    raise ValueError(f"`k2` must be at least `k1` ({k1}); got {k2}.")
  if not steppable(cell):
    raise ValueError(f"`cell` must be steppable (an rnn.Cell or a stack of them); got "
                     f"{type(cell).__name__}, which has no truncated form.")
  # Every check of `unroll` (shapes, dtypes, lengths in range) on the whole sequence.
  jax.eval_shape(lambda: unroll(cell, params, xs, state, lengths=lengths, resets=resets,
                                time_major=time_major, grad=grad))
  xs_tm = _to_time_major(xs, time_major)
  resets_tm = None if resets is None else _to_time_major(resets[..., None], time_major)[..., 0]
  num_steps = xs_tm.shape[0]
  k2 = min(k2, num_steps)
  num_blocks = -(-num_steps // k1)

  states = _states(cell, params, xs, state, lengths=lengths, resets=resets, time_major=time_major)
  ends = jnp.minimum((jnp.arange(num_blocks) + 1) * k1, num_steps) - 1  # tau_b
  starts = jnp.clip(ends - k2 + 1, 0, num_steps - k2)
  firsts = jnp.arange(num_blocks) * k1  # the block's first loss step

  def block_loss(start, first, end):
    idx = start + jnp.arange(k2)
    take = lambda s0, s: jnp.where(start == 0, s0.astype(s.dtype), s[jnp.maximum(start - 1, 0)])
    state0 = jax.tree.map(take, state, states)
    window = jnp.take(xs_tm, idx, axis=0)
    window_resets = None if resets_tm is None else jnp.take(resets_tm, idx, axis=0)
    window_lengths = None if lengths is None else jnp.clip(lengths - start, 0, k2)
    ys, _ = unroll(cell, params, window, state0, lengths=window_lengths, resets=window_resets,
                   time_major=True, grad=grad)
    losses = jax.vmap(loss_fn)(ys, idx)
    in_block = (idx >= first) & (idx <= end)
    return jnp.sum(jnp.where(in_block, losses, jnp.zeros_like(losses)))

  loss = jnp.sum(jax.vmap(block_loss)(starts, firsts, ends))
  final = jax.tree.map(lambda s: s[-1], states)
  return loss, final
