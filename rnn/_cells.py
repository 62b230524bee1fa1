"""The cell contract, and the built-in cells: Elman (tanh, IRNN), LSTM (with projection), GRU.

Weight layout and gate order follow PyTorch so that weights port exactly:

| cell   | `w_ih`        | `w_hh`          | `b_ih`, `b_hh` | gate order | extra           |
| ------ | ------------- | --------------- | -------------- | ---------- | --------------- |
| simple | `[H, D]`      | `[H, H]`        | `[H]`          | -          |                 |
| lstm   | `[4H, D]`     | `[4H, P or H]`  | `[4H]`         | i, f, g, o | `w_hr [P, H]`   |
| gru    | `[3H, D]`     | `[3H, H]`       | `[3H]`         | r, z, n    |                 |

Weights are stored `[out, in]` and contracted on their last axis (`x @ w.T` without materialising
the transpose), which is also the orientation XLA's CPU dot runs fastest at small batch. With
`bias=False` (PyTorch's) the bias fields are `None`.

`project` computes the input-to-hidden products for all steps at once (one GEMM, `xs @ w_ih.T`);
the step adds the biases to the pre-activations (`Pointwise.bias`), where they fuse with the gate
arithmetic instead of costing a pass over `[T, B, G]` (the GRU keeps `b_hn` apart: the
PyTorch/cuDNN form multiplies it by the reset gate).

Every built-in cell is written once, as its `Pointwise` parts: `step` is `Pointwise.step`, and the
hand-derived BPTT of `rnn.unroll(..., grad="manual")` is built from the same parts.

Precision (Flax's convention): `param_dtype` is the dtype `init` stores the parameters in; `dtype`
is the computation dtype (`None`: the promotion of the inputs' and the parameters' dtypes). GEMMs
run in the computation dtype and accumulate in float32 (or wider); the point-wise part runs in that
accumulation dtype, and the LSTM's cell state is kept in it.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Pointwise(NamedTuple):
  """A cell's step split around its recurrent product: the fast path of `grad="manual"`.

  ```
  hw_t = state_tm1.hidden @ W.T                   # W = recurrent_weight(params), [G_h, R]
  a_t = combine(xw_t, hw_t) + bias(params)        # xw_t + hw_t + bias by default
  state_t, y_t = update(params, a_t, state_tm1)   # the cell's point-wise math
  ```

  `xw_t` is `project`'s output for step t. The hand-derived BPTT writes the recursion and every
  GEMM once for all cells: it stores `a_t` (the pre-activations) and the state before each step,
  gets the derivatives of `update` with `jax.vjp` in the reverse loop (recomputed from the stored
  `a_t`), transposes `combine` to send `dhw_t` one step back through `W`, and forms the weight
  gradients as GEMMs over all steps (`jax.vjp` of `project` for the input side) and the bias
  gradients as sums over all steps. Parameters that `update` itself reads (a second GEMM such as
  LSTMP's projection) get their gradient from the same per-step `jax.vjp`, summed in the loop.

  Attributes:
    update: `update(params, a_t, state_tm1) -> (state_t, y_t)`. It runs in `a_t`'s dtype (at least
      float32; the state's leaves arrive promoted to it and leave cast back). The state must have
      a `hidden` field: the recurrent product reads it.
    combine: `combine(xw_t, hw_t) -> a_t`, linear in both (any pytree out, e.g. a tuple of
      arrays when the products meet the gates differently, as in the GRU); `None` means
      `xw_t + hw_t`. Not called when the recurrent weight is `None`: then `a_t` is `xw_t`.
    recurrent_weight: `recurrent_weight(params) -> W [G_h, R]`, or `None` for a cell whose gates
      do not read the previous state (minGRU, minLSTM); the field `None` means `params.w_hh`.
    bias: `bias(params) -> b`, vectors added to `a_t` (a pytree like it, or `None` for none);
      the field `None`: no bias here (a cell may instead fold its biases into `project`). A bias
      added in the step costs no pass over `[T, B, G]`, and its gradient is one sum.
  """

  update: Callable[..., tuple[Any, jax.Array]]
  combine: Callable[..., Any] | None = None
  recurrent_weight: Callable[..., jax.Array | None] | None = None
  bias: Callable[..., Any] | None = None

  def weight(self, params) -> jax.Array | None:
    """The recurrent weight `W [G_h, R]`, or `None` when the step has no recurrent product."""
    return params.w_hh if self.recurrent_weight is None else self.recurrent_weight(params)

  def products(self, xw_t, hw_t):
    """`combine(xw_t, hw_t)` (linear; `hw_t` is `None` without a recurrent weight)."""
    if hw_t is None:
      return _to_accumulation(xw_t)
    if self.combine is None:
      xw_t, hw_t = _to_accumulation(xw_t, hw_t)
      return xw_t + hw_t
    return self.combine(xw_t, hw_t)

  def add_bias(self, params, a_t):
    """`a_t + bias(params)`, leaf by leaf."""
    b = None if self.bias is None else self.bias(params)
    return a_t if b is None else jax.tree.map(_add_bias, a_t, b)

  def step(self, params, state_tm1, xw_t):
    """`Cell.step` built from the parts: `(state_t, y_t)`, `y_t` in `xw_t`'s dtype."""
    w = self.weight(params)
    hw_t = None if w is None else _dense(state_tm1.hidden, w)
    a_t = self.add_bias(params, self.products(xw_t, hw_t))
    return apply_update(self, params, a_t, state_tm1, xw_t.dtype)


class Cell(NamedTuple):
  """A recurrent cell: pure functions closed over static config, in the manner of optax.

  Every cell meets this contract, the built-in ones and a user's own. The first five fields are
  all `rnn.unroll` needs; the optional ones unlock fast paths.

  ```python
  class MyState(NamedTuple):
    hidden: jax.Array                                   # [..., H]

  def my_cell(h):
    def init(key, input_size):
      k1, k2 = jax.random.split(key)
      return rnn.SimpleParams(jax.random.normal(k1, (h, input_size)) / input_size ** 0.5,
                              jax.random.normal(k2, (h, h)) / h ** 0.5, None, None)
    def initial_state(params, batch_shape=()):
      return MyState(jnp.zeros(tuple(batch_shape) + (h,), params.w_hh.dtype))
    def project(params, xs):                            # [..., D] -> [..., H], all steps at once
      return xs @ params.w_ih.T
    def update(params, a_t, state_tm1):                 # a_t = project(x_t) + h_{t-1} @ w_hh.T
      h_t = jnp.tanh(a_t) * jax.nn.sigmoid(a_t)
      return MyState(h_t), h_t
    pointwise = rnn.Pointwise(update)                   # the fast path: grad="manual" works
    return rnn.Cell(init, initial_state, project, pointwise.step, h, pointwise=pointwise)
  ```

  A cell written only with `step` works with every `unroll` option but `grad="manual"` (which
  then says that `pointwise` is missing) and `parallel=True` (which needs `linear`).

  Attributes:
    init: `init(key, input_size) -> params`, a NamedTuple of arrays.
    initial_state: `initial_state(params, batch_shape) -> state`, the state a sequence starts
      from and a reset returns to (zeros for the built-in cells).
    project: `project(params, xs [..., D]) -> xw [..., G]`, the input products of every step in
      one GEMM (G is the number of gate units: H, 4H or 3H). It must treat every step alike.
    step: `step(params, state_tm1, xw_t [..., G]) -> (state_t, y_t)`, one step, in the order
      `jax.lax.scan` wants. Any leading batch shape works.
    output_size: the size of `y_t`.
    config: the static configuration (a NamedTuple of Python values), or `None`.
    pointwise: the step split around its recurrent product (`rnn.Pointwise`), from which `step`
      and the hand-derived BPTT are both built; `None`: `grad="manual"` is unavailable.
    linear: `linear(params, xw [..., G]) -> (a, b)`, for a cell whose state is only `hidden` and
      follows `h_t = a_t * h_{t-1} + b_t` with `a_t`, `b_t` from the input alone and `y_t = h_t`
      (minGRU, minLSTM): `unroll(..., parallel=True)` then solves the recurrence with
      `jax.lax.associative_scan`. `None`: no parallel form.
  """

  init: Callable[..., Any]
  initial_state: Callable[..., Any]
  project: Callable[..., jax.Array]
  step: Callable[..., tuple[Any, jax.Array]]
  output_size: int
  config: Any = None
  pointwise: Pointwise | None = None
  linear: Callable[..., tuple[jax.Array, jax.Array]] | None = None


class SimpleParams(NamedTuple):
  w_ih: jax.Array  # [H, D]
  w_hh: jax.Array  # [H, H]
  b_ih: jax.Array | None  # [H]
  b_hh: jax.Array | None  # [H]


class SimpleState(NamedTuple):
  hidden: jax.Array  # [..., H]


class LSTMParams(NamedTuple):
  w_ih: jax.Array  # [4H, D], gates i, f, g, o
  w_hh: jax.Array  # [4H, P] with a projection, else [4H, H]
  b_ih: jax.Array | None  # [4H]
  b_hh: jax.Array | None  # [4H]
  w_hr: jax.Array | None = None  # [P, H], the projection of LSTMP (Sak et al. 2014)


class LSTMState(NamedTuple):
  hidden: jax.Array  # [..., P or H], the (projected) output h_t
  cell: jax.Array  # [..., H], the memory c_t, in float32 or wider


class GRUParams(NamedTuple):
  w_ih: jax.Array  # [3H, D], gates r, z, n
  w_hh: jax.Array  # [3H, H]
  b_ih: jax.Array | None  # [3H]
  b_hh: jax.Array | None  # [3H]


class GRUState(NamedTuple):
  hidden: jax.Array  # [..., H]


class SimpleConfig(NamedTuple):
  hidden_size: int
  activation: Callable[[jax.Array], jax.Array]
  identity_init: bool
  bias: bool
  dtype: Any
  param_dtype: Any


class LSTMConfig(NamedTuple):
  hidden_size: int
  proj_size: int | None
  forget_bias: float
  bias: bool
  dtype: Any
  param_dtype: Any


class GRUConfig(NamedTuple):
  hidden_size: int
  reset_after: bool
  bias: bool
  dtype: Any
  param_dtype: Any


def _check_size(value, name: str, *, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"`{name}` must be a positive int; got {value!r}.")


def _check_dtype(value, name: str, *, allow_none: bool = False):
  """A floating dtype (`np.dtype`), or `None` where allowed."""
  if value is None and allow_none:
    return None
  try:
    dtype = np.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"`{name}` must be a floating dtype (e.g. jnp.float32, jnp.bfloat16)"
                     f"{' or None' if allow_none else ''}; got {value!r}.")
  return dtype


def promote(*dtypes):
  """The promotion of floating dtypes (bfloat16 with float32 is float32), whatever the config."""
  with jax.numpy_dtype_promotion("standard"):
    return jnp.result_type(*dtypes)


def accumulation_dtype(*dtypes):
  """Where GEMMs accumulate and the point-wise part runs: the dtypes' promotion, >= float32."""
  return promote(*dtypes, jnp.float32)


def _to_accumulation(*arrays):
  """The arrays in the accumulation dtype of all of them (one array in, one out)."""
  dtype = accumulation_dtype(*(a.dtype for a in arrays))
  out = tuple(a.astype(dtype) for a in arrays)
  return out[0] if len(out) == 1 else out


def _uniform(key, shape, scale, dtype):
  return jax.random.uniform(key, shape, dtype, -scale, scale)


def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x [..., K] @ w[N, K].T -> [..., N]` in `x`'s dtype, accumulated in float32 or wider.

  Contracts the last axes without a transpose; the result is in the accumulation dtype.
  """
  acc = accumulation_dtype(x.dtype)
  return jax.lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=None if acc == x.dtype else acc)


def _add_bias(x: jax.Array, b: jax.Array | None) -> jax.Array:
  """`x [..., N] + b [N]`, broadcasting explicitly (rank promotion may be set to raise)."""
  if b is None:
    return x
  return x + b.astype(x.dtype).reshape((1,) * (x.ndim - 1) + b.shape)


def _affine(xs: jax.Array, w: jax.Array, b: jax.Array | None, dtype) -> jax.Array:
  """`xs @ w.T + b` in the computation dtype (`dtype`, or promoted from `xs` and `w`)."""
  dtype = dtype or promote(xs.dtype, w.dtype)
  return _add_bias(_dense(xs.astype(dtype), w), b).astype(dtype)


def _summed_bias(params) -> jax.Array | None:
  """The bias of an Elman RNN's or LSTM's pre-activation: `b_ih + b_hh`."""
  if params.b_ih is None:
    return None
  return params.b_ih + params.b_hh


def _select(mask_t: jax.Array, new, old):
  """Keeps `old` where `mask_t` is False (padding past a sequence's length), leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(mask_t[..., None], n, o), new, old)


def masked_step(step, state_tm1, mask_t, reset_t, init):
  """One step of a sequence with resets and padding: `(state_t, y_t, state_in, *rest)`.

  Where `reset_t` is set, `step` starts from `init` instead of `state_tm1`; where `mask_t` is
  False (past a sequence's length) the state stays `state_tm1` and `y_t` is zero. `step(state)`
  returns `(state_t, y_t, *rest)`; `state_in` is the state it started from. `None` masks are off.
  """
  state_in = state_tm1 if reset_t is None else _select(reset_t, init, state_tm1)
  state_t, y_t, *rest = step(state_in)
  if mask_t is not None:
    state_t = _select(mask_t, state_t, state_tm1)
    y_t = jnp.where(mask_t[..., None], y_t, jnp.zeros_like(y_t))
  return (state_t, y_t, state_in, *rest)


def apply_update(pointwise: Pointwise, params, a_t, state_tm1, y_dtype):
  """`pointwise.update` with the state promoted to `a_t`'s dtype and cast back, `y_t` in `y_dtype`.

  So a step returns every state leaf in the dtype it came in (a scan's carry keeps its type), and
  the update's arithmetic never mixes dtypes.
  """
  dtype = jax.tree.leaves(a_t)[0].dtype
  promoted = jax.tree.map(lambda s: s.astype(promote(s.dtype, dtype)), state_tm1)
  state_t, y_t = pointwise.update(params, a_t, promoted)
  state_t = jax.tree.map(lambda n, o: n.astype(o.dtype), state_t, state_tm1)
  return state_t, y_t.astype(y_dtype)


def _lstm_gates(z: jax.Array) -> jax.Array:
  """`[..., 4H]` pre-activations -> (sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)), concatenated.

  One fused elementwise pass with one `tanh` per element: sigmoid(x) = (1 + tanh(x / 2)) / 2,
  and the g gate is `tanh(x) * 1 + 0`, so the gates need no split, no concatenation and no
  `exp`/divide.
  """
  h = z.shape[-1] // 4
  half = np.full((4 * h,), 0.5, np.float32)
  half[2 * h:3 * h] = 1.0                              # g: scale 1, offset 0
  offset = np.where(half == 0.5, 0.5, 0.0).astype(np.float32)
  shape = (1,) * (z.ndim - 1) + (4 * h,)
  scale = jnp.asarray(half, z.dtype).reshape(shape)
  return jnp.tanh(z * scale) * scale + jnp.asarray(offset, z.dtype).reshape(shape)


def zeros_state(state_cls, batch_shape, sizes, dtype, *, wide=()):
  """`state_cls` of zeros `[*batch_shape, n]`; the fields named in `wide` in float32 or wider."""
  batch_shape = tuple(batch_shape)
  return state_cls(**{name: jnp.zeros(batch_shape + (n,), accumulation_dtype(dtype)
                                      if name in wide else dtype)
                      for name, n in zip(state_cls._fields, sizes)})


def state_dtype(config, params):
  """The dtype of a built-in cell's `hidden`: the computation dtype, else the parameters'."""
  return config.dtype or params.w_ih.dtype


def torch_init(key, shapes, hidden_size, dtype):
  """PyTorch's default: every tensor U(-1/sqrt(H), 1/sqrt(H)) (`None` shapes give `None`)."""
  scale = 1.0 / float(hidden_size) ** 0.5
  keys = jax.random.split(key, len(shapes))
  return [None if s is None else _uniform(k, s, scale, dtype) for k, s in zip(keys, shapes)]


def _precision(dtype, param_dtype):
  return _check_dtype(dtype, "dtype", allow_none=True), _check_dtype(param_dtype, "param_dtype")


def simple(hidden_size: int, *, activation: Callable[[jax.Array], jax.Array] = jnp.tanh,
           identity_init: bool | None = None, bias: bool = True, dtype=None,
           param_dtype=jnp.float32) -> Cell:
  """The Elman RNN: `h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)`.

  With `activation=jax.nn.relu` and the recurrent matrix initialised to the identity and its
  bias to zero this is the IRNN of Le et al. 2015.

  Args:
    hidden_size: H.
    activation: the elementwise nonlinearity (tanh by default).
    identity_init: initialise `w_hh` to the identity and the biases to zero (IRNN). `None`
      means "when the activation is `jax.nn.relu`".
    bias: learn `b_ih` and `b_hh` (PyTorch's `bias`); `False`: both are `None`.
    dtype: the computation dtype; `None`: promoted from the inputs' and the parameters'.
    param_dtype: the dtype `init` stores the parameters in.

  Returns:
    A `Cell` with `SimpleParams` and `SimpleState(hidden)`.

  References:
    Elman, Finding structure in time, 1990. https://doi.org/10.1207/s15516709cog1402_1
    Le, Jaitly and Hinton, A simple way to initialize recurrent networks of rectified linear
      units, 2015. https://arxiv.org/abs/1504.00941
  """
  _check_size(hidden_size, "hidden_size")
  if not callable(activation):
    raise ValueError(f"`activation` must be callable; got {activation!r}.")
  if identity_init is None:
    identity_init = activation is jax.nn.relu
  config = SimpleConfig(hidden_size, activation, bool(identity_init), bool(bias),
                        *_precision(dtype, param_dtype))
  h = hidden_size

  def init(key, input_size: int) -> SimpleParams:
    _check_size(input_size, "input_size")
    b = (h,) if config.bias else None
    w_ih, w_hh, b_ih, b_hh = torch_init(key, [(h, input_size), (h, h), b, b], h,
                                        config.param_dtype)
    if config.identity_init:
      w_hh = jnp.eye(h, dtype=config.param_dtype)
      b_ih, b_hh = jax.tree.map(jnp.zeros_like, (b_ih, b_hh))
    return SimpleParams(w_ih, w_hh, b_ih, b_hh)

  def initial_state(params, batch_shape=()) -> SimpleState:
    return zeros_state(SimpleState, batch_shape, (h,), state_dtype(config, params))

  def project(params, xs):
    return _affine(xs, params.w_ih, None, config.dtype)

  def update(params, a_t, state_tm1):
    h_t = activation(a_t)
    return SimpleState(h_t), h_t

  pointwise = Pointwise(update, bias=_summed_bias)
  return Cell(init, initial_state, project, pointwise.step, h, config, pointwise)


def lstm(hidden_size: int, *, proj_size: int | None = None, forget_bias: float = 1.0,
         bias: bool = True, dtype=None, param_dtype=jnp.float32) -> Cell:
  """Long short-term memory, with PyTorch's gate order (i, f, g, o) and optional projection.

  ```
  i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
  c_t = f * c_{t-1} + i * g
  h_t = W_hr (o * tanh(c_t))      # LSTMP; without a projection h_t = o * tanh(c_t)
  ```

  Args:
    hidden_size: H, the size of the memory `c_t`.
    proj_size: P, the size of the projected output `h_t` (LSTMP); `None` for no projection.
    forget_bias: the initial value of the forget gate's input bias (`b_ih[H:2H]`; `b_hh[H:2H]`
      starts at zero), as Gers et al. 2000 and Jozefowicz et al. 2015 advise. It is a parameter,
      not a constant added at every step, so weights port to and from PyTorch exactly.
    bias: learn `b_ih` and `b_hh` (PyTorch's `bias`); `False`: both are `None` (and
      `forget_bias` is unused).
    dtype: the computation dtype; `None`: promoted from the inputs' and the parameters'. The
      memory `c_t` is kept in float32 (or wider) whatever it is.
    param_dtype: the dtype `init` stores the parameters in.

  Returns:
    A `Cell` with `LSTMParams` and `LSTMState(hidden, cell)`.

  References:
    Hochreiter and Schmidhuber, Long short-term memory, 1997.
      https://doi.org/10.1162/neco.1997.9.8.1735
    Gers, Schmidhuber and Cummins, Learning to forget, 2000.
      https://doi.org/10.1162/089976600300015015
    Sak, Senior and Beaufays, Long short-term memory recurrent neural network architectures for
      large scale acoustic modeling, 2014. https://arxiv.org/abs/1402.1128
  """
  _check_size(hidden_size, "hidden_size")
  _check_size(proj_size, "proj_size", allow_none=True)
  if proj_size is not None and proj_size >= hidden_size:
    raise ValueError(f"`proj_size` must be smaller than `hidden_size` ({hidden_size}), as in "
                     f"PyTorch; got {proj_size}.")
  config = LSTMConfig(hidden_size, proj_size, float(forget_bias), bool(bias),
                      *_precision(dtype, param_dtype))
  h = hidden_size
  p = proj_size or hidden_size

  def init(key, input_size: int) -> LSTMParams:
    _check_size(input_size, "input_size")
    b = (4 * h,) if config.bias else None
    shapes = [(4 * h, input_size), (4 * h, p), b, b, None if proj_size is None else (p, h)]
    w_ih, w_hh, b_ih, b_hh, w_hr = torch_init(key, shapes, h, config.param_dtype)
    if config.bias:
      b_ih = b_ih.at[h:2 * h].set(config.forget_bias)
      b_hh = b_hh.at[h:2 * h].set(0.0)
    return LSTMParams(w_ih, w_hh, b_ih, b_hh, w_hr)

  def initial_state(params, batch_shape=()) -> LSTMState:
    return zeros_state(LSTMState, batch_shape, (p, h), state_dtype(config, params),
                       wide=("cell",))

  def project(params, xs):
    return _affine(xs, params.w_ih, None, config.dtype)

  def update(params, z_t, state_tm1):
    i, f, g, o = jnp.split(_lstm_gates(z_t), 4, axis=-1)
    c_t = f * state_tm1.cell + i * g
    h_t = o * jnp.tanh(c_t)
    if params.w_hr is not None:
      h_t = _dense(h_t, params.w_hr)
    return LSTMState(h_t, c_t), h_t

  pointwise = Pointwise(update, bias=_summed_bias)
  return Cell(init, initial_state, project, pointwise.step, p, config, pointwise)


def gru(hidden_size: int, *, reset_after: bool = True, bias: bool = True, dtype=None,
        param_dtype=jnp.float32) -> Cell:
  """Gated recurrent unit, with PyTorch's gate order (r, z, n).

  ```
  r = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
  z = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
  n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn))     # reset_after=True (PyTorch, cuDNN)
  n = tanh(W_in x_t + b_in + W_hn (r * h_{t-1}) + b_hn)     # reset_after=False (Cho et al.)
  h_t = (1 - z) * n + z * h_{t-1}
  ```

  Args:
    hidden_size: H.
    reset_after: apply the reset gate after the recurrent product (PyTorch's and cuDNN's form,
      one fused `[3H, H]` GEMM a step) or before it (the original of Cho et al. 2014; its
      `W_hn` product sits in the point-wise part).
    bias: learn `b_ih` and `b_hh` (PyTorch's `bias`); `False`: both are `None`.
    dtype: the computation dtype; `None`: promoted from the inputs' and the parameters'.
    param_dtype: the dtype `init` stores the parameters in.

  Returns:
    A `Cell` with `GRUParams` and `GRUState(hidden)`.

  References:
    Cho et al., Learning phrase representations using RNN encoder-decoder for statistical
      machine translation, 2014. https://arxiv.org/abs/1406.1078
  """
  _check_size(hidden_size, "hidden_size")
  config = GRUConfig(hidden_size, bool(reset_after), bool(bias), *_precision(dtype, param_dtype))
  h = hidden_size

  def init(key, input_size: int) -> GRUParams:
    _check_size(input_size, "input_size")
    b = (3 * h,) if config.bias else None
    shapes = [(3 * h, input_size), (3 * h, h), b, b]
    return GRUParams(*torch_init(key, shapes, h, config.param_dtype))

  def initial_state(params, batch_shape=()) -> GRUState:
    return zeros_state(GRUState, batch_shape, (h,), state_dtype(config, params))

  def project(params, xs):
    return _affine(xs, params.w_ih, None, config.dtype)

  # The pre-activations a_t = (gates, x_n): the gates' products laid out as the recurrent GEMM
  # writes them (r, z and, with reset_after, W_hn h_{t-1}), so that the recurrent product's
  # cotangent is one array, and W_in x_t apart.
  def gate_bias(params):
    """`b_ih + b_hh` for r and z, then `b_hn` (reset_after); `b_in` (+ `b_hn` for Cho et al.)."""
    if params.b_ih is None:
      return None
    b_rz = params.b_ih[:2 * h] + params.b_hh[:2 * h]
    if config.reset_after:
      return jnp.concatenate([b_rz, params.b_hh[2 * h:]]), params.b_ih[2 * h:]
    return b_rz, params.b_ih[2 * h:] + params.b_hh[2 * h:]

  def combine(xw_t, hw_t):
    xw_t, hw_t = _to_accumulation(xw_t, hw_t)
    pad = [(0, 0)] * (hw_t.ndim - 1) + [(0, hw_t.shape[-1] - 2 * h)]
    return hw_t + jnp.pad(xw_t[..., :2 * h], pad), xw_t[..., 2 * h:]

  if config.reset_after:
    def candidate(params, gates, x_n, r, h_tm1):
      return x_n + r * gates[..., 2 * h:]

    recurrent_weight = None
  else:
    def candidate(params, gates, x_n, r, h_tm1):
      return x_n + _dense(r * h_tm1, params.w_hh[2 * h:])

    def recurrent_weight(params):
      return params.w_hh[:2 * h]

  def update(params, a_t, state_tm1):
    gates, x_n = a_t
    h_tm1 = state_tm1.hidden
    r, z = jnp.split(jax.nn.sigmoid(gates[..., :2 * h]), 2, axis=-1)
    n = jnp.tanh(candidate(params, gates, x_n, r, h_tm1))
    h_t = n + z * (h_tm1 - n)
    return GRUState(h_t), h_t

  pointwise = Pointwise(update, combine, recurrent_weight, gate_bias)
  return Cell(init, initial_state, project, pointwise.step, h, config, pointwise)
