"""PTB-style batching: a token stream cut into B rows, read in windows of `bptt` steps."""

from typing import NamedTuple

import numpy as np

LAST = ("keep", "drop", "pad")


class Window(NamedTuple):
  """One window of truncated BPTT over a batchified stream.

  Attributes:
    inputs: `[B, n]` int32 ids, `data[:, i:i + n]`.
    targets: `[B, n]` int32 ids, the inputs shifted by one step, `data[:, i + 1:i + 1 + n]`.
    mask: `[B, n]` bool, False only at the padded steps of a last window read with
      `last="pad"` (where inputs and targets are 0).
  """

  inputs: np.ndarray
  targets: np.ndarray
  mask: np.ndarray


def batchify(stream, batch_size: int) -> np.ndarray:
  """Cuts a token stream into `batch_size` contiguous rows, dropping the remainder.

  Row b holds `stream[b * L:(b + 1) * L]` with `L = T // batch_size`; the last `T % batch_size`
  tokens are dropped. This is the batch-major form of the recipe of Zaremba et al. (PyTorch's
  word_language_model `batchify` returns the transpose, `[L, B]`): each row is read left to
  right across consecutive windows with the recurrent state carried from one window to the
  next.

  Args:
    stream: `[T]` integer ids.
    batch_size: B, the number of rows.

  Returns:
    `[B, L]` int32 ids.

  Raises:
    ValueError: if `stream` is not 1-D integers, `batch_size < 1`, or the rows would be shorter
      than 2 tokens (no input with a target).

  References:
    Zaremba, Sutskever and Vinyals, "Recurrent Neural Network Regularization", 2014.
    https://arxiv.org/abs/1409.2329
  """
  stream = np.asarray(stream)
  if stream.ndim != 1 or (stream.size and not np.issubdtype(stream.dtype, np.integer)):
    raise ValueError(
        f"`stream` must be [T] integer ids; got shape {stream.shape}, dtype {stream.dtype}.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}.")
  length = stream.size // batch_size
  if length < 2:
    raise ValueError(
        f"a stream of {stream.size} tokens cut into `batch_size={batch_size}` rows leaves "
        f"{length} token(s) per row; at least 2 are needed.")
  return stream[:batch_size * length].reshape(batch_size, length).astype(np.int32)


def num_windows(length: int, bptt: int, *, last: str = "keep") -> int:
  """Returns the number of windows `bptt_windows` yields for rows of `length` tokens."""
  _check_window_args(length, bptt, last)
  full, rest = divmod(length - 1, bptt)
  return full + (rest > 0 and last != "drop")


def bptt_windows(data, bptt: int, *, last: str = "keep") -> list[Window]:
  """Cuts batchified data into consecutive windows of `bptt` steps for truncated BPTT.

  Window k holds `inputs = data[:, i:i + n]` and `targets = data[:, i + 1:i + 1 + n]` with
  `i = k * bptt` and `n = min(bptt, L - 1 - i)`, as `get_batch` of PyTorch's word_language_model
  example: over all windows every token but the last of each row is an input once, and every
  token but the first is a target once. The caller carries the recurrent state from window to
  window (with `jax.lax.stop_gradient`: stream TBPTT), as Zaremba et al. do.

  The last window is shorter when `bptt` does not divide `L - 1`. `last` chooses:

  - "keep": yield it short (one more shape to compile);
  - "drop": leave it out (its tokens are never predicted);
  - "pad": pad it to `bptt` steps with id 0 and mask False, so every window has one shape.
    `mask.sum(axis=1)` gives the per-row lengths; unrolling with those lengths keeps the carried
    state exact, and the masked steps must not count in the loss.

  The windows are views of `data` (except a padded one), so this costs no copy of the data.

  Args:
    data: `[B, L]` integer ids, from `batchify`.
    bptt: the number of steps per window.
    last: "keep", "drop" or "pad".

  Returns:
    The list of `Window(inputs [B, n], targets [B, n], mask [B, n])`, in reading order.

  Raises:
    ValueError: if `data` is not `[B, L]` integers with `L >= 2`, `bptt < 1`, `last` is unknown,
      or `last="drop"` leaves no window.

  References:
    Zaremba, Sutskever and Vinyals, "Recurrent Neural Network Regularization", 2014.
    https://arxiv.org/abs/1409.2329
  """
  data = np.asarray(data)
  if data.ndim != 2 or not np.issubdtype(data.dtype, np.integer):
    raise ValueError(
        f"`data` must be [B, L] integer ids; got shape {data.shape}, dtype {data.dtype}.")
  batch_size, length = data.shape
  count = num_windows(length, bptt, last=last)
  if count == 0:
    raise ValueError(
        f"`last=\"drop\"` leaves no window: rows of {length} tokens hold fewer than "
        f"`bptt={bptt}` + 1 tokens.")
  data = data.astype(np.int32, copy=False)
  full_mask = np.ones((batch_size, bptt), dtype=bool)
  full_mask.setflags(write=False)
  windows = []
  for k in range(count):
    i = k * bptt
    n = min(bptt, length - 1 - i)
    inputs, targets = data[:, i:i + n], data[:, i + 1:i + 1 + n]
    if n == bptt or last == "keep":
      windows.append(Window(inputs, targets, full_mask[:, :n]))
    else:
      pad = ((0, 0), (0, bptt - n))
      mask = np.pad(np.ones((batch_size, n), dtype=bool), pad)
      windows.append(Window(np.pad(inputs, pad), np.pad(targets, pad), mask))
  return windows


def _check_window_args(length, bptt, last):
  if last not in LAST:
    raise ValueError(f"`last` must be one of {LAST}; got {last!r}.")
  if isinstance(bptt, bool) or not isinstance(bptt, (int, np.integer)) or bptt < 1:
    raise ValueError(f"`bptt` must be a positive integer; got {bptt!r}.")
  if length < 2:
    raise ValueError(f"rows must hold at least 2 tokens; got {length}.")
