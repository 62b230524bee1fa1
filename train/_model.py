"""The recurrent language model: an embedding, a stack of recurrent cells, any output layer.

```
x_t = dropout(E[w_t])                       # [B, T, E], E tied to the output table with `tied`
y_t = rnn.stack(cells, dropout)(x_t)        # dropout between the layers
h_t = dropout(y_t)                          # [B, T, H]
loss = layer.loss(h_t, w_{t+1})             # any softmax_alts output layer
```

Dropout sits on the non-recurrent connections only (Zaremba et al. 2014): the embedding output,
between the layers and before the output layer; the recurrent state is never dropped.
"""

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import rnn
import softmax_alts

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
SOFTMAXES = ("full", "hsm-balanced", "hsm-huffman", "class", "dsoftmax", "sampled", "nce", "ns",
             "adaptive", "selfnorm")
SAMPLERS = ("uniform", "log_uniform", "unigram", "in_batch")
GRADS = ("autodiff", "manual")
INITS = ("default", "pytorch")
# The compute dtypes of `ModelConfig.precision` (the parameters are float32 in both).
PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The output layers over `FullParams(w [V, H], b [V])`, whose table `w` can be the embedding.
TIEABLE = ("full", "sampled", "nce", "ns", "selfnorm")
# The sampling losses, whose gradient touches only some rows of the table.
SAMPLING = ("sampled", "nce", "ns")
# The cumulative frequency at which the automatic cutoffs and bands cut the vocabulary.
_AUTO_MASS = (0.8, 0.95)


class ModelConfig(NamedTuple):
  """The static configuration of a language model (every field a plain Python value).

  Attributes:
    vocab_size: V.
    cell: "lstm", "gru", "rnn_tanh" or "rnn_relu".
    emsize: E, the embedding size.
    nhid: the hidden size of every layer.
    nlayers: the number of stacked layers.
    proj: the projection size of an LSTMP (`cell="lstm"` only), or None.
    dropout: the drop probability on the non-recurrent connections, in `[0, 1)`.
    tied: share the embedding with the output table (Press and Wolf 2017; Inan et al. 2017).
    softmax: one of `SOFTMAXES`.
    num_samples: k, the negatives of "sampled", "nce" and "ns".
    sampler: the negatives' distribution, one of `SAMPLERS`.
    cutoffs: the adaptive softmax's cutoffs, or None for automatic ones.
    bands: the D-softmax's `(num_words, dim)` bands, or None for automatic ones.
    classes: the class-based softmax's number of classes, or None for `round(sqrt(V))`.
    alpha: the self-normalization penalty's weight.
    div_value: the adaptive softmax's width divisor.
    grad: "autodiff" or "manual" (hand-derived BPTT, see `rnn.unroll`).
    init: the initial parameters. "default": each cell's own (`rnn.lstm`'s forget-gate bias of
      1) and each output layer's own (the full softmax's table `N(0, 1/H)`). "pytorch": those of
      PyTorch's word_language_model: every tensor of the recurrent layers `U(-1/sqrt(H),
      1/sqrt(H))` (`torch.nn.LSTM`'s own, no forget-gate bias), and an output table over
      `FullParams` `U(-0.1, 0.1)` with zero biases. The embedding is `U(-0.1, 0.1)` in both.
    precision: the compute dtype, "float32" or "bfloat16". The parameters (and so the gradients
      and the optimizer state) are float32 in both; with "bfloat16" the embedding is looked up
      and cast, the recurrent GEMMs run in bfloat16 with float32 accumulation (the cells'
      `dtype`), the carried state is float32, and the output layer reads bfloat16 features
      while computing its log-sum-exp and losses in float32.
    reset_id: a token id (the vocabulary's `<eos>`, `Vocab.eos_id`) after whose every input the
      recurrent state returns to its initial value, so that each document (line) of a stream
      starts afresh, across windows too; None carries the state across documents.
  """

  vocab_size: int
  cell: str = "lstm"
  emsize: int = 128
  nhid: int = 128
  nlayers: int = 1
  proj: int | None = None
  dropout: float = 0.0
  tied: bool = False
  softmax: str = "full"
  num_samples: int = 64
  sampler: str = "unigram"
  cutoffs: tuple[int, ...] | None = None
  bands: tuple[tuple[int, int], ...] | None = None
  classes: int | None = None
  alpha: float = 0.1
  div_value: float = 4.0
  grad: str = "autodiff"
  init: str = "default"
  precision: str = "float32"
  reset_id: int | None = None


class LMParams(NamedTuple):
  """The parameters of a language model.

  Attributes:
    embedding: `[V, E]` input word vectors, or None when tied (the table `output.w` is used).
    rnn: the `rnn.stack` parameters, one entry per layer.
    output: the output layer's parameters.
  """

  embedding: jax.Array | None
  rnn: tuple
  output: Any


class LanguageModel(NamedTuple):
  """A language model as a NamedTuple of pure functions, in the manner of optax.

  Attributes:
    init: `init(key) -> LMParams`.
    initial_state: `initial_state(params, batch_size) -> carry`, zeros.
    embed: `embed(params, inputs [B, T]) -> [B, T, E]`, the input word vectors.
    features: `features(rnn_params, x [B, T, E], carry, *, key=None, lengths=None,
      inputs=None) -> (hidden [B, T, H], carry)`: dropout, the stack, dropout (no dropout when
      `key` is None); `inputs [B, T]` (the token ids of `x`) are needed with `reset_id`.
    apply: `apply(params, inputs [B, T], carry, *, key=None, lengths=None) -> (hidden, carry)`.
    loss: `loss(params, inputs [B, T], targets [B, T], mask [B, T], carry, *, key) ->
      (objective, LossAux(carry, losses [B, T], hidden [B * T, H]))`: the training objective
      averaged over the unmasked tokens, with dropout and the output layer's (possibly
      sampled) loss.
    log_prob: `log_prob(params, inputs, targets, carry, *, lengths=None) -> (logp [B, T], carry)`:
      exact normalized log-probabilities, no dropout.
    step: `step(params, carry, token_ids [B]) -> (carry, log_probs [B, V])`: one step of
      generation, exact.
    cell: the `rnn.Stack` of the recurrent layers.
    layer: the `softmax_alts.OutputLayer`.
    config: the `ModelConfig`, with automatic options (cutoffs, bands, classes) filled in.
  """

  init: Callable[..., LMParams]
  initial_state: Callable[..., Any]
  embed: Callable[..., jax.Array]
  features: Callable[..., Any]
  apply: Callable[..., Any]
  loss: Callable[..., Any]
  log_prob: Callable[..., Any]
  step: Callable[..., Any]
  cell: rnn.Stack
  layer: Any
  config: ModelConfig


class LossAux(NamedTuple):
  """What `LanguageModel.loss` returns beside the objective.

  Attributes:
    carry: the recurrent state after the window (not detached).
    losses: `[B, T]` per-token training losses, zero at masked steps.
    hidden: `[B * T, H]` the features fed to the output layer (after dropout).
  """

  carry: Any
  losses: jax.Array
  hidden: jax.Array


def _positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
  return int(value)


def _check_counts(counts, vocab_size: int) -> np.ndarray:
  counts = np.asarray(counts)
  if counts.shape != (vocab_size,):
    raise ValueError(f"`counts` must be [V] with V = vocab_size = {vocab_size}; got shape "
                     f"{counts.shape}.")
  if counts.size and (not np.issubdtype(counts.dtype, np.number) or (counts < 0).any()):
    raise ValueError("`counts` must be non-negative numbers (the vocabulary's token counts).")
  if not counts.sum() > 0:
    raise ValueError("`counts` must have a positive total (the vocabulary's token counts).")
  return counts


def _mass_splits(counts: np.ndarray, num_splits: int) -> list[int]:
  """Ids in (0, V) where the cumulative frequency passes `_AUTO_MASS`, strictly increasing."""
  vocab_size = counts.size
  cumulative = np.cumsum(counts) / counts.sum()
  cuts = []
  for mass in _AUTO_MASS[:num_splits]:
    cut = int(np.searchsorted(cumulative, mass) + 1)
    cut = min(max(cut, (cuts[-1] + 1) if cuts else 1), vocab_size - 1)
    if cut > (cuts[-1] if cuts else 0) and cut < vocab_size:
      cuts.append(cut)
  return cuts


def default_cutoffs(counts) -> tuple[int, ...]:
  """Adaptive-softmax cutoffs where the cumulative frequency passes 80% and 95%.

  The shortlist holds the words that make up 80% of the tokens, the first cluster the next 15%,
  the second the rest: most tokens pay only for the head (Grave et al. 2017).

  Args:
    counts: `[V]` token counts, ids sorted by descending frequency (V >= 2).

  Returns:
    Strictly increasing ids in `(0, V)`.
  """
  counts = np.asarray(counts, np.float64)
  if counts.size < 2:
    raise ValueError(f"the adaptive softmax needs V >= 2; got V = {counts.size}.")
  return tuple(_mass_splits(counts, 2))


def default_bands(counts, hidden_size: int) -> tuple[tuple[int, int], ...]:
  """D-softmax bands cut where the cumulative frequency passes 80% and 95%.

  The frequent words (80% of the tokens) get half of the hidden units, the next band a quarter,
  the rare words the rest (Chen et al. 2016 give the frequent words the widest vectors).

  Args:
    counts: `[V]` token counts, ids sorted by descending frequency.
    hidden_size: H, the width the band dims sum to.

  Returns:
    `(num_words, dim)` pairs: words summing to V, dims to H.
  """
  counts = np.asarray(counts, np.float64)
  vocab_size = counts.size
  cuts = _mass_splits(counts, 2) if vocab_size >= 2 else []
  cuts = cuts[:max(0, hidden_size - 1)]
  words = np.diff([0] + cuts + [vocab_size]).tolist()
  shares = {1: (1.0,), 2: (2 / 3, 1 / 3), 3: (0.5, 0.25, 0.25)}[len(words)]
  dims = [max(1, int(hidden_size * s)) for s in shares[:-1]]
  dims.append(hidden_size - sum(dims))
  return tuple((int(w), int(d)) for w, d in zip(words, dims))


def _make_cell(config: ModelConfig) -> rnn.Stack:
  layers = []
  dtype = PRECISIONS[config.precision]
  for _ in range(config.nlayers):
    if config.cell == "lstm":
      layers.append(rnn.lstm(config.nhid, proj_size=config.proj, dtype=dtype))
    elif config.cell == "gru":
      layers.append(rnn.gru(config.nhid, dtype=dtype))
    elif config.cell == "rnn_tanh":
      layers.append(rnn.simple(config.nhid, activation=jnp.tanh, dtype=dtype))
    else:
      layers.append(rnn.simple(config.nhid, activation=jax.nn.relu, dtype=dtype))
  return rnn.stack(layers, dropout=config.dropout)


def _make_sampler(config: ModelConfig, counts: np.ndarray) -> softmax_alts.Sampler:
  vocab_size = config.vocab_size
  if config.sampler == "uniform":
    return softmax_alts.uniform(vocab_size)
  if config.sampler == "log_uniform":
    return softmax_alts.log_uniform(vocab_size)
  if config.sampler == "unigram":
    return softmax_alts.unigram(counts, power=0.75)
  return softmax_alts.in_batch(vocab_size)


def _make_layer(config: ModelConfig, counts: np.ndarray):
  name = config.softmax
  if name == "full":
    return softmax_alts.full()
  if name == "hsm-balanced":
    return softmax_alts.hierarchical(softmax_alts.balanced_tree(config.vocab_size))
  if name == "hsm-huffman":
    return softmax_alts.hierarchical(softmax_alts.huffman_tree(counts))
  if name == "class":
    return softmax_alts.class_based(counts, config.classes)
  if name == "dsoftmax":
    return softmax_alts.differentiated(counts, config.bands)
  if name == "adaptive":
    return softmax_alts.adaptive(config.cutoffs, div_value=config.div_value)
  if name == "selfnorm":
    return softmax_alts.self_normalized(config.alpha)
  sampler = _make_sampler(config, counts)
  if name == "sampled":
    return softmax_alts.sampled(config.num_samples, sampler)
  if name == "nce":
    return softmax_alts.nce(config.num_samples, sampler)
  return softmax_alts.negative_sampling(config.num_samples, sampler)


def check_config(config: ModelConfig, counts) -> ModelConfig:
  """Checks a `ModelConfig` against the vocabulary and fills in the automatic options.

  Args:
    config: the `ModelConfig`.
    counts: `[V]` token counts of the vocabulary, ids sorted by descending frequency.

  Returns:
    The config with `cutoffs`, `bands` and `classes` set (automatic values where None) for the
    output layer that uses them, and None for the others.

  Raises:
    ValueError: naming the field, the expected and the received value, for any size that is not
      positive, an unknown cell, softmax, sampler or grad, a dropout outside `[0, 1)`, a
      projection with a cell other than the LSTM or not smaller than `nhid`, cutoffs or bands
      that do not fit the vocabulary or the hidden size, or a `tied` that the shapes forbid.
  """
  vocab_size = _positive_int(config.vocab_size, "vocab_size")
  if vocab_size < 2:
    raise ValueError(f"a language model needs a vocabulary of at least 2 words; got {vocab_size}.")
  counts = _check_counts(counts, vocab_size)
  for name in ("emsize", "nhid", "nlayers", "num_samples"):
    _positive_int(getattr(config, name), name)
  for name, value, choices in (("cell", config.cell, CELLS), ("softmax", config.softmax, SOFTMAXES),
                               ("sampler", config.sampler, SAMPLERS),
                               ("grad", config.grad, GRADS), ("init", config.init, INITS),
                               ("precision", config.precision, tuple(PRECISIONS))):
    if value not in choices:
      raise ValueError(f"`{name}` must be one of {', '.join(choices)}; got {value!r}.")
  if not (isinstance(config.dropout, (int, float)) and 0.0 <= config.dropout < 1.0):
    raise ValueError(f"`dropout` must be in [0, 1); got {config.dropout!r}.")
  if config.proj is not None:
    _positive_int(config.proj, "proj")
    if config.cell != "lstm":
      raise ValueError(f"`proj` (LSTMP) needs cell=lstm; got cell={config.cell}.")
    if config.proj >= config.nhid:
      raise ValueError(f"`proj` must be smaller than nhid = {config.nhid}; got {config.proj}.")
  if config.reset_id is not None and (
      isinstance(config.reset_id, bool) or not isinstance(config.reset_id, (int, np.integer))
      or not 0 <= config.reset_id < vocab_size):
    raise ValueError(f"`reset_id` must be a token id in [0, V = {vocab_size}) (the vocabulary's "
                     f"<eos>) or None; got {config.reset_id!r}.")
  if not (isinstance(config.alpha, (int, float)) and config.alpha >= 0):
    raise ValueError(f"`alpha` must be a non-negative number; got {config.alpha!r}.")
  if not (isinstance(config.div_value, (int, float)) and config.div_value > 0):
    raise ValueError(f"`div_value` must be a positive number; got {config.div_value!r}.")
  hidden_size = config.proj or config.nhid
  cutoffs = bands = classes = None
  if config.softmax == "adaptive":
    cutoffs = default_cutoffs(counts) if config.cutoffs is None else tuple(config.cutoffs)
    if not cutoffs or any(isinstance(c, bool) or not isinstance(c, (int, np.integer))
                          for c in cutoffs):
      raise ValueError(f"`cutoffs` must be increasing integer ids in (0, V = {vocab_size}); "
                       f"got {list(cutoffs)}.")
    cutoffs = tuple(int(c) for c in cutoffs)
    if cutoffs[0] <= 0 or cutoffs[-1] >= vocab_size or any(
        b <= a for a, b in zip(cutoffs, cutoffs[1:])):
      raise ValueError(f"`cutoffs` must be strictly increasing ids in (0, V) = (0, {vocab_size}) "
                       f"for a vocabulary of {vocab_size} words; got {list(cutoffs)}.")
    widths = [int(hidden_size // config.div_value ** (i + 1)) for i in range(len(cutoffs))]
    if min(widths) < 1:
      raise ValueError(f"the adaptive softmax's tail widths H // div_value**(i+1) must be >= 1; "
                       f"got {widths} for H = {hidden_size}, div_value = {config.div_value} and "
                       f"cutoffs {list(cutoffs)}: use fewer cutoffs or a smaller div_value.")
  elif config.softmax == "dsoftmax":
    bands = default_bands(counts, hidden_size) if config.bands is None else config.bands
    try:
      bands = tuple((int(w), int(d)) for w, d in bands)
    except (TypeError, ValueError):
      raise ValueError(f"`bands` must be (num_words, dim) pairs; got {bands!r}.") from None
    if any(w < 1 or d < 1 for w, d in bands):
      raise ValueError(f"`bands` must hold positive (num_words, dim) pairs; got {list(bands)}.")
    total_words, total_dims = sum(w for w, _ in bands), sum(d for _, d in bands)
    if total_words != vocab_size:
      raise ValueError(f"`bands` word counts must sum to V = {vocab_size} (the vocabulary "
                       f"size); got {[w for w, _ in bands]} (sum {total_words}).")
    if total_dims != hidden_size:
      raise ValueError(f"`bands` dims must sum to H = {hidden_size} (the last layer's output "
                       f"size); got {[d for _, d in bands]} (sum {total_dims}).")
  elif config.softmax == "class":
    classes = round(math.sqrt(vocab_size)) if config.classes is None else config.classes
    classes = _positive_int(classes, "classes")
    if classes > vocab_size:
      raise ValueError(f"`classes` must be in [1, V = {vocab_size}]; got {classes}.")
  if config.tied:
    if config.softmax not in TIEABLE:
      raise ValueError(f"`tied` needs an output layer with a [V, H] table ({', '.join(TIEABLE)}); "
                       f"got softmax={config.softmax}.")
    if config.emsize != hidden_size:
      what = "proj" if config.proj else "nhid"
      raise ValueError(f"`tied` needs emsize equal to the last layer's output size ({what} = "
                       f"{hidden_size}); got emsize={config.emsize}.")
  reset_id = None if config.reset_id is None else int(config.reset_id)
  return config._replace(vocab_size=vocab_size, cutoffs=cutoffs, bands=bands, classes=classes,
                         dropout=float(config.dropout), tied=bool(config.tied),
                         reset_id=reset_id)


def _dropout(key, x, rate: float):
  """Inverted dropout: keep with probability `1 - rate`, scale the kept units by `1/(1-rate)`."""
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def _float32(tree):
  """Every floating leaf of `tree` as float32."""
  return jax.tree.map(lambda x: x.astype(jnp.float32)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _boundaries(inputs, lengths, reset_id: int):
  """`(resets [B, T], ended [B])` of the document boundaries in a window of `inputs [B, T]`.

  The state returns to its initial value after every input `reset_id`: before step t when the
  input of step t - 1 is one (`resets`), and after the window when its last valid input is one
  (`ended`, so that the next window starts afresh).
  """
  after = inputs == reset_id
  resets = jnp.concatenate([jnp.zeros_like(after[:, :1]), after[:, :-1]], axis=1)
  if lengths is None:
    ended = after[:, -1]
  else:
    last = jnp.clip(lengths - 1, 0, inputs.shape[1] - 1)
    ended = jnp.take_along_axis(after, last[:, None], axis=1)[:, 0] & (lengths > 0)
  return resets, ended


def _uniform_like(key, tree, scale: float):
  """`tree` with every array drawn anew from `U(-scale, scale)`, in its shape and dtype."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.uniform(k, x.shape, x.dtype, -scale, scale)
                                      for k, x in zip(keys, leaves)])


def language_model(config: ModelConfig, counts: Sequence[int] | np.ndarray, *,
                   layer=None) -> LanguageModel:
  """Makes a recurrent language model: embedding, `rnn.stack`, a `softmax_alts` output layer.

  The recipe of Zaremba et al. (2014): word vectors, a stack of LSTMs (or GRUs, Elman RNNs,
  LSTMPs) and a softmax, with dropout on the non-recurrent connections only, trained by
  truncated BPTT with the state carried from window to window. Any output layer of
  `softmax_alts` can replace the softmax; `log_prob` is always the exact normalized one. With
  `tied`, the input embedding is the output table `W [V, H]` (Press and Wolf 2017; Inan et al.
  2017), which needs E = H and an output layer over `FullParams`.

  Args:
    config: a `ModelConfig`.
    counts: `[V]` token counts of the vocabulary (ids by descending frequency); the Huffman
      tree, the classes, the D-softmax bands, the adaptive cutoffs and the unigram sampler are
      built from them.
    layer: an `OutputLayer` to use instead of the one `config.softmax` names, over the same
      parameters (e.g. its vocabulary-parallel form, see `train.sharded_language_model`).

  Returns:
    A `LanguageModel`.

  Raises:
    ValueError: for a config that cannot be built (see `check_config`).

  References:
    Zaremba, Sutskever and Vinyals, Recurrent neural network regularization, 2014.
      https://arxiv.org/abs/1409.2329
    Press and Wolf, Using the output embedding to improve language models, 2017.
      https://arxiv.org/abs/1608.05859
    Inan, Khosravi and Socher, Tying word vectors and word classifiers: a loss framework for
      language modeling, 2017. https://arxiv.org/abs/1611.01462
  """
  config = check_config(config, counts)
  counts = np.asarray(counts)
  cell = _make_cell(config)
  layer = _make_layer(config, counts) if layer is None else layer
  vocab_size, emsize, rate = config.vocab_size, config.emsize, config.dropout
  hidden_size = cell.output_size
  dtype = PRECISIONS[config.precision]

  def init(key) -> LMParams:
    key_embedding, key_rnn, key_output = jax.random.split(key, 3)
    output = layer.init(key_output, hidden_size, vocab_size)
    rnn_params = cell.init(key_rnn, emsize)
    if config.init == "pytorch":
      rnn_params = _uniform_like(key_rnn, rnn_params, 1.0 / math.sqrt(config.nhid))
      if isinstance(output, softmax_alts.FullParams):
        output = output._replace(w=_uniform_like(key_output, output.w, 0.1),
                                 b=jnp.zeros_like(output.b))
    if config.softmax == "nce":
      # Start self-normalized, log Z = log sum_v exp(b_v) = 0 (Zoph et al. 2016).
      output = output._replace(b=jnp.full_like(output.b, -math.log(vocab_size)))
    embedding = None
    if not config.tied:
      # PyTorch's word_language_model: encoder weights uniform in [-0.1, 0.1].
      embedding = jax.random.uniform(key_embedding, (vocab_size, emsize), jnp.float32, -0.1, 0.1)
    return LMParams(embedding=embedding, rnn=rnn_params, output=output)

  def initial_state(params: LMParams, batch_size: int):
    # Float32 whatever the precision: the carry (and a checkpoint of it) is the same in both.
    return _float32(cell.initial_state(params.rnn, (batch_size,)))

  def embed(params: LMParams, inputs: jax.Array) -> jax.Array:
    table = params.output.w if config.tied else params.embedding
    return jnp.take(table, inputs, axis=0).astype(dtype)

  def reset_after(params_rnn, carry, ended):
    """`carry` with the rows where `ended [B]` back at the initial state."""
    initial = initial_state(LMParams(None, params_rnn, None), ended.shape[0])
    return jax.tree.map(lambda i, c: jnp.where(ended.reshape(ended.shape + (1,) * (c.ndim - 1)),
                                               i.astype(c.dtype), c), initial, carry)

  def features(rnn_params, x, carry, *, key=None, lengths=None, inputs=None):
    resets = None
    if config.reset_id is not None:
      if inputs is None:
        raise ValueError("`inputs` (the token ids of `x`) are needed by a model with `reset_id`.")
      resets, ended = _boundaries(inputs, lengths, config.reset_id)
    keys = jax.random.split(key, 3) if key is not None and rate > 0 else None
    if keys is not None:
      x = _dropout(keys[0], x, rate)
    ys, final = rnn.unroll(cell, rnn_params, x, carry, lengths=lengths, resets=resets,
                           grad=config.grad, key=None if keys is None else keys[1])
    final = jax.tree.map(lambda f, c: f.astype(c.dtype), final, carry)
    if resets is not None:  # a window that ends with <eos> hands the next one a fresh state
      final = reset_after(rnn_params, final, ended)
    if keys is not None:
      ys = _dropout(keys[2], ys, rate)
    return ys, final

  def apply(params: LMParams, inputs, carry, *, key=None, lengths=None):
    return features(params.rnn, embed(params, inputs), carry, key=key, lengths=lengths,
                    inputs=inputs)

  def loss(params: LMParams, inputs, targets, mask, carry, *, key):
    key_features, key_loss = jax.random.split(key)
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
    hidden, carry = apply(params, inputs, carry, key=key_features, lengths=lengths)
    hidden = hidden.reshape(-1, hidden_size)
    values = layer.loss(params.output, hidden, targets.reshape(-1),
                        key=key_loss).reshape(targets.shape)
    values = jnp.where(mask, values, jnp.zeros_like(values))
    count = jnp.maximum(jnp.sum(mask, dtype=values.dtype), 1.0)
    return jnp.sum(values) / count, LossAux(carry, values, hidden)

  def log_prob(params: LMParams, inputs, targets, carry, *, lengths=None):
    hidden, carry = apply(params, inputs, carry, lengths=lengths)
    logp = layer.log_prob(params.output, hidden.reshape(-1, hidden_size), targets.reshape(-1))
    return logp.reshape(targets.shape), carry

  def step(params: LMParams, carry, token_ids):
    x = embed(params, token_ids)
    new, y = cell.step(params.rnn, carry, cell.project(params.rnn, x))
    new = jax.tree.map(lambda n, c: n.astype(c.dtype), new, carry)
    if config.reset_id is not None:
      new = reset_after(params.rnn, new, jnp.asarray(token_ids) == config.reset_id)
    return new, layer.log_probs(params.output, y)

  return LanguageModel(init=init, initial_state=initial_state, embed=embed, features=features,
                       apply=apply, loss=loss, log_prob=log_prob, step=step, cell=cell,
                       layer=layer, config=config)
