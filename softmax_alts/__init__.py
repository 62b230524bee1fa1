"""Output layers that replace the full softmax over a large vocabulary, as pure JAX functions."""

from softmax_alts._adaptive import AdaptiveParams
from softmax_alts._adaptive import adaptive
from softmax_alts._adaptive import adaptive_from_torch
from softmax_alts._adaptive import adaptive_to_torch
from softmax_alts._base import OutputLayer
from softmax_alts._base import RowSparse
from softmax_alts._class_based import ClassBasedParams
from softmax_alts._class_based import class_based
from softmax_alts._class_based import frequency_classes
from softmax_alts._differentiated import DifferentiatedParams
from softmax_alts._differentiated import differentiated
from softmax_alts._full import FullParams
from softmax_alts._full import full
from softmax_alts._full import log_normalizer
from softmax_alts._hierarchical import HierarchicalParams
from softmax_alts._hierarchical import hierarchical
from softmax_alts._lse import default_strategy
from softmax_alts._nce import nce
from softmax_alts._nce import negative_sampling
from softmax_alts._sampled import Negatives
from softmax_alts._sampled import sampled
from softmax_alts._samplers import Sampler
from softmax_alts._samplers import in_batch
from softmax_alts._samplers import log_uniform
from softmax_alts._samplers import unigram
from softmax_alts._samplers import uniform
from softmax_alts._self_normalized import self_normalized
from softmax_alts._self_normalized import unnormalized_score
from softmax_alts._sparse import RowGrad
from softmax_alts._sparse import RowOptimizer
from softmax_alts._sparse import apply_row_update
from softmax_alts._sparse import apply_row_updates
from softmax_alts._sparse import has_row_sparse_path
from softmax_alts._sparse import merge_rows
from softmax_alts._sparse import row_wise
from softmax_alts._sparse import sparse_loss_and_grads
from softmax_alts._trees import Tree
from softmax_alts._trees import balanced_tree
from softmax_alts._trees import huffman_tree
from softmax_alts._vocab_parallel import vocab_parallel_specs
# The ordinary factories under their former vocabulary-parallel names (pass `mesh=`).
from softmax_alts._adaptive import adaptive as vocab_parallel_adaptive
from softmax_alts._full import full as vocab_parallel_full
from softmax_alts._nce import nce as vocab_parallel_nce
from softmax_alts._nce import negative_sampling as vocab_parallel_negative_sampling
from softmax_alts._sampled import sampled as vocab_parallel_sampled
from softmax_alts._self_normalized import self_normalized as vocab_parallel_self_normalized
