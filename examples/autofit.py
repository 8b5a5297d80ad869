"""Auto-fit: the micro-batch size and checkpointing with the most samples/s in a memory budget.

    python examples/autofit.py                        # the GPT, then a ResNet-18; CPU, seconds
    python examples/autofit.py --model gpt --budget-fraction 0.2 --plot plan.png

For each model, ``torch_accum.autofit`` measures the candidates (checkpointing off, every
4th / 2nd block, selective, full x micro-batch sizes) in a budget that is a fraction of
what the whole batch needs without checkpointing, prints its table, and the model trains
with the plan in one line, ``plan.accumulator(model, optimizer)``. The GPT trains in float64
and is compared with training on whole batches; the ResNet (torchvision, optional) trains a
few steps on random images (its BatchNorm statistics depend on how the batch is cut, so it
is not compared).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _extras import import_error, needs
from cli_types import positive_int
from torch import nn

from torch_accum import autofit, measure_activation_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt import GPT, GPTConfig

GPT_CONFIG = GPTConfig(vocab_size=128, context=32, width=64, layers=4)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def whole_batch_peak(model: nn.Module, compute_loss: Any, batch: Any) -> int:
    """The activation peak of the whole batch without checkpointing (bytes)."""
    memory = measure_activation_memory(lambda: compute_loss(batch), parameters=model.parameters())
    model.zero_grad(set_to_none=True)
    return memory.peak


def gpt_loss(model: nn.Module) -> Any:
    def compute_loss(tokens: torch.Tensor) -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    return compute_loss


def make_gpt() -> nn.Module:
    torch.manual_seed(0)
    return GPT(GPT_CONFIG).double()  # float64: the comparison with whole batches is exact


def run_gpt(args: argparse.Namespace) -> bool:
    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(
            0, GPT_CONFIG.vocab_size, (args.batch_size, GPT_CONFIG.context + 1), generator=generator
        )
        for _ in range(args.steps)
    ]
    model = make_gpt()
    budget = int(args.budget_fraction * whole_batch_peak(model, gpt_loss(model), batches[0]))
    plan = autofit(model, batches[0], gpt_loss(model), memory_budget=budget)
    print(f"GPT ({GPT_CONFIG.layers} blocks, width {GPT_CONFIG.width}):")
    print(plan.table())
    print(f"plan: {plan}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        plan.plot(args.plot)
        print(f"plot saved to {args.plot}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    acc = plan.accumulator(model, optimizer)  # the plan, in one line
    with acc:
        for tokens in batches:
            acc.step_batch(tokens, gpt_loss(model))

    reference = make_gpt()
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    for tokens in batches:
        reference_optimizer.zero_grad()
        gpt_loss(reference)(tokens).backward()
        reference_optimizer.step()
    difference = max(
        (p - q).abs().max().item()
        for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )
    tolerance = 1e-9
    verdict = "MATCH" if difference <= tolerance else "MISMATCH"
    print(
        f"{verdict}: {acc.optimizer_steps} steps with the plan (micro-batches of "
        f"{plan.micro_batch_size}, checkpointing {plan.label}) equal whole batches of "
        f"{args.batch_size}, max |param difference| {difference:.1e} (tolerance {tolerance:.0e})"
    )
    return difference <= tolerance


def run_resnet(args: argparse.Namespace) -> bool:
    if args.model == "resnet":  # asked for: a missing torchvision stops with what to install
        with needs("torchvision", extra="examples"):
            import torchvision
    else:
        try:
            import torchvision
        except Exception as error:  # a torchvision built for another torch fails otherwise
            print(f"ResNet skipped: torchvision does not import ({import_error(error)})")
            return True
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch_size,))

    def compute_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    budget = int(args.budget_fraction * whole_batch_peak(model, compute_loss, (images, labels)))
    started = time.perf_counter()
    plan = autofit(model, (images, labels), compute_loss, memory_budget=budget)
    print(f"\nResNet-18, {args.image_size}x{args.image_size} images:")
    print(plan.table())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    acc = plan.accumulator(model, optimizer)
    losses = []
    with acc:
        for _ in range(args.steps):
            losses.append(acc.step_batch((images, labels), compute_loss))
    print(
        f"resnet18: {acc.optimizer_steps} steps of {args.batch_size} images in micro-batches of "
        f"{plan.micro_batch_size} x {plan.accumulation_steps}, checkpointing {plan.label}, "
        f"peak {plan.measured_peak / 2**20:.1f} of {budget / 2**20:.1f} MiB, loss "
        f"{losses[0]:.4f} -> {losses[-1]:.4f}, {time.perf_counter() - started:.1f} s"
    )
    return plan.measured_peak <= budget


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("gpt", "resnet", "both"), default="both")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="effective batch")
    parser.add_argument("--steps", type=positive_int, default=3, help="optimizer steps")
    parser.add_argument(
        "--budget-fraction",
        type=fraction,
        default=0.35,
        help="the memory budget, as a fraction of the whole batch's peak without checkpointing",
    )
    parser.add_argument("--image-size", type=positive_int, default=32)
    parser.add_argument("--plot", default=None, help="save the GPT plan's plot here (matplotlib)")
    args = parser.parse_args(argv)
    ok = True
    if args.model in ("gpt", "both"):
        ok = run_gpt(args) and ok
    if args.model in ("resnet", "both"):
        ok = run_resnet(args) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
