"""The training step, the optimizer and exact evaluation.

One pure `train_step(state, batch, key) -> (state, metrics)`, bound to the static config with
`functools.partial` and jitted once with the state donated (as nanodo's). The recurrent state is
carried from window to window and detached (`rnn.detach`): truncated BPTT over a stream, as
Zaremba et al. (2014) train their language models.

For the output layers with a row-sparse path (`softmax_alts.has_row_sparse_path`: the sampling
losses "sampled", "nce", "ns" and the hierarchical softmax "hsm-balanced", "hsm-huffman") the
output table is updated row-sparsely: the loss is differentiated with respect to the rows it
reads (`softmax_alts.sparse_loss_and_grads`), and only those rows are updated
(`softmax_alts.row_wise`), so the output layer costs O(k H) per token (k negatives; O(D H) for
the nodes on a tree path of depth D) instead of O(V H). With SGD this equals the dense update
exactly. With Adam it is
"lazy" Adam (as TensorFlow's LazyAdam): a row's moments are updated only at the steps that
touch it, so untouched rows neither move nor see their moments decay; pass
`sparse_output=False` for dense Adam at O(V H) per step.

The row-sparse step pays when the rows a step reads are few beside the table's. At WikiText-2
size (V = 13,777, H = 256, 20 x 35 tokens a step) a Huffman tree's paths (depth 18) give
N D = 12,600 row slots, about the V - 1 = 13,776 nodes: the row-sparse and dense
`hsm-huffman` steps then cost the same within noise (0.94-1.07x, interleaved on a shared 2-core
CPU); with V = 100,000 (Zipfian counts) the row-sparse step was 1.3x (SGD) and 1.5x (Adam)
faster.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rnn
import softmax_alts
from train._batching import Window, bptt_windows
from train._model import SAMPLING, LanguageModel, LMParams

OPTIMIZERS = ("sgd", "adam")


class TrainState(NamedTuple):
  """Everything that changes from step to step.

  Attributes:
    params: the `LMParams`.
    opt_state: the optimizer's state (with the learning rate in it, see `learning_rate`); a
      `SparseOptState` when the output table is updated row-sparsely.
    carry: the recurrent state carried into the next window, leaves `[B, ...]`.
    step: int32 scalar, the number of steps taken (it fixes the data position and the key).
  """

  params: LMParams
  opt_state: Any
  carry: Any
  step: jax.Array


class SparseOptState(NamedTuple):
  """The optimizer state of the row-sparse path.

  Attributes:
    dense: the optimizer state of everything but the output table.
    rows: the state of the output table, updated row by row (`softmax_alts.row_wise`).
  """

  dense: Any
  rows: Any


class Optimizer(NamedTuple):
  """The optimizer's static config.

  Attributes:
    name: "sgd" or "adam".
    transform: the optax transformation, its learning rate injected as state
      (`optax.inject_hyperparams`) so a schedule can change it between steps.
    clip: the global-norm clipping threshold, or None.
    sparse_output: update the output table row-sparsely (the output layers with a row-sparse
      path only, see `softmax_alts.has_row_sparse_path`).
  """

  name: str
  transform: optax.GradientTransformation
  clip: float | None
  sparse_output: bool


class Evaluation(NamedTuple):
  """The exact evaluation of a split.

  Attributes:
    nll: the sum of `-log p(w_t | w_<t)` over every predicted token (float64).
    tokens: the number of predicted tokens.
    perplexity: `exp(nll / tokens)`.
  """

  nll: float
  tokens: int
  perplexity: float


def optimizer(name: str, learning_rate: float, *, clip: float | None = None,
              sparse_output: bool = False) -> Optimizer:
  """Makes the optimizer: plain SGD or Adam, with global-norm clipping.

  `sgd`: `p -= lr * g` (Zaremba et al. use lr 1 and clip the norm at 5; PyTorch's example lr 20
  and 0.25). `adam`: Kingma and Ba (2015) with optax's defaults. Clipping is
  `optax.clip_by_global_norm`, over every gradient (the row-sparse rows included, merged so
  their norm is the dense gradient's).

  Args:
    name: "sgd" or "adam".
    learning_rate: the initial learning rate, positive.
    clip: the largest global gradient norm, positive, or None for no clipping.
    sparse_output: update the output table row-sparsely (meaningful for the sampling losses and
      the hierarchical softmax, whose layers have a row-sparse path).

  Returns:
    An `Optimizer`.

  References:
    Pascanu, Mikolov and Bengio, On the difficulty of training recurrent neural networks, 2013.
      https://arxiv.org/abs/1211.5063
    Kingma and Ba, Adam: a method for stochastic optimization, 2015.
      https://arxiv.org/abs/1412.6980
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"`optimizer` must be one of {', '.join(OPTIMIZERS)}; got {name!r}.")
  if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) \
      or not learning_rate > 0 or not np.isfinite(learning_rate):
    raise ValueError(f"`lr` must be a positive number; got {learning_rate!r}.")
  if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                           or not clip > 0):
    raise ValueError(f"`clip` must be a positive number or None; got {clip!r}.")
  if name == "sgd":
    transform = optax.inject_hyperparams(optax.sgd)(learning_rate=float(learning_rate))
  else:  # Only the learning rate is state; Adam's betas and epsilon stay Python constants.
    transform = optax.inject_hyperparams(optax.adam, static_args=("b1", "b2", "eps", "eps_root"))(
        learning_rate=float(learning_rate))
  return Optimizer(name, transform, None if clip is None else float(clip), bool(sparse_output))


def _strong(tree):
  """The same tree with every leaf a committed, non-weakly-typed array (stable jit signature)."""
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)


def _dense_part(params: LMParams) -> LMParams:
  return params._replace(output=None)


def _uses_sparse(model: LanguageModel, opt: Optimizer) -> bool:
  return opt.sparse_output and softmax_alts.has_row_sparse_path(model.layer)


def _drop_padded(ids: jax.Array, token_mask: jax.Array, num_table_rows: int,
                 per_token: bool) -> jax.Array:
  """The row ids of `sparse_loss_and_grads` with those read for padded tokens set to the dropped
  id R, so that a lazy optimizer leaves those rows and their state untouched.

  The ids are laid out as `sparse_loss_and_grads` documents: token-major `[N D]` node ids for the
  hierarchical softmax (`per_token`), the N targets then the shared negatives for the sampling
  losses (the negatives serve every token and are kept).
  """
  num_tokens, num_ids = token_mask.shape[0], ids.shape[0]
  if per_token:
    keep = jnp.repeat(token_mask, num_ids // num_tokens, total_repeat_length=num_ids)
  else:
    keep = jnp.concatenate([token_mask, jnp.ones((num_ids - num_tokens,), bool)])
  return jnp.where(keep, ids, num_table_rows)


def init_train_state(model: LanguageModel, opt: Optimizer, key: jax.Array,
                     batch_size: int) -> TrainState:
  """Initializes the parameters, the optimizer state and a zero recurrent state.

  Args:
    model: the `LanguageModel`.
    opt: the `Optimizer`.
    key: a `jax.random.key` for the parameters.
    batch_size: B, the rows of the training batches.

  Returns:
    A `TrainState` at step 0.
  """
  params = model.init(key)
  if _uses_sparse(model, opt):
    opt_state = SparseOptState(
        dense=opt.transform.init(_dense_part(params)),
        rows=softmax_alts.row_wise(opt.transform).init(params.output))
  else:
    opt_state = opt.transform.init(params)
  carry = model.initial_state(params, batch_size)
  return _strong(TrainState(params, opt_state, carry, jnp.zeros((), jnp.int32)))


def _is_lm_params(node) -> bool:
  return isinstance(node, LMParams)


def dense_opt_layout(state: TrainState) -> TrainState | None:
  """`state` with its `SparseOptState` laid out as the dense path's optimizer state (the output
  table's moments put back into the `LMParams` of the rest); None without a `SparseOptState`.

  Works on arrays and on `jax.ShapeDtypeStruct`s alike. The inverse of `sparse_opt_layout`: a
  checkpoint written by the dense path (e.g. a hierarchical run from before it trained
  row-sparsely) restores into this layout and is split again.
  """
  if not isinstance(state.opt_state, SparseOptState):
    return None

  def merge(dense, rows):
    return dense._replace(output=rows) if _is_lm_params(dense) else dense

  opt_state = jax.tree.map(merge, state.opt_state.dense, state.opt_state.rows,
                           is_leaf=_is_lm_params)
  return state._replace(opt_state=opt_state)


def sparse_opt_layout(state: TrainState) -> TrainState:
  """`state` with a dense-path optimizer state split into a `SparseOptState`: the state of the
  output table (`rows`) and that of everything else (`dense`); the global leaves (the step
  count, the learning rate) go to both, copied."""

  def dense(node):
    return node._replace(output=None) if _is_lm_params(node) else node

  def rows(node):
    return node.output if _is_lm_params(node) else jnp.copy(node)

  opt_state = SparseOptState(jax.tree.map(dense, state.opt_state, is_leaf=_is_lm_params),
                             jax.tree.map(rows, state.opt_state, is_leaf=_is_lm_params))
  return state._replace(opt_state=opt_state)


_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _is_injected(node) -> bool:
  return isinstance(node, _INJECTED)


def learning_rate(state: TrainState) -> float:
  """The current learning rate, read from the optimizer state."""
  for node in jax.tree.leaves(state.opt_state, is_leaf=_is_injected):
    if _is_injected(node):
      return float(node.hyperparams["learning_rate"])
  raise ValueError("the optimizer state holds no learning rate (not made by `train.optimizer`).")


def set_learning_rate(state: TrainState, lr: float) -> TrainState:
  """Returns `state` with the learning rate set to `lr` (for schedules and decay on plateau)."""
  value = np.asarray(lr, np.float32)

  def update(node):
    if _is_injected(node):
      return node._replace(hyperparams={**node.hyperparams,
                                        "learning_rate": jnp.asarray(value)})
    return node

  opt_state = jax.tree.map(update, state.opt_state, is_leaf=_is_injected)
  return state._replace(opt_state=opt_state)


def reset_carry(model: LanguageModel, state: TrainState) -> TrainState:
  """Returns `state` with a zero recurrent state (at the start of an epoch)."""
  batch_size = jax.tree.leaves(state.carry)[0].shape[0]
  carry = _strong(model.initial_state(state.params, batch_size))
  return state._replace(carry=carry)


def _optax_promotion():
  """optax's Adam raises a Python float to an int32 count (`b1 ** t`), which JAX's strict dtype
  promotion rejects; the optimizer update is traced with the standard rules whatever the
  caller's setting."""
  return jax.numpy_dtype_promotion("standard")


def _clip(opt: Optimizer, grads):
  norm = optax.tree.norm(grads)
  if opt.clip is not None:
    grads, _ = optax.clip_by_global_norm(opt.clip).update(grads, optax.EmptyState())
  return grads, norm


def _metrics(model, loss, aux, params_output, batch, norm, exact_nll: bool):
  tokens = jnp.sum(batch.mask, dtype=jnp.int32)
  metrics = {"loss": loss, "grad_norm": norm, "tokens": tokens}
  if model.config.softmax == "selfnorm":
    logp = model.layer.log_prob(params_output, jax.lax.stop_gradient(aux.hidden),
                                batch.targets.reshape(-1)).reshape(batch.targets.shape)
    nll = -jnp.where(batch.mask, logp, jnp.zeros_like(logp))
    metrics["nll"] = jnp.sum(nll) / jnp.maximum(tokens, 1).astype(nll.dtype)
  elif exact_nll:
    metrics["nll"] = loss
  return metrics


def _dense_step(state: TrainState, batch: Window, key, *, model: LanguageModel, opt: Optimizer):
  def objective(params):
    return model.loss(params, batch.inputs, batch.targets, batch.mask, state.carry, key=key)

  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  grads, norm = _clip(opt, grads)
  with _optax_promotion():
    updates, opt_state = opt.transform.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  exact = model.config.softmax not in SAMPLING
  metrics = _metrics(model, loss, aux, state.params.output, batch, norm, exact)
  return TrainState(params, opt_state, rnn.detach(aux.carry), state.step + 1), metrics


def _sparse_step(state: TrainState, batch: Window, key, *, model: LanguageModel,
                 opt: Optimizer):
  """The row-sparse path: the table's gradient is the rows the loss touched (and, tied, the
  embedding rows read), updated in place; the rest of the model is updated densely."""
  params, config = state.params, model.config
  num_table_rows = params.output[0].shape[0]  # R: V for `FullParams`, V-1 for the tree's nodes
  key_features, key_loss = jax.random.split(key)  # as `LanguageModel.loss` splits it
  mask = batch.mask
  lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
  count = jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)
  weights = mask.reshape(-1).astype(jnp.float32) / count

  if config.tied:
    x = model.embed(params, batch.inputs)

    def features(rnn_params, x):
      return model.features(rnn_params, x, state.carry, key=key_features, lengths=lengths,
                            inputs=batch.inputs)

    hidden, vjp, carry = jax.vjp(features, params.rnn, x, has_aux=True)
  else:
    def features(dense):
      x = model.embed(dense, batch.inputs)
      return model.features(dense.rnn, x, state.carry, key=key_features, lengths=lengths,
                            inputs=batch.inputs)

    hidden, vjp, carry = jax.vjp(features, _dense_part(params), has_aux=True)

  hidden_size = hidden.shape[-1]
  targets = batch.targets.reshape(-1)
  values, hidden_grad, rows = softmax_alts.sparse_loss_and_grads(
      model.layer, params.output, hidden.reshape(-1, hidden_size), targets, key=key_loss,
      weights=weights)
  values = jnp.where(mask.reshape(-1), values, jnp.zeros_like(values))
  loss = jnp.sum(values) / count
  # Padded steps have zero weight: send their rows to the dropped id R so they stay untouched.
  per_token = isinstance(params.output, softmax_alts.HierarchicalParams)
  rows = rows._replace(ids=_drop_padded(rows.ids, mask.reshape(-1), num_table_rows, per_token))
  # With bfloat16 features the cotangent enters the features' vjp in their dtype.
  cotangents = vjp(hidden_grad.reshape(hidden.shape).astype(hidden.dtype))
  if config.tied:
    rnn_grads, x_grad = cotangents
    dense_grads = LMParams(embedding=None, rnn=rnn_grads, output=None)
    input_ids = jnp.where(mask, batch.inputs, num_table_rows).reshape(-1)
    rows = softmax_alts.RowGrad(
        ids=jnp.concatenate([rows.ids, input_ids.astype(rows.ids.dtype)]),
        w_rows=jnp.concatenate([rows.w_rows,
                                x_grad.reshape(-1, hidden_size).astype(rows.w_rows.dtype)]),
        b_rows=jnp.concatenate([rows.b_rows, jnp.zeros(input_ids.shape, rows.b_rows.dtype)]))
  else:
    (dense_grads,) = cotangents
  rows = softmax_alts.merge_rows(rows, num_table_rows)
  (dense_grads, w_rows, b_rows), norm = _clip(opt, (dense_grads, rows.w_rows, rows.b_rows))
  rows = rows._replace(w_rows=w_rows, b_rows=b_rows)

  dense_params = _dense_part(params)
  with _optax_promotion():
    dense_updates, dense_state = opt.transform.update(dense_grads, state.opt_state.dense,
                                                      dense_params)
    # The rows were merged above, for the global norm: `distinct_ids` skips a second merge.
    row_updates, rows_state = softmax_alts.row_wise(opt.transform, distinct_ids=True).update(
        rows, state.opt_state.rows, params.output)
  dense_params = optax.apply_updates(dense_params, dense_updates)
  output = softmax_alts.apply_row_updates(params.output, row_updates)
  new_params = dense_params._replace(output=output)
  exact = config.softmax not in SAMPLING  # the hierarchical softmax's loss is its exact NLL
  metrics = _metrics(model, loss, None, None, batch, norm, exact)
  new_state = TrainState(new_params, SparseOptState(dense_state, rows_state),
                         rnn.detach(carry), state.step + 1)
  return new_state, metrics


def make_train_step(model: LanguageModel, opt: Optimizer) -> Callable:
  """Returns the jitted `train_step(state, batch, key) -> (state, metrics)`, state donated.

  One step of truncated BPTT on a window: the loss of `model` on `batch` (dropout on, the
  sampling losses drawing their negatives from `key`), its gradient, global-norm clipping and
  the optimizer's update; the final recurrent state is detached and carried in the new state.
  The function is pure: the same `(state, batch, key)` gives the same result, bit for bit.

  Args:
    model: the `LanguageModel`.
    opt: the `Optimizer`. With `sparse_output` and an output layer that has a row-sparse path
      (a sampling loss or the hierarchical softmax), the output table is updated row-sparsely
      (see the module docstring).

  Returns:
    `train_step(state: TrainState, batch: Window, key) -> (TrainState, metrics)`, with metrics
    a dict of scalars: "loss" (the mean training objective over the window's tokens), "nll"
    (the mean exact NLL, for the output layers whose loss gives it without extra cost),
    "grad_norm" (before clipping) and "tokens".

  References:
    Zaremba, Sutskever and Vinyals, Recurrent neural network regularization, 2014.
      https://arxiv.org/abs/1409.2329
    Williams and Peng, An efficient gradient-based algorithm for on-line training of recurrent
      network trajectories, 1990. https://doi.org/10.1162/neco.1990.2.4.490
  """
  body = _sparse_step if _uses_sparse(model, opt) else _dense_step
  return jax.jit(functools.partial(body, model=model, opt=opt), donate_argnums=0)


def make_evaluator(model: LanguageModel, *, bptt: int) -> Callable:
  """Returns `evaluate(params, data [B, L]) -> Evaluation`, exact, jitted once per data shape.

  The rows of `data` (from `train.batchify`) are read in windows of `bptt` steps with the state
  carried across them, as in training but without dropout; every window is scored with the
  output layer's exact `log_prob` (the full normalized distribution, whatever the training
  loss). The last window is padded and masked, so every target of the rows counts once:
  `perplexity = exp(sum_t -log p(w_t | w_<t) / #targets)`.

  Args:
    model: the `LanguageModel`.
    bptt: the window length.

  Returns:
    `evaluate(params, data) -> Evaluation`.
  """

  @jax.jit
  def scan_windows(params, inputs, targets, mask):
    carry = model.initial_state(params, inputs.shape[1])

    def body(carry, window):
      inputs_t, targets_t, mask_t = window
      lengths = jnp.sum(mask_t, axis=1, dtype=jnp.int32)
      logp, carry = model.log_prob(params, inputs_t, targets_t, carry, lengths=lengths)
      nll = -jnp.where(mask_t, logp, jnp.zeros_like(logp))
      return carry, jnp.sum(nll)

    _, sums = jax.lax.scan(body, carry, (inputs, targets, mask))
    return sums

  def evaluate(params: LMParams, data) -> Evaluation:
    windows = bptt_windows(np.asarray(data), bptt, last="pad")
    inputs, targets, mask = (np.stack(a) for a in zip(*windows))
    sums = np.asarray(scan_windows(params, inputs, targets, mask), np.float64)
    nll, tokens = float(sums.sum()), int(mask.sum())
    if not np.isfinite(nll):
      raise FloatingPointError(f"the evaluation NLL is not finite ({nll}): the model diverged.")
    return Evaluation(nll, tokens, float(np.exp(nll / tokens)))

  return evaluate
