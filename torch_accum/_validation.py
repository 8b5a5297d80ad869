"""Checks of user input. Each error names the argument, the value received and the fix."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch


def _describe(value: object) -> str:
    text = repr(value)
    if "\n" in text or len(text) > 60:
        return f"an object of type {type(value).__name__}"
    return f"{text} ({type(value).__name__})"


def check_accumulation_steps(value: object) -> int:
    # bool is an int subclass: accumulation_steps=True is almost surely a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"accumulation_steps must be a positive int, got {_describe(value)}; "
            "pass the number of micro-batches per optimizer step, e.g. accumulation_steps=4"
        )
    if value < 1:
        raise ValueError(
            f"accumulation_steps must be >= 1, got {value}; pass the number of "
            "micro-batches per optimizer step (1 disables accumulation)"
        )
    return value


def check_model(model: object) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {_describe(model)}; "
            "pass the module whose parameters the optimizer updates"
        )
    return model


def check_optimizers(optimizer: object) -> tuple[torch.optim.Optimizer, ...]:
    """One optimizer, or a non-empty list/tuple of distinct optimizers."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return (optimizer,)
    if (
        isinstance(optimizer, (list, tuple))
        and optimizer
        and all(isinstance(o, torch.optim.Optimizer) for o in optimizer)
    ):
        if len({id(o) for o in optimizer}) != len(optimizer):
            raise ValueError("optimizer lists the same optimizer twice; pass each optimizer once")
        shared = _shared_parameters(optimizer)
        if shared:
            raise ValueError(
                f"optimizer: {shared} parameter(s) belong to more than one of the optimizers "
                "passed, so they would be stepped twice per window; give each parameter to "
                "one optimizer"
            )
        return tuple(optimizer)
    raise TypeError(
        f"optimizer must be a torch.optim.Optimizer, got {_describe(optimizer)}; pass the "
        "optimizer itself (for example torch.optim.AdamW(model.parameters())), or a list of "
        "optimizers that train on the same loss"
    )


def _shared_parameters(optimizers: Sequence[torch.optim.Optimizer]) -> int:
    seen: set[int] = set()
    shared = 0
    for optimizer in optimizers:
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        shared += len(ids & seen)
        seen |= ids
    return shared


def check_schedulers(
    scheduler: object, optimizers: Sequence[torch.optim.Optimizer]
) -> tuple[Any, ...]:
    """None, one scheduler, or a list/tuple of them, each bound to one of ``optimizers``."""
    if scheduler is None:
        return ()
    schedulers = scheduler if isinstance(scheduler, (list, tuple)) else [scheduler]
    if len({id(s) for s in schedulers}) != len(schedulers):
        raise ValueError(
            "scheduler lists the same scheduler twice, so it would be stepped twice per "
            "optimizer step; pass each scheduler once"
        )
    return tuple(_check_scheduler(s, optimizers) for s in schedulers)


def _check_scheduler(scheduler: object, optimizers: Sequence[torch.optim.Optimizer]) -> Any:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise TypeError(
            "scheduler=ReduceLROnPlateau needs a metric, which the Accumulator cannot "
            "supply at the accumulation boundary; pass scheduler=None and call "
            "scheduler.step(metric) yourself, for example once per epoch"
        )
    if not callable(getattr(scheduler, "step", None)):
        raise TypeError(
            f"scheduler must be an LR scheduler with a step() method, got "
            f"{_describe(scheduler)}; pass a torch.optim.lr_scheduler.LRScheduler or None"
        )
    bound_to = getattr(scheduler, "optimizer", optimizers[0])
    if not any(bound_to is o for o in optimizers):
        raise ValueError(
            f"scheduler is bound to a different optimizer ({type(bound_to).__name__} at "
            f"{id(bound_to):#x}) than the optimizer(s) passed ("
            + ", ".join(f"{type(o).__name__} at {id(o):#x}" for o in optimizers)
            + "); create the scheduler from the same optimizer"
        )
    return scheduler


def check_scaler(scaler: object) -> torch.amp.GradScaler | None:
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            f"scaler must be a torch.amp.GradScaler or None, got {_describe(scaler)}; "
            "create one with torch.amp.GradScaler(device_type)"
        )
    return scaler


def check_max_grad_norm(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"max_grad_norm must be a positive number or None, got {_describe(value)}; "
            "pass e.g. max_grad_norm=1.0, or None to disable clipping"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"max_grad_norm must be a finite number > 0, got {value!r}; "
            "pass e.g. max_grad_norm=1.0, or None to disable clipping"
        )
    return float(value)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}; got {_describe(value)}")
    return str(value)


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_describe(value)}")
    return value


def check_optional_positive_int(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be a positive int or None, got {_describe(value)}; pass e.g. "
            f"{name}=len(loader), or None if it is not known"
        )
    return value


def check_optional_count(name: str, value: object) -> int | None:
    """A count that may be zero (a rank whose loader is empty runs no micro-batches)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{name} must be a non-negative int or None, got {_describe(value)}; pass e.g. "
            f"{name}=len(loader), or None if it is not known"
        )
    return value


def check_autofit(
    checkpointing: object, micro_batch_size: object, memory_budget: object, model: torch.nn.Module
) -> bool:
    """Whether ``checkpointing="auto"`` was asked for, with what it needs."""
    if not (isinstance(checkpointing, str) and checkpointing == "auto"):
        return False
    if micro_batch_size != "auto":
        raise ValueError(
            f"checkpointing='auto' plans the micro-batch size too, but micro_batch_size="
            f"{micro_batch_size!r}; pass micro_batch_size='auto' (and memory_budget), or a "
            "fixed checkpointing such as checkpointing=True"
        )
    cuda = any(p.device.type == "cuda" for p in model.parameters())
    if memory_budget is None and not cuda:
        raise ValueError(
            "checkpointing='auto' needs memory_budget (bytes that one micro-batch may hold) "
            "for a model that is not on CUDA; pass e.g. memory_budget=2 * 2**30"
        )
    return True


def check_micro_batch_size(value: object) -> int | Literal["auto"] | None:
    if value is None:
        return None
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"micro_batch_size must be a positive int, 'auto' or None, got {_describe(value)}; "
            "pass e.g. micro_batch_size=8, or 'auto' to find the largest that fits"
        )
    return value


def check_accumulation_dtype(value: object) -> torch.dtype | None:
    """None (each parameter's own dtype) or a floating dtype of at least 32 bits."""
    if value is None:
        return None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(
            f"accumulation_dtype must be a floating torch.dtype or None, got "
            f"{_describe(value)}; pass torch.float32 (the default) to accumulate bfloat16 and "
            "float16 gradients in float32, or None to accumulate in each parameter's dtype"
        )
    if torch.finfo(value).bits < 32:
        raise ValueError(
            f"accumulation_dtype must hold at least 32 bits, got {value}; pass torch.float32, "
            "or None to accumulate in each parameter's own dtype"
        )
    return value


def check_weight(weight: object) -> float:
    """Turn ``weight`` (number or one-element tensor) into a positive finite float."""
    if isinstance(weight, torch.Tensor):
        if weight.numel() != 1:
            raise ValueError(
                f"weight must be a scalar, got a tensor of shape {tuple(weight.shape)}; "
                "pass the micro-batch's total weight, e.g. weight=mask.sum()"
            )
        if weight.dtype == torch.bool:
            raise TypeError(
                "weight must be a number, got a bool tensor; pass e.g. weight=mask.sum()"
            )
        value = float(weight.item())
    # numbers.Real covers int, float, Fraction and numpy's integer and floating scalars.
    elif isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise TypeError(
            f"weight must be a positive number or a one-element tensor, got {_describe(weight)}; "
            "pass e.g. weight=n_tokens"
        )
    else:
        value = float(weight)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"weight must be a finite number > 0, got {value!r}; a micro-batch with no "
            "samples or tokens should be skipped instead of passed to acc.backward"
        )
    return value


def check_loss(loss: object) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"loss must be a torch.Tensor, got {_describe(loss)}; pass the scalar loss "
            "of the micro-batch"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}; reduce it "
            "first, e.g. loss.mean(), and pass the number of elements as weight"
        )
    if not loss.requires_grad:
        raise ValueError(
            "loss does not require grad; compute it from the model's output with "
            "gradients enabled (not under torch.no_grad() or inference_mode())"
        )
    return loss
