"""Real loops: how the loss reaches acc.backward (weights as ints, numpy and tensors, sum
and token losses, prefetched token counts) and the errors for loss.backward() and other misuse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from real_loops import *  # the matrix's models, data, reference loop and Variant
from torch import nn
from torch.nn import functional as F

from torch_accum import Accumulator


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


def masked_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y, mask = batch
    return ((model(x) - y).pow(2) * mask).sum()


def sum_mse(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y, reduction="sum")


def full_batch_token_mean(model: nn.Module, window: Sequence[Batch]) -> torch.Tensor:
    batch = cat(window)
    return masked_sum(model, batch) / batch[2].sum()


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


def loop_loss_not_reduced() -> Result:
    model, optimizer = build()
    with Accumulator(model, optimizer, K) as acc:
        for x, y in data():
            loss = F.mse_loss(model(x), y, reduction="none")  # the .mean() was forgotten
            acc.backward(loss)
            optimizer.step()
    return {}


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


VARIANTS = [
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
    # -- scaled and unreduced losses
    error(
        "scaled_loss_passed_to_acc_backward",
        "nanogpt",
        loop_scaled_loss_passed_to_acc_backward,
        ValueError,
        r"loss was already scaled by scaler.scale\(\); pass the unscaled loss",
    ),
    error("loss_not_reduced_raises", "edge", loop_loss_not_reduced, ValueError, r"scalar"),
]


@pytest.mark.parametrize("variant", matrix(VARIANTS))
def test_real_loop(variant: Variant) -> None:
    run_variant(variant)
