"""Automatic micro-batching: hand over whole batches, get micro-batches that fit.

    python examples/auto_microbatch.py                           # CPU, seconds
    python examples/auto_microbatch.py --memory-budget-mib 4 --batch-size 128

Two ways to pick the micro-batch size for a small GPT, each checked against training on
the whole batch at once:

1. ``memory_budget``: the activation memory of a probe micro-batch is measured (on any
   device) and the largest micro-batch that fits the budget is used;
2. out-of-memory recovery: micro-batches start at the whole batch and are halved, and the
   batch replayed, on every ``torch.OutOfMemoryError``. On a GPU that error comes from the
   allocator; here ``--simulate-oom-above`` raises it for micro-batches above a size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from cli_types import positive_float, positive_int
from torch import nn

from torch_accum import Accumulator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=128, context=32, width=64, layers=4)


def train(
    batches: list[torch.Tensor],
    device: torch.device,
    simulate_oom_above: int | None = None,
    **accumulator_options: object,
) -> tuple[nn.Module, Accumulator]:
    torch.manual_seed(0)
    model = GPT(CONFIG).to(device, torch.float64)  # float64: the comparison is exact
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    acc = Accumulator(model, optimizer, **accumulator_options)

    def compute_loss(tokens: torch.Tensor) -> torch.Tensor:
        if simulate_oom_above is not None and tokens.shape[0] > simulate_oom_above:
            raise torch.OutOfMemoryError(f"simulated: {tokens.shape[0]} sequences do not fit")
        logits = model(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    with acc:
        for tokens in batches:
            acc.step_batch(tokens.to(device), compute_loss)
    return model, acc


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=positive_int, default=64, help="sequences per batch")
    parser.add_argument("--steps", type=positive_int, default=3, help="batches (optimizer steps)")
    parser.add_argument("--memory-budget-mib", type=positive_float, default=8.0)
    parser.add_argument(
        "--simulate-oom-above",
        type=positive_int,
        default=16,
        help="raise torch.OutOfMemoryError for larger micro-batches",
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(
            0, CONFIG.vocab_size, (args.batch_size, CONFIG.context + 1), generator=generator
        )
        for _ in range(args.steps)
    ]

    whole, _ = train(batches, device, micro_batch_size=args.batch_size)
    tolerance = 1e-9
    results = []

    budget = int(args.memory_budget_mib * 2**20)
    model, acc = train(batches, device, micro_batch_size="auto", memory_budget=budget)
    difference = max_difference(model, whole)
    results.append(difference <= tolerance)
    print(
        f"memory_budget {args.memory_budget_mib} MiB: micro-batches of {acc.micro_batch_size} "
        f"sequences, {acc.optimizer_steps} optimizer steps, max |param difference| vs whole "
        f"batches {difference:.1e}"
    )

    model, acc = train(
        batches, device, simulate_oom_above=args.simulate_oom_above, micro_batch_size="auto"
    )
    difference = max_difference(model, whole)
    results.append(difference <= tolerance)
    print(
        f"out-of-memory above {args.simulate_oom_above}: {acc.oom_retries} replayed batch(es), "
        f"then micro-batches of {acc.micro_batch_size} sequences, {acc.optimizer_steps} "
        f"optimizer steps, max |param difference| vs whole batches {difference:.1e}"
    )

    verdict = "MATCH" if all(results) else "MISMATCH"
    print(f"{verdict}: both runs equal training on whole batches (tolerance {tolerance:.0e})")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
