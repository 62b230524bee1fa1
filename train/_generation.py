"""Generation from any autoregressive model: sampling (temperature, top-k) and beam search.

Both algorithms see the model only through a step function

```
state, log_probs_BxV = step_fn(state, token_ids_B)
```

that feeds one token per sequence and returns the model's normalized log-probabilities of the
next token. `state` is any pytree whose leaves have the batch as their leading axis (an RNN's
state, a cache of past tokens, nothing at all for a fixed Markov chain). Shapes are static and
the loops are `jax.lax.scan`s, so both functions compile once under `jax.jit` (with `step_fn`,
`num_tokens` and the keyword hyperparameters static).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

StepFn = Callable[[Any, jax.Array], tuple[Any, jax.Array]]


def _check_prompt(prompt, state):
  """Checks `prompt [B, P]` (P >= 1, integers) against the state's batch axis; returns B."""
  if jnp.ndim(prompt) != 2 or jnp.shape(prompt)[1] < 1:
    raise ValueError(f"`prompt` must be [B, P] token ids with P >= 1; got shape "
                     f"{jnp.shape(prompt)}.")
  if not jnp.issubdtype(jnp.result_type(prompt), jnp.integer):
    raise ValueError(f"`prompt` must be integer token ids; got dtype {jnp.result_type(prompt)}.")
  batch_size = jnp.shape(prompt)[0]
  for leaf in jax.tree.leaves(state):
    if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != batch_size:
      raise ValueError(f"`state` leaves must have the batch B = {batch_size} (the rows of "
                       f"`prompt`) as leading axis; got a leaf of shape {jnp.shape(leaf)}.")
  return batch_size


def _check_count(value, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"`{name}` must be an int >= {minimum}; got {value!r}.")
  return value


def _output_spec(step_fn: StepFn, state, tokens_N) -> tuple[int, Any]:
  """Traces one call of `step_fn` (no computation) and returns V and the log-probs' dtype."""
  rows = tokens_N.shape[0]
  _, log_probs = jax.eval_shape(step_fn, state, tokens_N)
  if len(log_probs.shape) != 2 or log_probs.shape[0] != rows:
    raise ValueError(f"`step_fn` must return log-probabilities [B, V] with B = {rows}; got shape "
                     f"{log_probs.shape}.")
  if not jnp.issubdtype(log_probs.dtype, jnp.floating):
    raise ValueError(f"`step_fn` must return floating log-probabilities; got dtype "
                     f"{log_probs.dtype}.")
  return log_probs.shape[1], log_probs.dtype


def _check_eos(eos_id, vocab_size: int) -> None:
  if eos_id is None:
    return
  if isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < vocab_size:
    raise ValueError(f"`eos_id` must be None or an int in [0, {vocab_size}) (V = {vocab_size}); "
                     f"got {eos_id!r}.")


def _feed(step_fn: StepFn, state, tokens_BxP):
  """Runs `step_fn` over the P columns of `tokens_BxP` and returns the state; log-probs dropped."""

  def body(state_tm1, token_t):
    state_t, _ = step_fn(state_tm1, token_t)
    return state_t, None

  state, _ = jax.lax.scan(body, state, jnp.moveaxis(tokens_BxP, 1, 0))
  return state


def _draw(key, log_probs_BxV, temperature: float, top_k: int | None):
  """One token per row from `softmax(log_probs / temperature)` restricted to the top k."""
  if temperature == 0.0:
    return jnp.argmax(log_probs_BxV, axis=-1).astype(jnp.int32)
  scaled = log_probs_BxV / jnp.asarray(temperature, log_probs_BxV.dtype)
  if top_k is None:
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
  values_BxK, ids_BxK = jax.lax.top_k(scaled, top_k)
  choice_B = jax.random.categorical(key, values_BxK, axis=-1)
  return jnp.take_along_axis(ids_BxK, choice_B[:, None], axis=1)[:, 0].astype(jnp.int32)


def sample(step_fn: StepFn, state, prompt: jax.Array, num_tokens: int, *, key: jax.Array,
           temperature: float = 1.0, top_k: int | None = None,
           eos_id: int | None = None) -> jax.Array:
  """Ancestral sampling of `num_tokens` tokens after a prompt, with temperature and top-k.

  The prompt is fed token by token; then, for t = 0 .. num_tokens - 1,

  ```
  state, log p(. | x_<t) = step_fn(state, x_{t-1})         # x_{-1}: the last prompt token
  x_t ~ softmax(log p(. | x_<t) / temperature)   over the top_k most probable ids only
  ```

  Temperature below 1 sharpens the distribution, above 1 flattens it, and 0 is greedy decoding
  (argmax, no randomness). Top-k sampling renormalizes over the k most probable tokens and
  never draws the others. Step t draws with its own key from `jax.random.split(key,
  num_tokens)`, so no key is used twice. With `eos_id`, every token after a sequence's first
  `eos_id` is `eos_id` (the sequence is over; the model is still stepped, shapes stay static).

  Args:
    step_fn: `step_fn(state, token_ids [B]) -> (state, log_probs [B, V])`, the model's next-token
      log-probabilities after feeding one token per sequence.
    state: the model state before the prompt, a pytree whose leaves are `[B, ...]`.
    prompt: `[B, P]` int token ids, P >= 1.
    num_tokens: the number of tokens to generate after the prompt.
    key: a `jax.random.key`.
    temperature: a float >= 0; the log-probabilities are divided by it (0: greedy).
    top_k: None (the whole vocabulary) or an int in `[1, V]`: draw among the k most probable
      tokens only (`top_k=1` is greedy).
    eos_id: optional end-of-sequence id; tokens after the first one are set to it.

  Returns:
    `[B, num_tokens]` int32 token ids.

  References:
    Fan, Lewis and Dauphin, Hierarchical neural story generation, 2018.
      https://arxiv.org/abs/1805.04833
  """
  batch_size = _check_prompt(prompt, state)
  _check_count(num_tokens, "num_tokens", 1)
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
      or not temperature >= 0:
    raise ValueError(f"`temperature` must be a float >= 0; got {temperature!r}.")
  if top_k is not None:
    _check_count(top_k, "top_k", 1)
  prompt = jnp.asarray(prompt).astype(jnp.int32)
  vocab_size, _ = _output_spec(step_fn, state, prompt[:, 0])
  if top_k is not None and top_k > vocab_size:
    raise ValueError(f"`top_k` must be at most V = {vocab_size}; got {top_k}.")
  _check_eos(eos_id, vocab_size)
  state = _feed(step_fn, state, prompt[:, :-1])

  def body(carry, key_t):
    state_tm1, token_tm1, done_tm1 = carry
    state_t, log_probs = step_fn(state_tm1, token_tm1)
    token_t = _draw(key_t, log_probs, float(temperature), top_k)
    if eos_id is not None:
      token_t = jnp.where(done_tm1, jnp.int32(eos_id), token_t)
      done_tm1 = done_tm1 | (token_t == eos_id)
    return (state_t, token_t, done_tm1), token_t

  done = jnp.zeros((batch_size,), bool)
  keys = jax.random.split(key, num_tokens)
  _, tokens_TxB = jax.lax.scan(body, (state, prompt[:, -1], done), keys)
  return jnp.moveaxis(tokens_TxB, 0, 1)


def _length_penalty(lengths, alpha: float, dtype):
  """GNMT's `lp(|Y|) = ((5 + |Y|) / 6) ** alpha`."""
  return ((5.0 + lengths.astype(dtype)) / 6.0) ** jnp.asarray(alpha, dtype)


def beam_search(step_fn: StepFn, state, prompt: jax.Array, num_tokens: int, *, beam_size: int,
                eos_id: int | None = None,
                length_penalty: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Beam search: the `beam_size` most probable continuations of `num_tokens` tokens.

  After the prompt, the state is replicated to `B * beam_size` rows (row `b * beam_size + k` is
  beam k of sequence b). At every step each beam is extended by every token, and the
  `beam_size` best of the `beam_size * V` candidates of each sequence survive, ranked by

  ```
  score(y) = sum_t log p(y_t | y_<t, prompt) / lp(|y|),   lp(n) = ((5 + n) / 6) ** length_penalty
  ```

  (`lp = 1` for the default `length_penalty=0`: the plain sum of log-probabilities). The states
  of the survivors are gathered from their parents' rows. Only beam 0 is live at the first step,
  so no continuation is found twice. With `eos_id`, a beam that has produced `eos_id` is
  finished: it keeps its score and length and extends only with `eos_id` at no cost, so it
  competes with the live beams on equal terms. Rows that could not be filled (fewer distinct
  continuations than beams) score `-inf`.

  Args:
    step_fn: `step_fn(state, token_ids [N]) -> (state, log_probs [N, V])`, called with
      `N = B * beam_size`.
    state: the model state before the prompt, a pytree whose leaves are `[B, ...]`.
    prompt: `[B, P]` int token ids, P >= 1.
    num_tokens: the length of the continuations.
    beam_size: the number of beams per sequence (1: greedy decoding).
    eos_id: optional end-of-sequence id; tokens after a beam's first one are `eos_id`.
    length_penalty: alpha of the length normalization (0: none; larger favours longer
      continuations). The length of a finished beam counts its tokens up to and including its
      first `eos_id`.

  Returns:
    `(sequences, scores)`: `sequences [B, beam_size, num_tokens]` int32 and `scores
    [B, beam_size]`, best first.

  References:
    Graves, Sequence transduction with recurrent neural networks, 2012.
      https://arxiv.org/abs/1211.3711
    Sutskever, Vinyals and Le, Sequence to sequence learning with neural networks, 2014.
      https://arxiv.org/abs/1409.3215
    Wu et al., Google's neural machine translation system: bridging the gap between human and
      machine translation, 2016 (the length penalty). https://arxiv.org/abs/1609.08144
  """
  batch_size = _check_prompt(prompt, state)
  _check_count(num_tokens, "num_tokens", 1)
  _check_count(beam_size, "beam_size", 1)
  if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
    raise ValueError(f"`length_penalty` must be a float; got {length_penalty!r}.")
  prompt = jnp.asarray(prompt).astype(jnp.int32)
  vocab_size, dtype = _output_spec(step_fn, state, prompt[:, 0])
  _check_eos(eos_id, vocab_size)
  score_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
  state = _feed(step_fn, state, prompt[:, :-1])
  # Row b * beam_size + k holds beam k of sequence b.
  state = jax.tree.map(lambda leaf: jnp.repeat(leaf, beam_size, axis=0), state)
  tokens = jnp.repeat(prompt[:, -1], beam_size)
  rows = batch_size * beam_size

  def body(carry, t):
    state_tm1, token_tm1, log_p_BxK, finished_BxK, length_BxK, seqs_BxKxT = carry
    state_t, log_probs = step_fn(state_tm1, token_tm1)
    log_probs_BxKxV = log_probs.astype(score_dtype).reshape(batch_size, beam_size, vocab_size)
    if eos_id is not None:
      # A finished beam extends only with eos, at log-probability 0.
      only_eos = jnp.where(jnp.arange(vocab_size) == eos_id, 0.0, -jnp.inf).astype(score_dtype)
      log_probs_BxKxV = jnp.where(finished_BxK[..., None], only_eos[None, None, :],
                                  log_probs_BxKxV)
    cand_log_p_BxKxV = log_p_BxK[..., None] + log_probs_BxKxV
    cand_length_BxK = jnp.where(finished_BxK, length_BxK, t + 1)
    cand_score_BxKxV = cand_log_p_BxKxV
    if length_penalty:
      lp_BxK = _length_penalty(cand_length_BxK, length_penalty, score_dtype)
      cand_score_BxKxV = cand_log_p_BxKxV / lp_BxK[..., None]
    flat_score = cand_score_BxKxV.reshape(batch_size, beam_size * vocab_size)
    _, best_BxK = jax.lax.top_k(flat_score, beam_size)
    parent_BxK = best_BxK // vocab_size
    token_BxK = (best_BxK % vocab_size).astype(jnp.int32)
    log_p_BxK = jnp.take_along_axis(
        cand_log_p_BxKxV.reshape(batch_size, beam_size * vocab_size), best_BxK, axis=1)
    length_BxK = jnp.take_along_axis(cand_length_BxK, parent_BxK, axis=1)
    finished_BxK = jnp.take_along_axis(finished_BxK, parent_BxK, axis=1)
    if eos_id is not None:
      finished_BxK = finished_BxK | (token_BxK == eos_id)
    seqs_BxKxT = jnp.take_along_axis(seqs_BxKxT, parent_BxK[..., None], axis=1)
    seqs_BxKxT = jax.lax.dynamic_update_index_in_dim(seqs_BxKxT, token_BxK, t, axis=2)
    parent_rows = (jnp.arange(batch_size)[:, None] * beam_size + parent_BxK).reshape(rows)
    state_t = jax.tree.map(lambda leaf: jnp.take(leaf, parent_rows, axis=0), state_t)
    carry = (state_t, token_BxK.reshape(rows), log_p_BxK, finished_BxK, length_BxK, seqs_BxKxT)
    return carry, None

  # Only beam 0 is live at the start; the others would repeat its continuations.
  log_p = jnp.where(jnp.arange(beam_size) == 0, 0.0, -jnp.inf)
  log_p = jnp.broadcast_to(log_p[None, :], (batch_size, beam_size)).astype(score_dtype)
  carry = (state, tokens, log_p, jnp.zeros((batch_size, beam_size), bool),
           jnp.zeros((batch_size, beam_size), jnp.int32),
           jnp.zeros((batch_size, beam_size, num_tokens), jnp.int32))
  carry, _ = jax.lax.scan(body, carry, jnp.arange(num_tokens))
  _, _, log_p, _, length, seqs = carry
  scores = log_p
  if length_penalty:
    scores = log_p / _length_penalty(length, length_penalty, log_p.dtype)
  return seqs, scores
