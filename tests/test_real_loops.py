"""A misuse matrix: training loops as people write them, run inside ``with acc:``.

This file is the matrix's index: its families live in tests/test_real_loops_<family>.py
(zero_grad, backward, stepping, scheduling, state_dict, windows, models), their shared
models, data and reference loop in tests/real_loops.py.

Every variant either trains exactly like a float64 reference, a plain PyTorch loop that
takes one optimizer step per window on the window's full batch (or the plain loop itself
at K=1, bit for bit), or raises a clear error. Never silently wrong.

Sources: real loops read for this matrix (paraphrased into tiny float64 models, not
copied), each with the variants taken from it (the `source` field of each Variant):

- pytorch/examples imagenet/main.py: ``optimizer.zero_grad()`` between forward and
  backward, StepLR, the learning rate written into ``param_groups`` by hand
  (adjust_learning_rate). -> zero_grad_between_forward_and_backward,
  steplr_scheduler_arg, manual_lr_from_optimizer_steps, loss_backward_instead_k1_raises.
- pytorch/examples word_language_model/main.py: ``model.zero_grad()`` at the top, the
  hidden state carried across batches and detached (repackage_hidden), clipping.
  -> model_zero_grad_top_of_loop, rnn_hidden_state_carried_detached,
  k1_model_zero_grad_bitwise.
- karpathy/nanoGPT train.py: the nested micro-step loop; ``GradScaler(enabled=dtype ==
  'float16')`` (disabled in full precision); ``scaler.scale(loss).backward()``;
  ``scaler.unscale_`` + ``clip_grad_norm_`` + ``scaler.step`` + ``scaler.update`` +
  ``zero_grad(set_to_none=True)``; ``get_lr(iter_num)`` into ``param_groups``;
  ``estimate_loss()`` inside the loop; ``torch.compile``; checkpoints of the model and
  optimizer state dicts. -> nanogpt_disabled_scaler_hand_clip, resume_mid_window,
  resume_at_boundary, compile_eager, compile_aot_eager, validation_inside_block,
  scaler_scale_backward_instead_raises, scaled_loss_passed_to_acc_backward.
- huggingface/pytorch-image-models train.py (train_one_epoch) and timm/utils/cuda.py
  (NativeScaler): ``need_update = last_batch or (batch_idx + 1) % accum_steps == 0``,
  ``model_ema.update(model)`` after the step, the scaler stepped and updated every call,
  its state saved in checkpoints. -> step_under_sync_total_micro_batches,
  dataloader_total_micro_batches, ema_under_sync_gradients_iterate,
  scaler_enabled_step_update, scaler_growth_every_step, resume_mid_window_with_scaler,
  total_micro_batches_of_one_epoch_two_epochs_in_block.
- huggingface/transformers src/transformers/trainer.py (_inner_training_loop):
  ``model.zero_grad()`` after the step; ``scale_before``/``scale_after`` to tell a skipped
  step and the scheduler stepped only ``if optimizer_was_run``; ReduceLROnPlateau
  special-cased; ``num_items_in_batch`` token counts; breaking out at ``max_steps``.
  -> model_zero_grad_after_step, model_zero_grad_set_to_none_false_unused_head,
  scaler_inf_window_skipped_trainer_style, reduce_lr_on_plateau_raises,
  weight_numpy_int64_mask_count, total_micro_batches_loop_breaks_early.
- huggingface/accelerate examples/by_feature/gradient_accumulation.py,
  examples/by_feature/gradient_accumulation_for_autoregressive_models.py,
  docs/source/usage_guides/gradient_accumulation.md,
  src/accelerate/test_utils/scripts/test_sync.py
  (test_gradient_accumulation_with_opt_and_scheduler): step, scheduler step and
  zero_grad on every iteration; clipping and scheduler steps under ``if
  accelerator.sync_gradients``; the window prefetched to count its tokens and the loss
  multiplied by K; ``accelerator.backward(loss)`` in place of ``loss.backward()``.
  -> zero_grad_after_step, lambdalr_scheduler_arg, step_under_sync_without_total,
  hand_clip_under_sync_gradients_iterate, iterate_list, scheduler_created_inside_block,
  onecyclelr_stepped_under_sync_iterate, prefetched_token_count_times_k,
  loss_backward_instead_raises, unregistered_scheduler_stepped_every_micro_batch.
- Lightning docs docs/source-pytorch/model/manual_optimization.rst and
  common/optimization.rst: manual optimization, ``opt.zero_grad()`` /
  ``manual_backward`` / ``opt.step()`` every N batches, several optimizers (GAN).
  -> submodule_zero_grad, no_zero_grad_at_all, forgot_optimizer_step_raises.
- pytorch/torchtitan torchtitan/train.py (train_step): ``optimizers.zero_grad()`` at the
  top; OptimizersContainer / LRSchedulersContainer stepped together; a sum-reduced loss
  over the valid tokens; ``clip_grad_norm_`` before the step; checkpoints of all of them.
  -> zero_grad_top_of_loop, two_optimizers_two_schedulers, weight_mask_sum_tensor,
  sum_loss_over_tokens_weighted, weight_zero_raises, max_grad_norm_arg,
  resume_weighted_window_two_optimizers.
- PyTorch docs notes/amp_examples.rst (gradient accumulation, unscaled gradients,
  multiple optimizers with one scaler). -> scaler_enabled_hand_clip_iterate,
  two_optimizers_one_scaler, state_dict_between_unscale_and_step_raises.
- PyTorch docs torch.optim (LBFGS closure, OneCycleLR, CosineAnnealingLR, SparseAdam)
  and nn.Embedding(sparse=True). -> closure_step_raises, onecyclelr_scheduler_arg,
  cosine_scheduler_arg, onecyclelr_too_few_total_steps_raises,
  sparse_adam_and_adam_two_optimizers, sparse_embedding_sgd_ragged_weights.
- "edge": the axes of the brief applied to the loops above rather than one file
  (set_to_none, unused heads, numpy and tensor weights, sum losses, partial windows,
  discard/carry, complex parameters, default dtype float64, parameters used directly in
  the loss, freezing and add_param_group mid-run, K changed between blocks, K=1 bitwise,
  hard errors). All other variants.
"""

from __future__ import annotations

import importlib

from real_loops import SOURCES

FAMILIES = (
    "test_real_loops_zero_grad",
    "test_real_loops_backward",
    "test_real_loops_stepping",
    "test_real_loops_scheduling",
    "test_real_loops_state_dict",
    "test_real_loops_windows",
    "test_real_loops_models",
)


VARIANTS = [variant for family in FAMILIES for variant in importlib.import_module(family).VARIANTS]


def test_the_matrix_is_large_and_sourced():
    assert len(VARIANTS) >= 40
    ids = [variant.id for variant in VARIANTS]
    assert len(ids) == len(set(ids))
    assert {variant.source for variant in VARIANTS} <= set(SOURCES)
    for variant in VARIANTS:  # the header names every variant taken from a source
        assert variant.source == "edge" or variant.id in __doc__, variant.id
