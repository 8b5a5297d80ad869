"""A misuse matrix: training loops as people write them, run inside ``with acc:``.

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

import contextlib
import functools
import io
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from helpers import OPTIMIZERS, TOLERANCES, make_batches, make_model, mse
from torch import nn
from torch.nn import functional as F

from torch_accum import Accumulator

K = 4
N_FULL = 8  # two full windows
N_PARTIAL = 10  # windows of 4, 4 and a final 2
CLIP = 0.05  # small enough that clipping is active on every window of these models
TOL = TOLERANCES[torch.float64]  # rtol=1e-10, atol=1e-12
BITWISE = {"rtol": 0.0, "atol": 0.0}
F64 = torch.float64

Batch = tuple[torch.Tensor, ...]
Result = dict[str, Any]
WindowLoss = Callable[[nn.Module, Sequence[Any]], torch.Tensor]


# ---------------------------------------------------------------------------- data
def data(count: int = N_FULL, seed: int = 1) -> list[Batch]:
    """Equal micro-batches of 4 samples (float64)."""
    return make_batches(count, 4, seed=seed)


RAGGED_SIZES = (3, 7, 2, 5, 4, 6, 1, 8)


def ragged(sizes: Sequence[int] = RAGGED_SIZES, seed: int = 2) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 6, generator=generator, dtype=F64),
            torch.randn(n, 3, generator=generator, dtype=F64),
        )
        for n in sizes
    ]


def masked(count: int = N_FULL, seed: int = 3) -> list[Batch]:
    """Micro-batches (x, y, mask) whose loss is a mean over the unmasked targets ("tokens")."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(count):
        rows = 2 + index % 4
        mask = torch.rand(rows, 3, generator=generator) < 0.3 + 0.1 * index
        mask[0, 0] = True
        x = torch.randn(rows, 6, generator=generator, dtype=F64)
        y = torch.randn(rows, 3, generator=generator, dtype=F64)
        batches.append((x, y, mask))
    return batches


def token_batches(sizes: Sequence[int] = (4,) * N_FULL, seed: int = 4) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, 20, (n, 5), generator=generator),
            torch.randn(n, 3, generator=generator, dtype=F64),
        )
        for n in sizes
    ]


def corrupted(count: int, index: int, value: float) -> list[Batch]:
    batches = data(count)
    x, y = batches[index]
    x = x.clone()
    x[0, 0] = value
    batches[index] = (x, y)
    return batches


def windows(items: Sequence[Any], k: int = K) -> list[list[Any]]:
    return [list(items[i : i + k]) for i in range(0, len(items), k)]


def cat(window: Sequence[Batch]) -> Batch:
    return tuple(torch.cat(parts) for parts in zip(*window))


# ---------------------------------------------------------------------------- models
def build(optimizer: str = "adamw") -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model()
    return model, OPTIMIZERS[optimizer](model.parameters())


class TwoHeads(nn.Module):
    """A body and two heads; head_b is left out of some micro-batches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 16)
        self.head_a = nn.Linear(16, 3)
        self.head_b = nn.Linear(16, 3)
        self.double()

    def forward(self, x: torch.Tensor, use_b: bool = True) -> torch.Tensor:
        hidden = torch.tanh(self.body(x))
        out = self.head_a(hidden)
        return out + self.head_b(hidden) if use_b else out


class BagOfWords(nn.Module):
    """A sparse embedding and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(20, 4, sparse=True)
        self.head = nn.Linear(4, 3)
        self.double()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens).mean(dim=1))


class ComplexLinear(nn.Module):
    """Complex parameters, real inputs and targets."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(
            0.3 * torch.randn(6, 3, generator=generator, dtype=torch.complex128)
        )
        self.bias = nn.Parameter(torch.zeros(3, dtype=torch.complex128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.complex128) @ self.weight + self.bias


def complex_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).abs().pow(2).mean()


def masked_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y, mask = batch
    return ((model(x) - y).pow(2) * mask).sum()


def sum_mse(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y, reduction="sum")


def l2_penalty(model: nn.Module) -> torch.Tensor:
    return 1e-2 * sum(p.pow(2).sum() for p in model.parameters())


# ---------------------------------------------------------------------------- reference
def full_batch(micro_loss: Callable[[nn.Module, Batch], torch.Tensor] = mse) -> WindowLoss:
    """The window's loss on the concatenation of its micro-batches (one batch at K=1)."""

    def loss(model: nn.Module, window: Sequence[Batch]) -> torch.Tensor:
        return micro_loss(model, window[0] if len(window) == 1 else cat(window))

    return loss


def full_batch_token_mean(model: nn.Module, window: Sequence[Batch]) -> torch.Tensor:
    batch = cat(window)
    return masked_sum(model, batch) / batch[2].sum()


def mean_of_micro_losses(micro_loss: Callable[[nn.Module, Any], torch.Tensor]) -> WindowLoss:
    """For windows whose micro-batches differ in kind (e.g. which head they use)."""

    def loss(model: nn.Module, window: Sequence[Any]) -> torch.Tensor:
        return sum(micro_loss(model, item) for item in window) / len(window)

    return loss


@dataclass
class PlainRun:
    losses: list[float]  # one per real step
    ran: list[bool]  # per window: stepped (True) or skipped as non-finite (False)

    @property
    def steps(self) -> int:
        return len(self.losses)


def finite_gradients(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def plain_loop(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    groups: Iterable[Sequence[Any]],
    *,
    loss: WindowLoss | None = None,
    schedulers: Sequence[Any] = (),
    clip: float | None = None,
    set_to_none: bool = True,
    skip_nonfinite: bool = False,
    lr_schedule: Callable[[int], float] | None = None,
    after_step: Callable[[], None] | None = None,
) -> PlainRun:
    """The reference: plain PyTorch, one optimizer step per window on its full batch."""
    loss = full_batch() if loss is None else loss
    run = PlainRun([], [])
    for window in groups:
        if lr_schedule is not None:
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr_schedule(run.steps)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)
        value = loss(model, window)
        value.backward()
        if skip_nonfinite and not finite_gradients(model):
            run.ran.append(False)
            continue
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        for optimizer in optimizers:
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        run.losses.append(value.item())
        run.ran.append(True)
        if after_step is not None:
            after_step()
    return run


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def lrs(*optimizers: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for optimizer in optimizers for group in optimizer.param_groups]


def reference(
    count: int = N_FULL,
    *,
    k: int = K,
    optimizer: str = "adamw",
    setup: Callable[[], tuple[nn.Module, torch.optim.Optimizer]] | None = None,
    batches: Callable[[], list[Any]] | None = None,
    groups: Callable[[list[Any]], list[list[Any]]] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    lr_schedule: Callable[[int], float] | None = None,
    loss: WindowLoss | None = None,
    clip: float | None = None,
    set_to_none: bool = True,
    skip_nonfinite: bool = False,
    window_loss: bool = False,
    **extra: Any,
) -> Result:
    """Run the plain loop and describe its outcome the way the variants describe theirs."""
    model, opt = build(optimizer) if setup is None else setup()
    sched = None if scheduler is None else scheduler(opt)
    items = data(count) if batches is None else batches()
    run = plain_loop(
        model,
        [opt],
        windows(items, k) if groups is None else groups(items),
        loss=loss,
        schedulers=[] if sched is None else [sched],
        clip=clip,
        set_to_none=set_to_none,
        skip_nonfinite=skip_nonfinite,
        lr_schedule=lr_schedule,
    )
    result: Result = {"params": snapshot(model), "steps": run.steps, **extra}
    if scheduler is not None or lr_schedule is not None:
        result["lr"] = lrs(opt)
    if window_loss:
        result["window_loss"] = run.losses[-1]
    return result


def assert_same(got: Result, expected: Result, tolerance: dict[str, float]) -> None:
    assert set(got) == set(expected), f"variant reports {sorted(got)}, reference {sorted(expected)}"
    for key, want in expected.items():
        have = got[key]
        if isinstance(want, list) and want and isinstance(want[0], torch.Tensor):
            assert len(have) == len(want), key
            for index, (a, b) in enumerate(zip(have, want)):
                torch.testing.assert_close(
                    a, b, **tolerance, msg=lambda m, key=key, i=index: f"{key}[{i}]: {m}"
                )
        elif isinstance(want, float) or (
            isinstance(want, list) and want and isinstance(want[0], float)
        ):
            torch.testing.assert_close(
                torch.tensor(have, dtype=F64),
                torch.tensor(want, dtype=F64),
                **tolerance,
                msg=lambda m, key=key: f"{key}: {m}",
            )
        else:
            assert have == want, f"{key}: variant {have!r}, reference {want!r}"


# ---------------------------------------------------------------------------- the loops
# Each loop is the user's code, unchanged but for `with acc:` and acc.backward(loss).
# Where to clear gradients --------------------------------------------------------------
def loop_zero_grad_top_of_loop() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data():
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), y)
            acc.backward(loss)
            optimizer.step()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_zero_grad_after_step() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data():
            loss = F.mse_loss(model(x), y)
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_zero_grad_between_forward_and_backward() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data():
            output = model(x)
            loss = F.mse_loss(output, y)
            optimizer.zero_grad()
            acc.backward(loss)
            optimizer.step()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_zero_grad_set_to_none_false() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data():
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_model_zero_grad_top_of_loop() -> Result:
    model, optimizer = build("sgd_momentum")
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data():
            model.zero_grad()
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_model_zero_grad_after_step() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data(N_PARTIAL):
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            model.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_submodule_zero_grad() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data():
            for part in (model[0], model[2]):  # per model part, as for a GAN's G and D
                part.zero_grad()
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_no_zero_grad_at_all() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data():
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_zero_grad_top_and_model_zero_grad_after() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data():
            optimizer.zero_grad(set_to_none=False)
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            model.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


HEAD_B_MOMENTUM = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}


def two_heads(optimizer: str = "sgd") -> tuple[nn.Module, torch.optim.Optimizer]:
    model = TwoHeads()
    if optimizer == "sgd":
        return model, torch.optim.SGD(model.parameters(), **HEAD_B_MOMENTUM)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def head_loss(uses_b: Callable[[int], bool]) -> Callable[[nn.Module, Any], torch.Tensor]:
    def loss(model: nn.Module, item: tuple[int, Batch]) -> torch.Tensor:
        index, (x, y) = item
        return F.mse_loss(model(x, use_b=uses_b(index)), y)

    return loss


def loop_two_heads(
    uses_b: Callable[[int], bool],
    *,
    k: int,
    optimizer: str,
    set_to_none: bool,
    clear_with_model: bool = False,
) -> Result:
    model, opt = two_heads(optimizer)
    with Accumulator(model, opt, k) as acc:
        for index, (x, y) in enumerate(data()):
            loss = F.mse_loss(model(x, use_b=uses_b(index)), y)
            acc.backward(loss)
            opt.step()
            if clear_with_model:
                model.zero_grad(set_to_none=set_to_none)
            else:
                opt.zero_grad(set_to_none=set_to_none)
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def reference_two_heads(
    uses_b: Callable[[int], bool], *, k: int, optimizer: str, set_to_none: bool
) -> Result:
    return reference(
        k=k,
        setup=functools.partial(two_heads, optimizer),
        batches=lambda: list(enumerate(data())),
        loss=mean_of_micro_losses(head_loss(uses_b)),
        set_to_none=set_to_none,
    )


def head_b_in_first_window(index: int) -> bool:
    return index < K


def head_b_in_third_micro_batch(index: int) -> bool:
    return index % K == 2


def head_b_every_third_step(index: int) -> bool:
    return index % 3 == 0


# How backward is called ------------------------------------------------------------------
def loop_weighted(weight_of: Callable[[Batch], Any]) -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in ragged():
            acc.backward(F.mse_loss(model(x), y), weight=weight_of((x, y)))
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def weight_numpy_int64(batch: Batch) -> Any:
    weight = np.ones(len(batch[0]), dtype=np.int64).sum()
    assert isinstance(weight, np.int64)
    return weight


def weight_numpy_float32(batch: Batch) -> Any:
    weight = np.ones(len(batch[0]), dtype=np.float32).sum()
    assert isinstance(weight, np.float32)
    return weight


def loop_weight_mask_sum_tensor() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for batch in masked():
            n_tokens = batch[2].sum()  # an int64 tensor
            acc.backward(masked_sum(model, batch) / n_tokens, weight=n_tokens)
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_weight_numpy_mask_count() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y, mask in masked():
            labels = np.where(mask.numpy(), 1, -100)  # a numpy collate with ignore_index
            n_tokens = (labels != -100).sum()
            assert isinstance(n_tokens, np.int64)
            acc.backward(masked_sum(model, (x, y, mask)) / int(n_tokens), weight=n_tokens)
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_sum_loss_unweighted() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for batch in data(N_PARTIAL):
            acc.backward(sum_mse(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_sum_loss_over_tokens_weighted() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for batch in masked(N_PARTIAL):
            valid_tokens = int(batch[2].sum())
            loss = masked_sum(model, batch) / valid_tokens
            acc.backward(loss, weight=valid_tokens)
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_prefetched_token_count_times_k() -> Result:
    # The window is prefetched to count its items; each loss is a sum over the window's
    # count, multiplied by K because the accumulation averages over K micro-batches.
    model, optimizer = build()
    loader = iter(masked())
    with Accumulator(model, optimizer, K) as acc:
        for _update_step in range(N_FULL // K):
            batch_samples = [next(loader) for _ in range(K)]
            num_items_in_batch = sum(int(b[2].sum()) for b in batch_samples)
            for batch in batch_samples:
                loss = masked_sum(model, batch) / num_items_in_batch
                acc.backward(loss * K)
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_weight_zero_raises() -> Result:
    model, optimizer = build()
    batches = masked()
    batches[2][2][:] = False  # a micro-batch made only of padding
    with Accumulator(model, optimizer, K) as acc:
        for batch in batches:
            n_tokens = batch[2].sum()
            acc.backward(masked_sum(model, batch) / n_tokens.clamp(min=1), weight=n_tokens)
            optimizer.step()
            optimizer.zero_grad()
    return {}


def loop_weight_per_sequence_vector_raises() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for batch in masked():
            n_tokens = batch[2].sum(dim=1)  # one count per sequence: not a scalar
            acc.backward(masked_sum(model, batch) / n_tokens.sum(), weight=n_tokens)
            optimizer.step()
    return {}


# Stepping ------------------------------------------------------------------------------
def loop_step_under_sync(total: int | None) -> Result:
    model, optimizer = build()
    batches = data(N_PARTIAL)
    with Accumulator(model, optimizer, K, total_micro_batches=total) as acc:
        for batch_idx, (x, y) in enumerate(batches):
            acc.backward(F.mse_loss(model(x), y))
            need_update = acc.sync_gradients
            if need_update:
                optimizer.step()
                optimizer.zero_grad()
            last = total is not None and batch_idx == total - 1
            assert need_update == (batch_idx % K == K - 1 or last), batch_idx
        steps_inside = acc.optimizer_steps
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "steps_inside": steps_inside}


def loop_optimizer_step_twice() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data(N_PARTIAL):
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.step()  # e.g. a callback that steps as well
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def nanogpt_lr(it: int, base: float = 1e-2, min_lr: float = 1e-3) -> float:
    warmup_iters, lr_decay_iters = 1, 3
    if it < warmup_iters:
        return base * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (base - min_lr)


def loop_nanogpt_disabled_scaler_hand_clip() -> Result:
    model, optimizer = build()
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # enabled only for float16
    batches = iter(data())
    with Accumulator(model, optimizer, K, scaler=scaler) as acc:
        for iter_num in range(N_FULL // K):
            lr = nanogpt_lr(iter_num)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            for _micro_step in range(K):
                x, y = next(batches)
                loss = F.mse_loss(model(x), y)
                acc.backward(loss)
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(optimizer)}


def loop_scaler_enabled_step_update() -> Result:
    model, optimizer = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # powers of two: exact
    with Accumulator(model, optimizer, K, scaler=scaler) as acc:
        for x, y in data(N_PARTIAL):
            optimizer.zero_grad()
            acc.backward(F.mse_loss(model(x), y))
            scaler.step(optimizer)
            scaler.update()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "scale": scaler.get_scale()}


def loop_scaler_enabled_hand_clip_iterate() -> Result:
    model, optimizer = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    acc = Accumulator(model, optimizer, K, scaler=scaler)
    with acc:
        for x, y in acc.iterate(data(N_PARTIAL)):
            acc.backward(F.mse_loss(model(x), y))
            if acc.sync_gradients:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
        steps_inside = acc.optimizer_steps
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "steps_inside": steps_inside}


def halving(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)


def loop_scaler_inf_window_skipped_trainer_style() -> Result:
    model, optimizer = build()
    scheduler = halving(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    acc = Accumulator(model, optimizer, K, scheduler=scheduler, scaler=scaler)
    optimizer_was_run = []
    with acc:
        for x, y in acc.iterate(corrupted(N_PARTIAL, 5, math.inf)):
            acc.backward(F.mse_loss(model(x), y))
            if acc.sync_gradients:
                scale_before = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                optimizer_was_run.append(scale_before <= scaler.get_scale())
                if optimizer_was_run[-1]:
                    scheduler.step()
                model.zero_grad()
    return {
        "params": snapshot(model),
        "steps": acc.optimizer_steps,
        "skipped": acc.skipped_steps,
        "was_run": optimizer_was_run,
        "lr": lrs(optimizer),
    }


def loop_nan_window(on_nonfinite: str) -> Result:
    model, optimizer = build()
    scheduler = halving(optimizer)
    acc = Accumulator(model, optimizer, K, scheduler=scheduler, on_nonfinite=on_nonfinite)
    with acc:
        for x, y in data_with_nan():
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return {
        "params": snapshot(model),
        "steps": acc.optimizer_steps,
        "skipped": acc.skipped_steps,
        "lr": lrs(optimizer),
    }


def data_with_nan() -> list[Batch]:
    return corrupted(N_PARTIAL, 5, math.nan)


def loop_nan_window_skipped() -> Result:
    with pytest.warns(RuntimeWarning, match="non-finite"):
        return loop_nan_window("skip")


def loop_closure_step_raises() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data():

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                optimizer.zero_grad()
                loss = F.mse_loss(model(x), y)
                acc.backward(loss)
                return loss

            optimizer.step(closure)
    return {}


def loop_forgot_optimizer_step_raises() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for batch_idx, (x, y) in enumerate(data()):
            acc.backward(F.mse_loss(model(x), y))
            if (batch_idx + 1) % (2 * K) == 0:  # stepping on the wrong period
                optimizer.step()
                optimizer.zero_grad()
    return {}


def loop_two_backwards_per_iteration(k: int) -> Result:
    # Two losses per iteration (two tasks), each its own acc.backward: each call is one
    # micro-batch, so a window of K=4 covers two iterations.
    model, optimizer = build()
    batches = data()
    with Accumulator(model, optimizer, k) as acc:
        for task_a, task_b in zip(batches[0::2], batches[1::2]):
            acc.backward(mse(model, task_a))
            acc.backward(mse(model, task_b))
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


# Scheduling ------------------------------------------------------------------------------
def loop_scheduler_arg(make_scheduler: Callable[[torch.optim.Optimizer], Any]) -> Result:
    model, optimizer = build()
    scheduler = make_scheduler(optimizer)
    acc = Accumulator(model, optimizer, K, scheduler=scheduler)
    with acc:
        for x, y in data(N_PARTIAL):
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return {
        "params": snapshot(model),
        "steps": acc.optimizer_steps,
        "lr": lrs(optimizer),
        "window_loss": acc.loss,
    }


def steplr(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)


def onecyclelr(optimizer: torch.optim.Optimizer, total_steps: int = 3) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=total_steps)


def cosine(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3, eta_min=1e-3)


class HalvingSchedule:
    """A hand-written schedule object with nothing but step()."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._groups = optimizer.param_groups

    def step(self) -> None:
        for group in self._groups:
            group["lr"] *= 0.5


def loop_scheduler_created_inside_block() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        lr_scheduler = halving(optimizer)  # built lazily, once the loop runs
        for x, y in data():
            acc.backward(F.mse_loss(model(x), y))
            if acc.sync_gradients:
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
    # After the block the optimizer and the scheduler work as in a plain loop.
    x, y = data(1, seed=9)[0]
    optimizer.zero_grad()
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    lr_scheduler.step()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(optimizer)}


def reference_scheduler_created_inside_block() -> Result:
    model, optimizer = build()
    lr_scheduler = halving(optimizer)
    extra = data(1, seed=9)
    plain_loop(model, [optimizer], [*windows(data()), extra], schedulers=[lr_scheduler])
    return {"params": snapshot(model), "steps": 2, "lr": lrs(optimizer)}


def loop_manual_lr_from_optimizer_steps() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data(N_PARTIAL):
            for param_group in optimizer.param_groups:
                param_group["lr"] = nanogpt_lr(acc.optimizer_steps)
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(optimizer)}


def loop_reduce_lr_on_plateau_raises() -> Result:
    model, optimizer = build()
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    Accumulator(model, optimizer, K, scheduler=scheduler)
    return {}


def loop_scheduler_of_another_optimizer_raises() -> Result:
    model, optimizer = build()
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    Accumulator(model, optimizer, K, scheduler=halving(other))
    return {}


# Clipping ------------------------------------------------------------------------------
def loop_max_grad_norm_arg() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K, max_grad_norm=CLIP) as acc:
        for x, y in data(N_PARTIAL):
            optimizer.zero_grad()
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_hand_clip_under_sync_gradients_iterate() -> Result:
    model, optimizer = build()
    acc = Accumulator(model, optimizer, K)
    with acc:
        for x, y in acc.iterate(data(N_PARTIAL)):
            acc.backward(F.mse_loss(model(x), y))
            if acc.sync_gradients:
                nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad()
        steps_inside = acc.optimizer_steps
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "steps_inside": steps_inside}


# Saving and resuming -------------------------------------------------------------------
class Preempted(Exception):
    """The job is killed right after writing its checkpoint."""


def start_run() -> tuple[nn.Module, torch.optim.Optimizer, Any, Accumulator]:
    model, optimizer = build()
    scheduler = halving(optimizer)
    acc = Accumulator(model, optimizer, K, scheduler=scheduler, max_grad_norm=0.5)
    return model, optimizer, scheduler, acc


def loop_resume(stop_after: int | None) -> Result:
    batches = data(N_PARTIAL)
    model, optimizer, scheduler, acc = start_run()
    buffer = io.BytesIO()
    start = 0
    if stop_after is not None:
        with contextlib.suppress(Preempted), acc:
            for index, (x, y) in enumerate(batches):
                acc.backward(F.mse_loss(model(x), y))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                if index + 1 == stop_after:
                    checkpoint = {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "accumulator": acc.state_dict(),
                        "next_micro_batch": index + 1,
                    }
                    torch.save(checkpoint, buffer)
                    raise Preempted
        buffer.seek(0)
        checkpoint = torch.load(buffer)  # weights_only=True, the default
        model, optimizer, scheduler, acc = start_run()
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        acc.load_state_dict(checkpoint["accumulator"])
        start = checkpoint["next_micro_batch"]
    with acc:
        for x, y in batches[start:]:
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(optimizer)}


def loop_state_dict_every_iteration() -> Result:
    model, optimizer, scheduler, acc = start_run()
    with acc:
        for x, y in data(N_PARTIAL):
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "accumulator": acc.state_dict(),
                },
                io.BytesIO(),
            )
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(optimizer)}


# Several optimizers ----------------------------------------------------------------------
def split_optimizers(model: nn.Module) -> tuple[list[Any], list[Any]]:
    body = torch.optim.AdamW(model[0].parameters(), lr=1e-2, weight_decay=0.1)
    head = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    return [body, head], [halving(body), steplr(head)]


def loop_two_optimizers_two_schedulers() -> Result:
    model = make_model()
    optimizers, lr_schedulers = split_optimizers(model)
    acc = Accumulator(model, optimizers, K, scheduler=lr_schedulers)
    with acc:
        for x, y in data(N_PARTIAL):
            for optimizer in optimizers:
                optimizer.zero_grad()
            acc.backward(F.mse_loss(model(x), y))
            for optimizer in optimizers:
                optimizer.step()
            for lr_scheduler in lr_schedulers:
                lr_scheduler.step()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(*optimizers)}


def reference_two_optimizers_two_schedulers() -> Result:
    model = make_model()
    optimizers, lr_schedulers = split_optimizers(model)
    run = plain_loop(model, optimizers, windows(data(N_PARTIAL)), schedulers=lr_schedulers)
    return {"params": snapshot(model), "steps": run.steps, "lr": lrs(*optimizers)}


def sparse_optimizers(model: BagOfWords) -> tuple[torch.optim.Optimizer, ...]:
    return (
        torch.optim.SparseAdam(list(model.embedding.parameters()), lr=1e-2),
        torch.optim.Adam(model.head.parameters(), lr=1e-2),
    )


def loop_sparse_adam_and_adam_two_optimizers() -> Result:
    model = BagOfWords()
    optimizers = sparse_optimizers(model)
    with Accumulator(model, optimizers, K) as acc:
        for tokens, y in token_batches():
            acc.backward(F.mse_loss(model(tokens), y))
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def reference_sparse_adam_and_adam() -> Result:
    model = BagOfWords()
    optimizers = sparse_optimizers(model)
    run = plain_loop(model, optimizers, windows(token_batches()))
    return {"params": snapshot(model), "steps": run.steps}


def bag_of_words_sgd() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = BagOfWords()
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def loop_sparse_embedding_sgd_ragged_weights() -> Result:
    model, optimizer = bag_of_words_sgd()
    with Accumulator(model, optimizer, K) as acc:
        for tokens, y in token_batches(RAGGED_SIZES):
            acc.backward(F.mse_loss(model(tokens), y), weight=len(tokens))
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


# torch.compile, default dtype, complex parameters ---------------------------------------
def loop_compiled(backend: str) -> Result:
    torch._dynamo.reset()
    try:
        model, optimizer = build()
        compiled = torch.compile(model, backend=backend)
        with Accumulator(compiled, optimizer, K) as acc:
            for x, y in data():
                loss = F.mse_loss(compiled(x), y)
                acc.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
    finally:
        torch._dynamo.reset()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


COMPILE_MARKS = (
    pytest.mark.skipif(
        not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported(),
        reason="torch.compile is not available here",
    ),
)


@contextlib.contextmanager
def default_float64() -> Any:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def default_dtype_setup() -> tuple[nn.Module, torch.optim.Optimizer, list[Batch]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 6, generator=generator), torch.randn(4, 3, generator=generator))
        for _ in range(N_PARTIAL)
    ]
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), batches


def loop_default_dtype_float64() -> Result:
    with default_float64():
        model, optimizer, batches = default_dtype_setup()
        assert model[0].weight.dtype == torch.float64
        with Accumulator(model, optimizer, K) as acc:
            for x, y in batches:
                acc.backward(F.mse_loss(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def reference_default_dtype_float64() -> Result:
    with default_float64():
        model, optimizer, batches = default_dtype_setup()
        run = plain_loop(model, [optimizer], windows(batches))
    return {"params": snapshot(model), "steps": run.steps}


def complex_setup(**adamw: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = ComplexLinear()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, **adamw)


def loop_complex_parameters(max_grad_norm: float | None) -> Result:
    model, optimizer = complex_setup(weight_decay=0.1)
    with Accumulator(model, optimizer, K, max_grad_norm=max_grad_norm) as acc:
        for batch in data(N_PARTIAL):
            acc.backward(complex_loss(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


# Parameters in the loss directly ---------------------------------------------------------
def loop_explicit_l2_penalty_in_loss() -> Result:
    model, optimizer = build("sgd_momentum")
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data(N_PARTIAL):
            loss = F.mse_loss(model(x), y) + l2_penalty(model)
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def scaled_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model()
    model.register_parameter("log_scale", nn.Parameter(torch.tensor(0.1, dtype=F64)))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def scaled_mse(model: nn.Module, batch: Batch) -> torch.Tensor:
    # A learned output scale used directly in the loss, as in uncertainty weighting.
    x, y = batch
    return F.mse_loss(model(x) * model.log_scale.exp(), y) + 0.1 * model.log_scale


def loop_parameter_used_directly_in_loss() -> Result:
    model, optimizer = scaled_model()
    with Accumulator(model, optimizer, K) as acc:
        for batch in data(N_PARTIAL):
            acc.backward(scaled_mse(model, batch))
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def leaf_setup() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Module()
    model.register_parameter("value", nn.Parameter(torch.tensor(2.0, dtype=F64)))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)


def loop_loss_is_a_leaf_parameter() -> Result:
    model, optimizer = leaf_setup()
    with Accumulator(model, optimizer, K) as acc:
        for _ in range(N_PARTIAL):
            acc.backward(model.value)  # minimise the parameter itself
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


# Partial final windows -------------------------------------------------------------------
SYNC_PATTERN = [False, False, False, True, False, False, False, True, False, True]


def loop_iterate(make_loader: Callable[[list[Batch]], Iterable[Batch]]) -> Result:
    model, optimizer = build()
    acc = Accumulator(model, optimizer, K)
    sync = []
    with acc:
        for x, y in acc.iterate(make_loader(data(N_PARTIAL))):
            acc.backward(F.mse_loss(model(x), y))
            sync.append(acc.sync_gradients)
            optimizer.step()
            optimizer.zero_grad()
        steps_inside = acc.optimizer_steps
    return {
        "params": snapshot(model),
        "steps": acc.optimizer_steps,
        "steps_inside": steps_inside,
        "sync": sync,
    }


def as_generator(batches: list[Batch]) -> Iterable[Batch]:
    return (batch for batch in batches)


def loop_dataloader_total_micro_batches() -> Result:
    model, optimizer = build()
    x_all, y_all = cat(data(N_PARTIAL))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_all, y_all), batch_size=4, shuffle=False
    )
    acc = Accumulator(model, optimizer, K, total_micro_batches=len(loader))
    with acc:
        for batch_idx, (x, y) in enumerate(loader):
            acc.backward(F.mse_loss(model(x), y))
            need_update = acc.sync_gradients
            assert need_update == (batch_idx in (3, 7, 9))
            if need_update:
                optimizer.step()
                optimizer.zero_grad()
        steps_inside = acc.optimizer_steps
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "steps_inside": steps_inside}


def loop_partial_window_discard() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K, partial_window="discard") as acc:
        for x, y in data(N_PARTIAL):
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_partial_window_carry_two_epochs() -> Result:
    model, optimizer = build()
    batches = data(12)
    acc = Accumulator(model, optimizer, K, partial_window="carry")
    for epoch in range(2):
        with acc:
            for x, y in batches[6 * epoch : 6 * epoch + 6]:
                acc.backward(F.mse_loss(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def spiky_data() -> list[Batch]:
    batches = data(12)
    x, y = batches[5]
    batches[5] = (x, 100 * y)
    return batches


def loop_discard_on_loss_spike() -> Result:
    model, optimizer = build()
    dropped = []
    with Accumulator(model, optimizer, K) as acc:
        for x, y in spiky_data():
            loss = F.mse_loss(model(x), y)
            if loss.item() > 100.0:  # skip the spike and the window it landed in
                dropped.append(acc.discard())
                optimizer.zero_grad()
                continue
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "dropped": dropped}


def loop_ema_under_sync_gradients_iterate() -> Result:
    model, optimizer = build()
    ema = snapshot(model)
    acc = Accumulator(model, optimizer, K)
    with acc:
        for x, y in acc.iterate(data(N_PARTIAL)):
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
            if acc.sync_gradients:
                with torch.no_grad():
                    for average, param in zip(ema, model.parameters()):
                        average.lerp_(param, 0.25)
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "ema": ema}


def reference_ema() -> Result:
    model, optimizer = build()
    ema = snapshot(model)

    def update_ema() -> None:
        with torch.no_grad():
            for average, param in zip(ema, model.parameters()):
                average.lerp_(param, 0.25)

    run = plain_loop(model, [optimizer], windows(data(N_PARTIAL)), after_step=update_ema)
    return {"params": snapshot(model), "steps": run.steps, "ema": ema}


# Forgetting acc.backward, and other hard errors -----------------------------------------
def loop_loss_backward_instead(k: int) -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, k):
        for x, y in data():
            loss = F.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return {}


def loop_loss_backward_on_some_micro_batches() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for batch_idx, (x, y) in enumerate(data()):
            loss = F.mse_loss(model(x), y)
            if batch_idx % 2:
                loss.backward()  # an auxiliary branch that was not ported
            else:
                acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    return {}


def loop_scaler_scale_backward_instead() -> Result:
    model, optimizer = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with Accumulator(model, optimizer, K, scaler=scaler):
        for x, y in data():
            loss = F.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    return {}


def loop_backward_outside_block() -> Result:
    model, optimizer = build()
    acc = Accumulator(model, optimizer, K)  # `with acc:` forgotten
    for x, y in data():
        acc.backward(F.mse_loss(model(x), y))
        optimizer.step()
    return {}


def loop_second_accumulator_same_optimizer() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K), Accumulator(model, optimizer, K):
        pass
    return {}


# More loop shapes --------------------------------------------------------------------------
def loop_validation_inside_block() -> Result:
    model, optimizer = build()
    x_val, y_val = data(1, seed=7)[0]
    val_losses = []
    with Accumulator(model, optimizer, K) as acc:
        for batch_idx, (x, y) in enumerate(data(N_PARTIAL)):
            if batch_idx % 3 == 0:  # estimate_loss() every eval_interval iterations
                model.eval()
                with torch.no_grad():
                    val_losses.append(F.mse_loss(model(x_val), y_val).item())
                model.train()
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_freeze_body_after_first_window() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data(N_PARTIAL):
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
            if acc.sync_gradients and acc.optimizer_steps == 1:
                model[0].requires_grad_(False)
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def reference_freeze_body_after_first_window() -> Result:
    model, optimizer = build()
    run = plain_loop(
        model,
        [optimizer],
        windows(data(N_PARTIAL)),
        after_step=lambda: model[0].requires_grad_(False),
    )
    return {"params": snapshot(model), "steps": run.steps}


def head_only() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model()
    model[0].requires_grad_(False)
    return model, torch.optim.AdamW(model[2].parameters(), lr=1e-2, weight_decay=0.1)


def unfreeze_body(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model[0].requires_grad_(True)
    optimizer.add_param_group({"params": list(model[0].parameters()), "lr": 1e-3})


def loop_add_param_group_at_boundary() -> Result:
    # Progressive unfreezing: the body joins the optimizer after the first window; the
    # final short window then needs its correction on the new group too.
    model, optimizer = head_only()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data(N_PARTIAL):
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
            if acc.sync_gradients and acc.optimizer_steps == 1:
                unfreeze_body(model, optimizer)
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(optimizer)}


def reference_add_param_group_at_boundary() -> Result:
    model, optimizer = head_only()

    def after_step() -> None:
        if len(optimizer.param_groups) == 1:
            unfreeze_body(model, optimizer)

    run = plain_loop(model, [optimizer], windows(data(N_PARTIAL)), after_step=after_step)
    return {"params": snapshot(model), "steps": run.steps, "lr": lrs(optimizer)}


def loop_step_at_top_of_next_iteration() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data(N_PARTIAL):
            optimizer.step()  # applies the previous iteration's window when it is complete
            optimizer.zero_grad()
            acc.backward(F.mse_loss(model(x), y))
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_two_optimizers_one_scaler() -> Result:
    model = make_model()
    optimizers, _ = split_optimizers(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with Accumulator(model, optimizers, K, scaler=scaler) as acc:
        for x, y in data(N_PARTIAL):
            for optimizer in optimizers:
                optimizer.zero_grad()
            acc.backward(F.mse_loss(model(x), y))
            scaler.step(optimizers[0])
            scaler.step(optimizers[1])
            scaler.update()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def reference_two_optimizers() -> Result:
    model = make_model()
    optimizers, _ = split_optimizers(model)
    run = plain_loop(model, optimizers, windows(data(N_PARTIAL)))
    return {"params": snapshot(model), "steps": run.steps}


RAGGED10 = (*RAGGED_SIZES, 2, 9)


def loop_weighted_scaler_max_grad_norm_partial() -> Result:
    model, optimizer = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with Accumulator(model, optimizer, K, scaler=scaler, max_grad_norm=CLIP) as acc:
        for x, y in ragged(RAGGED10):
            acc.backward(F.mse_loss(model(x), y), weight=len(x))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def start_split_run() -> tuple[nn.Module, list[Any], list[Any], Accumulator]:
    model = make_model()
    optimizers, lr_schedulers = split_optimizers(model)
    acc = Accumulator(model, optimizers, K, scheduler=lr_schedulers)
    return model, optimizers, lr_schedulers, acc


def train_split(acc: Accumulator, model: nn.Module, optimizers: list[Any], batch: Batch) -> None:
    x, y = batch
    acc.backward(F.mse_loss(model(x), y), weight=len(x))
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad()


def loop_resume_weighted_window_two_optimizers() -> Result:
    batches = ragged(RAGGED10)
    model, optimizers, lr_schedulers, acc = start_split_run()
    buffer = io.BytesIO()
    with contextlib.suppress(Preempted), acc:
        for batch in batches[:6]:
            train_split(acc, model, optimizers, batch)
        torch.save(
            {
                "model": model.state_dict(),
                "optimizers": [optimizer.state_dict() for optimizer in optimizers],
                "schedulers": [scheduler.state_dict() for scheduler in lr_schedulers],
                "accumulator": acc.state_dict(),
            },
            buffer,
        )
        raise Preempted
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model, optimizers, lr_schedulers, acc = start_split_run()
    model.load_state_dict(checkpoint["model"])
    for optimizer, state in zip(optimizers, checkpoint["optimizers"]):
        optimizer.load_state_dict(state)
    for scheduler, state in zip(lr_schedulers, checkpoint["schedulers"]):
        scheduler.load_state_dict(state)
    acc.load_state_dict(checkpoint["accumulator"])
    with acc:
        for batch in batches[6:]:
            train_split(acc, model, optimizers, batch)
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(*optimizers)}


def reference_weighted_two_optimizers() -> Result:
    model = make_model()
    optimizers, lr_schedulers = split_optimizers(model)
    run = plain_loop(model, optimizers, windows(ragged(RAGGED10)), schedulers=lr_schedulers)
    return {"params": snapshot(model), "steps": run.steps, "lr": lrs(*optimizers)}


def default_dtype_nan_setup() -> tuple[nn.Module, torch.optim.Optimizer, list[Batch]]:
    model, optimizer, batches = default_dtype_setup()
    x, y = batches[5]
    batches[5] = (torch.full_like(x, math.nan), y)
    return model, optimizer, batches


def loop_default_dtype_float64_nan_skipped() -> Result:
    with default_float64(), pytest.warns(RuntimeWarning, match="non-finite"):
        model, optimizer, batches = default_dtype_nan_setup()
        with Accumulator(model, optimizer, K) as acc:
            for x, y in batches:
                acc.backward(F.mse_loss(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "skipped": acc.skipped_steps}


def reference_default_dtype_float64_nan_skipped() -> Result:
    with default_float64():
        model, optimizer, batches = default_dtype_nan_setup()
        run = plain_loop(model, [optimizer], windows(batches), skip_nonfinite=True)
    return {"params": snapshot(model), "steps": run.steps, "skipped": 1}


def loop_iterate_partial_window_discard() -> Result:
    model, optimizer = build()
    acc = Accumulator(model, optimizer, K, partial_window="discard")
    sync = []
    with acc:
        for x, y in acc.iterate(data(N_PARTIAL)):
            acc.backward(F.mse_loss(model(x), y))
            sync.append(acc.sync_gradients)
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "sync": sync}


def loop_onecyclelr_stepped_under_sync_iterate() -> Result:
    model, optimizer = build()
    scheduler = onecyclelr(optimizer)  # total_steps=3: one per window, the short one too
    acc = Accumulator(model, optimizer, K)
    with acc:
        for x, y in acc.iterate(data(N_PARTIAL)):
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            if acc.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(optimizer)}


def loop_total_micro_batches_of_one_epoch_two_epochs_in_block() -> Result:
    model, optimizer = build()
    loader = data(N_PARTIAL)
    with Accumulator(model, optimizer, K, total_micro_batches=len(loader)) as acc:
        for _epoch in range(2):
            for x, y in loader:
                acc.backward(F.mse_loss(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
    return {}


def loop_total_micro_batches_loop_breaks_early() -> Result:
    model, optimizer = build()
    max_steps_reached_at = N_PARTIAL
    with Accumulator(model, optimizer, K, total_micro_batches=12) as acc:
        for batch_idx, (x, y) in enumerate(data(12)):
            if batch_idx == max_steps_reached_at:
                break
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
        steps_inside = acc.optimizer_steps
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "steps_inside": steps_inside}


def loop_discard_with_nothing_pending() -> Result:
    model, optimizer = build()
    dropped = []
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data():
            if acc.micro_step == 0:
                dropped.append(acc.discard())  # e.g. a defensive reset at every window start
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "dropped": dropped}


def loop_mixed_zero_grad_calls_unused_head() -> Result:
    # zero_grad(set_to_none=False) at the top and model.zero_grad() after the step: in a
    # plain loop the latter wins (None stays None), so unused parameters are skipped.
    model, optimizer = two_heads("sgd")
    with Accumulator(model, optimizer, K) as acc:
        for index, (x, y) in enumerate(data()):
            optimizer.zero_grad(set_to_none=False)
            acc.backward(F.mse_loss(model(x, use_b=head_b_in_first_window(index)), y))
            optimizer.step()
            model.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_resume_mid_window_with_scaler() -> Result:
    batches = data(N_PARTIAL)

    def start() -> tuple[nn.Module, torch.optim.Optimizer, Any, Accumulator]:
        model, optimizer = build()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        return model, optimizer, scaler, Accumulator(model, optimizer, K, scaler=scaler)

    model, optimizer, scaler, acc = start()
    buffer = io.BytesIO()
    with contextlib.suppress(Preempted), acc:
        for index, (x, y) in enumerate(batches):
            acc.backward(F.mse_loss(model(x), y))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            if index == 5:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(),
                        "accumulator": acc.state_dict(),
                    },
                    buffer,
                )
                raise Preempted
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model, optimizer, scaler, acc = start()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    acc.load_state_dict(checkpoint["accumulator"])
    with acc:
        for x, y in batches[6:]:
            acc.backward(F.mse_loss(model(x), y))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "scale": scaler.get_scale()}


def loop_scaler_growth_every_step() -> Result:
    model, optimizer = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    with Accumulator(model, optimizer, K, scaler=scaler) as acc:
        for x, y in data(N_PARTIAL):
            acc.backward(F.mse_loss(model(x), y))
            scaler.step(optimizer)
            scaler.update()  # grows the scale once per real step, not per micro-batch
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "scale": scaler.get_scale()}


def loop_state_dict_between_unscale_and_step() -> Result:
    model, optimizer = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    acc = Accumulator(model, optimizer, K, scaler=scaler)
    with acc:
        for x, y in data():
            acc.backward(F.mse_loss(model(x), y))
            if acc.sync_gradients:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                torch.save({"accumulator": acc.state_dict()}, io.BytesIO())  # too early
            scaler.step(optimizer)
            scaler.update()
    return {}


def loop_loss_not_reduced() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data():
            loss = F.mse_loss(model(x), y, reduction="none")  # the .mean() was forgotten
            acc.backward(loss)
            optimizer.step()
    return {}


class TinyRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.GRU(6, 8)
        self.decoder = nn.Linear(8, 3)
        self.double()

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output, hidden = self.rnn(x, hidden)
        return self.decoder(output), hidden


def bptt_batches(count: int = N_PARTIAL) -> list[Batch]:
    generator = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(5, 2, 6, generator=generator, dtype=F64),
            torch.randn(5, 2, 3, generator=generator, dtype=F64),
        )
        for _ in range(count)
    ]


def rnn_setup() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = TinyRNN()
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def loop_rnn_hidden_state_carried_detached() -> Result:
    # word_language_model: the hidden state crosses micro-batches, detached
    # (repackage_hidden), and the gradient is clipped once per update.
    model, optimizer = rnn_setup()
    hidden = torch.zeros(1, 2, 8, dtype=F64)
    with Accumulator(model, optimizer, K, max_grad_norm=0.25) as acc:
        for data_, targets in bptt_batches():
            hidden = hidden.detach()
            model.zero_grad()
            output, hidden = model(data_, hidden)
            acc.backward(F.mse_loss(output, targets))
            optimizer.step()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def reference_rnn_hidden_state_carried_detached() -> Result:
    model, optimizer = rnn_setup()
    state = {"hidden": torch.zeros(1, 2, 8, dtype=F64)}

    def window_loss(model: nn.Module, window: Sequence[Batch]) -> torch.Tensor:
        losses = []
        for data_, targets in window:
            output, hidden = model(data_, state["hidden"].detach())
            state["hidden"] = hidden
            losses.append(F.mse_loss(output, targets))
        return sum(losses) / len(losses)

    run = plain_loop(model, [optimizer], windows(bptt_batches()), loss=window_loss, clip=0.25)
    return {"params": snapshot(model), "steps": run.steps}


# Silent mistakes a library could catch ----------------------------------------------------
def loop_scaled_loss_passed_to_acc_backward() -> Result:
    # nanoGPT's `scaler.scale(loss).backward()` ported as acc.backward(scaler.scale(loss))
    # while the scaler is also given to the Accumulator: the loss is scaled twice.
    model, optimizer = build("sgd_momentum")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with Accumulator(model, optimizer, K, scaler=scaler) as acc:
        for x, y in data():
            loss = F.mse_loss(model(x), y)
            acc.backward(scaler.scale(loss))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": 2}


def loop_unregistered_scheduler_stepped_every_micro_batch() -> Result:
    model, optimizer = build()
    scheduler = halving(optimizer)  # not passed as scheduler=
    with Accumulator(model, optimizer, K) as acc, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "scheduler before optimizer"
        for x, y in data():
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": 2, "lr": lrs(optimizer)}


# Changing accumulation_steps between blocks ----------------------------------------------
def loop_accumulation_steps_changed_between_blocks() -> Result:
    model, optimizer = build()
    batches = data(12)
    acc = Accumulator(model, optimizer, 2)
    with acc:
        for x, y in batches[:4]:
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    acc.accumulation_steps = 4  # e.g. a batch-size ramp
    with acc:
        for x, y in batches[4:]:
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_accumulation_steps_changed_with_carried_window() -> Result:
    model, optimizer = build()
    batches = data(12)
    acc = Accumulator(model, optimizer, K, partial_window="carry")
    with acc:
        for x, y in batches[:6]:  # one window of 4, then 2 carried over
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    acc.accumulation_steps = 2  # for the next window; the carried one still needs 4
    with acc:
        for x, y in batches[6:]:
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def split_at(*bounds: int) -> Callable[[list[Any]], list[list[Any]]]:
    def groups(items: list[Any]) -> list[list[Any]]:
        edges = [0, *bounds, len(items)]
        return [items[a:b] for a, b in itertools.pairwise(edges) if b > a]

    return groups


# K=1 is the plain loop, bit for bit -----------------------------------------------------
def loop_k1_model_zero_grad() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, 1) as acc:
        for x, y in data():
            model.zero_grad()
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def loop_k1_scheduler_and_clip() -> Result:
    model, optimizer = build()
    scheduler = halving(optimizer)
    with Accumulator(model, optimizer, 1, scheduler=scheduler, max_grad_norm=CLIP) as acc:
        for x, y in data():
            optimizer.zero_grad()
            acc.backward(F.mse_loss(model(x), y))
            optimizer.step()
            scheduler.step()
    return {"params": snapshot(model), "steps": acc.optimizer_steps, "lr": lrs(optimizer)}


def loop_k1_set_to_none_false_max_grad_norm() -> Result:
    model, optimizer = two_heads("sgd")
    with Accumulator(model, optimizer, 1, max_grad_norm=CLIP) as acc:
        for index, (x, y) in enumerate(data()):
            optimizer.zero_grad(set_to_none=False)
            acc.backward(F.mse_loss(model(x, use_b=head_b_every_third_step(index)), y))
            optimizer.step()
    return {"params": snapshot(model), "steps": acc.optimizer_steps}


def reference_k1_set_to_none_false_max_grad_norm() -> Result:
    return reference(
        k=1,
        setup=functools.partial(two_heads, "sgd"),
        batches=lambda: list(enumerate(data())),
        loss=mean_of_micro_losses(head_loss(head_b_every_third_step)),
        set_to_none=False,
        clip=CLIP,
    )


# ---------------------------------------------------------------------------- the matrix
@dataclass(frozen=True)
class Variant:
    id: str
    source: str  # a key of SOURCES
    loop: Callable[[], Result]
    reference: Callable[[], Result] | None = None  # "exact": compare with this plain loop
    raises: type[BaseException] | None = None  # or: must raise this, matching `match`
    match: str | None = None
    bitwise: bool = False
    marks: tuple[Any, ...] = ()


SOURCES = {
    "examples-imagenet": "pytorch/examples imagenet/main.py",
    "examples-wlm": "pytorch/examples word_language_model/main.py",
    "nanogpt": "karpathy/nanoGPT train.py",
    "timm": "huggingface/pytorch-image-models train.py, timm/utils/cuda.py",
    "hf-trainer": "huggingface/transformers src/transformers/trainer.py",
    "accelerate": "huggingface/accelerate examples/by_feature/gradient_accumulation*.py, "
    "docs/source/usage_guides/gradient_accumulation.md, test_utils/scripts/test_sync.py",
    "lightning": "Lightning docs model/manual_optimization.rst, common/optimization.rst",
    "torchtitan": "pytorch/torchtitan torchtitan/train.py",
    "amp-docs": "PyTorch docs notes/amp_examples.rst",
    "torch-docs": "PyTorch docs torch.optim, nn.Embedding",
    "edge": "patterns not tied to one file",
}


def exact(
    id: str,
    source: str,
    loop: Callable[[], Result],
    ref: Callable[[], Result],
    *,
    bitwise: bool = False,
    marks: tuple[Any, ...] = (),
) -> Variant:
    return Variant(id, source, loop, ref, bitwise=bitwise, marks=marks)


def error(
    id: str,
    source: str,
    loop: Callable[[], Result],
    raises: type[BaseException],
    match: str,
    *,
    marks: tuple[Any, ...] = (),
) -> Variant:
    return Variant(id, source, loop, raises=raises, match=match, marks=marks)


P = functools.partial
PARTIAL_REF = P(reference, N_PARTIAL)

VARIANTS = [
    # -- where gradients are cleared
    exact("zero_grad_top_of_loop", "torchtitan", loop_zero_grad_top_of_loop, reference),
    exact("zero_grad_after_step", "accelerate", loop_zero_grad_after_step, reference),
    exact(
        "zero_grad_between_forward_and_backward",
        "examples-imagenet",
        loop_zero_grad_between_forward_and_backward,
        reference,
    ),
    exact(
        "zero_grad_set_to_none_false",
        "edge",
        loop_zero_grad_set_to_none_false,
        P(reference, set_to_none=False),
    ),
    exact(
        "model_zero_grad_top_of_loop",
        "examples-wlm",
        loop_model_zero_grad_top_of_loop,
        P(reference, optimizer="sgd_momentum"),
    ),
    exact("model_zero_grad_after_step", "hf-trainer", loop_model_zero_grad_after_step, PARTIAL_REF),
    exact("submodule_zero_grad", "lightning", loop_submodule_zero_grad, reference),
    exact("no_zero_grad_at_all", "lightning", loop_no_zero_grad_at_all, reference),
    exact(
        "zero_grad_top_and_model_zero_grad_after",
        "edge",
        loop_zero_grad_top_and_model_zero_grad_after,
        reference,
    ),
    exact(
        "unused_head_set_to_none_false_momentum",
        "edge",
        P(loop_two_heads, head_b_in_first_window, k=K, optimizer="sgd", set_to_none=False),
        P(reference_two_heads, head_b_in_first_window, k=K, optimizer="sgd", set_to_none=False),
    ),
    exact(
        "unused_head_adamw_set_to_none_true",
        "edge",
        P(loop_two_heads, head_b_in_first_window, k=K, optimizer="adamw", set_to_none=True),
        P(reference_two_heads, head_b_in_first_window, k=K, optimizer="adamw", set_to_none=True),
    ),
    exact(
        "head_used_in_one_micro_batch_of_each_window",
        "edge",
        P(loop_two_heads, head_b_in_third_micro_batch, k=K, optimizer="sgd", set_to_none=True),
        P(
            reference_two_heads,
            head_b_in_third_micro_batch,
            k=K,
            optimizer="sgd",
            set_to_none=True,
        ),
    ),
    # -- how backward is called
    exact(
        "weight_python_int_ragged",
        "edge",
        P(loop_weighted, lambda batch: len(batch[0])),
        P(reference, batches=ragged),
    ),
    exact(
        "weight_mask_sum_tensor",
        "torchtitan",
        loop_weight_mask_sum_tensor,
        P(reference, batches=masked, loss=full_batch_token_mean),
    ),
    exact(
        "weight_numpy_int64_mask_count",
        "hf-trainer",
        loop_weight_numpy_mask_count,
        P(reference, batches=masked, loss=full_batch_token_mean),
    ),
    exact(
        "weight_numpy_int64",
        "edge",
        P(loop_weighted, weight_numpy_int64),
        P(reference, batches=ragged),
    ),
    exact(
        "weight_numpy_float32",
        "edge",
        P(loop_weighted, weight_numpy_float32),
        P(reference, batches=ragged),
    ),
    exact(
        "weight_one_element_tensor",
        "edge",
        P(loop_weighted, lambda batch: torch.tensor([float(len(batch[0]))])),
        P(reference, batches=ragged),
    ),
    exact(
        "sum_loss_unweighted",
        "edge",
        loop_sum_loss_unweighted,
        P(reference, N_PARTIAL, loss=mean_of_micro_losses(sum_mse)),
    ),
    exact(
        "sum_loss_over_tokens_weighted",
        "torchtitan",
        loop_sum_loss_over_tokens_weighted,
        P(reference, batches=P(masked, N_PARTIAL), loss=full_batch_token_mean),
    ),
    exact(
        "prefetched_token_count_times_k",
        "accelerate",
        loop_prefetched_token_count_times_k,
        P(reference, batches=masked, loss=full_batch_token_mean),
    ),
    error("weight_zero_raises", "torchtitan", loop_weight_zero_raises, ValueError, r"weight.*> ?0"),
    error(
        "weight_per_sequence_vector_raises",
        "edge",
        loop_weight_per_sequence_vector_raises,
        ValueError,
        r"weight.*(scalar|one-element|single)",
    ),
    # -- stepping
    exact(
        "step_under_sync_total_micro_batches",
        "timm",
        P(loop_step_under_sync, N_PARTIAL),
        P(reference, N_PARTIAL, steps_inside=3),
    ),
    exact(
        "step_under_sync_without_total",
        "accelerate",
        P(loop_step_under_sync, None),
        P(reference, N_PARTIAL, steps_inside=2),
    ),
    exact("optimizer_step_twice", "edge", loop_optimizer_step_twice, PARTIAL_REF),
    exact(
        "nanogpt_disabled_scaler_hand_clip",
        "nanogpt",
        loop_nanogpt_disabled_scaler_hand_clip,
        P(reference, lr_schedule=nanogpt_lr, clip=CLIP),
    ),
    exact(
        "scaler_enabled_step_update",
        "timm",
        loop_scaler_enabled_step_update,
        P(reference, N_PARTIAL, scale=2.0**10),
    ),
    exact(
        "scaler_enabled_hand_clip_iterate",
        "amp-docs",
        loop_scaler_enabled_hand_clip_iterate,
        P(reference, N_PARTIAL, clip=CLIP, steps_inside=3),
    ),
    exact(
        "scaler_inf_window_skipped_trainer_style",
        "hf-trainer",
        loop_scaler_inf_window_skipped_trainer_style,
        P(
            reference,
            batches=P(corrupted, N_PARTIAL, 5, math.inf),
            scheduler=halving,
            skip_nonfinite=True,
            skipped=1,
            was_run=[True, False, True],
        ),
    ),
    exact(
        "nan_window_skipped",
        "edge",
        loop_nan_window_skipped,
        P(reference, batches=data_with_nan, scheduler=halving, skip_nonfinite=True, skipped=1),
    ),
    error("nan_window_raises", "edge", P(loop_nan_window, "raise"), RuntimeError, r"non-finite"),
    error("closure_step_raises", "torch-docs", loop_closure_step_raises, TypeError, r"closure"),
    error(
        "forgot_optimizer_step_raises",
        "lightning",
        loop_forgot_optimizer_step_raises,
        RuntimeError,
        r"optimizer\.step\(\)",
    ),
    exact(
        "two_backwards_per_iteration_k4",
        "edge",
        P(loop_two_backwards_per_iteration, 4),
        reference,
    ),
    error(
        "two_backwards_per_iteration_k3_raises",
        "edge",
        P(loop_two_backwards_per_iteration, 3),
        RuntimeError,
        r"optimizer\.step\(\)",
    ),
    # -- scheduling
    exact(
        "lambdalr_scheduler_arg",
        "accelerate",
        P(loop_scheduler_arg, halving),
        P(reference, N_PARTIAL, scheduler=halving, window_loss=True),
    ),
    exact(
        "steplr_scheduler_arg",
        "examples-imagenet",
        P(loop_scheduler_arg, steplr),
        P(reference, N_PARTIAL, scheduler=steplr, window_loss=True),
    ),
    exact(
        "onecyclelr_scheduler_arg",
        "torch-docs",
        P(loop_scheduler_arg, onecyclelr),
        P(reference, N_PARTIAL, scheduler=onecyclelr, window_loss=True),
    ),
    exact(
        "cosine_scheduler_arg",
        "torch-docs",
        P(loop_scheduler_arg, cosine),
        P(reference, N_PARTIAL, scheduler=cosine, window_loss=True),
    ),
    exact(
        "custom_scheduler_with_only_step",
        "edge",
        P(loop_scheduler_arg, HalvingSchedule),
        P(reference, N_PARTIAL, scheduler=HalvingSchedule, window_loss=True),
    ),
    exact(
        "scheduler_created_inside_block",
        "accelerate",
        loop_scheduler_created_inside_block,
        reference_scheduler_created_inside_block,
    ),
    exact(
        "manual_lr_from_optimizer_steps",
        "examples-imagenet",
        loop_manual_lr_from_optimizer_steps,
        P(reference, N_PARTIAL, lr_schedule=nanogpt_lr),
    ),
    error(
        "onecyclelr_too_few_total_steps_raises",
        "torch-docs",
        P(loop_scheduler_arg, P(onecyclelr, total_steps=2)),
        ValueError,
        r"Tried to step",
    ),
    error(
        "reduce_lr_on_plateau_raises",
        "hf-trainer",
        loop_reduce_lr_on_plateau_raises,
        TypeError,
        r"ReduceLROnPlateau",
    ),
    error(
        "scheduler_of_another_optimizer_raises",
        "edge",
        loop_scheduler_of_another_optimizer_raises,
        ValueError,
        r"optimizer",
    ),
    # -- clipping
    exact("max_grad_norm_arg", "torchtitan", loop_max_grad_norm_arg, P(PARTIAL_REF, clip=CLIP)),
    exact(
        "hand_clip_under_sync_gradients_iterate",
        "accelerate",
        loop_hand_clip_under_sync_gradients_iterate,
        P(reference, N_PARTIAL, clip=CLIP, steps_inside=3),
    ),
    # -- saving and resuming
    exact(
        "resume_mid_window",
        "nanogpt",
        P(loop_resume, 6),
        P(reference, N_PARTIAL, scheduler=halving, clip=0.5),
    ),
    exact(
        "resume_at_boundary",
        "nanogpt",
        P(loop_resume, 8),
        P(reference, N_PARTIAL, scheduler=halving, clip=0.5),
    ),
    exact(
        "state_dict_every_iteration",
        "edge",
        loop_state_dict_every_iteration,
        P(reference, N_PARTIAL, scheduler=halving, clip=0.5),
    ),
    # -- several optimizers, sparse gradients
    exact(
        "two_optimizers_two_schedulers",
        "torchtitan",
        loop_two_optimizers_two_schedulers,
        reference_two_optimizers_two_schedulers,
    ),
    exact(
        "sparse_adam_and_adam_two_optimizers",
        "torch-docs",
        loop_sparse_adam_and_adam_two_optimizers,
        reference_sparse_adam_and_adam,
    ),
    exact(
        "sparse_embedding_sgd_ragged_weights",
        "torch-docs",
        loop_sparse_embedding_sgd_ragged_weights,
        P(reference, setup=bag_of_words_sgd, batches=P(token_batches, RAGGED_SIZES)),
    ),
    # -- torch.compile, default dtype, complex parameters
    exact("compile_eager", "nanogpt", P(loop_compiled, "eager"), reference, marks=COMPILE_MARKS),
    exact(
        "compile_aot_eager",
        "nanogpt",
        P(loop_compiled, "aot_eager"),
        reference,
        marks=COMPILE_MARKS,
    ),
    exact(
        "default_dtype_float64",
        "edge",
        loop_default_dtype_float64,
        reference_default_dtype_float64,
    ),
    exact(
        "complex_parameters",
        "edge",
        P(loop_complex_parameters, None),
        P(
            reference,
            N_PARTIAL,
            setup=P(complex_setup, weight_decay=0.1),
            loss=full_batch(complex_loss),
        ),
    ),
    exact(
        "complex_parameters_max_grad_norm",
        "edge",
        P(loop_complex_parameters, CLIP),
        P(
            reference,
            N_PARTIAL,
            setup=P(complex_setup, weight_decay=0.1),
            loss=full_batch(complex_loss),
            clip=CLIP,
        ),
    ),
    # -- parameters appearing in the loss directly
    exact(
        "explicit_l2_penalty_in_loss",
        "edge",
        loop_explicit_l2_penalty_in_loss,
        P(
            reference,
            N_PARTIAL,
            optimizer="sgd_momentum",
            loss=lambda model, window: full_batch()(model, window) + l2_penalty(model),
        ),
    ),
    exact(
        "parameter_used_directly_in_loss",
        "edge",
        loop_parameter_used_directly_in_loss,
        P(reference, N_PARTIAL, setup=scaled_model, loss=full_batch(scaled_mse)),
    ),
    exact(
        "loss_is_a_leaf_parameter",
        "edge",
        loop_loss_is_a_leaf_parameter,
        P(
            reference,
            N_PARTIAL,
            setup=leaf_setup,
            batches=lambda: [None] * N_PARTIAL,
            loss=lambda model, window: model.value * 1.0,
        ),
    ),
    # -- partial final windows
    exact(
        "iterate_list",
        "accelerate",
        P(loop_iterate, list),
        P(reference, N_PARTIAL, steps_inside=3, sync=SYNC_PATTERN),
    ),
    exact(
        "iterate_generator",
        "edge",
        P(loop_iterate, as_generator),
        P(reference, N_PARTIAL, steps_inside=3, sync=SYNC_PATTERN),
    ),
    exact(
        "dataloader_total_micro_batches",
        "timm",
        loop_dataloader_total_micro_batches,
        P(reference, N_PARTIAL, steps_inside=3),
    ),
    exact(
        "partial_window_discard",
        "edge",
        loop_partial_window_discard,
        P(reference, N_PARTIAL, groups=lambda items: windows(items)[:2]),
    ),
    exact(
        "partial_window_carry_two_epochs",
        "edge",
        loop_partial_window_carry_two_epochs,
        P(reference, 12),
    ),
    exact(
        "discard_on_loss_spike",
        "edge",
        loop_discard_on_loss_spike,
        P(
            reference,
            batches=spiky_data,
            groups=lambda items: [items[0:4], items[6:10], items[10:12]],
            dropped=[1],
        ),
    ),
    exact(
        "ema_under_sync_gradients_iterate",
        "timm",
        loop_ema_under_sync_gradients_iterate,
        reference_ema,
    ),
    # -- forgetting acc.backward, and other hard errors
    error(
        "loss_backward_instead_raises",
        "accelerate",
        P(loop_loss_backward_instead, K),
        RuntimeError,
        r"acc\.backward",
    ),
    error(
        "loss_backward_instead_k1_raises",
        "examples-imagenet",
        P(loop_loss_backward_instead, 1),
        RuntimeError,
        r"acc\.backward",
    ),
    error(
        "loss_backward_on_some_micro_batches_raises",
        "edge",
        loop_loss_backward_on_some_micro_batches,
        RuntimeError,
        r"acc\.backward",
    ),
    error(
        "scaler_scale_backward_instead_raises",
        "nanogpt",
        loop_scaler_scale_backward_instead,
        RuntimeError,
        r"acc\.backward",
    ),
    error(
        "backward_outside_block_raises",
        "edge",
        loop_backward_outside_block,
        RuntimeError,
        r"with acc",
    ),
    error(
        "second_accumulator_same_optimizer_raises",
        "edge",
        loop_second_accumulator_same_optimizer,
        RuntimeError,
        r"already",
    ),
    # -- accumulation_steps changed between blocks
    exact(
        "accumulation_steps_changed_between_blocks",
        "edge",
        loop_accumulation_steps_changed_between_blocks,
        P(reference, 12, groups=split_at(2, 4, 8)),
    ),
    exact(
        "accumulation_steps_changed_with_carried_window",
        "edge",
        loop_accumulation_steps_changed_with_carried_window,
        P(reference, 12, groups=split_at(4, 8, 10)),
    ),
    # -- more loop shapes
    exact(
        "validation_inside_block",
        "nanogpt",
        loop_validation_inside_block,
        PARTIAL_REF,
    ),
    exact(
        "freeze_body_after_first_window",
        "edge",
        loop_freeze_body_after_first_window,
        reference_freeze_body_after_first_window,
    ),
    exact(
        "add_param_group_at_boundary",
        "edge",
        loop_add_param_group_at_boundary,
        reference_add_param_group_at_boundary,
    ),
    exact(
        "step_at_top_of_next_iteration",
        "edge",
        loop_step_at_top_of_next_iteration,
        PARTIAL_REF,
    ),
    exact(
        "two_optimizers_one_scaler",
        "amp-docs",
        loop_two_optimizers_one_scaler,
        reference_two_optimizers,
    ),
    exact(
        "weighted_scaler_max_grad_norm_partial",
        "edge",
        loop_weighted_scaler_max_grad_norm_partial,
        P(reference, batches=P(ragged, RAGGED10), clip=CLIP),
    ),
    exact(
        "resume_weighted_window_two_optimizers",
        "torchtitan",
        loop_resume_weighted_window_two_optimizers,
        reference_weighted_two_optimizers,
    ),
    exact(
        "default_dtype_float64_nan_skipped",
        "edge",
        loop_default_dtype_float64_nan_skipped,
        reference_default_dtype_float64_nan_skipped,
    ),
    exact(
        "model_zero_grad_set_to_none_false_unused_head",
        "hf-trainer",
        P(
            loop_two_heads,
            head_b_in_first_window,
            k=K,
            optimizer="sgd",
            set_to_none=False,
            clear_with_model=True,
        ),
        P(reference_two_heads, head_b_in_first_window, k=K, optimizer="sgd", set_to_none=False),
    ),
    exact(
        "iterate_partial_window_discard",
        "edge",
        loop_iterate_partial_window_discard,
        P(
            reference,
            N_PARTIAL,
            groups=lambda items: windows(items)[:2],
            sync=[*SYNC_PATTERN[:-1], False],
        ),
    ),
    exact(
        "onecyclelr_stepped_under_sync_iterate",
        "accelerate",
        loop_onecyclelr_stepped_under_sync_iterate,
        P(reference, N_PARTIAL, scheduler=onecyclelr),
    ),
    error(
        "total_micro_batches_of_one_epoch_two_epochs_in_block",
        "timm",
        loop_total_micro_batches_of_one_epoch_two_epochs_in_block,
        RuntimeError,
        r"total_micro_batches|more often",
    ),
    exact(
        "total_micro_batches_loop_breaks_early",
        "hf-trainer",
        loop_total_micro_batches_loop_breaks_early,
        P(reference, N_PARTIAL, steps_inside=2),
    ),
    exact(
        "discard_with_nothing_pending",
        "edge",
        loop_discard_with_nothing_pending,
        P(reference, dropped=[0, 0]),
    ),
    error(
        "scaled_loss_passed_to_acc_backward",
        "nanogpt",
        loop_scaled_loss_passed_to_acc_backward,
        ValueError,
        r"loss was already scaled by scaler.scale\(\); pass the unscaled loss",
    ),
    error(
        "unregistered_scheduler_stepped_every_micro_batch",
        "accelerate",
        loop_unregistered_scheduler_stepped_every_micro_batch,
        RuntimeError,
        r"learning rate.*changed.*scheduler",
    ),
    exact(
        "mixed_zero_grad_calls_unused_head",
        "edge",
        loop_mixed_zero_grad_calls_unused_head,
        P(reference_two_heads, head_b_in_first_window, k=K, optimizer="sgd", set_to_none=True),
    ),
    exact(
        "resume_mid_window_with_scaler",
        "timm",
        loop_resume_mid_window_with_scaler,
        P(reference, N_PARTIAL, scale=2.0**13),
    ),
    exact(
        "scaler_growth_every_step",
        "timm",
        loop_scaler_growth_every_step,
        P(reference, N_PARTIAL, scale=2.0**13),
    ),
    error(
        "state_dict_between_unscale_and_step_raises",
        "amp-docs",
        loop_state_dict_between_unscale_and_step,
        RuntimeError,
        r"unscale",
    ),
    error("loss_not_reduced_raises", "edge", loop_loss_not_reduced, ValueError, r"scalar"),
    exact(
        "rnn_hidden_state_carried_detached",
        "examples-wlm",
        loop_rnn_hidden_state_carried_detached,
        reference_rnn_hidden_state_carried_detached,
    ),
    exact(
        "k1_set_to_none_false_max_grad_norm_bitwise",
        "edge",
        loop_k1_set_to_none_false_max_grad_norm,
        reference_k1_set_to_none_false_max_grad_norm,
        bitwise=True,
    ),
    # -- K=1: the plain loop, bit for bit
    exact(
        "k1_unused_head_set_to_none_true_bitwise",
        "edge",
        P(loop_two_heads, head_b_every_third_step, k=1, optimizer="sgd", set_to_none=True),
        P(reference_two_heads, head_b_every_third_step, k=1, optimizer="sgd", set_to_none=True),
        bitwise=True,
    ),
    exact(
        "k1_unused_head_set_to_none_false_bitwise",
        "edge",
        P(loop_two_heads, head_b_every_third_step, k=1, optimizer="sgd", set_to_none=False),
        P(reference_two_heads, head_b_every_third_step, k=1, optimizer="sgd", set_to_none=False),
        bitwise=True,
    ),
    exact(
        "k1_model_zero_grad_bitwise",
        "examples-wlm",
        loop_k1_model_zero_grad,
        P(reference, k=1),
        bitwise=True,
    ),
    exact(
        "k1_scheduler_and_clip_bitwise",
        "edge",
        loop_k1_scheduler_and_clip,
        P(reference, k=1, scheduler=halving, clip=CLIP),
        bitwise=True,
    ),
]


def test_the_matrix_is_large_and_sourced():
    assert len(VARIANTS) >= 40
    ids = [variant.id for variant in VARIANTS]
    assert len(ids) == len(set(ids))
    assert {variant.source for variant in VARIANTS} <= set(SOURCES)
    for variant in VARIANTS:  # the header names every variant taken from a source
        assert variant.source == "edge" or variant.id in __doc__, variant.id


@pytest.mark.parametrize("variant", [pytest.param(v, id=v.id, marks=v.marks) for v in VARIANTS])
def test_real_loop(variant: Variant) -> None:
    if variant.raises is not None:
        with pytest.raises(variant.raises, match=variant.match):
            variant.loop()
        return
    assert variant.reference is not None
    got = variant.loop()
    expected = variant.reference()
    assert_same(got, expected, BITWISE if variant.bitwise else TOL)


# ---------------------------------------------------------------------------- beyond the table
def test_resume_is_bitwise_identical_to_the_uninterrupted_run():
    uninterrupted = loop_resume(None)
    for stop_after in (1, 6, 8):
        resumed = loop_resume(stop_after)
        assert_same(resumed, uninterrupted, BITWISE)


def test_scheduler_error_at_the_boundary_applies_the_update_once():
    def lr_lambda(step: int) -> float:
        if step == 2:
            raise RuntimeError("schedule exhausted")
        return 0.5**step

    model, optimizer = build("sgd_momentum")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    acc = Accumulator(model, optimizer, K, scheduler=scheduler)
    errors = []
    with acc:
        for x, y in data():
            acc.backward(F.mse_loss(model(x), y))
            try:
                optimizer.step()
            except RuntimeError as error:
                errors.append(str(error))
                optimizer.step()  # a retry must not apply the window twice
    assert errors == ["schedule exhausted"]
    assert acc.optimizer_steps == 2
    assert acc.micro_step == 0

    ref_model, ref_optimizer = build("sgd_momentum")
    ref_scheduler = torch.optim.lr_scheduler.LambdaLR(ref_optimizer, lr_lambda)
    with pytest.raises(RuntimeError, match="schedule exhausted"):
        plain_loop(ref_model, [ref_optimizer], windows(data()), schedulers=[ref_scheduler])
    for got, want in zip(snapshot(model), snapshot(ref_model)):
        torch.testing.assert_close(got, want, **TOL)


def test_several_optimizers_are_exposed_in_order():
    model = make_model()
    optimizers, lr_schedulers = split_optimizers(model)
    acc = Accumulator(model, tuple(optimizers), K, scheduler=tuple(lr_schedulers))
    assert acc.optimizers == tuple(optimizers)
    assert acc.optimizer is optimizers[0]
    assert acc.schedulers == tuple(lr_schedulers)


def test_model_zero_grad_is_plain_again_after_the_block():
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        acc.backward(mse(model, data(1)[0]))
        model.zero_grad()  # a window is pending: kept
        assert all(p.grad is not None for p in model.parameters())
    assert acc.optimizer_steps == 1  # the partial window was applied on exit
    mse(model, data(1)[0]).backward()
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------- negative controls
# The reference comparison is sharp: loops that are *not* accumulation fail it.
def test_control_stepping_every_micro_batch_is_not_one_step_per_window():
    model, optimizer = build()
    plain_loop(model, [optimizer], windows(data(), 1))  # K steps where one was meant
    expected = reference()
    with pytest.raises(AssertionError):
        assert_same({"params": snapshot(model), "steps": 2}, expected, TOL)


def test_control_dividing_a_short_final_window_by_k_is_not_exact():
    model, optimizer = build("sgd_momentum")
    for window in windows(data(N_PARTIAL)):
        optimizer.zero_grad()
        for batch in window:
            (mse(model, batch) / K).backward()  # the textbook loop: the last window is 2/K
        optimizer.step()
    expected = reference(N_PARTIAL, optimizer="sgd_momentum")
    with pytest.raises(AssertionError):
        assert_same({"params": snapshot(model), "steps": 3}, expected, TOL)


def test_control_set_to_none_changes_the_plain_loop():
    # So the two K=1 bitwise variants above pin different behaviour.
    kwargs = {"k": 1, "optimizer": "sgd"}
    to_none = reference_two_heads(head_b_every_third_step, set_to_none=True, **kwargs)
    to_zero = reference_two_heads(head_b_every_third_step, set_to_none=False, **kwargs)
    with pytest.raises(AssertionError):
        assert_same(to_none, to_zero, TOL)
