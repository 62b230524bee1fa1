"""The PyTorch peer of `train.language_model`: PyTorch's word_language_model recipe.

An embedding, `torch.nn.LSTM`, dropout and a linear decoder over the whole vocabulary
(`examples/word_language_model/model.py`, `RNNModel` with `rnn_type="LSTM"`, its `init_weights`
included), trained as its `main.py` trains it: windows of `bptt` steps read from time-major
`[L, B]` columns (the last one shorter), the hidden state carried from window to window and
detached (`repackage_hidden`), the mean cross-entropy over the window's tokens, gradients clipped
to a global norm, then an optimizer step. The optimizer and the learning-rate schedule are
arguments, so that one loop serves both benchmarks:

  * `main.py` itself (the `recipe` suite): plain SGD (`p -= lr * grad`, as `main.py` writes it
    out) and `decay="plateau"`: the learning rate divided by `lr_decay` (4) after every epoch
    whose validation loss is not below the best so far; `decay="none"` keeps it constant;
  * `python -m train`'s defaults (the `peers` suite): Adam and `decay="epoch"`, the learning
    rate divided by `lr_decay` at the end of every epoch from epoch `decay_after` on.

Either way the parameters with the best validation perplexity are the ones tested.
`from_ours` copies the weights of our model into the torch one (embedding, LSTM gates in
PyTorch's order with `rnn.to_torch`, decoder), so both can start from the same point.

References:
  Zaremba, Sutskever and Vinyals, Recurrent neural network regularization, 2014.
    https://arxiv.org/abs/1409.2329
  PyTorch examples, word_language_model.
    https://github.com/pytorch/examples/tree/main/word_language_model
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import rnn
import train


class LSTMLM(torch.nn.Module):
  """`RNNModel` of PyTorch's word_language_model, LSTM cell: embedding, LSTM, dropout, decoder.

  ```
  emb = dropout(encoder(input))          # [T, B, E]
  output, hidden = lstm(emb, hidden)     # [T, B, H]
  logits = decoder(dropout(output))      # [T * B, V]
  ```
  """

  def __init__(self, vocab_size: int, emsize: int, nhid: int, nlayers: int = 1,
               dropout: float = 0.0):
    super().__init__()
    self.nhid, self.nlayers = nhid, nlayers
    self.drop = torch.nn.Dropout(dropout)
    self.encoder = torch.nn.Embedding(vocab_size, emsize)
    self.rnn = torch.nn.LSTM(emsize, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0)
    self.decoder = torch.nn.Linear(nhid, vocab_size)
    # The recipe's `init_weights`: encoder and decoder uniform in [-0.1, 0.1], decoder bias 0.
    torch.nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
    torch.nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
    torch.nn.init.zeros_(self.decoder.bias)

  def forward(self, inputs, hidden):
    """`inputs [T, B]` ids, `hidden (h, c)` each `[nlayers, B, H]` -> `(logits [T*B, V], hidden)`."""
    emb = self.drop(self.encoder(inputs))
    output, hidden = self.rnn(emb, hidden)
    output = self.drop(output)
    return self.decoder(output.reshape(-1, output.shape[-1])), hidden

  def init_hidden(self, batch_size: int):
    weight = next(self.parameters())
    shape = (self.nlayers, batch_size, self.nhid)
    return (weight.new_zeros(shape), weight.new_zeros(shape))


def from_ours(model: train.LanguageModel, params: train.LMParams) -> LSTMLM:
  """An `LSTMLM` holding the weights of our LSTM language model with the full softmax.

  Args:
    model: a `train.LanguageModel` with `cell="lstm"`, no projection, `softmax="full"`, untied.
    params: its `LMParams`.

  Returns:
    The torch module (on the CPU), in training mode.

  Raises:
    ValueError: for a model that has no counterpart here.
  """
  c = model.config
  if c.cell != "lstm" or c.proj is not None or c.softmax != "full" or c.tied:
    raise ValueError("`model` must be an untied LSTM language model with softmax='full' and no "
                     f"projection; got cell={c.cell}, proj={c.proj}, softmax={c.softmax}, "
                     f"tied={c.tied}.")
  lm = LSTMLM(c.vocab_size, c.emsize, c.nhid, c.nlayers, c.dropout)
  tensors = {f"rnn.{k}": v for k, v in rnn.to_torch(model.cell, params.rnn).items()}
  tensors["encoder.weight"] = params.embedding
  tensors["decoder.weight"] = params.output.w
  tensors["decoder.bias"] = params.output.b
  state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()}
  lm.load_state_dict(state, strict=True)
  return lm


def _detach(hidden):
  """`repackage_hidden`: the state's values without their history (truncated BPTT)."""
  return tuple(h.detach() for h in hidden)


def _time_major(window: train.Window):
  """A window's real steps (mask all true) as time-major `[n, B]` int64 tensors."""
  n = int(window.mask[0].sum())
  inputs = torch.from_numpy(np.ascontiguousarray(window.inputs[:, :n].T).astype(np.int64))
  targets = torch.from_numpy(np.ascontiguousarray(window.targets[:, :n].T).astype(np.int64))
  return inputs, targets


class Trainer(NamedTuple):
  """A torch LM with its optimizer, fed the same windows as `train.fit`.

  Attributes:
    lm: the `LSTMLM`.
    opt: `torch.optim.Adam` or `torch.optim.SGD` over its parameters.
    clip: the largest global gradient norm, or None.
    windows: the training windows, time-major `(inputs [n, B], targets [n, B])` tensors.
    state: mutable record: "hidden", "epoch", "best_valid", "best_state", "train_s",
      "tokens", "step".
  """

  lm: LSTMLM
  opt: Any
  clip: float | None
  windows: list
  state: dict


def trainer(lm: LSTMLM, train_data: np.ndarray, *, bptt: int, lr: float, clip: float | None,
            optimizer: str = "adam") -> Trainer:
  """An optimizer over `lm`, with `train_data [B, L]` read in windows of `bptt` steps.

  Args:
    lm: the `LSTMLM`.
    train_data: `[B, L]` batchified training ids.
    bptt: the window length (the last window shorter, as `main.py` reads it).
    lr: the initial learning rate.
    clip: the largest global gradient norm, or None.
    optimizer: "adam" (PyTorch's defaults but the learning rate) or "sgd" (plain, no momentum:
      `main.py`'s `p.data.add_(p.grad, alpha=-lr)`).

  Returns:
    The `Trainer`.
  """
  windows = [_time_major(w) for w in train.bptt_windows(train_data, bptt, last="keep")]
  if optimizer not in ("adam", "sgd"):
    raise ValueError(f"`optimizer` must be 'adam' or 'sgd'; got {optimizer!r}.")
  make = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
  opt = make(lm.parameters(), lr=lr)
  state = {"hidden": None, "epoch": 0, "best_valid": None, "best_state": None, "train_s": 0.0,
           "tokens": 0, "step": 0}
  return Trainer(lm, opt, clip, windows, state)


def train_step(t: Trainer, inputs, targets) -> float:
  """One window: forward, mean cross-entropy, backward, clip, the optimizer's step; the state
  carried, detached."""
  lm, s = t.lm, t.state
  lm.train()
  if s["hidden"] is None:
    s["hidden"] = lm.init_hidden(inputs.shape[1])
  t.opt.zero_grad(set_to_none=True)
  logits, hidden = lm(inputs, _detach(s["hidden"]))
  loss = F.cross_entropy(logits, targets.reshape(-1))
  loss.backward()
  if t.clip is not None:
    torch.nn.utils.clip_grad_norm_(lm.parameters(), t.clip)
  t.opt.step()
  s["hidden"] = _detach(hidden)
  s["step"] += 1
  return float(loss.detach())


def train_epoch(t: Trainer) -> float:
  """One pass over the windows from a zero state (as `train.fit` resets it every epoch).

  Returns:
    The seconds spent in the training steps.
  """
  t.state["hidden"] = None
  start = time.perf_counter()
  for inputs, targets in t.windows:
    train_step(t, inputs, targets)
    t.state["tokens"] += inputs.numel()
  seconds = time.perf_counter() - start
  t.state["train_s"] += seconds
  t.state["epoch"] += 1
  return seconds


def end_epoch(t: Trainer, valid_ppl: float, *, decay: str = "epoch", lr_decay: float,
              decay_after: int = 0) -> None:
  """Keeps the best parameters and decays the learning rate after an epoch's validation.

  Args:
    t: the `Trainer`.
    valid_ppl: the validation perplexity after the epoch.
    decay: "epoch" (divide by `lr_decay` once `decay_after` epochs are done, as
      `python -m train --decay epoch`), "plateau" (divide when `valid_ppl` is not below the best
      so far, `main.py`'s rule) or "none".
    lr_decay: the divisor.
    decay_after: with "epoch", the epochs at the initial learning rate.
  """
  s = t.state
  improved = s["best_valid"] is None or valid_ppl < s["best_valid"]
  if improved:
    s["best_valid"] = valid_ppl
    s["best_state"] = copy.deepcopy(t.lm.state_dict())
  if decay not in ("epoch", "plateau", "none"):
    raise ValueError(f"`decay` must be 'epoch', 'plateau' or 'none'; got {decay!r}.")
  if (decay == "epoch" and s["epoch"] >= decay_after) or (decay == "plateau" and not improved):
    for group in t.opt.param_groups:
      group["lr"] /= lr_decay


def learning_rate(t: Trainer) -> float:
  """The learning rate in force."""
  return float(t.opt.param_groups[0]["lr"])


@torch.no_grad()
def evaluate(lm: LSTMLM, data: np.ndarray, *, bptt: int, state_dict=None) -> train.Evaluation:
  """Exact perplexity of `data [B, L]`, read in windows with the state carried, no dropout.

  Args:
    lm: the `LSTMLM`.
    data: batchified ids (`train.batchify`).
    bptt: the window length.
    state_dict: weights to evaluate instead of the module's current ones (restored after).

  Returns:
    A `train.Evaluation`: every target of the rows counted once, as `train.make_evaluator`.
  """
  saved = None
  if state_dict is not None:
    saved = copy.deepcopy(lm.state_dict())
    lm.load_state_dict(state_dict)
  lm.eval()
  hidden = lm.init_hidden(data.shape[0])
  nll, tokens = 0.0, 0
  for window in train.bptt_windows(data, bptt, last="keep"):
    inputs, targets = _time_major(window)
    logits, hidden = lm(inputs, hidden)
    nll += float(F.cross_entropy(logits, targets.reshape(-1), reduction="sum").double())
    tokens += targets.numel()
  if saved is not None:
    lm.load_state_dict(saved)
  lm.train()
  return train.Evaluation(nll, tokens, math.exp(nll / tokens))
