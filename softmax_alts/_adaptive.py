"""Adaptive softmax (Grave et al. 2017), as PyTorch's AdaptiveLogSoftmaxWithLoss computes it."""

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from softmax_alts import _lse
from softmax_alts._base import (OutputLayer, check_divisible, check_options, init_function,
                                layer_functions)


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


def adaptive(cutoffs: Sequence[int], *, div_value: float = 4.0, head_bias: bool = False,
             strategy: str | None = None, block_rows: int = 8192, tile_rows: int = 64,
             mesh=None, axis: str = "model") -> OutputLayer:
  """Adaptive softmax: a head over the shortlist and the clusters, low-rank tails per cluster.

  With cutoffs c_0 < .. < c_{K-1} (and c_K = V), the head scores the shortlist words
  `[0, c_0)` and one entry per cluster; cluster i holds the words `[c_i, c_{i+1})` and is
  scored through a projection to h_i = H // div_value**(i+1) dimensions:

    log p(w | h) = log softmax(A h + a)_w                             for w < c_0,
    log p(w | h) = log softmax(A h + a)_{c_0+i}
                   + log softmax(O_i (P_i h))_{w - c_i}               for c_i <= w < c_{i+1}.

  Exactly PyTorch's `torch.nn.AdaptiveLogSoftmaxWithLoss` (same parameters, same numbers; see
  `AdaptiveParams` for the layout, `adaptive_from_torch` to copy a module's weights). Both
  terms come from the package's one log-sum-exp primitive: the head over its table for every
  row, and each tail over its cluster for the rows whose target falls in it (every other row
  has an empty range). With the "stream" strategy (the CPU default) those member rows are
  gathered first and computed in tiles of `tile_rows` rows against blocks of `block_rows`
  cluster words, in a loop whose trip count is known only at run time (static shapes
  throughout), so a frequent target costs O(H (c_0 + K)) and a rare one adds
  O(H h_i + h_i cluster_size_i); "materialize" (accelerators) computes each tail for every row
  in one GEMM. `loss` and `log_prob` support reverse mode (`grad`, `vjp`), `log_probs` any
  autodiff. With `mesh`, each tail's output table is split along its cluster's words over
  `axis` (the head and projections are replicated); every cluster size must be a multiple of
  the axis size.

  Example:
    >>> layer = adaptive([2000, 10000])  # V = 100K: shortlist 2000, clusters of 8K and 90K
    >>> params = layer.init(key, 512, 100_000)
    >>> loss = layer.loss(params, hidden, targets).mean()

  Args:
    cutoffs: increasing ids in (0, V); `cutoffs[0]` is the shortlist size.
    div_value: the divisor of the tail widths, h_i = H // div_value**(i+1).
    head_bias: whether the head has a bias (PyTorch's default: no).
    strategy: "stream", "materialize" or None (by backend and size: `default_strategy`).
    block_rows: cluster words per block (stream).
    tile_rows: member rows per tile (stream).
    mesh: a `jax.sharding.Mesh` to split the tails over, or None.
    axis: the mesh axis the clusters are split over.

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
  shards = check_options(strategy, mesh, axis, block_rows=block_rows, tile_rows=tile_rows)
  shortlist, num_clusters = cuts[0], len(cuts)
  head_size = shortlist + num_clusters

  def widths(hidden_size: int) -> list[int]:
    return [int(hidden_size // (div_value ** (i + 1))) for i in range(num_clusters)]

  @init_function
  def init(key, hidden_size: int, vocab_size: int, dtype) -> AdaptiveParams:
    """Every weight uniform in +-1/sqrt(fan_in), as PyTorch's `Linear` (and its module)."""
    if hidden_size < 1:
      raise ValueError(f"`hidden_size` must be >= 1; got {hidden_size}.")
    if vocab_size <= cuts[-1]:
      raise ValueError(f"`cutoffs` must be ids in (0, V) = (0, {vocab_size}); "
                       f"got {list(cuts)}.")
    bounds = list(cuts) + [vocab_size]
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

  def check(params: AdaptiveParams, hidden) -> int:
    """V, from the shapes of `params`, after checking them against `hidden` (trace time)."""
    if jnp.ndim(params.head) != 2 or jnp.shape(params.head)[0] != head_size:
      raise ValueError(f"`params.head` must be [cutoffs[0] + num_clusters, H] = "
                       f"[{head_size}, H]; got {jnp.shape(params.head)}.")
    hidden_size = jnp.shape(params.head)[1]
    if jnp.shape(hidden)[1] != hidden_size:
      raise ValueError(f"`hidden` must be [N, H] with H = {hidden_size} (the columns of "
                       f"`params.head`); got shape {jnp.shape(hidden)}.")
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
      check_divisible(size, shards, f"params.tail_outputs[{i}]", axis)
    return vocab_size

  def target_log_prob(params: AdaptiveParams, hidden, targets) -> jax.Array:
    cluster = jnp.searchsorted(jnp.asarray(cuts, jnp.int32), targets, side="right")  # 0: head
    cluster = cluster.astype(jnp.int32)
    head_index = jnp.where(cluster == 0, targets, shortlist + cluster - 1)
    head_lse, head_z = _lse.lse_and_target(hidden, params.head, params.head_bias, head_index,
                                           strategy=strategy)
    total = head_z - head_lse
    for i, (projection, output) in enumerate(zip(params.tail_projections, params.tail_outputs)):
      member = cluster == i + 1
      size = output.shape[0]
      lo = jnp.where(member, 0, size)
      # Streamed, the few member rows recompute their logits in the backward pass: a small
      # GEMM, where keeping them would hold a block of every cluster word for every tile.
      tail_strategy = strategy or _lse.default_strategy(hidden.shape[0], size, ranges=True)
      lse, z = _lse.lse_and_target(
          _lse.dot(hidden, projection, ((1,), (1,))).astype(_lse.common_dtype(hidden, output)),
          output, None, targets - cuts[i], lo, jnp.full_like(lo, size), strategy=tail_strategy,
          store=tail_strategy == "materialize", block_rows=block_rows, tile_rows=tile_rows,
          max_range=size, mesh=mesh, axis=axis)
      total = total + jnp.where(member, z - lse, 0)
    return total

  def all_log_probs(params: AdaptiveParams, hidden) -> jax.Array:
    head = _lse.log_softmax(_lse.logits(hidden, params.head, params.head_bias))
    parts = [head[:, :shortlist]]
    for i, (projection, output) in enumerate(zip(params.tail_projections, params.tail_outputs)):
      projected = _lse.dot(hidden, projection, ((1,), (1,))).astype(
          _lse.common_dtype(hidden, output))
      z, lse = _lse.split_logits(projected, output, None, mesh, axis)
      parts.append(z - (lse - head[:, shortlist + i])[:, None])
    return jnp.concatenate(parts, axis=1)

  loss, log_prob, log_probs = layer_functions(check, target_log_prob, all_log_probs)
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
