"""Data-parallel training with gradient accumulation: the same loop on 1 or N processes.

    torchrun --standalone --nproc_per_node=2 examples/ddp.py      # CPUs (gloo) or GPUs (nccl)
    python examples/ddp.py                                         # a single process works too

Each rank trains on its own shard of a synthetic regression data set; the Accumulator makes
DDP synchronise gradients once per optimizer step (on the micro-batch that ends a window)
instead of once per micro-batch. Rank 0 prints the mean loss of every window and, at the
end, checks that all ranks hold the same parameters.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from cli_types import positive_int
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torch_accum import Accumulator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accumulation-steps", type=positive_int, default=4)
    parser.add_argument("--micro-batch-size", type=positive_int, default=8)
    parser.add_argument("--samples", type=positive_int, default=1024, help="data set size")
    parser.add_argument("--epochs", type=positive_int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2)
    return parser.parse_args(argv)


def setup() -> torch.device:
    """Join the process group torchrun describes, or run as a single process."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", 1))))
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup()
    same = train(args, device)
    if dist.is_initialized():
        # The model, DDP and the Accumulator refer to each other, so only the garbage
        # collector frees them, and with them the process group's gloo threads. Collect now:
        # done during the interpreter's shutdown, it aborted a rank now and then.
        gc.collect()
        dist.barrier()  # tear down together, no rank still inside a collective
        dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        world = int(os.environ.get("WORLD_SIZE", 1))
        print(f"{'OK' if same else 'MISMATCH'}: parameters identical on all {world} rank(s)")
    return 0 if same else 1


def train(args: argparse.Namespace, device: torch.device) -> bool:
    """Train for ``args.epochs``; whether every rank ends with the same parameters."""
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 32, generator=generator)
    y = x @ torch.randn(32, 1, generator=generator) + 0.1 * torch.randn(
        args.samples, 1, generator=generator
    )
    data = TensorDataset(x, y)
    # drop_last: every rank must run the same number of micro-batches.
    sampler = DistributedSampler(data, drop_last=True) if distributed else None
    loader = DataLoader(
        data,
        batch_size=args.micro_batch_size,
        sampler=sampler,
        shuffle=sampler is None,
        drop_last=True,
    )

    torch.manual_seed(0)  # the same initial parameters on every rank
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 1)).to(device)
    if distributed:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    acc = Accumulator(
        model,
        optimizer,
        accumulation_steps=args.accumulation_steps,
        total_micro_batches=len(loader),
    )

    effective = args.micro_batch_size * args.accumulation_steps * world
    if rank == 0:
        print(
            f"{world} process(es) on {device.type}, {len(loader)} micro-batches per epoch and "
            f"rank, effective batch {effective}"
        )
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        with acc:
            for inputs, targets in loader:
                loss = nn.functional.mse_loss(model(inputs.to(device)), targets.to(device))
                acc.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        if rank == 0:
            print(
                f"epoch {epoch + 1}: {acc.optimizer_steps} optimizer steps, "
                f"last window loss {acc.loss:.4f}"
            )

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if distributed:
        everyone = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(everyone, flat)
        return all(torch.equal(everyone[0], other) for other in everyone)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
