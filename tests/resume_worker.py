"""Train 11 micro-batches, optionally stopping or resuming mid-window (run as a script).

python resume_worker.py OUT [--stop-after N] [--resume CHECKPOINT]
"""

import argparse

import torch
from torch import nn

from torch_accum import Accumulator

MICRO_BATCHES = 11


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    acc = Accumulator(model, optimizer, 4, scheduler=scheduler, max_grad_norm=0.5)
    generator = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(5, 8, generator=generator), torch.randn(5, 2, generator=generator))
        for _ in range(MICRO_BATCHES)
    ]

    start = 0
    if args.resume:
        checkpoint = torch.load(args.resume)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        acc.load_state_dict(checkpoint["accumulator"])
        start = checkpoint["next_micro_batch"]

    with acc:
        for index in range(start, MICRO_BATCHES):
            x, y = data[index]
            acc.backward(nn.functional.mse_loss(model(x), y), weight=index % 3 + 1)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if args.stop_after is not None and index + 1 == args.stop_after:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "accumulator": acc.state_dict(),
                        "next_micro_batch": index + 1,
                    },
                    args.out,
                )
                raise SystemExit(0)  # a crash mid-window: nothing applied on the way out
    torch.save(
        {
            "params": [p.detach() for p in model.parameters()],
            "counters": (acc.optimizer_steps, acc.skipped_steps, acc.micro_step, acc.loss),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
