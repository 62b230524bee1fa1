"""Tests for PTB-style batching: `batchify`, `bptt_windows` and `num_windows`."""

import numpy as np
import pytest

import train


def test_batchify_rows_are_contiguous_and_remainder_dropped():
  stream = np.arange(23)
  data = train.batchify(stream, 4)
  assert data.shape == (4, 5)
  assert data.dtype == np.int32
  np.testing.assert_array_equal(data[0], [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(data[3], [15, 16, 17, 18, 19])
  np.testing.assert_array_equal(data.reshape(-1), stream[:20])


def test_batchify_is_the_transpose_of_pytorch_batchify():
  # PyTorch's example: data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t() -> [L, B].
  stream = np.random.default_rng(0).integers(0, 50, size=1003)
  batch_size = 7
  length = stream.size // batch_size
  torch_form = stream[:length * batch_size].reshape(batch_size, -1).T
  np.testing.assert_array_equal(train.batchify(stream, batch_size), torch_form.T)


@pytest.mark.parametrize("length, bptt", [(20, 5), (21, 5), (22, 5), (12, 35), (2, 1), (9, 4)])
@pytest.mark.parametrize("last", ["keep", "drop", "pad"])
def test_windows_reproduce_the_stream_row_by_row(length, bptt, last):
  rng = np.random.default_rng(length * 100 + bptt)
  stream = rng.integers(0, 1000, size=3 * length + 2)
  data = train.batchify(stream, 3)
  assert data.shape == (3, length)
  full, rest = divmod(length - 1, bptt)
  if last == "drop" and full == 0:
    with pytest.raises(ValueError, match="leaves no window"):
      train.bptt_windows(data, bptt, last=last)
    return
  windows = train.bptt_windows(data, bptt, last=last)
  assert len(windows) == train.num_windows(length, bptt, last=last)
  assert len(windows) == full + (rest > 0 and last != "drop")
  for window in windows:
    assert window.inputs.shape == window.targets.shape == window.mask.shape
    assert window.inputs.dtype == window.targets.dtype == np.int32
    assert window.mask.dtype == bool
    if last != "keep":
      assert window.inputs.shape == (3, bptt)
  mask = np.concatenate([w.mask for w in windows], axis=1)
  inputs = np.concatenate([w.inputs for w in windows], axis=1)
  targets = np.concatenate([w.targets for w in windows], axis=1)
  inputs = inputs[mask].reshape(3, -1)
  targets = targets[mask].reshape(3, -1)
  covered = full * bptt if last == "drop" else length - 1
  for b in range(3):
    row = stream[b * length:(b + 1) * length]
    np.testing.assert_array_equal(inputs[b], row[:covered])
    np.testing.assert_array_equal(targets[b], row[1:covered + 1])
    if last != "drop":  # every token of the row: the inputs, then the last target
      np.testing.assert_array_equal(np.append(inputs[b], targets[b, -1]), row)


def test_windows_shift_targets_by_one_and_mask_the_padding():
  data = train.batchify(np.arange(22), 2)  # rows 0..10 and 11..21
  windows = train.bptt_windows(data, 4, last="pad")
  assert len(windows) == 3  # 10 steps: 4, 4, then 2 padded to 4
  np.testing.assert_array_equal(windows[1].inputs, [[4, 5, 6, 7], [15, 16, 17, 18]])
  np.testing.assert_array_equal(windows[1].targets, [[5, 6, 7, 8], [16, 17, 18, 19]])
  np.testing.assert_array_equal(windows[2].inputs, [[8, 9, 0, 0], [19, 20, 0, 0]])
  np.testing.assert_array_equal(windows[2].targets, [[9, 10, 0, 0], [20, 21, 0, 0]])
  np.testing.assert_array_equal(windows[2].mask.sum(axis=1), [2, 2])
  assert windows[0].mask.all()
  short = train.bptt_windows(data, 4, last="keep")[2]
  np.testing.assert_array_equal(short.inputs, [[8, 9], [19, 20]])


def test_windows_are_views():
  data = train.batchify(np.arange(40), 4)
  window = train.bptt_windows(data, 3)[1]
  assert np.shares_memory(window.inputs, data)
  assert np.shares_memory(window.targets, data)


def test_errors():
  with pytest.raises(ValueError, match="batch_size"):
    train.batchify(np.arange(10), 0)
  with pytest.raises(ValueError, match="leaves 1 token"):
    train.batchify(np.arange(10), 6)
  with pytest.raises(ValueError, match=r"\[T\] integer ids"):
    train.batchify(np.zeros((2, 5), dtype=np.int32), 2)
  data = train.batchify(np.arange(10), 2)
  with pytest.raises(ValueError, match="`last` must be one of"):
    train.bptt_windows(data, 2, last="trim")
  with pytest.raises(ValueError, match="bptt"):
    train.bptt_windows(data, 0)
  with pytest.raises(ValueError, match="leaves no window"):
    train.bptt_windows(data, 5, last="drop")
  with pytest.raises(ValueError, match=r"\[B, L\] integer ids"):
    train.bptt_windows(np.arange(10), 2)
