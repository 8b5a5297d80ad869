"""Train 11 micro-batches, optionally stopping or resuming mid-window (run as a script).

python resume_worker.py OUT [--stop-after N] [--resume CHECKPOINT] [--scaler] [--two-optimizers]
    [--before-step]

``--before-step`` saves the checkpoint right after the N-th acc.backward, before its step.
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
    parser.add_argument("--scaler", action="store_true")
    parser.add_argument("--two-optimizers", action="store_true")
    parser.add_argument("--before-step", action="store_true")
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 2))
    if args.two_optimizers:
        optimizers = [
            torch.optim.AdamW(model[0].parameters(), lr=1e-2),
            torch.optim.SGD(model[2].parameters(), lr=1e-2, momentum=0.9),
        ]
    else:
        optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-2)]
    optimizer = optimizers[0]
    schedulers = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1 / (1 + step)) for o in optimizers
    ]
    scheduler = schedulers[0]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if args.scaler else None
    acc = Accumulator(model, optimizers, 4, scheduler=schedulers, scaler=scaler, max_grad_norm=0.5)
    generator = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(5, 8, generator=generator), torch.randn(5, 2, generator=generator))
        for _ in range(MICRO_BATCHES)
    ]

    def step() -> None:
        for one in optimizers:
            if scaler is None:
                one.step()
            else:
                scaler.step(one)
        if scaler is not None:
            scaler.update()
        for one in schedulers:
            one.step()
        for one in optimizers:
            one.zero_grad()

    def save(next_micro_batch: int) -> None:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "optimizers": [o.state_dict() for o in optimizers],
                "scheduler": scheduler.state_dict(),
                "schedulers": [s.state_dict() for s in schedulers],
                "scaler": None if scaler is None else scaler.state_dict(),
                "accumulator": acc.state_dict(),
                "next_micro_batch": next_micro_batch,
                "before_step": args.before_step,
            },
            args.out,
        )
        raise SystemExit(0)  # a crash mid-window: nothing applied on the way out

    start, step_first = 0, False
    if args.resume:
        checkpoint = torch.load(args.resume)
        model.load_state_dict(checkpoint["model"])
        for one, state in zip(optimizers, checkpoint["optimizers"], strict=True):
            one.load_state_dict(state)
        for one, state in zip(schedulers, checkpoint["schedulers"], strict=True):
            one.load_state_dict(state)
        if scaler is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        acc.load_state_dict(checkpoint["accumulator"])
        start = checkpoint["next_micro_batch"]
        step_first = checkpoint.get("before_step", False)

    with acc:
        if step_first:  # the rest of the interrupted iteration
            step()
        for index in range(start, MICRO_BATCHES):
            x, y = data[index]
            acc.backward(nn.functional.mse_loss(model(x), y), weight=index % 3 + 1)
            if args.before_step and index + 1 == args.stop_after:
                save(index + 1)
            step()
            if args.stop_after is not None and index + 1 == args.stop_after:
                save(index + 1)
    torch.save(
        {
            "params": [p.detach() for p in model.parameters()],
            "counters": (acc.optimizer_steps, acc.skipped_steps, acc.micro_step, acc.loss),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
