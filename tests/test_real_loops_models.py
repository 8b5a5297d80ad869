"""Real loops: what the model and its parameters do (torch.compile, float64 default dtype,
complex parameters, parameters used in the loss directly, freezing, add_param_group, an
RNN's carried hidden state, validation inside the block).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from helpers import make_model
from real_loops import *  # the matrix's models, data, reference loop and Variant
from torch import nn
from torch.nn import functional as F

from torch_accum import Accumulator


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


def l2_penalty(model: nn.Module) -> torch.Tensor:
    return 1e-2 * sum(p.pow(2).sum() for p in model.parameters())


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


VARIANTS = [
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
    # -- freezing, parameter groups, validation, NaN under float64 default, RNN state
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
        "default_dtype_float64_nan_skipped",
        "edge",
        loop_default_dtype_float64_nan_skipped,
        reference_default_dtype_float64_nan_skipped,
    ),
    exact(
        "rnn_hidden_state_carried_detached",
        "examples-wlm",
        loop_rnn_hidden_state_carried_detached,
        reference_rnn_hidden_state_carried_detached,
    ),
]


@pytest.mark.parametrize("variant", matrix(VARIANTS))
def test_real_loop(variant: Variant) -> None:
    run_variant(variant)
