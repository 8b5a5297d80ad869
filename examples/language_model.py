"""Character-level language model: a small GPT on variable-length sentences, token-weighted.

    python examples/language_model.py                             # CPU, seconds
    python examples/language_model.py --checkpointing --steps 200 --progress
    python examples/language_model.py --text my_corpus.txt        # one sequence per line

Each line of the text (``examples/data/harbour.txt`` by default) is one sequence, so
sequences have different lengths. A micro-batch pads its sequences on the right with a PAD
id to its longest one, and its loss is the mean over its real (non-PAD) tokens. Micro-batches
therefore hold different numbers of tokens, and ``acc.backward(loss, weight=n_tokens)`` makes
each update the exact mean over all tokens of the window, as if the window's sequences had
been one batch; a plain ``acc.backward(loss)`` would average the micro-batches' means and
over-weight the tokens of short sentences. The last line compares the first and the last
window's loss.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from cli_types import non_negative_int, positive_float, positive_int
from torch import nn

from torch_accum import Accumulator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt import GPT, GPTConfig

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "harbour.txt"
PAD = 0
# Marks the start and the end of every sequence, so the model learns where sentences end.
BOUNDARY = "\n"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The flags, and the text's non-blank lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accumulation-steps", type=positive_int, default=4)
    parser.add_argument(
        "--micro-batch-size", type=positive_int, default=8, help="sentences per micro-batch"
    )
    parser.add_argument("--steps", type=positive_int, default=40, help="optimizer steps")
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="recompute the transformer blocks' activations in backward (less memory)",
    )
    # None, not False: the Accumulator then shows a bar only on a terminal.
    parser.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="show a progress bar (needs tqdm; default: only when stderr is a terminal)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument(
        "--text", type=Path, default=DEFAULT_TEXT, help="UTF-8 text, one sequence per line"
    )
    args = parser.parse_args(argv)
    if args.progress and importlib.util.find_spec("tqdm") is None:
        parser.error("--progress needs tqdm: pip install tqdm, or leave out --progress")
    try:
        lines = [line.strip() for line in args.text.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        parser.error(f"--text {args.text}: cannot read it ({error}); pass a UTF-8 text file")
    lines = [line for line in lines if line]
    if len(lines) < args.micro_batch_size:
        parser.error(
            f"--text {args.text} has {len(lines)} non-blank lines, fewer than "
            f"--micro-batch-size {args.micro_batch_size}; pass a smaller --micro-batch-size "
            "or a longer text"
        )
    return args, lines


def encode(lines: list[str]) -> tuple[list[torch.Tensor], int]:
    """Each line as character ids framed by BOUNDARY, and the vocabulary size (PAD included)."""
    characters = sorted(set("".join(lines)) | {BOUNDARY})
    ids = {character: index for index, character in enumerate(characters, start=PAD + 1)}
    framed = [BOUNDARY + line + BOUNDARY for line in lines]
    sequences = [torch.tensor([ids[character] for character in text]) for text in framed]
    return sequences, len(characters) + 1


def micro_batches(
    sequences: list[torch.Tensor], size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless micro-batches of ``size`` shuffled sequences, right-padded with PAD.

    Each epoch is reshuffled; its last, smaller micro-batch is dropped.
    """
    while True:
        order = torch.randperm(len(sequences), generator=generator).tolist()
        for start in range(0, len(order) - size + 1, size):
            chosen = [sequences[index] for index in order[start : start + size]]
            yield nn.utils.rnn.pad_sequence(chosen, batch_first=True, padding_value=PAD)


def main(argv: list[str] | None = None) -> int:
    args, lines = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sequences, vocab_size = encode(lines)
    longest = max(len(sequence) for sequence in sequences)
    # The model reads every sequence but its last character.
    config = GPTConfig(vocab_size=vocab_size, context=longest - 1, width=64, heads=4, layers=2)

    torch.manual_seed(args.seed)
    model = GPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    acc = Accumulator(
        model,
        optimizer,
        args.accumulation_steps,
        checkpointing=args.checkpointing,
        total_micro_batches=args.steps * args.accumulation_steps,
        progress=args.progress,
    )
    print(
        f"{len(lines)} sentences of {min(len(line) for line in lines)} to "
        f"{max(len(line) for line in lines)} characters, vocabulary of {vocab_size} ids "
        f"(PAD included), GPT with {sum(p.numel() for p in model.parameters())} parameters "
        f"on {device.type}"
    )

    batches = micro_batches(
        sequences, args.micro_batch_size, torch.Generator().manual_seed(args.seed)
    )
    window_losses: list[float] = []
    token_counts: list[int] = []
    log_every = max(1, args.steps // 5)
    start = time.perf_counter()
    with acc:
        for _ in range(args.steps * args.accumulation_steps):
            tokens = next(batches).to(device)
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            # Right padding is safe under causal attention: a real token attends only to
            # itself and earlier positions, which are all real, so the PAD positions after
            # it cannot change its output; positions also still start at 0 for every
            # sequence. The PAD positions' own predictions have PAD targets, which
            # ignore_index drops from the loss, so they get no gradient either.
            logits = model(inputs)
            loss = nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=PAD
            )
            n_tokens = (targets != PAD).sum()
            acc.backward(loss, weight=n_tokens)
            optimizer.step()
            optimizer.zero_grad()
            token_counts.append(int(n_tokens))
            if acc.sync_gradients:
                window_losses.append(acc.loss)
                # The progress bar shows the window's loss itself; print it only without one.
                if not acc.progress and acc.optimizer_steps % log_every == 0:
                    print(f"step {acc.optimizer_steps}/{args.steps}: loss {acc.loss:.4f}")
    seconds = time.perf_counter() - start

    print(
        f"micro-batches of {args.micro_batch_size} sentences held {min(token_counts)} to "
        f"{max(token_counts)} tokens; checkpointed {len(acc.checkpointed_modules)} blocks; "
        f"{seconds:.1f} s"
    )
    print(
        f"loss {window_losses[0]:.2f} -> {window_losses[-1]:.2f} over {acc.optimizer_steps} "
        f"optimizer steps (token-weighted, {args.accumulation_steps} micro-batches per step)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
