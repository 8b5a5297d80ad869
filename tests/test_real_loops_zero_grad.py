"""Real loops: where and how gradients are cleared (optimizer/model/submodule zero_grad,
set_to_none, heads left out of a window) and K=1 bit for bit with the plain loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import mse
from real_loops import *  # the matrix's models, data, reference loop and Variant
from torch import nn
from torch.nn import functional as F

from torch_accum import Accumulator


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
    # -- set_to_none=False and mixed clearing with an unused head
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
        "mixed_zero_grad_calls_unused_head",
        "edge",
        loop_mixed_zero_grad_calls_unused_head,
        P(reference_two_heads, head_b_in_first_window, k=K, optimizer="sgd", set_to_none=True),
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


@pytest.mark.parametrize("variant", matrix(VARIANTS))
def test_real_loop(variant: Variant) -> None:
    run_variant(variant)


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


def test_control_set_to_none_changes_the_plain_loop():
    # So the two K=1 bitwise variants above pin different behaviour.
    kwargs = {"k": 1, "optimizer": "sgd"}
    to_none = reference_two_heads(head_b_every_third_step, set_to_none=True, **kwargs)
    to_zero = reference_two_heads(head_b_every_third_step, set_to_none=False, **kwargs)
    with pytest.raises(AssertionError):
        assert_same(to_none, to_zero, TOL)
