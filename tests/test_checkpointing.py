"""Activation checkpointing: which blocks, exact results, BatchNorm, restore, bad input."""

import copy
import pickle

import pytest
import torch
from gpt import GPT, GPTConfig
from torch import nn

import torch_accum.checkpointing
from torch_accum import Accumulator


class ResidualBlock(nn.Module):
    def __init__(self, width: int, dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(width) if batch_norm else nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * width, width)
        )

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        return x + scale * self.mlp(self.norm(x))


class Stack(nn.Module):
    """A float-input model with repeated blocks that take a keyword argument."""

    def __init__(self, width=16, depth=4, dropout=0.0, batch_norm=False, seed=0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(ResidualBlock(width, dropout, batch_norm) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, scale=scale)
        return self.head(x)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


# ----------------------------------------------------------------------------- selection
def test_true_finds_the_transformer_blocks():
    model = GPT(GPTConfig(layers=3))
    acc = Accumulator(model, sgd(model), 2, checkpointing=True)
    assert acc.checkpointed_modules == ("blocks.0", "blocks.1", "blocks.2")


def test_true_finds_blocks_in_every_stage_and_not_inside_them():
    # ResNet-like: stages (attributes) holding Sequentials of blocks, which hold Sequentials.
    model = nn.Module()
    model.stem = nn.Linear(8, 16)
    model.stage1 = nn.Sequential(ResidualBlock(16), ResidualBlock(16))
    model.stage2 = nn.Sequential(ResidualBlock(16), ResidualBlock(16), ResidualBlock(16))
    acc = Accumulator(model, sgd(model), 2, checkpointing=True)
    assert acc.checkpointed_modules == (
        "stage1.0",
        "stage1.1",
        "stage2.0",
        "stage2.1",
        "stage2.2",
    )


def test_true_without_repeated_blocks_raises_and_says_how_to_pass_a_policy():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(
        ValueError, match=r"found no repeated blocks in Sequential.*checkpointing=<block class>"
    ):
        Accumulator(model, sgd(model), 2, checkpointing=True)


def test_class_tuple_and_callable_policies():
    model = GPT(GPTConfig(layers=2))
    by_class = Accumulator(model, sgd(model), 2, checkpointing=nn.LayerNorm)
    # LayerNorms inside the blocks and the final one; nothing nested.
    assert by_class.checkpointed_modules == (
        "blocks.0.attention_norm",
        "blocks.0.mlp_norm",
        "blocks.1.attention_norm",
        "blocks.1.mlp_norm",
        "norm",
    )
    by_tuple = Accumulator(
        model, sgd(model), 2, checkpointing=(nn.MultiheadAttention, nn.Embedding)
    )
    assert by_tuple.checkpointed_modules == (
        "token_embedding",
        "position_embedding",
        "blocks.0.attention",
        "blocks.1.attention",
    )
    by_callable = Accumulator(model, sgd(model), 2, checkpointing=lambda m: m is model.blocks[1])
    assert by_callable.checkpointed_modules == ("blocks.1",)


def test_a_policy_matching_a_block_and_its_children_wraps_only_the_block():
    model = GPT(GPTConfig(layers=2))
    acc = Accumulator(
        model,
        sgd(model),
        2,
        checkpointing=lambda m: isinstance(m, (type(model.blocks[0]), nn.Sequential, nn.Linear)),
    )
    assert acc.checkpointed_modules == ("blocks.0", "blocks.1", "head")


def test_bad_policies():
    model = GPT(GPTConfig(layers=2))
    with pytest.raises(
        ValueError,
        match=r"checkpointing=<class 'torch.nn.modules.conv.Conv2d'> matches no submodule of GPT",
    ):
        Accumulator(model, sgd(model), 2, checkpointing=nn.Conv2d)
    with pytest.raises(ValueError, match=r"matches no submodule of GPT; pass the class"):
        Accumulator(model, sgd(model), 2, checkpointing=lambda m: False)
    for policy in (3, (nn.Linear, "x"), ()):
        with pytest.raises(
            TypeError, match=r"checkpointing must be True, False, an nn.Module class.* got"
        ):
            Accumulator(model, sgd(model), 2, checkpointing=policy)
    with pytest.raises(TypeError, match=r"got 3 \(int\)"):
        Accumulator(model, sgd(model), 2, checkpointing=3)
    # A string is the right type but not a mode.
    with pytest.raises(
        ValueError, match=r"checkpointing='blocks' is not a mode: .* 'full' .* 'selective'"
    ):
        Accumulator(model, sgd(model), 2, checkpointing="blocks")


def test_model_without_parameters_raises():
    model = nn.Sequential(nn.ReLU(), nn.ReLU())
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"checkpointing was requested for a Sequential without parameters.*checkpointing=False",
    ):
        Accumulator(model, optimizer, 2, checkpointing=True)


# ----------------------------------------------------------------------------- exactness
def forward_backward(model, x, scale, seed=123):
    torch.manual_seed(seed)  # the same dropout masks in both runs
    x = x.detach().requires_grad_()
    out = model(x, scale=scale)
    out.square().mean().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_outputs_and_gradients_equal_without_checkpointing(dropout):
    x = torch.randn(8, 16)
    scale = torch.tensor(0.7, requires_grad=True)  # a tensor keyword argument gets gradients
    plain = Stack(dropout=dropout)
    expected = forward_backward(plain, x, scale)
    expected_scale_grad = scale.grad.clone()
    scale.grad = None

    model = Stack(dropout=dropout)
    with Accumulator(model, sgd(model), 2, checkpointing=True):
        got = forward_backward(model, x, scale)
    # Same ops on the same values (the recomputation restores the RNG state): bit-exact.
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)
    torch.testing.assert_close(scale.grad, expected_scale_grad, rtol=0, atol=0)


def test_dropout_masks_differ_between_seeds():
    # The control for the dropout case: with another seed the result does change.
    x = torch.randn(8, 16)
    a = forward_backward(Stack(dropout=0.3), x, 1.0, seed=1)
    b = forward_backward(Stack(dropout=0.3), x, 1.0, seed=2)
    assert not torch.equal(a[0], b[0])


def test_gpt_with_checkpointing_trains_like_without():
    config = GPTConfig(layers=3, dropout=0.1)
    tokens = torch.randint(
        0, config.vocab_size, (8, 17), generator=torch.Generator().manual_seed(0)
    )

    def train(checkpointing):
        torch.manual_seed(0)
        model = GPT(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(1)
        with Accumulator(model, optimizer, 2, checkpointing=checkpointing):
            for micro in tokens.chunk(4):
                logits = model(micro[:, :-1])
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), micro[:, 1:].flatten())
                acc_backward(model, loss)
        return model

    def acc_backward(model, loss):
        Accumulator.backward(active[0], loss)
        active[0].optimizer.step()

    active = []
    original_enter = Accumulator.__enter__

    def remember(self):
        active[:] = [self]
        return original_enter(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Accumulator, "__enter__", remember)
        plain = train(False)
        checkpointed = train(True)
    for got, expected in zip(checkpointed.parameters(), plain.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- BatchNorm
def bn_buffers(model):
    return {name: b.clone() for name, b in model.named_buffers()}


def test_batch_norm_running_stats_are_updated_once():
    x = torch.randn(8, 16)
    plain = Stack(batch_norm=True)
    forward_backward(plain, x, 1.0)
    model = Stack(batch_norm=True)
    with Accumulator(model, sgd(model), 2, checkpointing=True):
        forward_backward(model, x, 1.0)
    expected = bn_buffers(plain)
    got = bn_buffers(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert int(model.blocks[0].norm.num_batches_tracked) == 1
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm1d))


def test_plain_checkpoint_would_update_batch_norm_twice():
    # The control: torch.utils.checkpoint alone recomputes BatchNorm's running update.
    block = ResidualBlock(16, batch_norm=True)
    x = torch.randn(8, 16, requires_grad=True)
    torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).sum().backward()
    assert int(block.norm.num_batches_tracked) == 2


# ----------------------------------------------------------------------------- when it applies
def count_checkpoint_calls(monkeypatch):
    calls = []
    original = torch_accum.checkpointing.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch_accum.checkpointing, "checkpoint", counting)
    return calls


def test_skipped_in_eval_and_under_no_grad(monkeypatch):
    calls = count_checkpoint_calls(monkeypatch)
    model = Stack(depth=3)
    x = torch.randn(4, 16)
    with Accumulator(model, sgd(model), 2, checkpointing=True):
        with torch.no_grad():
            model(x)
        assert calls == []
        model.eval()
        model(x).sum().backward()
        assert calls == []
        model.train()
        model(x)
        assert len(calls) == 3
    model(x)  # after the block: plain again
    assert len(calls) == 3


def test_state_dict_keys_unchanged_and_forward_restored_also_on_error():
    model = GPT(GPTConfig(layers=2))
    keys = list(model.state_dict())
    acc = Accumulator(model, sgd(model), 2, checkpointing=True)
    with pytest.raises(RuntimeError, match="boom"), acc:
        assert list(model.state_dict()) == keys
        assert "forward" in vars(model.blocks[0])
        raise RuntimeError("boom")
    assert list(model.state_dict()) == keys
    assert all("forward" not in vars(block) for block in model.blocks)


def test_a_copy_of_a_trained_model_gets_forwards_of_its_own():
    # A block keeps its checkpointed forward for the next Accumulator (compiled graphs
    # guard on it); copies and pickles of the model must not carry it along.
    model = Stack(depth=3)
    with Accumulator(model, sgd(model), 2, checkpointing=True):
        pass
    pickled = pickle.dumps(model)
    assert b"torch_accum." not in pickled  # loading it needs no torch_accum module
    assert all(
        vars(block)["_torch_accum_checkpointed_forward"] is None
        for block in pickle.loads(pickled).blocks
    )
    clone = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    with Accumulator(clone, sgd(clone), 1, checkpointing=True) as acc:
        installed = [vars(block)["forward"] for block in clone.blocks]
        assert all(f.block is b for f, b in zip(installed, clone.blocks, strict=True))
        acc.backward(clone(torch.randn(4, 16)).square().mean())
    for a, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any((a != b).any() for a, b in zip(clone.parameters(), before, strict=True))


# ----------------------------------------------------------------------------- with the rest
def test_with_autocast_and_grad_scaler():
    x = torch.randn(16, 16)

    def train(checkpointing):
        model = Stack(depth=3)
        optimizer = sgd(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        with Accumulator(model, optimizer, 2, scaler=scaler, checkpointing=checkpointing) as acc:
            for micro in x.chunk(4):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(micro).float().square().mean()
                acc.backward(loss)
                scaler.step(optimizer)
                scaler.update()
        assert acc.optimizer_steps == 2
        return model

    plain, checkpointed = train(False), train(True)
    for got, expected in zip(checkpointed.parameters(), plain.parameters()):
        # The recomputation runs under the same autocast state: identical bf16 ops.
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- selective, written in place
class RelativePositionAttention(nn.Module):
    """timm MViTv2's attention: a term added in place to the scores of a 4-D ``q @ k^T``.

    The 4-D matmul is a ``bmm`` and an ``_unsafe_view`` with a version counter of its own, so
    a write into the scores changes the kept ``bmm`` result without PyTorch noticing.
    """

    def __init__(self, width: int = 16, heads: int = 2, tokens: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.rel = nn.Parameter(0.1 * torch.randn(heads, tokens - 1, tokens - 1))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, tokens, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = q @ k.transpose(-2, -1)
        attn[:, :, 1:, 1:] += self.rel  # the class token (position 0) has no relative term
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, width)
        return x + self.proj(out)


class InplaceReluBlock(nn.Module):
    """A Linear whose result an in-place ReLU overwrites, in a Sequential and as a call.

    torchvision Swin V2's ``cpb_mlp`` (``Linear, ReLU(inplace=True), Linear``) and
    GoogLeNet's auxiliary heads (``F.relu(self.fc1(x), inplace=True)``).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.ReLU(inplace=True), nn.Linear(2 * width, width)
        )
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.relu(self.fc(self.mlp(x)), inplace=True)


class ScaledInPlaceBlock(nn.Module):
    """A Linear whose result is scaled in place under ``no_grad`` by ``scale_in_place``."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    @staticmethod
    def scale_in_place(h: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        with torch.no_grad():
            self.scale_in_place(h)
        return x + torch.tanh(h)


class OutWriteBlock(ScaledInPlaceBlock):
    """Through ``out=``: the written tensor comes as a keyword argument."""

    @staticmethod
    def scale_in_place(h: torch.Tensor) -> None:
        torch.mul(h, 0.5, out=h)


class ForeachWriteBlock(ScaledInPlaceBlock):
    """Through ``torch._foreach_mul_``: a list of written tensors."""

    @staticmethod
    def scale_in_place(h: torch.Tensor) -> None:
        torch._foreach_mul_([h], 0.5)


class Blocks(nn.Module):
    def __init__(self, block: type[nn.Module], depth: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(*(block() for _ in range(depth)))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def gradients(model, x, checkpointing):
    model.zero_grad()
    x = x.detach().requires_grad_()
    with Accumulator(model, sgd(model), 2, checkpointing=checkpointing):
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("block", "shape"),
    [
        (RelativePositionAttention, (2, 5, 16)),
        (InplaceReluBlock, (4, 16)),
        (OutWriteBlock, (4, 16)),
        (ForeachWriteBlock, (4, 16)),
    ],
    ids=[
        "scores-written-through-a-view",
        "linear-then-inplace-relu",
        "linear-scaled-through-out",
        "linear-scaled-as-a-list",
    ],
)
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_selective_is_bit_exact_when_a_block_writes_into_a_kept_matmul_result(block, shape, mode):
    model = Blocks(block)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    expected = gradients(model, x, False)
    got = gradients(model, x, mode)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_written_result_is_a_real_difference():
    # The control: recomputing from the written scores (the term added twice) changes the
    # gradients, so the test above would see a cache that kept the written value.
    model = Blocks(RelativePositionAttention)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    expected = gradients(model, x, False)
    with torch.no_grad():
        for block in model.blocks:
            block.rel.mul_(2)
    doubled = gradients(model, x, False)
    assert not torch.equal(doubled[2 + 2], expected[2 + 2])  # the first block's qkv weight


def test_selective_refuses_a_write_it_cannot_protect_naming_the_block(monkeypatch):
    # A torch whose selective cache has another layout: an error, never a silent difference.
    import torch_accum._selective

    monkeypatch.setattr(torch_accum._selective, "_kept_values", lambda cache: None)
    model = Blocks(InplaceReluBlock)
    with pytest.raises(
        RuntimeError,
        match=r"block 'blocks.0' writes in place \(aten.relu_.default\) into the result of "
        r"aten.addmm.default.*checkpointing='full'",
    ):
        gradients(model, torch.randn(4, 16), "selective")


def test_selective_reads_both_cache_layouts_and_reports_any_other_as_unknown():
    # What test_selective_refuses_a_write_it_cannot_protect_naming_the_block simulates:
    # a cache whose layout is not one of the two known (a list per op in torch 2.6, a dict
    # by call index later) is reported unknown (None, then the error), never guessed at.
    from types import SimpleNamespace

    from torch_accum._selective import _kept_values

    def wrapped(value):  # the shape of torch's _VersionWrapper
        return SimpleNamespace(val=value, version=getattr(value, "_version", None))

    a, b, c = torch.zeros(2), torch.ones(3), torch.full((1,), 2.0)
    recompute = object()  # torch's marker for an op that is not kept
    count = wrapped(7)  # an op's non-tensor output (flash attention's sizes on CUDA)
    by_call = {"mm": {0: wrapped(a), 1: recompute}, "sdpa": {0: (wrapped(b), count)}}
    assert [w.val for w in _kept_values(SimpleNamespace(storage=by_call))] == [a, b]
    as_lists = {"mm": [wrapped(a), recompute], "sdpa": [(wrapped(b), count), wrapped(c)]}
    assert [w.val for w in _kept_values(SimpleNamespace(storage=as_lists))] == [a, b, c]
    no_version = SimpleNamespace(val=c)
    assert _kept_values(SimpleNamespace(storage={"mm": [no_version]})) == []
    assert _kept_values(SimpleNamespace(storage={})) == []
    assert _kept_values(SimpleNamespace(storage=[wrapped(a)])) is None
    assert _kept_values(SimpleNamespace(storage={"mm": (wrapped(a),)})) is None
    assert _kept_values(SimpleNamespace()) is None


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(6, 6), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class Net(nn.Module):
    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_true_needs_two_blocks_of_a_kind():
    # A container of one block does not count as repeated.
    model = Net(blocks=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"checkpointing=True found no repeated blocks in Net"):
        Accumulator(model, optimizer, 2, checkpointing=True)
    two = Net(blocks=2)
    acc = Accumulator(two, torch.optim.SGD(two.parameters(), lr=0.1), 2, checkpointing=True)
    assert acc.checkpointed_modules == ("blocks.0", "blocks.1")
