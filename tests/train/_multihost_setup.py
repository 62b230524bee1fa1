"""The model, optimizer and batches shared by the multi-process workers and their reference."""

import jax
import numpy as np

import train
from train._model import ModelConfig, language_model

VOCAB, BATCH, STEPS, BPTT = 24, 4, 3, 5


def setup():
  """`(model, opt, batches, key, batch_size)`: a tiny LSTM LM with the full softmax and Adam."""
  counts = np.sort(np.random.default_rng(0).integers(1, 100, VOCAB))[::-1].copy()
  model = language_model(ModelConfig(vocab_size=VOCAB, emsize=8, nhid=8, dropout=0.1), counts)
  opt = train.optimizer("adam", 1e-2, clip=1.0)
  stream = np.random.default_rng(1).integers(0, VOCAB, BATCH * (STEPS * BPTT + 1))
  batches = train.bptt_windows(train.batchify(stream, BATCH), BPTT)[:STEPS]
  return model, opt, batches, jax.random.key(0), BATCH
