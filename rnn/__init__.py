"""Recurrent cells as pure functions, unrolled with `jax.lax.scan` and trained by BPTT."""

from rnn._cells import Cell
from rnn._cells import GRUParams
from rnn._cells import GRUState
from rnn._cells import LSTMParams
from rnn._cells import LSTMState
from rnn._cells import SimpleParams
from rnn._cells import SimpleState
from rnn._cells import gru
from rnn._cells import lstm
from rnn._cells import simple
from rnn._compose import Bidirectional
from rnn._compose import bidirectional
from rnn._compose import stack
from rnn._diagnostics import gradient_norms
from rnn._torch import from_torch
from rnn._torch import to_torch
from rnn._truncated import detach
from rnn._truncated import truncated
from rnn._unroll import static_unroll
from rnn._unroll import unroll
