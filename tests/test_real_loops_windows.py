"""Real loops: partial final windows (iterate, total_micro_batches, discard, carry),
accumulation_steps changed between blocks, loops that break early.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from helpers import mse
from real_loops import *  # the matrix's models, data, reference loop and Variant
from torch.nn import functional as F

from torch_accum import Accumulator

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


VARIANTS = [
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
    # -- declared lengths, loops that break early, discards
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
]


@pytest.mark.parametrize("variant", matrix(VARIANTS))
def test_real_loop(variant: Variant) -> None:
    run_variant(variant)


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
