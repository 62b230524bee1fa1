"""Adaptive softmax (Grave et al. 2017), as PyTorch's AdaptiveLogSoftmaxWithLoss computes it."""

import functools
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from softmax_alts._base import OutputLayer, check_hidden, check_targets, nan_where_invalid


class AdaptiveParams(NamedTuple):
  """Parameters of the adaptive softmax, in PyTorch's `(out_features, in_features)` layout.

  With shortlist S = cutoffs[0], K clusters and h_i = H // div_value**(i+1):

  | field                 | shape                  | PyTorch `AdaptiveLogSoftmaxWithLoss` |
  | --------------------- | ---------------------- | ------------------------------------ |
  | `head`                | `[S + K, H]`           | `head.weight`                        |
  | `head_bias`           | `[S + K]` or None      | `head.bias` (only with `head_bias`)  |
  | `tail_projections[i]` | `[h_i, H]`             | `tail[i][0].weight`                  |
  | `tail_outputs[i]`     | `[cluster_size_i, h_i]`| `tail[i][1].weight`                  |

  Attributes:
    head: `[S + K, H]` the shortlist words' vectors, then one vector per cluster.
    head_bias: `[S + K]` the head's bias, or None (the default, as PyTorch's `head_bias=False`).
    tail_projections: per cluster, `[h_i, H]` the projection of h to the cluster's width.
    tail_outputs: per cluster, `[cluster_size_i, h_i]` the cluster words' vectors.
  """

  head: jax.Array
  head_bias: jax.Array | None
  tail_projections: tuple[jax.Array, ...]
  tail_outputs: tuple[jax.Array, ...]


def _check_cutoffs(cutoffs) -> tuple[int, ...]:
  """Returns `cutoffs` as a tuple of ints, or raises `ValueError`."""
  try:
    values = tuple(cutoffs)
  except TypeError:
    raise ValueError(f"`cutoffs` must be a sequence of increasing ids in (0, V); "
                     f"got {cutoffs!r}.") from None
  if not values:
    raise ValueError("`cutoffs` must hold at least one id in (0, V); got an empty sequence.")
  if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in values):
    raise ValueError(f"`cutoffs` must be ints; got {values!r}.")
  values = tuple(int(c) for c in values)
  if values[0] <= 0:
    raise ValueError(f"`cutoffs` must be ids in (0, V), so cutoffs[0] > 0; got {list(values)}.")
  if any(b <= a for a, b in zip(values, values[1:])):
    raise ValueError(f"`cutoffs` must be strictly increasing (no duplicates); "
                     f"got {list(values)}.")
  return values


# A tail's loss needs the cluster's logits for its member rows only, and under Zipf's law they
# are few; with static shapes their number is known only at run time. The member rows are
# packed first (`_pack`) and the work is two nested loops: the outer one over chunks of
# `_VOCAB_CHUNK` cluster words (a static count), the inner one over blocks of `_BLOCK_ROWS`
# packed rows (a trip count of ceil(members / B), known at run time). Each chunk of the
# cluster's output vectors is read once and used by every block of rows while it is in cache,
# with an online log-sum-exp, so the cost is about members * (H h + h cluster_size) flops and
# one pass over the cluster's vectors per pass, and nothing of size [members, cluster_size]
# is ever built. The backward pass runs the same loops, recomputing the logits, and writes each
# chunk's gradient once.
_BLOCK_ROWS = 64
_VOCAB_CHUNK = 8192


def _pack(member, block: int):
  """Row ids of the `member` rows first (padded to a multiple of `block`), and their count."""
  num_rows = member.shape[0]
  padded = -(-num_rows // block) * block
  slot = jnp.cumsum(member, dtype=jnp.int32) - 1
  rows = jnp.zeros((padded,), jnp.int32).at[jnp.where(member, slot, padded)].set(
      jnp.arange(num_rows, dtype=jnp.int32), mode="drop")
  return rows, jnp.sum(member, dtype=jnp.int32)


def _dot_rows(x, rows):
  """`x [n, k]` times `rows [m, k]` transposed, contracting the last axes: `[n, m]`."""
  return jax.lax.dot_general(x, rows, (((1,), (1,)), ((), ())))


def _chunk_of(output, j, chunk):
  """Chunk j of the cluster's vectors (the last one clamped to the end) and its fresh ids."""
  size = output.shape[0]
  start = jnp.minimum(j * chunk, size - chunk)
  fresh = start + jnp.arange(chunk, dtype=jnp.int32) >= j * chunk
  return start, jax.lax.dynamic_slice_in_dim(output, start, chunk, 0), fresh


def _tail_setup(hidden, projection, member):
  block = min(_BLOCK_ROWS, hidden.shape[0])
  rows, count = _pack(member, block)
  z = _dot_rows(hidden[rows], projection)                                # [P, h], packed
  real = jnp.arange(rows.shape[0], dtype=jnp.int32) < count
  return block, rows, count, z, real


@jax.custom_vjp
def _tail_log_prob(hidden, projection, output, relative, member) -> jax.Array:
  """log p(w | cluster, h) = log softmax(O (P h))_relative for the `member` rows, 0 elsewhere.

  Args:
    hidden: `[N, H]`.
    projection: `[h, H]` the cluster's projection P.
    output: `[cluster_size, h]` the cluster's word vectors O.
    relative: `[N]` int32 target ids within the cluster (any value in range where not member).
    member: `[N]` bool, True where the target is in the cluster.

  Returns:
    `[N]` the log-probabilities within the cluster, 0 where not `member`.
  """
  return _tail_forward(hidden, projection, output, relative, member)[0]


def _tail_forward(hidden, projection, output, relative, member):
  num_rows = hidden.shape[0]
  if num_rows == 0:
    return jnp.zeros((0,), hidden.dtype), (hidden, projection, output) + (None,) * 6
  block, rows, count, z, real = _tail_setup(hidden, projection, member)
  chunk = min(_VOCAB_CHUNK, output.shape[0])
  num_blocks = (count + block - 1) // block

  def over_chunks(j, carry):
    _, o_chunk, fresh = _chunk_of(output, j, chunk)

    def over_rows(b, carry):
      m, s = carry
      logits = jnp.where(fresh[None, :],
                         _dot_rows(jax.lax.dynamic_slice_in_dim(z, b * block, block, 0),
                                   o_chunk), -jnp.inf)
      m_prev = jax.lax.dynamic_slice_in_dim(m, b * block, block, 0)
      s_prev = jax.lax.dynamic_slice_in_dim(s, b * block, block, 0)
      m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1))
      s_new = (s_prev * jnp.exp(m_prev - m_new)
               + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1))
      return (jax.lax.dynamic_update_slice_in_dim(m, m_new, b * block, 0),
              jax.lax.dynamic_update_slice_in_dim(s, s_new, b * block, 0))

    return jax.lax.fori_loop(0, num_blocks, over_rows, carry)

  packed = rows.shape[0]
  m, s = jax.lax.fori_loop(0, -(-output.shape[0] // chunk), over_chunks,
                           (jnp.full((packed,), -jnp.inf, z.dtype), jnp.zeros((packed,), z.dtype)))
  lse = jnp.where(real, m + jnp.log(s), 0)
  target = relative[rows]
  value = jnp.sum(z * output[target], axis=1) - lse
  values = jnp.zeros((num_rows,), hidden.dtype).at[jnp.where(real, rows, num_rows)].set(
      value.astype(hidden.dtype), mode="drop")
  return values, (hidden, projection, output, rows, real, z, target, lse, num_blocks)


def _tail_backward(residuals, cotangent):
  hidden, projection, output, rows, real, z, target, lse, num_blocks = residuals
  if rows is None:  # an empty batch
    return jnp.zeros_like(hidden), jnp.zeros_like(projection), jnp.zeros_like(output), None, None
  num_rows = hidden.shape[0]
  block = min(_BLOCK_ROWS, num_rows)
  chunk = min(_VOCAB_CHUNK, output.shape[0])
  g = jnp.where(real, cotangent[rows], 0).astype(z.dtype)                # [P]

  def over_chunks(j, carry):
    dz, d_output = carry
    start, o_chunk, fresh = _chunk_of(output, j, chunk)

    def over_rows(b, carry):
      dz, d_chunk = carry
      z_b = jax.lax.dynamic_slice_in_dim(z, b * block, block, 0)
      lse_b = jax.lax.dynamic_slice_in_dim(lse, b * block, block, 0)
      g_b = jax.lax.dynamic_slice_in_dim(g, b * block, block, 0)
      # d/dlogits of (logit_target - logsumexp) is onehot(target) - softmax, times g; the
      # one-hot part is added after the loops, on the target rows of O only.
      d_logits = jnp.where(fresh[None, :],
                           -g_b[:, None] * jnp.exp(_dot_rows(z_b, o_chunk) - lse_b[:, None]), 0)
      dz = jax.lax.dynamic_update_slice_in_dim(
          dz, jax.lax.dynamic_slice_in_dim(dz, b * block, block, 0) + d_logits @ o_chunk,
          b * block, 0)
      return dz, d_chunk + jax.lax.dot_general(d_logits, z_b, (((0,), (0,)), ((), ())))

    dz, d_chunk = jax.lax.fori_loop(0, num_blocks, over_rows,
                                    (dz, jnp.zeros((chunk, z.shape[1]), z.dtype)))
    d_output = jax.lax.dynamic_update_slice_in_dim(
        d_output, jax.lax.dynamic_slice_in_dim(d_output, start, chunk, 0) + d_chunk, start, 0)
    return dz, d_output

  dz, d_output = jax.lax.fori_loop(0, -(-output.shape[0] // chunk), over_chunks,
                                   (jnp.zeros_like(z), jnp.zeros_like(output)))
  dz = dz + g[:, None] * output[target]
  d_output = d_output.at[target].add(g[:, None] * z)
  d_hidden = jnp.zeros_like(hidden).at[jnp.where(real, rows, num_rows)].add(
      dz @ projection, mode="drop")
  d_projection = jax.lax.dot_general(dz, hidden[rows], (((0,), (0,)), ((), ())))
  return d_hidden, d_projection, d_output, None, None


_tail_log_prob.defvjp(_tail_forward, _tail_backward)


def _tail_log_probs(hidden, projection, output) -> jax.Array:
  """`[N, C]` log softmax over a cluster's words, for every row."""
  return jax.nn.log_softmax((hidden @ projection.T) @ output.T, axis=1)


def _head_log_probs(params, hidden) -> jax.Array:
  """`[N, S + K]` log softmax over the shortlist and the clusters."""
  logits = hidden @ params.head.T
  if params.head_bias is not None:
    logits = logits + params.head_bias[None, :]
  return jax.nn.log_softmax(logits, axis=1)


def _log_prob_fns(cuts: tuple[int, ...], tail_log_prob, tail_log_probs):
  """`(target_log_prob(params, hidden, targets) -> [N], all_log_probs(params, hidden) -> [N, V])`,
  jitted, from a cluster's `tail_log_prob(hidden, projection, output, relative, member)` and
  `tail_log_probs(hidden, projection, output)`: shared by `adaptive` and its vocab-parallel form.

  They are jitted once here (the input checks stay outside, so that a bad id raises eagerly);
  called under an outer `jit`, they are inlined.
  """
  shortlist, num_clusters = cuts[0], len(cuts)

  @jax.jit
  def target_log_prob(params, hidden, targets) -> jax.Array:
    vocab_size = cuts[-1] + params.tail_outputs[-1].shape[0]
    valid = (targets >= 0) & (targets < vocab_size)  # NaN for a bad id under jit
    targets = jnp.where(valid, targets, 0).astype(jnp.int32)
    bounds = list(cuts) + [vocab_size]
    cluster = jnp.searchsorted(jnp.asarray(cuts, jnp.int32), targets, side="right")  # 0: head
    cluster = cluster.astype(jnp.int32)
    head_index = jnp.where(cluster == 0, targets, shortlist + cluster - 1)
    head = _head_log_probs(params, hidden)
    total = jnp.take_along_axis(head, head_index[:, None], axis=1)[:, 0]
    for i in range(num_clusters):
      relative = jnp.clip(targets - bounds[i], 0, bounds[i + 1] - bounds[i] - 1)
      total = total + tail_log_prob(hidden, params.tail_projections[i], params.tail_outputs[i],
                                    relative, cluster == i + 1)
    return nan_where_invalid(total, valid)

  @jax.jit
  def all_log_probs(params, hidden) -> jax.Array:
    head = _head_log_probs(params, hidden)
    parts = [head[:, :shortlist]]
    for i in range(num_clusters):
      tail = tail_log_probs(hidden, params.tail_projections[i], params.tail_outputs[i])
      parts.append(tail + head[:, shortlist + i:shortlist + i + 1])
    return jnp.concatenate(parts, axis=1)

  return target_log_prob, all_log_probs


def adaptive(cutoffs: Sequence[int], *, div_value: float = 4.0,
             head_bias: bool = False) -> OutputLayer:
  """Adaptive softmax: a head over the shortlist and the clusters, low-rank tails per cluster.

  With cutoffs c_0 < .. < c_{K-1} (and c_K = V), the head scores the shortlist words
  `[0, c_0)` and one entry per cluster; cluster i holds the words `[c_i, c_{i+1})` and is
  scored through a projection to h_i = H // div_value**(i+1) dimensions:

    log p(w | h) = log softmax(A h + a)_w                             for w < c_0,
    log p(w | h) = log softmax(A h + a)_{c_0+i}
                   + log softmax(O_i (P_i h))_{w - c_i}               for c_i <= w < c_{i+1}.

  Exactly PyTorch's `torch.nn.AdaptiveLogSoftmaxWithLoss` (same parameters, same numbers; see
  `AdaptiveParams` for the layout, `adaptive_from_torch` to copy a module's weights). The loss
  computes the head for every row but a tail only for the rows whose target falls in it: they
  are packed first and processed in blocks of 32 rows by a loop whose trip count is known only
  at run time (static shapes throughout), so a frequent target costs O(H * (c_0 + K)) and a
  rare one adds O(H * h_i + h_i * cluster_size_i). The tails' backward pass is hand-written
  (`jax.custom_vjp`, the same loop): `loss` and `log_prob` support first-order reverse mode
  (`grad`, `vjp`), not forward mode; `log_probs` is plain autodiff.

  Example:
    >>> layer = adaptive([2000, 10000])  # V = 100K: shortlist 2000, clusters of 8K and 90K
    >>> params = layer.init(key, 512, 100_000)
    >>> loss = layer.loss(params, hidden, targets).mean()

  Args:
    cutoffs: increasing ids in (0, V); `cutoffs[0]` is the shortlist size.
    div_value: the divisor of the tail widths, h_i = H // div_value**(i+1).
    head_bias: whether the head has a bias (PyTorch's default: no).

  Returns:
    An `OutputLayer` with `AdaptiveParams`. `loss` is the exact NLL `[N]` (its `key` is unused),
    `log_prob` `[N]`, `log_probs` `[N, V]`. V is fixed at `init` (it must exceed cutoffs[-1]).

  References:
    Grave, Joulin, Cisse, Grangier and Jegou, "Efficient softmax approximation for GPUs", 2017.
    https://arxiv.org/abs/1609.04309
  """
  cuts = _check_cutoffs(cutoffs)
  if isinstance(div_value, bool) or not isinstance(div_value, (int, float)) or not div_value > 0:
    raise ValueError(f"`div_value` must be a positive number; got {div_value!r}.")
  shortlist, num_clusters = cuts[0], len(cuts)

  def widths(hidden_size: int) -> list[int]:
    return [int(hidden_size // (div_value ** (i + 1))) for i in range(num_clusters)]

  @functools.partial(jax.jit, static_argnums=(1, 2), static_argnames=("dtype",))
  def init(key, hidden_size: int, vocab_size: int, *, dtype=jnp.float32) -> AdaptiveParams:
    """Every weight uniform in +-1/sqrt(fan_in), as PyTorch's `Linear` (and its module)."""
    if hidden_size < 1:
      raise ValueError(f"`hidden_size` must be >= 1; got {hidden_size}.")
    if vocab_size <= cuts[-1]:
      raise ValueError(f"`cutoffs` must be ids in (0, V) = (0, {vocab_size}); "
                       f"got {list(cuts)}.")
    bounds = list(cuts) + [vocab_size]
    head_size = shortlist + num_clusters
    # (shape, fan_in) of every tensor, in the field order; one uniform draw for them all.
    specs = [((head_size, hidden_size), hidden_size)]
    specs += [((head_size,), hidden_size)] if head_bias else []
    specs += [((h, hidden_size), hidden_size) for h in widths(hidden_size)]
    specs += [((bounds[i + 1] - bounds[i], h), h) for i, h in enumerate(widths(hidden_size))]
    sizes = [int(np.prod(shape)) for shape, _ in specs]
    flat = jax.random.uniform(key, (sum(sizes),), dtype, -1.0, 1.0)
    parts = iter(
        (part * (float(fan_in) ** -0.5 if fan_in > 0 else 0.0)).astype(dtype).reshape(shape)
        for part, (shape, fan_in) in zip(jnp.split(flat, np.cumsum(sizes)[:-1].tolist()),
                                         specs))
    return AdaptiveParams(
        head=next(parts),
        head_bias=next(parts) if head_bias else None,
        tail_projections=tuple(next(parts) for _ in range(num_clusters)),
        tail_outputs=tuple(next(parts) for _ in range(num_clusters)))

  def vocab_of(params: AdaptiveParams, hidden) -> int:
    """V, from the shapes of `params`, after checking them against `hidden` (trace time)."""
    hidden_size = jnp.shape(hidden)[1]
    head_size = shortlist + num_clusters
    if jnp.shape(params.head) != (head_size, hidden_size):
      raise ValueError(f"`params.head` must be [cutoffs[0] + num_clusters, H] = "
                       f"[{head_size}, {hidden_size}]; got {jnp.shape(params.head)}.")
    if head_bias != (params.head_bias is not None):
      raise ValueError(f"`params.head_bias` must be {'an array' if head_bias else 'None'} "
                       f"(head_bias={head_bias}); got {type(params.head_bias).__name__}.")
    if head_bias and jnp.shape(params.head_bias) != (head_size,):
      raise ValueError(f"`params.head_bias` must be [{head_size}]; "
                       f"got {jnp.shape(params.head_bias)}.")
    if len(params.tail_projections) != num_clusters or len(params.tail_outputs) != num_clusters:
      raise ValueError(f"`params` must hold {num_clusters} tails; got "
                       f"{len(params.tail_projections)} and {len(params.tail_outputs)}.")
    vocab_size = cuts[-1] + jnp.shape(params.tail_outputs[-1])[0]
    bounds = list(cuts) + [vocab_size]
    for i, h in enumerate(widths(hidden_size)):
      size = bounds[i + 1] - bounds[i]
      if jnp.shape(params.tail_projections[i]) != (h, hidden_size):
        raise ValueError(f"`params.tail_projections[{i}]` must be [{h}, {hidden_size}]; "
                         f"got {jnp.shape(params.tail_projections[i])}.")
      if jnp.shape(params.tail_outputs[i]) != (size, h):
        raise ValueError(f"`params.tail_outputs[{i}]` must be [{size}, {h}]; "
                         f"got {jnp.shape(params.tail_outputs[i])}.")
    return vocab_size

  target_log_prob, all_log_probs = _log_prob_fns(cuts, _tail_log_prob, _tail_log_probs)

  def log_prob(params: AdaptiveParams, hidden, targets) -> jax.Array:
    check_hidden(hidden)
    params, hidden = jax.tree.map(jnp.asarray, params), jnp.asarray(hidden)
    vocab_size = vocab_of(params, hidden)
    check_targets(targets, vocab_size, jnp.shape(hidden)[0])  # raises on a bad id outside jit
    return target_log_prob(params, hidden, jnp.asarray(targets))

  def loss(params: AdaptiveParams, hidden, targets, *, key=None) -> jax.Array:
    del key  # exact: nothing is sampled
    return -log_prob(params, hidden, targets)

  def log_probs(params: AdaptiveParams, hidden) -> jax.Array:
    check_hidden(hidden)
    params, hidden = jax.tree.map(jnp.asarray, params), jnp.asarray(hidden)
    vocab_of(params, hidden)
    return all_log_probs(params, hidden)

  return OutputLayer(init=init, loss=loss, log_prob=log_prob, log_probs=log_probs)


def _to_numpy(value) -> np.ndarray:
  """A numpy copy of an array or a tensor (detached and moved to host when it is one)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def adaptive_from_torch(tensors: Mapping[str, Any]) -> AdaptiveParams:
  """`AdaptiveParams` from the `state_dict()` of a PyTorch `AdaptiveLogSoftmaxWithLoss`.

  Args:
    tensors: arrays (numpy, or tensors) keyed by PyTorch's names: `head.weight`, `head.bias`
      (only with `head_bias=True`), `tail.{i}.0.weight` and `tail.{i}.1.weight`.

  Returns:
    `AdaptiveParams` of jax arrays with the same dtypes (see its table for the layout).
  """
  if "head.weight" not in tensors:
    raise ValueError(f"`tensors` must hold `head.weight`; got keys {sorted(tensors)}.")
  num_clusters = 0
  while f"tail.{num_clusters}.0.weight" in tensors:
    num_clusters += 1
  if num_clusters == 0:
    raise ValueError(f"`tensors` must hold `tail.0.0.weight` and `tail.0.1.weight`; "
                     f"got keys {sorted(tensors)}.")
  return AdaptiveParams(
      head=jnp.asarray(_to_numpy(tensors["head.weight"])),
      head_bias=(jnp.asarray(_to_numpy(tensors["head.bias"])) if "head.bias" in tensors
                 else None),
      tail_projections=tuple(jnp.asarray(_to_numpy(tensors[f"tail.{i}.0.weight"]))
                             for i in range(num_clusters)),
      tail_outputs=tuple(jnp.asarray(_to_numpy(tensors[f"tail.{i}.1.weight"]))
                         for i in range(num_clusters)))


def adaptive_to_torch(params: AdaptiveParams) -> dict[str, np.ndarray]:
  """Numpy arrays keyed by PyTorch's names, for `AdaptiveLogSoftmaxWithLoss.load_state_dict`.

  Args:
    params: `AdaptiveParams`.

  Returns:
    A dict `{"head.weight": .., ["head.bias": ..,] "tail.{i}.0.weight": .., "tail.{i}.1.weight":
    ..}` of numpy arrays (convert each with `torch.from_numpy` before loading).
  """
  tensors = {"head.weight": np.asarray(params.head)}
  if params.head_bias is not None:
    tensors["head.bias"] = np.asarray(params.head_bias)
  for i, (projection, output) in enumerate(zip(params.tail_projections, params.tail_outputs)):
    tensors[f"tail.{i}.0.weight"] = np.asarray(projection)
    tensors[f"tail.{i}.1.weight"] = np.asarray(output)
  return tensors
