"""Real loops: how the optimizer is stepped (under sync_gradients, twice, with a GradScaler,
inf/NaN windows, closures), clipping, several optimizers and sparse gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from helpers import make_model, mse
from real_loops import *  # the matrix's models, data, reference loop and Variant
from torch import nn
from torch.nn import functional as F

from torch_accum import Accumulator


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


VARIANTS = [
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
    # -- clipping
    exact("max_grad_norm_arg", "torchtitan", loop_max_grad_norm_arg, P(PARTIAL_REF, clip=CLIP)),
    exact(
        "hand_clip_under_sync_gradients_iterate",
        "accelerate",
        loop_hand_clip_under_sync_gradients_iterate,
        P(reference, N_PARTIAL, clip=CLIP, steps_inside=3),
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
    # -- where the step is called, GradScaler combinations
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
        "scaler_growth_every_step",
        "timm",
        loop_scaler_growth_every_step,
        P(reference, N_PARTIAL, scale=2.0**13),
    ),
]


@pytest.mark.parametrize("variant", matrix(VARIANTS))
def test_real_loop(variant: Variant) -> None:
    run_variant(variant)


def test_several_optimizers_are_exposed_in_order():
    model = make_model()
    optimizers, lr_schedulers = split_optimizers(model)
    acc = Accumulator(model, tuple(optimizers), K, scheduler=tuple(lr_schedulers))
    assert acc.optimizers == tuple(optimizers)
    assert acc.optimizer is optimizers[0]
    assert acc.schedulers == tuple(lr_schedulers)


# The reference comparison is sharp: loops that are *not* accumulation fail it.
def test_control_stepping_every_micro_batch_is_not_one_step_per_window():
    model, optimizer = build()
    plain_loop(model, [optimizer], windows(data(), 1))  # K steps where one was meant
    expected = reference()
    with pytest.raises(AssertionError):
        assert_same({"params": snapshot(model), "steps": 2}, expected, TOL)
