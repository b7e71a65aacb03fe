"""The synthetic matrix approximation benchmark of the KRAdapter paper (arXiv 2508.00230).

Every method fits a target matrix ``T`` of shape ``(d_out, d_in)`` from scratch with the update it would
train inside a model: a one-layer model (an ``nn.Linear(d_in, d_out)`` with zero weight) gets the method's
adapter through ``kr_vlm.adapters.inject_adapters``, so the layer's ``delta_weight()`` *is* the fit, and
AdamW minimises ``||delta_weight() - T||_F``. All methods get about the same number of trainable
parameters (the paper's budget ``2 * min * sqrt(max)``, 49,152 at 1024x768).

Follows the authors' ``approximate_weight.py`` (github PaulAlbert31/KRAdapter):

- targets: ``gaussian`` (``randn``), ``sparse`` (``randn`` with 90% of entries dropped), ``whitened``
  (PCA-whitened ``randn``: centre, project on the covariance eigenvectors, divide by ``sqrt(eigenvalue +
  1e-5)``; flat spectrum), ``lowrank`` (``randn`` with the smallest 75% of singular values zeroed),
  ``highfreq`` / ``lowfreq`` (row ``i`` is ``sin(2 pi f_i t + phase_i)`` over ``t = j / d_in`` with ``f_i``
  spread evenly over 1000..10000 resp. 1..100 cycles, a random phase in [0, 1) radians as in their code, plus
  0 to 5 harmonics of random frequency in the same range). At 1000+ cycles over ``d_in`` samples the
  high-frequency rows are aliased, exactly as in the authors' benchmark. ``checkpoint:PATH:KEY`` crops a
  real weight matrix (the paper uses CLIP's attention ``in_proj_weight``) to the size.
- each target is cast to half precision and fitted in float32; AdamW (torch defaults, weight decay 0.01),
  lr 0.1, 300 steps, loss ``||fit - T||_F`` (not squared).
- LoRA's rank is ``budget // (d_out + d_in) + 1`` (28 at 1024x768); the truncated SVD at that rank is the
  best any rank-r update can do (Eckart-Young) and needs no training.
- nuclear error: ``mean |sigma_fit - sigma_T|`` over the sorted singular values; effective rank as in
  ``kr_vlm.spectral``.

Choices of ours (the authors' code is silent or differs):

- Normalisation: every target is scaled to unit RMS entry (``||T||_F = sqrt(d_out * d_in)``, the scale of
  the Gaussian target) before the half cast, so lr 0.1 means the same for every family and absolute
  errors compare across families. For ``sparse`` this replaces the authors' ``F.dropout`` rescaling (which
  would change only the scale). ``whitened`` treats the longer side as the samples, so the spectrum is flat
  whichever side is longer.
- Each method starts from its own initialisation as users get it (LoRA ``B = 0``, KRAdapter ``U = 0``,
  LoKr ``w1 = 0``, LoHa ``w2_b = 0``, VeRA ``lambda_b = 0``, RandLoRA ``lambda = 0``); the authors' benchmark
  instead starts LoRA with both factors random.
- Scalings: KRAdapter keeps its default ``s = 2`` (``s = 1``, the authors' benchmark value, fits the same to
  4 digits); LoRA, LoHa, LoKr and RandLoRA use ``alpha = r``, i.e. scaling 1 (peft's defaults would scale a
  rank-28 LoRA by 8/28; peft's advice for RandLoRA, ``randlora_alpha = 20 r``, makes its fit get worse with
  more steps at lr 0.1); VeRA has no scaling. With Adam a constant scaling mostly changes the effective
  step size.
- Each method's size is the one whose trainable count is closest to the budget (``method_setup``), except
  LoRA (the paper's rank rule) and VeRA: VeRA trains only ``r + d_out`` numbers, so matching the budget
  would take ``r`` of about 48,000 shared random projections (over 80M numbers and ~200 GFLOP a step); its
  rank is capped at ``min(d_out, d_in)``, where its update can already be full rank, and it stays far
  under budget. The printed counts are the real ones (``count_parameters``).
- DoRA is left out: its magnitude vector starts as the row norms of the base weight, which are zero here.

Modules: ``targets`` (the target families), ``fit`` (settings, method sizes, the fit and the run),
``report`` (tables, figure, files).
"""

from kr_vlm.benchmarks.matrix_approx.fit import (
    COMPARED_METHODS,
    LAYER_NAME,
    METHOD_LABELS,
    QUICK_SETTINGS,
    REFERENCE_METHOD,
    BenchmarkSettings,
    MethodSetup,
    approximation_metrics,
    check_methods,
    default_budget,
    fit_target,
    lora_rank_for_budget,
    make_targets,
    method_setup,
    one_layer_model,
    parse_size,
    run_benchmark,
    truncated_svd,
)
from kr_vlm.benchmarks.matrix_approx.report import plot_results, results_markdown, write_outputs
from kr_vlm.benchmarks.matrix_approx.targets import (
    CHECKPOINT_PREFIX,
    FAMILIES,
    check_families,
    checkpoint_matrix,
    family_label,
    make_target,
    parse_checkpoint_family,
)

__all__ = [
    "CHECKPOINT_PREFIX",
    "COMPARED_METHODS",
    "FAMILIES",
    "LAYER_NAME",
    "METHOD_LABELS",
    "QUICK_SETTINGS",
    "REFERENCE_METHOD",
    "BenchmarkSettings",
    "MethodSetup",
    "approximation_metrics",
    "check_families",
    "check_methods",
    "checkpoint_matrix",
    "default_budget",
    "family_label",
    "fit_target",
    "lora_rank_for_budget",
    "make_target",
    "make_targets",
    "method_setup",
    "one_layer_model",
    "parse_checkpoint_family",
    "parse_size",
    "plot_results",
    "results_markdown",
    "run_benchmark",
    "truncated_svd",
    "write_outputs",
]
