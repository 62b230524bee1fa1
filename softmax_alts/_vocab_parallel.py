"""Where each parameter of a vocabulary-parallel layer lives on the mesh."""

from jax.sharding import PartitionSpec as P

from softmax_alts._adaptive import AdaptiveParams
from softmax_alts._class_based import ClassBasedParams
from softmax_alts._differentiated import DifferentiatedParams
from softmax_alts._full import FullParams


def vocab_parallel_specs(params, *, axis: str = "model"):
  """The `PartitionSpec` of every parameter of a layer made with a `mesh`.

  The word-indexed tables (`w` and `b`, a class-based softmax's word table, a D-softmax's bands
  and bias, an adaptive softmax's tail outputs) are split along their first axis over `axis`;
  everything else is replicated.

  Example:
    >>> specs = softmax_alts.vocab_parallel_specs(params)
    >>> params = jax.device_put(params, jax.tree.map(
    ...     lambda s: jax.sharding.NamedSharding(mesh, s), specs))

  Args:
    params: `FullParams`, `ClassBasedParams`, `DifferentiatedParams` or `AdaptiveParams`.
    axis: the mesh axis the vocabulary is split over.

  Returns:
    The same structure with a `jax.sharding.PartitionSpec` for each array (None where `params`
    has None).
  """
  rows, vector = P(axis, None), P(axis)
  if isinstance(params, FullParams):
    return FullParams(w=rows, b=vector)
  if isinstance(params, ClassBasedParams):
    return ClassBasedParams(class_weights=P(), class_bias=P(), word_weights=rows,
                            word_bias=vector)
  if isinstance(params, DifferentiatedParams):
    return DifferentiatedParams(weights=tuple(rows for _ in params.weights), bias=vector)
  if isinstance(params, AdaptiveParams):
    return AdaptiveParams(
        head=P(), head_bias=None if params.head_bias is None else P(),
        tail_projections=tuple(P() for _ in params.tail_projections),
        tail_outputs=tuple(rows for _ in params.tail_outputs))
  raise ValueError("`params` must be FullParams, ClassBasedParams, DifferentiatedParams or "
                   "AdaptiveParams (the layers with a vocabulary-parallel form); got "
                   f"{type(params).__name__}.")
