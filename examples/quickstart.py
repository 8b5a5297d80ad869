"""Quickstart: train with 4 micro-batches per optimizer step and match full-batch training.

    python examples/quickstart.py                    # float64, prints MATCH
    python examples/quickstart.py --accumulation-steps 8 --batch-size 64 --steps 20

The same model is trained twice from the same initialisation: once with full batches, once
with each batch split into ``--accumulation-steps`` micro-batches inside ``with acc:``.
The losses are printed side by side and the final parameters compared.
"""

from __future__ import annotations

import argparse

import torch
from cli_types import positive_int
from torch import nn

from torch_accum import Accumulator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accumulation-steps", type=positive_int, default=4)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="full batch size")
    parser.add_argument("--steps", type=positive_int, default=10, help="optimizer steps")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = parser.parse_args(argv)
    if args.batch_size % args.accumulation_steps:
        parser.error(
            f"--batch-size {args.batch_size} is not divisible by --accumulation-steps "
            f"{args.accumulation_steps}; pick a batch size that is a multiple of it"
        )
    return args


def make_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 64), nn.GELU(), nn.Linear(64, 1)).to(dtype)


def train(
    batches: list[tuple[torch.Tensor, torch.Tensor]], accumulation_steps: int, dtype: torch.dtype
) -> tuple[nn.Module, list[float]]:
    """The plain training loop, wrapped in ``with acc:``; returns the model and window losses."""
    model = make_model(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    with Accumulator(model, optimizer, accumulation_steps=accumulation_steps) as acc:
        for x, y in batches:
            for micro_x, micro_y in zip(
                x.chunk(accumulation_steps), y.chunk(accumulation_steps), strict=True
            ):
                loss = nn.functional.mse_loss(model(micro_x), micro_y)
                acc.backward(loss)
                optimizer.step()  # a no-op until the window is complete
                optimizer.zero_grad()
                if acc.sync_gradients:
                    losses.append(acc.loss)
    return model, losses


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(10, 1, generator=generator, dtype=dtype)
    batches = []
    for _ in range(args.steps):
        x = torch.randn(args.batch_size, 10, generator=generator, dtype=dtype)
        noise = 0.1 * torch.randn(args.batch_size, 1, generator=generator, dtype=dtype)
        batches.append((x, x @ weights + noise))

    full_model, full_losses = train(batches, 1, dtype)
    accumulated_model, accumulated_losses = train(batches, args.accumulation_steps, dtype)

    print(f"{'step':>4}  {'full batch':>12}  {f'{args.accumulation_steps} micro-batches':>16}")
    for step, (full, accumulated) in enumerate(zip(full_losses, accumulated_losses, strict=True)):
        print(f"{step + 1:>4}  {full:>12.6f}  {accumulated:>16.6f}")
    difference = max(
        (a - b).abs().max().item()
        for a, b in zip(full_model.parameters(), accumulated_model.parameters(), strict=True)
    )
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    verdict = "MATCH" if difference <= tolerance else "MISMATCH"
    print(
        f"{verdict}: accumulated run vs full-batch run, max |param difference| = "
        f"{difference:.2e} (tolerance {tolerance:.0e})"
    )
    return 0 if verdict == "MATCH" else 1


if __name__ == "__main__":
    raise SystemExit(main())
