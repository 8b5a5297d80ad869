"""Image classification: a torchvision ResNet-18 on CIFAR-10-sized images, with AMP on a GPU.

    python examples/image_classification.py                     # synthetic FakeData, CPU seconds
    python examples/image_classification.py --checkpointing --progress
    python examples/image_classification.py --data-dir ~/data --steps 2000 --workers 4

Without ``--data-dir`` the images are torchvision's ``FakeData`` (random 3x32x32 images
with random labels, so the loss stays near ln 10 = 2.30): the run shows the loop, not
learning. With ``--data-dir DIR``, ``DIR/cifar-10-batches-py`` must hold the extracted
CIFAR-10 python archive (https://www.cs.toronto.edu/~kriz/cifar.html); nothing is
downloaded.

The loop is a plain AMP training loop (autocast, ``scaler.step``, ``scaler.update``,
``scheduler.step``) inside ``with acc:``; the Accumulator makes those calls take effect
once per ``--accumulation-steps`` micro-batches, clips the accumulated gradient to
``--max-grad-norm`` and, with ``--checkpointing``, recomputes the ResNet blocks'
activations in backward instead of storing them. Requires torchvision (the ``examples``
extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from _extras import needs
from cli_types import non_negative_int, positive_float, positive_int
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torch_accum import Accumulator

# Without torchvision (or with one built for another torch), stop with one line that says
# what to install, not a traceback.
with needs("torchvision", extra="examples"):
    import torchvision
    from torchvision import transforms

CIFAR10_FOLDER = "cifar-10-batches-py"
# torchvision's CIFAR10 checks all of these before it loads the training batches.
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accumulation-steps", type=positive_int, default=4)
    parser.add_argument(
        "--micro-batch-size", type=positive_int, default=8, help="images per micro-batch"
    )
    parser.add_argument("--steps", type=positive_int, default=3, help="optimizer steps")
    parser.add_argument("--lr", type=positive_float, default=0.05, help="peak learning rate")
    parser.add_argument(
        "--max-grad-norm",
        type=positive_float,
        default=1.0,
        help="clip the accumulated gradient to this total 2-norm",
    )
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="recompute the ResNet blocks' activations in backward (less memory)",
    )
    # None, not False: the Accumulator then shows a bar only on a terminal.
    parser.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="show a progress bar (needs tqdm; default: only when stderr is a terminal)",
    )
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="data-loading processes (0: load in the main process)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"folder holding {CIFAR10_FOLDER}/ (default: synthetic FakeData)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    return parser


def parse_args(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.progress and importlib.util.find_spec("tqdm") is None:
        parser.error("--progress needs tqdm: pip install tqdm, or leave out --progress")
    if args.data_dir is not None:
        folder = args.data_dir.expanduser() / CIFAR10_FOLDER
        missing = [name for name in CIFAR10_FILES if not (folder / name).is_file()]
        if missing:
            found = (
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
                if folder.is_dir()
                else "there is no such folder"
            )
            if args.data_dir.name == CIFAR10_FOLDER:
                found += f" (--data-dir is {CIFAR10_FOLDER} itself; pass its parent folder)"
            parser.error(
                f"--data-dir {args.data_dir}: the CIFAR-10 files must be in {folder}, but "
                f"{found}; download cifar-10-python.tar.gz from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it in "
                f"{args.data_dir}, or leave out --data-dir to train on synthetic FakeData"
            )
    return args


def make_dataset(args: argparse.Namespace, images: int) -> tuple[Dataset, str]:
    """The training images and their description; FakeData holds exactly ``images``."""
    normalize = [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    if args.data_dir is None:
        dataset = torchvision.datasets.FakeData(
            size=images,
            image_size=(3, 32, 32),
            num_classes=10,
            transform=transforms.Compose(normalize),
            random_offset=args.seed,
        )
        return dataset, f"FakeData ({images} synthetic images)"
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    dataset = torchvision.datasets.CIFAR10(
        args.data_dir.expanduser(),
        train=True,
        download=False,
        transform=transforms.Compose(augment + normalize),
    )
    return dataset, f"CIFAR-10 ({len(dataset)} training images)"


def repeat(loader: Iterable[Any], count: int) -> Iterator[Any]:
    """``count`` batches from ``loader``, starting a new (reshuffled) epoch when it runs out."""
    produced = 0
    while produced < count:
        for batch in loader:
            if produced == count:
                return
            yield batch
            produced += 1


def warmup_cosine(total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup over the first tenth, then cosine decay to 0."""
    warmup = max(1, total_steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))

    return factor


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parse_args(parser, argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    micro_batches = args.steps * args.accumulation_steps
    try:
        dataset, description = make_dataset(args, micro_batches * args.micro_batch_size)
    except RuntimeError:  # torchvision checks the files' md5 sums before loading them
        parser.error(
            f"--data-dir {args.data_dir}: the files in {CIFAR10_FOLDER} are incomplete or "
            "corrupt (their checksums do not match CIFAR-10's); extract "
            "cifar-10-python.tar.gz again, or leave out --data-dir to train on FakeData"
        )
    loader = DataLoader(
        dataset,
        batch_size=args.micro_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=cuda,
        generator=torch.Generator().manual_seed(args.seed),
    )
    if len(loader) == 0:
        parser.error(
            f"--micro-batch-size {args.micro_batch_size} is larger than the data set "
            f"({len(dataset)} images); pass a smaller one"
        )

    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(weights=None, num_classes=10).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps))
    # float16 autocast needs loss scaling against gradient underflow; on the CPU this runs
    # in float32, where there is nothing to scale.
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    acc = Accumulator(
        model,
        optimizer,
        args.accumulation_steps,
        scheduler=scheduler,
        scaler=scaler,
        max_grad_norm=args.max_grad_norm,
        checkpointing=args.checkpointing,
        # Known in advance: it sizes the progress bar and, under DDP, lets the last
        # micro-batch synchronise gradients in its own backward.
        total_micro_batches=micro_batches,
        progress=args.progress,
    )

    effective = args.accumulation_steps * args.micro_batch_size
    print(
        f"ResNet-18 on {description}, {device.type}{' with float16 autocast' if cuda else ''}: "
        f"{args.steps} optimizer steps of {effective} images"
    )
    # BatchNorm normalises each micro-batch with its own statistics: the one part of the
    # update that differs from a single batch of accumulation-steps x micro-batch-size
    # images. Micro-batches of 8 or more images keep the difference small.
    model.train()
    start = time.perf_counter()
    with acc:
        for images, labels in repeat(loader, micro_batches):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                loss = nn.functional.cross_entropy(model(images), labels)
            acc.backward(loss)  # scales the loss with the scaler itself: pass it unscaled
            lr = scheduler.get_last_lr()[0]  # what this window's update uses
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            # The progress bar shows the window's loss itself; print it only without one.
            if acc.sync_gradients and not acc.progress:
                # A step the GradScaler skipped (inf/NaN in float16) still ends a window.
                window = acc.optimizer_steps + acc.skipped_steps
                print(f"step {window}/{args.steps}: loss {acc.loss:.4f}, lr {lr:.4f}")
    seconds = time.perf_counter() - start
    skipped = f", {acc.skipped_steps} skipped (loss scale)" if acc.skipped_steps else ""
    print(
        f"done: {acc.optimizer_steps} optimizer steps of {effective} images "
        f"({args.accumulation_steps} x {args.micro_batch_size}){skipped}, last window loss "
        f"{acc.loss:.2f}, checkpointed {len(acc.checkpointed_modules)} blocks, "
        f"{seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
