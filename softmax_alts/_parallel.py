"""Vocabulary-parallel output layers: the `[V, H]` table sharded along V over a mesh axis.

Each device of the `model` axis holds `V / M` consecutive rows of the table (rows
`[m V/M, (m+1) V/M)` on device m) and scores only those; the results are combined with
collectives over that axis inside `jax.shard_map`, as Megatron-LM's vocab-parallel
cross-entropy:

```
lse_m  = logsumexp_{v in shard m} (w_v . h + b_v)          # local, in vocabulary blocks
log Z  = max_m lse_m + log sum_m exp(lse_m - max_m lse_m)   # pmax, psum over `model`
z_t    = sum_m [t in shard m] (w_t . h + b_t)                # psum over `model`
```

Nothing of size V ever crosses devices: per token, the collectives move a few scalars (the full
softmax and its gradient), `k` scores (the sampling losses) or, for `log_probs`, the `[N, V]`
result stays sharded along V. The shard_map is manual over the `model` axis only; every other
axis of the mesh (`data`) is left to the compiler, so the same layer serves a data-parallel
batch (`hidden` sharded along N) unchanged.

The layers take and return exactly the parameters of their unsharded counterparts (`FullParams`,
`AdaptiveParams`, same shapes), so a model trained sharded is evaluated, saved and restored by
the plain layers, and the other way round. Place the parameters with
`vocab_parallel_specs(params)`; arrays placed otherwise are resharded by the compiler.

References:
  Shoeybi, Patwary, Puri, LeGresley, Casper and Catanzaro, "Megatron-LM: Training
  Multi-Billion Parameter Language Models Using Model Parallelism", 2019.
  https://arxiv.org/abs/1909.08053
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from softmax_alts import _adaptive as adaptive_lib
from softmax_alts import _full as full_lib
from softmax_alts import _self_normalized as self_normalized_lib
from softmax_alts._base import OutputLayer, check_hidden, check_targets, nan_where_invalid
from softmax_alts._nce import _make_binary_token_loss
from softmax_alts._sampled import (_make_sampled_token_loss, check_sampler,
                                   check_sampling_inputs, log_q, make_row_form,
                                   sampling_layer)
from softmax_alts._samplers import check_num_samples


def _check_mesh(mesh, axis) -> int:
  """Returns the size of `axis` in `mesh`, after checking both (`ValueError`)."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"`mesh` must be a jax.sharding.Mesh; got {type(mesh).__name__}.")
  if axis not in mesh.axis_names:
    raise ValueError(f"`axis` must be one of the mesh's axes {tuple(mesh.axis_names)}; "
                     f"got {axis!r}.")
  return int(mesh.shape[axis])


def _check_divisible(rows: int, shards: int, name: str, axis: str) -> int:
  """Returns `rows // shards`, or raises `ValueError` naming the array when it does not divide."""
  if rows % shards:
    raise ValueError(f"`{name}` must have a number of rows divisible by the size {shards} of "
                     f"the mesh axis {axis!r} (each device holds an equal slice); got {rows} "
                     "rows.")
  return rows // shards


def _shard_numbers(shards: int) -> jax.Array:
  """`[0, .., M - 1]`, passed into the shard_map split over the axis: each device reads its own
  number from its slice. (`lax.axis_index` lowers to XLA's PartitionId, which the partitioner
  refuses in a program that is manual over one axis and automatic over the others.)"""
  return jnp.arange(shards, dtype=jnp.int32)


def _local_ids(ids, rows_per_shard: int, shard):
  """Shard-local row ids (clipped into range) and whether this shard owns each id.

  `shard` is this device's `[1]` slice of `_shard_numbers`.
  """
  local = ids - shard[0] * rows_per_shard
  owned = (local >= 0) & (local < rows_per_shard)
  return jnp.clip(local, 0, rows_per_shard - 1), owned


def _global_lse(lse_local, axis: str):
  """`log sum_m exp(lse_m)` over the shards of `axis`, stable (the max is not differentiated)."""
  m = lax.pmax(lax.stop_gradient(lse_local), axis)
  return m + jnp.log(lax.psum(jnp.exp(lse_local - m), axis))


def vocab_parallel_specs(params, *, axis: str = "model"):
  """The `PartitionSpec` of every parameter of a vocabulary-parallel layer.

  The word-indexed tables are split along their first axis (V, or a cluster's size) over
  `axis`; everything else is replicated.

  Example:
    >>> specs = softmax_alts.vocab_parallel_specs(params)
    >>> params = jax.device_put(params, jax.tree.map(
    ...     lambda s: jax.sharding.NamedSharding(mesh, s), specs))

  Args:
    params: `FullParams` or `AdaptiveParams`.
    axis: the mesh axis the vocabulary is split over.

  Returns:
    The same structure with a `jax.sharding.PartitionSpec` for each array (None where `params`
    has None).
  """
  if isinstance(params, full_lib.FullParams):
    return full_lib.FullParams(w=P(axis, None), b=P(axis))
  if isinstance(params, adaptive_lib.AdaptiveParams):
    return adaptive_lib.AdaptiveParams(
        head=P(), head_bias=None if params.head_bias is None else P(),
        tail_projections=tuple(P() for _ in params.tail_projections),
        tail_outputs=tuple(P(axis, None) for _ in params.tail_outputs))
  raise ValueError("`params` must be FullParams or AdaptiveParams (the layers with a "
                   f"vocabulary-parallel form); got {type(params).__name__}.")


# --------------------------------------------------------------------------------------------
# The full softmax's log Z and target logit, with the blocked custom VJP of `_full` per shard.

def _lse_and_target_fn(mesh: Mesh, axis: str, chunk_size: int | None):
  """`f(w, b, hidden, targets) -> (log Z [N], z_t [N])`, differentiable w.r.t. w, b, hidden.

  Forward: every shard runs `_full`'s blocked online log-sum-exp over its own rows, then the
  shards' values are combined with pmax/psum. Backward: every shard forms `dz = g_lse * p +
  g_z * onehot(t)` for its own rows (p from the global log Z, the one-hot only where it owns the
  target), which gives its slice of `dw`, `db` directly; `dh` is summed over the shards.
  """
  store_logits = chunk_size is None
  shards = int(mesh.shape[axis])

  def chunk_of(rows):
    return min(full_lib.BLOCK_ROWS if store_logits else chunk_size, rows)

  def smap(f, in_specs, out_specs):
    # The blocked scans of `_full` carry values whose replication JAX cannot infer; the VJP is
    # written out below, so the checks that serve autodiff are not needed here.
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names={axis}, check_vma=False)

  logits_spec = P(None, None, axis) if store_logits else P()

  def forward(w, b, hidden, targets):
    rows = w.shape[0] // shards

    def body(shard, w, b, hidden, targets):
      local, owned = _local_ids(targets, rows, shard)
      lse, z_t, z_blocks = full_lib._blocked_forward(w, b, hidden, local, chunk_of(rows),
                                                     store_logits)
      z_t = lax.psum(jnp.where(owned, z_t, jnp.zeros_like(z_t)), axis)
      return _global_lse(lse, axis), z_t, z_blocks

    return smap(body, (P(axis), P(axis, None), P(axis), P(), P()),
                (P(), P(), logits_spec))(_shard_numbers(shards), w, b, hidden, targets)

  @jax.custom_vjp
  def lse_and_target(w, b, hidden, targets):
    lse, z_t, _ = forward(w, b, hidden, targets)
    return lse, z_t

  def fwd(w, b, hidden, targets):
    lse, z_t, z_blocks = forward(w, b, hidden, targets)
    return (lse, z_t), (w, b, hidden, targets, lse, z_blocks)

  def bwd(residuals, cotangents):
    w, b, hidden, targets, lse, z_blocks = residuals
    g_lse, g_z = cotangents
    rows = w.shape[0] // shards

    def body(shard, w, b, hidden, targets, lse, z_blocks, g_lse, g_z):
      local, owned = _local_ids(targets, rows, shard)
      dw, db, dh, _ = full_lib._blocked_bwd(
          chunk_of(rows), store_logits, (w, b, hidden, local, lse, z_blocks),
          (g_lse, jnp.where(owned, g_z, jnp.zeros_like(g_z))))
      return dw, db, lax.psum(dh, axis)

    dw, db, dh = smap(
        body, (P(axis), P(axis, None), P(axis), P(), P(), P(), logits_spec, P(), P()),
        (P(axis, None), P(axis), P()))(_shard_numbers(shards), w, b, hidden, targets, lse,
                                       z_blocks, g_lse, g_z)
    return dw, db, dh, None

  lse_and_target.defvjp(fwd, bwd)
  return lse_and_target


def _log_probs_fn(mesh: Mesh, axis: str):
  """`f(w, b, hidden) -> [N, V]` exact log-softmax, the result sharded along V over `axis`."""

  def body(w, b, hidden):
    z = full_lib._dot_rows(hidden, w) + b[None, :].astype(hidden.dtype)
    lse = _global_lse(jax.nn.logsumexp(z, axis=1), axis)
    return z - lse[:, None]

  return jax.shard_map(body, mesh=mesh, in_specs=(P(axis, None), P(axis), P()),
                       out_specs=P(None, axis), axis_names={axis})


class _FullParts:
  """The checked, jitted pieces shared by every layer over `FullParams`."""

  def __init__(self, mesh: Mesh, axis: str, chunk_size: int | None):
    self.shards = _check_mesh(mesh, axis)
    self.axis = axis
    full_lib.check_chunk_size(chunk_size)
    self.lse_and_target = _lse_and_target_fn(mesh, axis, chunk_size)
    self._log_probs = jax.jit(_log_probs_fn(mesh, axis))

    @jax.jit
    def log_prob(params, hidden, targets):
      vocab_size = params.w.shape[0]
      valid = (targets >= 0) & (targets < vocab_size)
      lse, z_t = self.lse_and_target(params.w, params.b, hidden,
                                     jnp.where(valid, targets, 0).astype(jnp.int32))
      return nan_where_invalid(z_t - lse, valid)

    self._log_prob = log_prob

  def check(self, params, hidden) -> int:
    """Checks `params` against `hidden` and the mesh at trace time; returns V."""
    vocab_size = full_lib.check_params(params, hidden)
    _check_divisible(vocab_size, self.shards, "params.w", self.axis)
    return vocab_size

  def log_prob(self, params, hidden, targets):
    vocab_size = self.check(params, hidden)
    check_targets(targets, vocab_size, hidden.shape[0])
    return self._log_prob(params, jnp.asarray(hidden), jnp.asarray(targets))

  def log_probs(self, params, hidden):
    self.check(params, hidden)
    return self._log_probs(params.w, params.b, jnp.asarray(hidden))


_MESH_DOC = """
    mesh: the `jax.sharding.Mesh`; any other axes (e.g. `data`) are left to the compiler.
    axis: the mesh axis the vocabulary is split over; V must be a multiple of its size. With
      an axis of size 1 the factory returns the unsharded layer itself."""


def vocab_parallel_full(*, mesh: Mesh, axis: str = "model",
                        chunk_size: int | None = None) -> OutputLayer:
  """The full softmax with the table sharded along V (Megatron's vocab-parallel cross-entropy).

  Computes exactly what `full(chunk_size=...)` computes, for the same `FullParams`: each device
  of `axis` runs the blocked online log-sum-exp of `full` over its `V / M` rows, and the
  devices combine their `log Z` with a pmax and a psum and their target logit with a psum; the
  backward pass needs no further communication but the psum of `d hidden`. `log_probs` returns
  `[N, V]` sharded along V.

  Args:{mesh}
    chunk_size: vocabulary rows per block within a device (see `full`).

  Returns:
    An `OutputLayer` over `FullParams(w [V, H], b [V])`, as `full`'s.

  References:
    Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
    Parallelism", 2019. https://arxiv.org/abs/1909.08053
  """
  if _check_mesh(mesh, axis) == 1:
    return full_lib.full(chunk_size=chunk_size)
  parts = _FullParts(mesh, axis, chunk_size)

  def loss(params, hidden, targets, *, key=None):
    del key  # Exact: no sampling.
    return -parts.log_prob(params, hidden, targets)

  return OutputLayer(init=full_lib.init_full_params, loss=loss, log_prob=parts.log_prob,
                     log_probs=parts.log_probs)


def vocab_parallel_self_normalized(alpha: float, *, mesh: Mesh, axis: str = "model",
                                   chunk_size: int | None = None) -> OutputLayer:
  """`self_normalized(alpha)` with the table sharded along V: `-log p(t) + alpha (log Z)^2`.

  log Z and the target logit come from the vocabulary-parallel full softmax
  (`vocab_parallel_full`); the values equal `self_normalized`'s.

  Args:
    alpha: the penalty's weight, a non-negative number.{mesh}
    chunk_size: vocabulary rows per block within a device (see `full`).

  Returns:
    An `OutputLayer` over `FullParams(w [V, H], b [V])`, as `self_normalized`'s.

  References:
    Devlin et al., "Fast and Robust Neural Network Joint Models for Statistical Machine
    Translation", 2014. https://aclanthology.org/P14-1129/
  """
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
    raise ValueError(f"`alpha` must be a non-negative number; got {alpha!r}.")
  if _check_mesh(mesh, axis) == 1:
    return self_normalized_lib.self_normalized(alpha, chunk_size=chunk_size)
  parts = _FullParts(mesh, axis, chunk_size)

  @jax.jit
  def values(params, hidden, targets):
    vocab_size = params.w.shape[0]
    valid = (targets >= 0) & (targets < vocab_size)
    lse, z_t = parts.lse_and_target(params.w, params.b, hidden,
                                    jnp.where(valid, targets, 0).astype(jnp.int32))
    out = lse - z_t + jnp.asarray(alpha, lse.dtype) * jnp.square(lse)
    return nan_where_invalid(out, valid)

  def loss(params, hidden, targets, *, key=None):
    del key  # Exact: no sampling.
    vocab_size = parts.check(params, hidden)
    check_targets(targets, vocab_size, hidden.shape[0])
    return values(params, jnp.asarray(hidden), jnp.asarray(targets))

  return OutputLayer(init=full_lib.init_full_params, loss=loss, log_prob=parts.log_prob,
                     log_probs=parts.log_probs)


# --------------------------------------------------------------------------------------------
# Sampling losses: negatives drawn once (replicated), each shard scores the rows it owns.

def _scores_fn(mesh: Mesh, axis: str, shared: bool):
  """`f(w, b, hidden, targets, sample_ids) -> (s_t [N], s_s [N, k])`, `s_v = w_v . h + b_v`.

  Each shard computes the scores of the ids in its rows (zero for the others) and a psum over
  `axis` completes them: per token, k + 1 numbers cross devices, never a table row.
  """

  def body(shard, w, b, hidden, targets, sample_ids):
    rows, dtype = w.shape[0], hidden.dtype
    local_t, owned_t = _local_ids(targets, rows, shard)
    s_t = jnp.sum(hidden * w[local_t], axis=1) + b[local_t].astype(dtype)
    local_s, owned_s = _local_ids(sample_ids, rows, shard)
    if shared:  # one [N, H] x [H, k] GEMM on the rows this shard owns
      s_s = full_lib._dot_rows(hidden, w[local_s]) + b[local_s][None, :].astype(dtype)
      owned_s = jnp.broadcast_to(owned_s[None, :], s_s.shape)
    else:
      s_s = jnp.einsum("nh,nkh->nk", hidden, w[local_s]) + b[local_s].astype(dtype)
    s_t = jnp.where(owned_t, s_t, jnp.zeros_like(s_t))
    s_s = jnp.where(owned_s, s_s, jnp.zeros_like(s_s))
    return lax.psum(s_t, axis), lax.psum(s_s, axis)

  scores = jax.shard_map(body, mesh=mesh,
                         in_specs=(P(axis), P(axis, None), P(axis), P(), P(), P()),
                         out_specs=(P(), P()), axis_names={axis})
  shards = int(mesh.shape[axis])
  return lambda *args: scores(_shard_numbers(shards), *args)


def _sampling_layer(token_loss, sampler, num_samples: int, *, mesh: Mesh, axis: str,
                    shared: bool, subtract_log_q: bool, chunk_size: int | None) -> OutputLayer:
  """A vocabulary-parallel sampling loss from its per-token form (`_sampled`, `_nce`).

  The per-token loss is the very function the unsharded layer vmaps, fed with the scores: the
  row `w_t` becomes the scalar score `s_t` and `h` becomes 1 (`s_t * 1 + 0` is exact).
  """
  row_form = make_row_form(token_loss, sampler, num_samples, shared, subtract_log_q)
  if _check_mesh(mesh, axis) == 1:
    full_lib.check_chunk_size(chunk_size)
    return sampling_layer(row_form, chunk_size)
  parts = _FullParts(mesh, axis, chunk_size)
  scores = _scores_fn(mesh, axis, shared)

  @jax.jit
  def values(params, hidden, targets, key):
    sample_ids = row_form.draw(key, targets)  # drawn once: the same ids on every device
    s_t, s_s = scores(params.w, params.b, hidden, targets, sample_ids)
    num_rows, dtype = hidden.shape[0], hidden.dtype
    log_q_t, log_q_s = log_q(sampler, num_samples, targets, sample_ids, subtract_log_q, dtype)
    shape = (num_rows, num_samples)
    return jax.vmap(token_loss)(
        jnp.ones((num_rows, 1), dtype), targets, s_t[:, None], jnp.zeros((num_rows,), dtype),
        jnp.broadcast_to(sample_ids, shape), s_s[:, :, None], jnp.zeros(shape, dtype),
        log_q_t, jnp.broadcast_to(log_q_s, shape))

  def loss(params, hidden, targets, *, key=None):
    valid, targets = check_sampling_inputs(sampler, params, hidden, targets, key)
    parts.check(params, hidden)
    return nan_where_invalid(values(params, jnp.asarray(hidden), targets, key), valid)

  # The row-sparse training path (`sparse_loss_and_grads`) gathers the rows itself; on a sharded
  # table the compiler partitions that gather.
  loss.row_form = row_form
  return OutputLayer(init=full_lib.init_full_params, loss=loss, log_prob=parts.log_prob,
                     log_probs=parts.log_probs)


def vocab_parallel_sampled(num_samples: int, sampler, *, mesh: Mesh, axis: str = "model",
                           remove_accidental_hits: bool = True, subtract_log_q: bool = True,
                           shared: bool = True, chunk_size: int | None = None) -> OutputLayer:
  """`sampled(...)` (importance sampling, log Q corrected) with the table sharded along V.

  The negatives are drawn once from `key`, identically on every device; each device scores the
  target and negative ids that fall in its rows, and a psum of the `[N]` and `[N, k]` scores
  completes them. The losses and gradients equal `sampled`'s with the same key.
  `log_prob` / `log_probs` are `vocab_parallel_full`'s.

  Args:
    num_samples: k.
    sampler: a `Sampler` over the same V as the params.{mesh}
    remove_accidental_hits: mask negatives equal to the row's target.
    subtract_log_q: subtract `log E[count]` from every logit.
    shared: share the negatives across the batch (False: k per token).
    chunk_size: vocabulary rows per block of the exact `log_prob` within a device.

  Returns:
    An `OutputLayer` over `FullParams(w [V, H], b [V])`, as `sampled`'s.

  References:
    Jean, Cho, Memisevic and Bengio, "On Using Very Large Target Vocabulary for Neural Machine
    Translation", 2015. https://arxiv.org/abs/1412.2007
  """
  check_num_samples(num_samples)
  check_sampler(sampler)
  return _sampling_layer(_make_sampled_token_loss(remove_accidental_hits), sampler, num_samples,
                         mesh=mesh, axis=axis, shared=shared, subtract_log_q=subtract_log_q,
                         chunk_size=chunk_size)


def vocab_parallel_nce(num_samples: int, sampler, *, mesh: Mesh, axis: str = "model",
                       remove_accidental_hits: bool = False, shared: bool = True,
                       chunk_size: int | None = None) -> OutputLayer:
  """`nce(...)` (noise-contrastive estimation, log Z = 0) with the table sharded along V.

  As `vocab_parallel_sampled`: negatives drawn once, each device scoring its own rows.

  Args:
    num_samples: k.
    sampler: the noise distribution (a `Sampler` over the same V as the params).{mesh}
    remove_accidental_hits: drop noise words equal to the row's target.
    shared: share the noise words across the batch.
    chunk_size: vocabulary rows per block of the exact `log_prob` within a device.

  Returns:
    An `OutputLayer` over `FullParams(w [V, H], b [V])`, as `nce`'s.

  References:
    Mnih and Teh, "A Fast and Simple Algorithm for Training Neural Probabilistic Language
    Models", 2012. https://arxiv.org/abs/1206.6426
  """
  check_num_samples(num_samples)
  check_sampler(sampler)
  return _sampling_layer(_make_binary_token_loss(remove_accidental_hits), sampler, num_samples,
                         mesh=mesh, axis=axis, shared=shared, subtract_log_q=True,
                         chunk_size=chunk_size)


def vocab_parallel_negative_sampling(num_samples: int, sampler, *, mesh: Mesh,
                                     axis: str = "model", remove_accidental_hits: bool = False,
                                     shared: bool = True,
                                     chunk_size: int | None = None) -> OutputLayer:
  """`negative_sampling(...)` with the table sharded along V.

  As `vocab_parallel_sampled`: negatives drawn once, each device scoring its own rows.

  Args:
    num_samples: k.
    sampler: the negatives' distribution (a `Sampler` over the same V as the params).{mesh}
    remove_accidental_hits: drop negatives equal to the row's target.
    shared: share the negatives across the batch.
    chunk_size: vocabulary rows per block of the exact `log_prob` within a device.

  Returns:
    An `OutputLayer` over `FullParams(w [V, H], b [V])`, as `negative_sampling`'s.

  References:
    Mikolov, Sutskever, Chen, Corrado and Dean, "Distributed Representations of Words and
    Phrases and their Compositionality", 2013. https://arxiv.org/abs/1310.4546
  """
  check_num_samples(num_samples)
  check_sampler(sampler)
  return _sampling_layer(_make_binary_token_loss(remove_accidental_hits), sampler, num_samples,
                         mesh=mesh, axis=axis, shared=shared, subtract_log_q=False,
                         chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------
# Adaptive softmax: the head replicated, every tail's output table sharded over its cluster.

_TAIL_BLOCK_ROWS = 32  # Member rows of a tail computed together (as in `adaptive`).


def _pack(member, block: int):
  """Row ids of the `member` rows first (padded to a multiple of `block`), and their count."""
  num_rows = member.shape[0]
  padded = -(-num_rows // block) * block
  slot = jnp.cumsum(member, dtype=jnp.int32) - 1
  rows = jnp.zeros((padded,), jnp.int32).at[jnp.where(member, slot, padded)].set(
      jnp.arange(num_rows, dtype=jnp.int32), mode="drop")
  return rows, jnp.sum(member, dtype=jnp.int32)


def _tail_block(hidden, projection, output, relative, rows, count, i, block):
  """Block i of the packed rows: their ids, which are real members, their inputs `x [B, H]`,
  `z = P x [B, h]`, this shard's logits `[B, C / M]` and their targets within the cluster."""
  ids = lax.dynamic_slice(rows, (i * block,), (block,))
  real = i * block + jnp.arange(block, dtype=jnp.int32) < count
  x = hidden[ids]
  z = x @ projection.T
  return ids, real, x, z, z @ output.T, relative[ids]


def _tail_fn(mesh: Mesh, axis: str):
  """`f(hidden, projection, output, relative, member) -> [N]`, the vocabulary-parallel form of
  `_adaptive._tail_log_prob`: `log softmax(O (P h))_relative` for the member rows, 0 elsewhere.

  As the unsharded tail, only the member rows are computed, packed in blocks by a loop whose
  trip count is known at run time; each device forms the logits of its slice of the cluster.
  After the loop (no collective inside it) the per-row log-sum-exps are combined with pmax and
  psum. The backward pass runs the same loop on every device with the global log Z: its slice of
  `d output` is local, and the partial `d hidden` and `d projection` are summed once at the end.
  """
  shards = int(mesh.shape[axis])

  def smap(f, in_specs, out_specs):
    # A loop with a run-time trip count; the VJP is written out, so no autodiff checks needed.
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names={axis}, check_vma=False)

  def forward(hidden, projection, output, relative, member):
    num_rows = hidden.shape[0]
    block = min(_TAIL_BLOCK_ROWS, num_rows)

    def body(shard, hidden, projection, output, relative, member):
      rows, count = _pack(member, block)
      cluster_rows = output.shape[0]

      def step(i, carry):
        lse_local, z_local = carry
        ids, real, _, _, logits, target = _tail_block(
            hidden, projection, output, relative, rows, count, i, block)
        local, owned = _local_ids(target, cluster_rows, shard)
        z_t = jnp.take_along_axis(logits, local[:, None], axis=1)[:, 0]
        slots = jnp.where(real, ids, num_rows)
        return (lse_local.at[slots].set(jax.nn.logsumexp(logits, axis=1), mode="drop"),
                z_local.at[slots].set(jnp.where(owned, z_t, jnp.zeros_like(z_t)), mode="drop"))

      zeros = jnp.zeros((num_rows,), hidden.dtype)
      lse_local, z_local = lax.fori_loop(0, (count + block - 1) // block, step, (zeros, zeros))
      lse = _global_lse(lse_local, axis)
      z_t = lax.psum(z_local, axis)
      return jnp.where(member, z_t - lse, jnp.zeros_like(lse)), lse

    return smap(body, (P(axis), P(), P(), P(axis, None), P(), P()),
                (P(), P()))(_shard_numbers(shards), hidden, projection, output, relative, member)

  @jax.custom_vjp
  def tail(hidden, projection, output, relative, member):
    if hidden.shape[0] == 0:
      return jnp.zeros((0,), hidden.dtype)
    return forward(hidden, projection, output, relative, member)[0]

  def fwd(hidden, projection, output, relative, member):
    if hidden.shape[0] == 0:
      values, lse = jnp.zeros((0,), hidden.dtype), jnp.zeros((0,), hidden.dtype)
    else:
      values, lse = forward(hidden, projection, output, relative, member)
    return values, (hidden, projection, output, relative, member, lse)

  def bwd(residuals, cotangent):
    hidden, projection, output, relative, member, lse = residuals
    num_rows = hidden.shape[0]
    if num_rows == 0:
      return (jnp.zeros_like(hidden), jnp.zeros_like(projection), jnp.zeros_like(output),
              None, None)
    block = min(_TAIL_BLOCK_ROWS, num_rows)

    def body(shard, hidden, projection, output, relative, member, lse, cotangent):
      rows, count = _pack(member, block)
      cluster_rows = output.shape[0]

      def step(i, grads):
        d_hidden, d_projection, d_output = grads
        ids, real, x, z, logits, target = _tail_block(
            hidden, projection, output, relative, rows, count, i, block)
        local, owned = _local_ids(target, cluster_rows, shard)
        g = jnp.where(real, cotangent[ids], 0)                               # [B]
        g_owned = jnp.where(owned, g, 0)
        d_logits = -g[:, None] * jnp.exp(logits - lse[ids][:, None])         # [B, C / M]
        d_z = d_logits @ output + g_owned[:, None] * output[local]           # partial [B, h]
        return (d_hidden.at[ids].add(d_z @ projection),
                d_projection + d_z.T @ x,
                (d_output + d_logits.T @ z).at[local].add(g_owned[:, None] * z))

      d_hidden, d_projection, d_output = lax.fori_loop(
          0, (count + block - 1) // block, step,
          (jnp.zeros_like(hidden), jnp.zeros_like(projection), jnp.zeros_like(output)))
      return lax.psum(d_hidden, axis), lax.psum(d_projection, axis), d_output

    grads = smap(body, (P(axis), P(), P(), P(axis, None), P(), P(), P(), P()),
                 (P(), P(), P(axis, None)))(_shard_numbers(shards), hidden, projection, output,
                                            relative, member, lse, cotangent)
    return (*grads, None, None)

  tail.defvjp(fwd, bwd)
  return tail


def _tail_log_probs_fn(mesh: Mesh, axis: str):
  """`f(hidden, projection, output) -> [N, C]` log softmax over a cluster, sharded along C."""

  def body(hidden, projection, output):
    logits = (hidden @ projection.T) @ output.T
    lse = _global_lse(jax.nn.logsumexp(logits, axis=1), axis)
    return logits - lse[:, None]

  return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(axis, None)),
                       out_specs=P(None, axis), axis_names={axis})


def vocab_parallel_adaptive(cutoffs, *, mesh: Mesh, axis: str = "model", div_value: float = 4.0,
                            head_bias: bool = False) -> OutputLayer:
  """`adaptive(cutoffs, ...)` with every tail's output table sharded over its cluster's words.

  The head (the shortlist and one entry per cluster, `[S + K, H]`) is small and replicated;
  tail i's output table `[C_i, h_i]` is split along `C_i` over `axis`, and its log-softmax is
  computed vocabulary-parallel, for the member rows only, exactly as `adaptive` does on one
  device (same `AdaptiveParams`, same values). Every cluster size `C_i` must be a multiple of
  the axis size.

  Args:
    cutoffs: increasing ids in (0, V), as `adaptive`'s.{mesh}
    div_value: the divisor of the tail widths.
    head_bias: whether the head has a bias.

  Returns:
    An `OutputLayer` over `AdaptiveParams`, as `adaptive`'s (`log_probs` sharded along V
    within each cluster).

  References:
    Grave, Joulin, Cisse, Grangier and Jegou, "Efficient softmax approximation for GPUs", 2017.
    https://arxiv.org/abs/1609.04309
  """
  base = adaptive_lib.adaptive(cutoffs, div_value=div_value, head_bias=head_bias)  # checks them
  cuts = tuple(int(c) for c in cutoffs)
  shards = _check_mesh(mesh, axis)
  if shards == 1:
    return base
  tail = _tail_fn(mesh, axis)
  tail_log_probs = _tail_log_probs_fn(mesh, axis)

  def check(params, hidden) -> int:
    """Checks the shapes at trace time (as `adaptive` does) and the divisibility; returns V."""
    check_hidden(hidden)
    jax.eval_shape(base.log_probs, params, hidden)  # `adaptive`'s own shape checks, no compute
    for i, output in enumerate(params.tail_outputs):
      _check_divisible(jnp.shape(output)[0], shards, f"params.tail_outputs[{i}]", axis)
    return cuts[-1] + jnp.shape(params.tail_outputs[-1])[0]

  target_log_prob, all_log_probs = adaptive_lib._log_prob_fns(cuts, tail, tail_log_probs)

  def log_prob(params, hidden, targets):
    check_hidden(hidden)
    params, hidden = jax.tree.map(jnp.asarray, params), jnp.asarray(hidden)
    vocab_size = check(params, hidden)
    check_targets(targets, vocab_size, hidden.shape[0])
    return target_log_prob(params, hidden, jnp.asarray(targets))

  def loss(params, hidden, targets, *, key=None):
    del key  # Exact: nothing is sampled.
    return -log_prob(params, hidden, targets)

  def log_probs(params, hidden):
    check_hidden(hidden)
    params, hidden = jax.tree.map(jnp.asarray, params), jnp.asarray(hidden)
    check(params, hidden)
    return all_log_probs(params, hidden)

  return OutputLayer(init=base.init, loss=loss, log_prob=log_prob, log_probs=log_probs)


for _factory in (vocab_parallel_full, vocab_parallel_self_normalized, vocab_parallel_sampled,
                 vocab_parallel_nce, vocab_parallel_negative_sampling, vocab_parallel_adaptive):
  if _factory.__doc__:  # None under `python -OO`.
    _factory.__doc__ = _factory.__doc__.replace("{mesh}", _MESH_DOC)
del _factory
