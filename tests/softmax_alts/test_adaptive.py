"""Tests of the adaptive softmax against PyTorch's AdaptiveLogSoftmaxWithLoss, weights copied."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_alts

# (V, cutoffs)
CASES = [(2, (1,)), (3, (1, 2)), (17, (3, 9)), (1000, (20, 100, 400))]


def _inputs(key, layer, num_rows, hidden_size, vocab_size, dtype=jnp.float32):
  """Random params (shaped as `init` makes them), hidden and targets, drawn with numpy."""
  rng = np.random.default_rng(vocab_size)
  shapes = jax.eval_shape(lambda k: layer.init(k, hidden_size, vocab_size), key)
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), dtype), shapes)
  hidden = jnp.asarray(2.0 * rng.normal(size=(num_rows, hidden_size)), dtype)
  targets = jnp.asarray(rng.integers(0, vocab_size, size=num_rows), jnp.int32)
  return params, hidden, targets


@pytest.mark.parametrize("vocab_size,cutoffs", CASES)
def test_normalized_and_consistent(key, vocab_size, cutoffs):
  layer = softmax_alts.adaptive(cutoffs, head_bias=True)
  params, hidden, targets = _inputs(key, layer, 6, 8, vocab_size)
  log_probs = np.asarray(layer.log_probs(params, hidden))
  log_prob = np.asarray(layer.log_prob(params, hidden, targets))
  loss = np.asarray(layer.loss(params, hidden, targets))
  assert log_probs.shape == (6, vocab_size) and log_prob.shape == loss.shape == (6,)
  np.testing.assert_allclose(np.logaddexp.reduce(log_probs, axis=1), 0.0, atol=1e-5)
  np.testing.assert_allclose(log_prob, log_probs[np.arange(6), np.asarray(targets)],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(loss, -log_prob)


@pytest.mark.parametrize("vocab_size,cutoffs,hidden_size,div_value,head_bias,num_rows", [
    (1000, (20, 100, 400), 32, 4.0, True, 300),  # many rows: several blocks per tail
    (40, (5, 12), 6, 2.0, False, 9),  # H // 2**2 = 1, one row per tail
    (40, (5,), 3, 4.0, False, 9),  # H // 4 = 0: an empty projection, uniform in the tail
])
def test_equals_torch(vocab_size, cutoffs, hidden_size, div_value, head_bias, num_rows):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  with warnings.catch_warnings():  # torch warns that it cannot init an empty tensor
    warnings.simplefilter("ignore")
    module = torch.nn.AdaptiveLogSoftmaxWithLoss(hidden_size, vocab_size, list(cutoffs),
                                                 div_value=div_value, head_bias=head_bias)
  with torch.no_grad():  # non-trivial values everywhere, the empty tensors included
    for p in module.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  x = torch.randn(num_rows, hidden_size, requires_grad=True)
  # Zipf-like targets: every cluster used, the last one by few rows.
  ranks = np.random.default_rng(1).zipf(1.2, size=num_rows) - 1
  target = torch.as_tensor(np.minimum(ranks, vocab_size - 1))
  out = module(x, target)
  out.loss.backward()

  layer = softmax_alts.adaptive(cutoffs, div_value=div_value, head_bias=head_bias)
  params = softmax_alts.adaptive_from_torch(module.state_dict())
  chex.assert_trees_all_equal_shapes(params, jax.eval_shape(
      lambda k: layer.init(k, hidden_size, vocab_size), jax.random.key(0)))
  hidden, targets = jnp.asarray(x.detach().numpy()), jnp.asarray(target.numpy())

  def mean_loss(p, h):
    losses = layer.loss(p, h, targets)
    return jnp.mean(losses), losses

  (loss, losses), (grads, hidden_grad) = jax.jit(jax.value_and_grad(
      mean_loss, argnums=(0, 1), has_aux=True))(params, hidden)
  np.testing.assert_allclose(-losses, out.output.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, out.loss.item(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer.log_probs(params, hidden),
                             module.log_prob(x).detach().numpy(), rtol=1e-5, atol=1e-5)
  # The gradients too (the tails' backward is hand-written).
  torch_grads = softmax_alts.adaptive_from_torch(
      {name: p.grad for name, p in module.named_parameters()})
  chex.assert_trees_all_close(grads, torch_grads, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(hidden_grad, x.grad.numpy(), rtol=1e-4, atol=1e-6)
  # And back: to_torch then load_state_dict reproduces the module.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    reloaded = torch.nn.AdaptiveLogSoftmaxWithLoss(hidden_size, vocab_size, list(cutoffs),
                                                   div_value=div_value, head_bias=head_bias)
  reloaded.load_state_dict({k: torch.from_numpy(np.array(v))
                            for k, v in softmax_alts.adaptive_to_torch(params).items()})
  np.testing.assert_allclose(reloaded(x, target).output.detach().numpy(),
                             out.output.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_init(key):
  layer = softmax_alts.adaptive((20, 100), head_bias=True)
  params = layer.init(key, 64, 300)
  chex.assert_shape([params.head, params.head_bias, *params.tail_projections,
                     *params.tail_outputs], [(22, 64), (22,), (16, 64), (4, 64), (80, 16),
                                             (200, 4)])
  # Uniform in +-1/sqrt(fan_in), as torch's Linear.
  for weights, fan_in in [(params.head, 64), (params.tail_projections[0], 64),
                          (params.tail_outputs[0], 16), (params.tail_outputs[1], 4)]:
    assert 0.8 / np.sqrt(fan_in) < np.abs(weights).max() <= 1 / np.sqrt(fan_in)
  assert softmax_alts.adaptive((20, 100)).init(key, 64, 300).head_bias is None


@pytest.mark.parametrize("cutoffs,match", [
    ((9, 3), "strictly increasing"),
    ((3, 3, 9), "strictly increasing"),
    ((0, 9), r"\(0, V\)"),
    ((-2, 9), r"\(0, V\)"),
    ((), "at least one"),
    ((3.0, 9), "ints"),
    (5, "sequence"),
])
def test_bad_cutoffs(cutoffs, match):
  with pytest.raises(ValueError, match=match):
    softmax_alts.adaptive(cutoffs)


def test_bad_config(key):
  for cutoffs in [(3, 17), (3, 20)]:
    with pytest.raises(ValueError, match=r"cutoffs.*\(0, 17\)"):
      softmax_alts.adaptive(cutoffs).init(key, 8, 17)
  with pytest.raises(ValueError, match="div_value"):
    softmax_alts.adaptive((3, 9), div_value=0.0)
  layer = softmax_alts.adaptive((3, 9))
  params, hidden, targets = _inputs(key, layer, 3, 8, 17)
  for fn in (layer.loss, jax.jit(layer.loss), layer.log_prob, jax.jit(layer.log_prob)):
    with pytest.raises(ValueError, match=r"`hidden` must be \[N, H\] with H = 8 .*params.head"):
      fn(params, jnp.zeros((3, 9)), targets)  # the width of hidden is wrong, not the params
  for fn in (layer.log_probs, jax.jit(layer.log_probs)):
    with pytest.raises(ValueError, match="`hidden` must be"):
      fn(params, jnp.zeros((3, 9)))
  with pytest.raises(ValueError, match=r"params.head.*\[5, H\]"):
    layer.loss(params._replace(head=params.head[1:]), hidden, targets)
  with pytest.raises(ValueError, match="head_bias"):
    softmax_alts.adaptive((3, 9), head_bias=True).loss(params, hidden, targets)
  with pytest.raises(ValueError, match="head.weight"):
    softmax_alts.adaptive_from_torch({"tail.0.0.weight": np.zeros((2, 8))})


def test_empty_batch_and_empty_cluster(key):
  layer = softmax_alts.adaptive((3, 9))
  params, hidden, _ = _inputs(key, layer, 6, 8, 17)
  assert layer.loss(params, hidden[:0], jnp.zeros((0,), jnp.int32)).shape == (0,)
  # No row in the last cluster: its loop runs zero times, its gradient is zero.
  targets = jnp.array([0, 1, 2, 3, 5, 8])
  grads = jax.grad(lambda p: layer.loss(p, hidden, targets).sum())(params)
  np.testing.assert_array_equal(grads.tail_outputs[1], 0.0)
  assert np.abs(grads.tail_outputs[0]).max() > 0
  np.testing.assert_allclose(layer.log_prob(params, hidden, targets),
                             np.asarray(layer.log_probs(params, hidden))[np.arange(6), targets],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("half", ["hidden", "params"])
def test_mixed_precision_where_torch_adaptive_fails(half):
  """16-bit inputs with float32 weights (what automatic mixed precision gives a module) break
  PyTorch's AdaptiveLogSoftmaxWithLoss (pytorch/pytorch#44724: it copies float32 log-probs into
  a 16-bit output in place), and 16-bit weights with float32 inputs fail its GEMMs. Here either
  mix works: the log-probabilities are float32 and equal PyTorch's float32 computation on the
  same rounded values, and every gradient comes back in its input's dtype."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  module = torch.nn.AdaptiveLogSoftmaxWithLoss(16, 40, [5, 12], div_value=2.0)
  with torch.no_grad():
    for p in module.parameters():  # values exact in bfloat16, so both sides see the same
      p.copy_((torch.randn_like(p) * 0.3).bfloat16().float())
  x = torch.randn(9, 16).bfloat16().float()
  target = torch.as_tensor([0, 4, 5, 11, 12, 39, 20, 3, 7])
  expected = module(x, target).output.detach().numpy()

  params = softmax_alts.adaptive_from_torch(module.state_dict())
  hidden, targets = jnp.asarray(x.numpy()), jnp.asarray(target.numpy())
  if half == "hidden":
    hidden = hidden.astype(jnp.bfloat16)
  else:
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  layer = softmax_alts.adaptive([5, 12], div_value=2.0)
  log_prob = jax.jit(layer.log_prob)(params, hidden, targets)
  assert log_prob.dtype == jnp.float32
  np.testing.assert_allclose(log_prob, expected, rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda p, h: jnp.mean(layer.loss(p, h, targets)), argnums=(0, 1)))(
      params, hidden)
  chex.assert_trees_all_equal_dtypes(grads, (params, hidden))
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in jax.tree.leaves(grads))
