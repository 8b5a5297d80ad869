"""measure_activation_memory: exact byte counts (views, resized and wrapped storages),
scaling, gradient exclusion, checkpointing."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.checkpoint import checkpoint

from torch_accum.memory import ActivationMemory, measure_activation_memory

F32 = 4  # bytes per float32 element
BATCH, WIDTH = 64, 256
BLOCK = BATCH * WIDTH * F32  # one (64, 256) float32 activation: 65536 bytes


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    x = torch.randn(32, 100)
    w = torch.randn(100, 50, requires_grad=True)
    return x, w


def test_exact_bytes_by_hand(tiny):
    x, w = tiny
    memory = measure_activation_memory(lambda: (x @ w).relu().sum(), parameters=[w])
    # Forward: mm output (32x50) is freed once relu has consumed it (MmBackward keeps x and w,
    # which predate the call); relu output is kept by ThresholdBackward; the loss is 4 bytes.
    assert memory.retained_after_forward == 32 * 50 * F32 + F32 == 6404
    # Backward peak, inside ThresholdBackward: relu output + loss + ones-like loss gradient +
    # the relu gradient it returns. The mm gradient is w.grad, so it is excluded.
    assert memory.peak == 2 * 32 * 50 * F32 + 2 * F32 == 12808
    assert memory.cuda_max_allocated is None
    # .grad is what plain backward gives: neither zeroed nor pre-allocated by the meter.
    assert torch.allclose(w.grad, x.T @ ((x @ w) > 0).float())


def test_forward_only_peak_counts_storages_freed_inside_forward(tiny):
    x, w = tiny
    memory = measure_activation_memory(lambda: (x @ w).relu().sum(), backward=False)
    assert memory.retained_after_forward == 6404
    # mm output and relu output are alive together before the mm output is freed.
    assert memory.peak == 2 * 32 * 50 * F32 == 12800
    assert w.grad is None


def test_views_share_one_storage_and_count_once(tiny):
    x, w = tiny
    kept = []

    def forward():
        h = x @ w
        kept.extend([h, h.t(), h[0], h.view(-1)[:7]])
        return h.detach().sum()

    memory = measure_activation_memory(forward, backward=False)
    assert memory.retained_after_forward == 32 * 50 * F32 + F32


def test_parameter_gradients_are_excluded(tiny):
    x, w = tiny
    with_grads = measure_activation_memory(lambda: (x @ w).relu().sum())
    w.grad = None
    without_grads = measure_activation_memory(lambda: (x @ w).relu().sum(), parameters=[w])
    assert with_grads.retained_after_forward == without_grads.retained_after_forward == 6404
    # w.grad (100x50) is born in MmBackward, after ThresholdBackward released the relu output:
    # loss + ones + relu gradient + w.grad.
    assert with_grads.peak == 2 * F32 + 32 * 50 * F32 + 100 * 50 * F32 == 26408
    assert without_grads.peak == 12808


def test_parameter_gradient_bytes_are_the_difference_when_they_form_the_peak():
    w = torch.randn(1000, requires_grad=True)
    # Forward creates only the loss; backward the ones-like seed and then w.grad (a copy of the
    # broadcast seed), while both are alive: the peaks differ by exactly the parameter bytes.
    counted = measure_activation_memory(lambda: w.sum())
    w.grad = None
    excluded = measure_activation_memory(lambda: w.sum(), parameters=[w])
    assert excluded == ActivationMemory(
        retained_after_forward=F32, peak=2 * F32, cuda_max_allocated=None
    )
    assert counted.peak - excluded.peak == w.numel() * F32 == 4000


def test_mlp_gradients_are_excluded_and_model_parameters_generator_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
    x = torch.randn(32, 128)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    counted = measure_activation_memory(lambda: model(x).sum())
    model.zero_grad(set_to_none=True)
    excluded = measure_activation_memory(lambda: model(x).sum(), parameters=model.parameters())
    assert counted.retained_after_forward == excluded.retained_after_forward
    # Gradients appear while activations are being freed, so they raise the peak by less
    # than their size, but they do raise it.
    assert 0 < counted.peak - excluded.peak <= param_bytes


def test_existing_gradients_are_accumulated_in_place_and_not_counted(tiny):
    x, w = tiny
    first = measure_activation_memory(lambda: (x @ w).relu().sum(), parameters=[w])
    grad, pointer = w.grad.clone(), w.grad.data_ptr()
    second = measure_activation_memory(lambda: (x @ w).relu().sum(), parameters=[w])
    assert second == first == ActivationMemory(6404, 12808, None)
    assert w.grad.data_ptr() == pointer
    assert torch.allclose(w.grad, 2 * grad)


def _mlp(depth: int, width: int = 128) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])


def test_doubling_the_batch_doubles_retained_and_peak():
    model = _mlp(4)

    def measure(batch: int) -> ActivationMemory:
        x = torch.randn(batch, 128)
        return measure_activation_memory(
            lambda: model(x).square().mean(), parameters=model.parameters()
        )

    small, large = measure(16), measure(32)
    # Each of the 4 layers keeps at least its (16, 128) Linear input.
    assert small.retained_after_forward > 4 * 16 * 128 * F32
    assert large.retained_after_forward / small.retained_after_forward == pytest.approx(2, rel=0.02)
    assert large.peak / small.peak == pytest.approx(2, rel=0.02)


def test_no_grad_forward_retains_only_the_loss():
    model = _mlp(4)
    x = torch.randn(64, 128)

    def forward():
        with torch.no_grad():
            return model(x).sum()

    memory = measure_activation_memory(forward, backward=False)
    assert memory.retained_after_forward == F32
    # Without a graph at most two (64, 128) activations live at once.
    assert memory.peak == 2 * 64 * 128 * F32


def _blocks() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        *[
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH), nn.GELU())
            for _ in range(8)
        ]
    )


def test_non_reentrant_checkpointing_is_seen():
    model, x = _blocks(), torch.randn(BATCH, WIDTH)

    def forward(checkpointed: bool) -> torch.Tensor:
        h = x
        for block in model:
            h = checkpoint(block, h, use_reentrant=False) if checkpointed else block(h)
        return h.sum()

    plain = measure_activation_memory(lambda: forward(False), parameters=model.parameters())
    model.zero_grad(set_to_none=True)
    checkpointed = measure_activation_memory(lambda: forward(True), parameters=model.parameters())
    # Without checkpointing each block keeps 4 activations (the inputs of its two Linears and
    # two GELUs), one of which is the previous block's output (x for block 0, not counted):
    # 8 * 4 - 1 = 31. With it, only the inputs of blocks 1..7 are kept: 7. Plus the loss.
    assert plain.retained_after_forward == 31 * BLOCK + F32
    assert checkpointed.retained_after_forward == 7 * BLOCK + F32
    assert plain.retained_after_forward >= 3 * checkpointed.retained_after_forward
    # Backward recomputes one block at a time on top of the 7 kept inputs.
    assert plain.peak == 32 * BLOCK + 2 * F32
    assert checkpointed.peak == 11 * BLOCK + 2 * F32
    assert plain.peak >= 2.5 * checkpointed.peak


@pytest.mark.parametrize(
    ("forward", "error", "message"),
    [
        (torch.ones(()), TypeError, r"forward must be a callable .* got tensor\(1\.\) \(Tensor\)"),
        (None, TypeError, r"forward must be a callable .* got None .*forward=lambda: model"),
        (
            lambda: 1.5,
            TypeError,
            r"forward\(\) must return the loss as a scalar tensor, but it returned 1\.5 \(float\)",
        ),
        (
            lambda: torch.ones(3, 2),
            ValueError,
            r"must return a scalar loss, but it returned a tensor of shape \(3, 2\); reduce it",
        ),
        (
            lambda: torch.ones(()),
            ValueError,
            r"backward=True but the loss .* does not require grad .*torch\.no_grad\(\).*backward=False",
        ),
    ],
)
def test_bad_forward(forward, error, message):
    with pytest.raises(error, match=message):
        measure_activation_memory(forward)
    assert _get_current_dispatch_mode() is None


def test_bad_parameters_and_backward(tiny):
    x, w = tiny
    with pytest.raises(
        TypeError, match=r"parameters must be an iterable of tensors, got an element 'w' \(str\)"
    ):
        measure_activation_memory(lambda: (x @ w).sum(), parameters=["w"])
    with pytest.raises(TypeError, match=r"backward must be True or False, got 'yes' \(str\)"):
        measure_activation_memory(lambda: (x @ w).sum(), backward="yes")


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("boom in backward")


def test_dispatch_mode_and_hooks_are_removed_when_forward_or_backward_raises(tiny):
    x, w = tiny

    def failing_forward():
        (x @ w).relu()
        raise KeyError("boom in forward")

    with pytest.raises(KeyError, match="boom in forward"):
        measure_activation_memory(failing_forward, parameters=[w])
    assert _get_current_dispatch_mode() is None
    with pytest.raises(RuntimeError, match="boom in backward"):
        measure_activation_memory(lambda: _FailingBackward.apply(x @ w).sum(), parameters=[w])
    assert _get_current_dispatch_mode() is None
    assert not w._backward_hooks
    # Still usable afterwards, with the same numbers.
    w.grad = None
    assert measure_activation_memory(lambda: (x @ w).relu().sum(), parameters=[w]).peak == 12808


@pytest.mark.cuda
def test_cuda_max_allocated():
    x = torch.randn(32, 100, device="cuda")
    w = torch.randn(100, 50, device="cuda", requires_grad=True)
    memory = measure_activation_memory(lambda: (x @ w).relu().sum(), parameters=[w])
    assert memory.retained_after_forward == 6404
    assert memory.cuda_max_allocated is not None
    assert memory.cuda_max_allocated > 0


def test_a_storage_that_an_out_argument_resizes_counts_its_new_size():
    x = torch.ones(100)  # 400 bytes

    def forward():
        out = torch.empty(4)  # 16 bytes, grown to 400 in place
        torch.mul(x, 2, out=out.resize_(100))
        return out.sum()

    memory = measure_activation_memory(forward, backward=False)
    assert memory.peak == 400 + 4
    assert memory.retained_after_forward == 4  # `out` is freed when forward returns


def test_a_view_of_a_new_tensor_is_not_counted_again():
    x = torch.ones(100)
    memory = measure_activation_memory(lambda: (x * 2).view(10, 10)[0].sum(), backward=False)
    assert memory.peak == 400 + 4


def test_a_wrapper_subclass_counts_the_storages_of_its_inner_tensors():
    # DTensor (FSDP2) is such a subclass: the memory is in the tensors it wraps.
    from torch.testing._internal.two_tensor import TwoTensor

    x = TwoTensor(torch.ones(100), torch.ones(100))
    memory = measure_activation_memory(lambda: (x * 2).sum(), backward=False)
    assert memory.peak == 2 * 400 + 2 * 4


def test_a_broadcast_gradient_is_not_taken_for_the_parameters_own():
    # The gradient of w.sum() is the 4-byte backward seed expanded to w's shape: its storage
    # is the seed's, an activation of backward, not a gradient to leave out.
    weight = nn.Parameter(torch.ones(100, 4))
    weight.grad = torch.zeros_like(weight)
    memory = measure_activation_memory(lambda: weight.sum(), parameters=[weight])
    assert (memory.retained_after_forward, memory.peak) == (4, 4 + 4)


def test_parameters_may_be_a_single_tensor():
    weight = nn.Parameter(torch.ones(100, 4))
    x = torch.ones(4)

    def measure(parameters):
        weight.grad = torch.zeros_like(weight)  # backward adds a fresh gradient into it
        return measure_activation_memory(lambda: (weight @ x).sum(), parameters=parameters)

    assert measure(weight) == measure([weight])
    assert measure(weight).peak < measure([]).peak  # the fresh gradient is left out


def test_tensors_inside_lists_tuples_and_keyword_arguments_are_seen():
    # Ops take tensor lists (stack, cat), keyword tensors (out=) and return named tuples
    # (max): each must be found for its bytes to count, or not count when it predates the run.
    w = torch.ones(10)
    buffer = torch.empty(20)  # exists before the run: written through out=, never counted
    keep = []

    def forward():
        y = w * 2  # 40 bytes
        z = torch.stack(y.unbind(0))  # the unbound views share y's storage: 40 bytes for z
        values, indices = torch.max(z.view(2, 5), dim=0)  # 20 + 40 bytes
        torch.cat([y, y], out=buffer)  # into the old buffer: nothing new
        keep.extend([y, z, values, indices])
        return values.sum()  # 4 bytes

    memory = measure_activation_memory(forward, backward=False)
    assert memory.retained_after_forward == 40 + 40 + 20 + 40 + 4
    assert memory.peak == memory.retained_after_forward
