"""Fine-tune a Hugging Face causal LM with token-weighted accumulation: exact token means.

    python examples/huggingface_causal_lm.py                  # tiny random GPT-2, CPU, seconds
    python examples/huggingface_causal_lm.py --model-dir ./my-checkpoint --steps 2

Sequences of different lengths are right-padded per micro-batch (``attention_mask`` 0 and
``labels`` -100 on the padding), so micro-batches hold different numbers of real target
tokens. ``model(**batch).loss`` is the mean over one micro-batch's tokens. Averaging those
means over the window (``loss / K``, what a plain loop does and what Hugging Face's Trainer
did until its gradient accumulation fix of late 2024, transformers 4.46) over-weights the
tokens of short micro-batches: the update is not the one of the whole window as a batch.
``acc.backward(loss, weight=n_tokens)`` weights each micro-batch by its token count, which
makes the update the exact token mean over the window.

The same model is trained three times from the same weights, in float64 and without
dropout: with the Accumulator, with the naive mean of means, and with the reference, one
step per window on the concatenation of the window's micro-batches. The script prints how
far each run's parameters end from the reference. Without ``--model-dir`` the model is a
2-layer GPT-2 built from a small config (nothing is downloaded); ``--model-dir`` loads a
local checkpoint with ``from_pretrained`` (models that compute parts in float32 whatever
their dtype, such as Llama's RMSNorm, agree only to float32 round-off: pass ``--tolerance
1e-5``). The token ids are random: this shows the arithmetic of the loop, not learning.
Requires transformers (the ``hf`` extra: ``pip install -e '.[hf]'``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from _extras import needs
from cli_types import non_negative_int, positive_float, positive_int
from torch import nn

from torch_accum import Accumulator

with needs("transformers", extra="hf"):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

IGNORE = -100  # the label that Hugging Face's loss leaves out
# Windows of micro-batches of sequences (1-D tensors of token ids).
Windows = list[list[list[torch.Tensor]]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accumulation-steps", type=positive_int, default=4)
    parser.add_argument(
        "--micro-batch-size", type=positive_int, default=4, help="sequences per micro-batch"
    )
    parser.add_argument("--steps", type=positive_int, default=4, help="optimizer steps")
    parser.add_argument("--max-length", type=positive_int, default=24, help="tokens per sequence")
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="a local checkpoint (default: tiny GPT-2)"
    )
    parser.add_argument(
        "--tolerance",
        type=positive_float,
        default=1e-10,
        help="largest |param difference| that counts as a match (default: 1e-10)",
    )
    args = parser.parse_args(argv)
    if args.max_length < 2:
        parser.error("--max-length must be at least 2: a sequence needs a token to predict")
    if args.model_dir is not None and not (args.model_dir / "config.json").is_file():
        parser.error(f"--model-dir {args.model_dir}: no config.json there; pass a checkpoint")
    return args


def make_model(args: argparse.Namespace) -> nn.Module:
    if args.model_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    else:
        torch.manual_seed(args.seed)
        # Random weights: the comparison needs no pretrained ones. (GPT-2's default
        # bos/eos id, 50256, lies outside this small vocabulary.)
        size = {"vocab_size": 100, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4}
        config = GPT2Config(**size, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
    # float64, so that "equal" can be checked to 1e-10; eval() turns dropout off, so that
    # the three runs compute the same function (gradients flow in eval mode too).
    return model.double().eval()


def collate(sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: what a tokenizer with padding="longest" returns,
    plus labels. The padding's input id does not matter: it is masked out and unlabelled."""
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = sequence
        attention_mask[row, : len(sequence)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def target_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many tokens the loss averages over: position t predicts label t + 1."""
    return (batch["labels"][:, 1:] != IGNORE).sum()


def token_mean_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean over the batch's target tokens: ``model(**batch).loss``, in the model's dtype.

    Hugging Face's loss casts the logits to float32 even in a float64 model, which would
    blur this script's float64 comparison at 1e-8; in your own fine-tuning (float32 or
    bfloat16 weights) use ``model(**batch).loss`` itself.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE
    )


def make_windows(args: argparse.Namespace, vocab_size: int) -> Windows:
    """``--steps`` windows of ``--accumulation-steps`` micro-batches of random sequences."""
    generator = torch.Generator().manual_seed(args.seed)

    def sequence() -> torch.Tensor:
        length = int(torch.randint(2, args.max_length + 1, (), generator=generator))
        return torch.randint(vocab_size, (length,), generator=generator)

    return [
        [[sequence() for _ in range(args.micro_batch_size)] for _ in range(args.accumulation_steps)]
        for _ in range(args.steps)
    ]


def train_torch_accum(model: nn.Module, windows: Windows, lr: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    with Accumulator(model, optimizer, accumulation_steps=len(windows[0])) as acc:
        for window in windows:
            for sequences in window:
                batch = collate(sequences)
                loss = token_mean_loss(model, batch)  # this micro-batch's token mean
                n_tokens = target_tokens(batch)
                # Weighting by n_tokens makes the window's gradient sum(n_i * mean_i) / sum(n_i),
                # the mean over all its tokens: what Trainer's fix (num_items_in_batch) does.
                # A plain acc.backward(loss) would average the means, as the naive loop does.
                acc.backward(loss, weight=n_tokens)
                optimizer.step()  # a no-op until the window is complete
                optimizer.zero_grad()


def train_mean_of_means(model: nn.Module, windows: Windows, lr: float) -> None:
    """The plain loop (and Trainer before late 2024): every micro-batch counts 1/K."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for window in windows:
        for sequences in window:
            (token_mean_loss(model, collate(sequences)) / len(window)).backward()
        optimizer.step()
        optimizer.zero_grad()


def train_full_batch(model: nn.Module, windows: Windows, lr: float) -> None:
    """The reference: one batch per window, its loss the mean over all its tokens."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for window in windows:
        everything = [sequence for sequences in window for sequence in sequences]
        token_mean_loss(model, collate(everything)).backward()
        optimizer.step()
        optimizer.zero_grad()


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = make_model(args)
    positions = getattr(model.config, "max_position_embeddings", None) or args.max_length
    if args.max_length > positions:
        print(
            f"--max-length {args.max_length} is more than the model's {positions} positions; "
            "pass a smaller one",
            file=sys.stderr,
        )
        return 2
    models = [model, copy.deepcopy(model), copy.deepcopy(model)]  # the same weights
    windows = make_windows(args, model.config.vocab_size)
    counts = [int(target_tokens(collate(s))) for window in windows for s in window]
    print(
        f"{type(models[0]).__name__} with {sum(p.numel() for p in models[0].parameters())} "
        f"parameters; {args.steps} optimizer steps of {args.accumulation_steps} micro-batches "
        f"holding {min(counts)} to {max(counts)} target tokens"
    )
    accumulated, naive, reference = models
    train_torch_accum(accumulated, windows, args.lr)
    train_mean_of_means(naive, windows, args.lr)
    train_full_batch(reference, windows, args.lr)

    exact = max_difference(accumulated, reference)
    off = max_difference(naive, reference)
    print(f"torch_accum vs full-batch token mean: max |param difference| = {exact:.1e}")
    print(f"naive mean of means vs full-batch token mean: max |param difference| = {off:.1e}")
    verdict = "MATCH" if exact <= args.tolerance else "MISMATCH"
    print(
        f"{verdict}: acc.backward(loss, weight=n_tokens) vs full-batch token mean, max |param "
        f"difference| = {exact:.2e} (tolerance {args.tolerance:.0e})"
    )
    if verdict == "MISMATCH" and args.model_dir is not None:
        print(
            "(some models compute parts in float32 whatever their dtype, e.g. Llama's RMSNorm: "
            "their runs agree to float32 round-off only; compare with the naive difference, "
            "or pass --tolerance 1e-5)"
        )
    return 0 if verdict == "MATCH" else 1


if __name__ == "__main__":
    raise SystemExit(main())
