"""What checkpointing saves and costs, for a 12-block GPT: activation memory and FLOPs."""

import pytest
import torch
from gpt import GPT, GPTConfig
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

from torch_accum import Accumulator, measure_activation_memory

CONFIG = GPTConfig(layers=12, width=64, heads=4, context=64)


def make_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def lm_loss(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def tokens_of(batch_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(
        0, CONFIG.vocab_size, (batch_size, CONFIG.context + 1), generator=generator
    )


def activation_memory(batch_size: int, checkpointing: bool):
    model = make_gpt()
    acc = Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), 1, checkpointing=checkpointing
    )
    tokens = tokens_of(batch_size)
    with acc:
        return measure_activation_memory(
            lambda: lm_loss(model, tokens), parameters=model.parameters()
        )


# Each test measures what it compares (no shared fixture): mutation testing maps the code a
# test runs to that test, and times only the test itself (docs/testing.md).
def test_checkpointing_cuts_retained_activations_at_least_5x():
    plain, checkpointed = activation_memory(16, False), activation_memory(16, True)
    assert plain.retained_after_forward >= 5 * checkpointed.retained_after_forward


def test_checkpointing_cuts_the_peak_at_least_3x():
    plain, checkpointed = activation_memory(16, False), activation_memory(16, True)
    assert plain.peak >= 3 * checkpointed.peak


@pytest.mark.parametrize("checkpointing", [False, True])
def test_halving_the_micro_batch_halves_activation_memory(checkpointing):
    full, half = activation_memory(16, checkpointing), activation_memory(8, checkpointing)
    assert half.retained_after_forward == pytest.approx(full.retained_after_forward / 2, rel=0.10)
    assert half.peak == pytest.approx(full.peak / 2, rel=0.10)


def flops(checkpointing: bool, early_stop: bool = True) -> tuple[int, int, int]:
    """Forward FLOPs, backward FLOPs, and the forward FLOPs inside the 12 blocks."""
    model = make_gpt()
    acc = Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), 1, checkpointing=checkpointing
    )
    tokens = tokens_of(4)
    with acc, set_checkpoint_early_stop(early_stop):
        with FlopCounterMode(display=False) as forward:
            loss = lm_loss(model, tokens)
        with FlopCounterMode(display=False) as backward:
            loss.backward()
    counts = forward.get_flop_counts()
    in_blocks = sum(
        sum(by_op.values())
        for name, by_op in counts.items()
        if name.startswith("GPT.blocks.") and name.count(".") == 2
    )
    return forward.get_total_flops(), backward.get_total_flops(), in_blocks


def test_backward_flops_rise_by_exactly_the_recomputed_forward():
    plain_forward, plain_backward, blocks_forward = flops(checkpointing=False)
    forward, backward, _ = flops(checkpointing=True, early_stop=False)
    assert blocks_forward > 0.9 * plain_forward  # the blocks are nearly all the work
    assert forward == plain_forward
    assert backward == plain_backward + blocks_forward


def test_early_stop_recomputes_at_most_the_forward():
    # PyTorch's default stops recomputing once the last saved tensor is back.
    _, plain_backward, blocks_forward = flops(checkpointing=False)
    _, backward, _ = flops(checkpointing=True)
    assert plain_backward < backward <= plain_backward + blocks_forward


def test_wrapping_the_blocks_children_keeps_far_more_memory():
    # The pitfall: checkpointing attention and MLP separately still stores everything
    # between them (the norms, residual sums and the inputs of each child).
    def retained(policy):
        model = make_gpt()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        tokens = tokens_of(8)
        with Accumulator(model, optimizer, 1, checkpointing=policy):
            memory = measure_activation_memory(
                lambda: lm_loss(model, tokens), parameters=model.parameters()
            )
        return memory.retained_after_forward

    blocks = retained(True)
    children = retained(lambda m: isinstance(m, (torch.nn.MultiheadAttention, torch.nn.Sequential)))
    assert children >= 2 * blocks
