"""`checkpointing=True` on real models: torchvision, timm and transformers, one row each.

    pip install -e ".[zoo]"
    python benchmarks/zoo.py --markdown          # the table in benchmarks/RESULTS.md
    python benchmarks/zoo.py --smoke             # a few models, seconds each; the tests run this
    python benchmarks/zoo.py --models tv/resnet50,hf/llama-eager

Every model is built from its library's code with random weights (small configs, no
downloads) and trained as its users would call it: cross entropy on the logits for the vision
models (with their auxiliary heads' losses where they have them), ``model(input_ids=...,
attention_mask=..., labels=...).loss`` for Hugging Face text models and CTC on audio for
wav2vec2. For each it reports, with checkpointing off against on (one model, one input,
float32, the RNG seeded identically before every run so that dropout draws the same masks):

- the blocks that ``checkpointing=True`` wraps (how many, of which class), or its error;
- the largest absolute difference of any parameter gradient (the claim is 0: bit-identical);
- the activation peak and the bytes retained after the forward, as ratios to no
  checkpointing, from ``torch_accum.measure_activation_memory``;
- the best explicit per-class policy: every module class with parameters and submodules
  whose instances run at least twice in one forward (at most ``--max-candidates`` of them,
  the largest first) is passed as ``checkpointing=<class>``; the lowest peak ratio and its
  class are reported, and ``checkpointing=True`` should be within 10% of it;
- the time of forward+backward with checkpointing against without, timed in alternating
  order in one run (median of the per-repetition ratios), in CPU seconds of the process
  by default (``--wall-clock`` for wall time);
- peak and time ratios of the other points of the memory/time curve: the selective mode
  (``checkpointing="selective"``) and every other block (``Checkpointing(every=2)``), "n/a"
  where this torch_accum lacks them. Their gradients are compared bit for bit too.

A model that fails gets a row that says where and with which exception; nothing is hidden.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import torch_accum
from torch_accum import Accumulator, measure_activation_memory

Loss = Callable[[nn.Module], torch.Tensor]
Builder = Callable[[], tuple[nn.Module, Loss]]
Clock = Callable[[], float]

# The selective mode's value for ``checkpointing=`` (saves matmuls and attention, recomputes
# the rest); a torch_accum without it raises TypeError, which the table shows as "n/a".
SELECTIVE = "selective"


def _every_second() -> Any:
    """``Checkpointing(every=2)``: every other block; None where torch_accum lacks it."""
    checkpointing = getattr(torch_accum, "Checkpointing", None)
    return None if checkpointing is None else checkpointing(every=2)


# The other points of the memory/time curve, each a column: name -> its policy (or None).
MODES: dict[str, Callable[[], Any]] = {"selective": lambda: SELECTIVE, "every 2nd": _every_second}
# Containers hold blocks but run nothing of their own worth a policy.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
TARGET_BEST_POLICY = 1.10  # checkpointing=True's peak at most this times the best class's


# ----------------------------------------------------------------------------- the models
@dataclass(frozen=True)
class Case:
    name: str
    build: Builder
    description: str
    smoke: bool = False

    @property
    def library(self) -> str:
        """The package the model comes from (the zoo extra installs all three)."""
        prefix = self.name.split("/")[0]
        return {"tv": "torchvision", "timm": "timm", "hf": "transformers"}[prefix]


def _images(batch: int, side: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, side, side, generator=generator)
    return images, torch.randint(0, classes, (batch,), generator=generator)


def vision_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy as each model's users train it.

    A tensor of logits; GoogLeNet's and Inception's outputs with auxiliary logits in
    training (a namedtuple: the main logits, then the auxiliary ones, weighted 0.3); a
    segmentation model's dict (``out``, ``aux`` weighted 0.5) against one class per image
    spread over every pixel.
    """
    if isinstance(output, dict):
        main, aux = output["out"], output.get("aux")
        pixels = targets[:, None, None].expand(-1, *main.shape[2:])
        loss = nn.functional.cross_entropy(main, pixels)
        return loss if aux is None else loss + 0.5 * nn.functional.cross_entropy(aux, pixels)
    if isinstance(output, tuple):
        main, *auxiliary = output
        loss = nn.functional.cross_entropy(main, targets)
        for logits in auxiliary:
            if logits is not None:
                loss = loss + 0.3 * nn.functional.cross_entropy(logits, targets)
        return loss
    return nn.functional.cross_entropy(output, targets)


def _classifier(model: nn.Module, batch: int, side: int) -> tuple[nn.Module, Loss]:
    images, targets = _images(batch, side)

    def loss(m: nn.Module) -> torch.Tensor:
        return vision_loss(m(images), targets)

    return model.train(), loss


def torchvision_case(name: str, side: int, batch: int = 4, **kwargs: Any) -> Builder:
    def build() -> tuple[nn.Module, Loss]:
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
        return _classifier(model, batch, side)

    return build


def torchvision_segmentation(name: str, side: int, batch: int = 4, **kwargs: Any) -> Builder:
    def build() -> tuple[nn.Module, Loss]:
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=10, **kwargs
        )
        return _classifier(model, batch, side)

    return build


def torchvision_vit(side: int, batch: int = 4) -> Builder:
    def build() -> tuple[nn.Module, Loss]:
        from torchvision.models import VisionTransformer

        torch.manual_seed(0)
        model = VisionTransformer(
            image_size=side,
            patch_size=8,
            num_layers=4,
            num_heads=4,
            hidden_dim=128,
            mlp_dim=256,
            num_classes=10,
        )
        return _classifier(model, batch, side)

    return build


def timm_case(name: str, side: int, batch: int = 4, **kwargs: Any) -> Builder:
    def build() -> tuple[nn.Module, Loss]:
        import timm

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        return _classifier(model, batch, side)

    return build


HF_VOCAB, HF_BATCH, HF_LENGTH, HF_PADDING = 256, 2, 32, 12


def _hf_text() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, a padding mask (the second sequence is shorter) and labels ignoring pads."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, HF_VOCAB, (HF_BATCH, HF_LENGTH), generator=generator)
    mask = torch.ones(HF_BATCH, HF_LENGTH, dtype=torch.long)
    mask[1, -HF_PADDING:] = 0
    ids[1, -HF_PADDING:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def hf_case(model_class: str, config_class: str, attention: str = "sdpa", **config: Any) -> Builder:
    """A tiny randomly initialised transformers model trained on a padded batch."""

    def build() -> tuple[nn.Module, Loss]:
        import transformers

        transformers.logging.set_verbosity_error()  # config warnings about the tiny sizes
        torch.manual_seed(0)
        settings = {"vocab_size": HF_VOCAB, **config}
        model_config = getattr(transformers, config_class)(**settings)
        model_config._attn_implementation = attention
        model = getattr(transformers, model_class)(model_config).train()
        ids, mask, labels = _hf_text()
        if model_class == "BertForMaskedLM" or model_class == "AlbertForMaskedLM":
            # Masked LM: predict 15% of the real tokens from a [MASK] id (4 here).
            chosen = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.15
            chosen &= mask.bool()
            chosen[0, 0] = True
            labels = ids.masked_fill(~chosen, -100)
            ids = ids.masked_fill(chosen, 4)

        def loss(m: nn.Module) -> torch.Tensor:
            return m(input_ids=ids, attention_mask=mask, labels=labels).loss

        return model, loss

    return build


def hf_wav2vec2(seconds: float = 0.5, batch: int = 2) -> Builder:
    """Wav2Vec2ForCTC, small: 7 feature convs of width 64, 4 encoder layers, CTC labels."""

    def build() -> tuple[nn.Module, Loss]:
        import transformers

        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        config = transformers.Wav2Vec2Config(
            vocab_size=32,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            conv_dim=(64,) * 7,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            # SpecAugment's time masks are drawn from numpy's global RNG, which the runs
            # do not seed alike: without it the plain run is not reproducible either.
            mask_time_prob=0.0,
        )
        model = transformers.Wav2Vec2ForCTC(config).train()
        generator = torch.Generator().manual_seed(1)
        audio = torch.randn(batch, int(16000 * seconds), generator=generator)
        labels = torch.randint(1, 32, (batch, 6), generator=generator)

        def loss(m: nn.Module) -> torch.Tensor:
            return m(input_values=audio, labels=labels).loss

        return model, loss

    return build


_DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
_ENCODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}

CASES = [
    Case("tv/resnet18", torchvision_case("resnet18", 96), "torchvision resnet18, 4x3x96x96"),
    Case("tv/resnet50", torchvision_case("resnet50", 128), "torchvision resnet50, 4x3x128x128"),
    Case(
        "tv/mobilenet_v3_small",
        torchvision_case("mobilenet_v3_small", 96),
        "torchvision mobilenet_v3_small, 4x3x96x96",
    ),
    Case(
        "tv/efficientnet_b0",
        torchvision_case("efficientnet_b0", 96),
        "torchvision efficientnet_b0, 4x3x96x96",
    ),
    Case(
        "tv/regnet_y_400mf",
        torchvision_case("regnet_y_400mf", 96),
        "torchvision regnet_y_400mf, 4x3x96x96",
    ),
    Case(
        "tv/densenet121",
        torchvision_case("densenet121", 64),
        "torchvision densenet121, 4x3x64x64",
        smoke=True,
    ),
    Case(
        "tv/convnext_tiny",
        torchvision_case("convnext_tiny", 64),
        "torchvision convnext_tiny, 4x3x64x64",
    ),
    Case("tv/swin_t", torchvision_case("swin_t", 64), "torchvision swin_t, 4x3x64x64"),
    Case(
        "tv/vit",
        torchvision_vit(64),
        "torchvision VisionTransformer, 4 layers, width 128, patch 8, 4x3x64x64",
    ),
    Case(
        "timm/convnext_atto",
        timm_case("convnext_atto", 64),
        "timm convnext_atto, 4x3x64x64",
        smoke=True,
    ),
    Case(
        "timm/swin_tiny",
        timm_case("swin_tiny_patch4_window7_224", 64, img_size=64),
        "timm swin_tiny_patch4_window7_224, img_size 64, 4x3x64x64",
    ),
    Case(
        "timm/efficientnet_b0",
        timm_case("efficientnet_b0", 96),
        "timm efficientnet_b0, 4x3x96x96",
    ),
    Case(
        "timm/mobilenetv3_small_100",
        timm_case("mobilenetv3_small_100", 96),
        "timm mobilenetv3_small_100, 4x3x96x96",
    ),
    Case("timm/regnetx_002", timm_case("regnetx_002", 96), "timm regnetx_002, 4x3x96x96"),
    Case(
        "timm/vit_tiny",
        timm_case("vit_tiny_patch16_224", 64, img_size=64),
        "timm vit_tiny_patch16_224, img_size 64, 4x3x64x64",
    ),
    Case("timm/resnet18", timm_case("resnet18", 96), "timm resnet18, 4x3x96x96"),
    # Issue 24: selective with results written in place (mvitv2, googlenet, swin_v2), and
    # block choices that once went wrong (fcn with two heads, ghostnet, inception, wav2vec2).
    Case(
        "timm/mvitv2_tiny",
        timm_case("mvitv2_tiny", 64, img_size=64),
        "timm mvitv2_tiny, img_size 64, 4x3x64x64",
    ),
    Case(
        "tv/googlenet",
        torchvision_case("googlenet", 64, aux_logits=True, init_weights=True),
        "torchvision googlenet with its auxiliary heads, 4x3x64x64",
    ),
    Case("tv/swin_v2_t", torchvision_case("swin_v2_t", 64), "torchvision swin_v2_t, 4x3x64x64"),
    Case(
        "tv/fcn_resnet50",
        torchvision_segmentation("fcn_resnet50", 64, aux_loss=True),
        "torchvision fcn_resnet50, aux_loss=True, 4x3x64x64",
    ),
    Case("timm/ghostnet_100", timm_case("ghostnet_100", 64), "timm ghostnet_100, 4x3x64x64"),
    Case(
        "tv/inception_v3",
        torchvision_case("inception_v3", 96, aux_logits=False, init_weights=True),
        "torchvision inception_v3, 4x3x96x96 (too small for its auxiliary head)",
    ),
    Case("timm/inception_v3", timm_case("inception_v3", 96), "timm inception_v3, 4x3x96x96"),
    Case(
        "hf/gpt2",
        hf_case(
            "GPT2LMHeadModel",
            "GPT2Config",
            n_layer=4,
            n_embd=64,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=1,
        ),
        "GPT2LMHeadModel, 4 layers, width 64",
    ),
    Case(
        "hf/llama",
        hf_case("LlamaForCausalLM", "LlamaConfig", **_DECODER),
        "LlamaForCausalLM, 4 layers, width 64, sdpa",
        smoke=True,
    ),
    Case(
        "hf/llama-eager",
        hf_case("LlamaForCausalLM", "LlamaConfig", "eager", **_DECODER),
        "LlamaForCausalLM, 4 layers, width 64, eager attention",
    ),
    Case(
        "hf/mistral",
        hf_case("MistralForCausalLM", "MistralConfig", **_DECODER),
        "MistralForCausalLM, 4 layers, width 64",
    ),
    Case(
        "hf/qwen2",
        hf_case("Qwen2ForCausalLM", "Qwen2Config", **_DECODER),
        "Qwen2ForCausalLM, 4 layers, width 64",
    ),
    Case(
        "hf/t5",
        hf_case(
            "T5ForConditionalGeneration",
            "T5Config",
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
        "T5ForConditionalGeneration, 2+2 layers, width 64, labels",
    ),
    Case(
        "hf/bert",
        hf_case("BertForMaskedLM", "BertConfig", **_ENCODER),
        "BertForMaskedLM, 4 layers, width 64",
    ),
    Case(
        "hf/albert",
        hf_case("AlbertForMaskedLM", "AlbertConfig", embedding_size=32, **_ENCODER),
        "AlbertForMaskedLM, 4 layers sharing one, width 64",
    ),
    Case(
        "hf/wav2vec2",
        hf_wav2vec2(),
        "Wav2Vec2ForCTC, 7 feature convs of width 64, 4 layers, 2x0.5 s of audio, CTC",
    ),
]
BY_NAME = {case.name: case for case in CASES}


# ----------------------------------------------------------------------------- measuring
@dataclass
class ModeResult:
    """One of MODES on one model: ``status`` is "n/a" (not in this torch_accum), "ok", "error"."""

    status: str = "n/a"
    peak: float | None = None
    time: float | None = None
    grad_diff: float | None = None


@dataclass
class Row:
    name: str
    description: str
    blocks: list[tuple[int, str]] = field(default_factory=list)  # (how many, class name)
    errors: list[str] = field(default_factory=list)
    grad_diff: float | None = None
    peak: float | None = None
    retained: float | None = None
    best_class: str | None = None
    best_peak: float | None = None
    time: float | None = None
    modes: dict[str, ModeResult] = field(default_factory=dict)
    noise: float | None = None
    candidates: dict[str, float | None] = field(default_factory=dict)  # None: it failed
    inexact_classes: dict[str, float] = field(default_factory=dict)  # their max grad diff
    seconds: float = 0.0

    @property
    def within_target(self) -> bool | None:
        if self.peak is None or self.best_peak is None:
            return None
        return self.peak <= TARGET_BEST_POLICY * self.best_peak


def _failure(where: str, error: BaseException) -> str:
    text = " ".join(str(error).split())
    if len(text) > 600:  # long enough for the class names that checkpointing errors list
        text = text[:597] + "..."
    return f"{where}: {type(error).__name__}: {text}"


def _accumulator(model: nn.Module, policy: Any) -> Accumulator:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    return Accumulator(model, optimizer, 1, checkpointing=policy)


def _clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def _max_diff(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if (x is None) != (y is None):
            return float("inf")  # a gradient present in one run only
        if x is not None and y is not None:
            worst = max(worst, (x - y).abs().max().item() if x.numel() else 0.0)
    return worst


def _step(model: nn.Module, loss: Loss, acc: Accumulator, clock: Clock) -> float:
    """One seeded forward+backward in ``acc``'s block; its seconds (forward+backward only)."""
    _clear_grads(model)
    torch.manual_seed(1234)  # dropout, stochastic depth: the same draws in every run
    with acc:
        start = clock()
        loss(model).backward()
        return clock() - start


def _memory(model: nn.Module, loss: Loss, acc: Accumulator) -> tuple[int, int]:
    _clear_grads(model)
    torch.manual_seed(1234)
    with acc:
        memory = measure_activation_memory(lambda: loss(model), parameters=model.parameters())
    return memory.peak, memory.retained_after_forward


def repeated_classes(model: nn.Module, loss: Loss, limit: int) -> list[type[nn.Module]]:
    """Classes with parameters and submodules whose instances run at least twice per forward.

    Counted by calls, not instances, so that a layer shared across depth (ALBERT) counts;
    the largest (parameters of one instance) come first, at most ``limit`` of them.
    """
    calls: Counter[type[nn.Module]] = Counter()
    size: dict[type[nn.Module], int] = {}
    handles = []
    for module in model.modules():
        if module is model or type(module) in _CONTAINERS:
            continue
        if next(module.children(), None) is None or next(module.parameters(), None) is None:
            continue
        cls = type(module)
        size[cls] = max(size.get(cls, 0), sum(p.numel() for p in module.parameters()))
        handles.append(module.register_forward_pre_hook(lambda m, _args: calls.update([type(m)])))
    try:
        torch.manual_seed(1234)
        with torch.no_grad():
            loss(model)
    finally:
        for handle in handles:
            handle.remove()
    repeated = [cls for cls, count in calls.items() if count >= 2]
    return sorted(repeated, key=lambda cls: -size[cls])[:limit]


def _block_classes(model: nn.Module, names: tuple[str, ...]) -> list[tuple[int, str]]:
    classes = Counter(type(model.get_submodule(name)).__name__ for name in names)
    return [(count, cls) for cls, count in classes.most_common()]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the libraries' one-time warnings and info logs out of the table."""
    level = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger("transformers").setLevel(level)


def measure(
    case: Case,
    repetitions: int = 7,
    max_candidates: int = 8,
    clock: Clock = time.process_time,
) -> Row:
    """All the columns of one model's row; failures are recorded in ``row.errors``.

    ``clock`` times the steps: by default the process's CPU time, which other jobs on a
    shared machine hardly change (on one thread it is the step's compute time), where wall
    time swings with their load; pass ``time.perf_counter`` for wall time.
    """
    started = time.perf_counter()
    row = Row(case.name, case.description)
    with _quiet():
        _measure(case, row, repetitions, max_candidates, clock)
    row.seconds = time.perf_counter() - started
    return row


def _measure(case: Case, row: Row, repetitions: int, max_candidates: int, clock: Clock) -> None:
    try:
        model, loss = case.build()
    except Exception as error:
        row.errors.append(_failure("build", error))
        return
    accs: dict[str, Accumulator] = {"off": _accumulator(model, False)}
    try:
        accs["on"] = _accumulator(model, True)
        row.blocks = _block_classes(model, accs["on"].checkpointed_modules)
    except Exception as error:
        row.errors.append(_failure("checkpointing=True", error))
    for mode, make_policy in MODES.items():
        row.modes[mode] = result = ModeResult()
        policy = make_policy()
        if policy is None:
            continue
        try:
            accs[mode] = _accumulator(model, policy)
            result.status = "ok"
        except TypeError:
            continue  # a torch_accum without this mode: "n/a"
        except Exception as error:
            result.status = "error"
            failure = _failure(f"checkpointing={policy!r}", error)
            if row.errors and row.errors[0].split(": ", 1)[1] == failure.split(": ", 1)[1]:
                failure = f"checkpointing={policy!r}: the same {type(error).__name__}"
            row.errors.append(failure)

    def failed(name: str, where: str, error: Exception) -> None:
        row.errors.append(_failure(f"{where}, {name}", error))
        accs.pop(name, None)
        if name in row.modes:
            row.modes[name].status = "error"

    # Exactness and time: every setting once as warm-up (its gradients are compared), then
    # `repetitions` timed rounds in rotating order.
    settings = list(accs)
    grads: dict[str, list[torch.Tensor | None]] = {}
    times: dict[str, dict[int, float]] = {name: {} for name in settings}
    for repetition in range(repetitions + 1):
        shift = repetition % len(settings)
        for name in settings[shift:] + settings[:shift]:
            if name not in accs:
                continue
            try:
                seconds = _step(model, loss, accs[name], clock)
            except Exception as error:
                failed(name, "forward+backward", error)
                continue
            if repetition == 0:
                grads[name] = _grads(model)
            else:
                times[name][repetition] = seconds
                if repetition == 1 and name == "off":
                    row.noise = _max_diff(grads["off"], _grads(model))
    if "off" not in grads:
        return

    def time_ratio(name: str) -> float | None:
        rounds = [r for r in times.get(name, {}) if r in times["off"]]
        if name not in accs or not rounds:
            return None
        return statistics.median(times[name][r] / times["off"][r] for r in rounds)

    if "on" in grads:
        row.grad_diff = _max_diff(grads["off"], grads["on"])
        row.time = time_ratio("on")
    for mode, result in row.modes.items():
        if mode in grads:
            result.grad_diff = _max_diff(grads["off"], grads[mode])
            result.time = time_ratio(mode)

    # Memory: one tracked forward+backward per setting and per candidate class.
    try:
        base_peak, base_retained = _memory(model, loss, accs["off"])
    except Exception as error:
        row.errors.append(_failure("memory, off", error))
        return
    # The tracked runs leave their gradients too: the same kernels run under the tracking
    # mode, so they must equal the plain run's bit for bit (else `noise` says so), and
    # every explicit class's gradients are checked against them as well.
    row.noise = max(row.noise or 0.0, _max_diff(grads["off"], _grads(model)))
    for name in [n for n in accs if n != "off"]:
        try:
            peak, retained = _memory(model, loss, accs[name])
        except Exception as error:
            failed(name, "memory", error)
            continue
        if name == "on":
            row.peak, row.retained = peak / base_peak, retained / base_retained
        else:
            row.modes[name].peak = peak / base_peak
    try:
        candidates = repeated_classes(model, loss, max_candidates)
    except Exception as error:
        row.errors.append(_failure("finding candidate classes", error))
        candidates = []
    for cls in candidates:
        try:
            peak, _ = _memory(model, loss, _accumulator(model, cls))
        except Exception as error:
            row.errors.append(_failure(f"checkpointing={cls.__name__}", error))
            row.candidates[cls.__name__] = None
            continue
        row.candidates[cls.__name__] = peak / base_peak
        diff = _max_diff(grads["off"], _grads(model))
        if diff:
            row.inexact_classes[cls.__name__] = diff
        if row.best_peak is None or peak / base_peak < row.best_peak:
            row.best_peak, row.best_class = peak / base_peak, cls.__name__


# ----------------------------------------------------------------------------- the table
COLUMNS = (
    "model",
    "blocks (checkpointing=True)",
    "max abs grad diff",
    "peak",
    "retained",
    "best class: peak",
    "within 10%",
    "time",
    *(f"{mode} peak / time" for mode in MODES),
    "errors",
)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _diff(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.1e}"


# Backslash escapes for GitHub and Python-Markdown alike; the latter does not know `\<`.
_MARKDOWN_SPECIAL = str.maketrans({"<": "&lt;", ">": "&gt;", **{c: "\\" + c for c in "\\`*_|[]"}})


def cells(row: Row, markdown: bool = False) -> list[str]:
    """The row's table cells; for markdown, class names as code and error text escaped."""

    def name(cls: str) -> str:
        return f"`{cls}`" if markdown else cls

    def error(text: str) -> str:
        return f"**{text.translate(_MARKDOWN_SPECIAL)}**" if markdown else text

    within = {None: "-", True: "yes", False: "**no**" if markdown else "NO"}[row.within_target]
    best = "-" if row.best_class is None else f"{name(row.best_class)}: {_num(row.best_peak)}"
    if row.best_class in row.inexact_classes:
        best += f" (grad diff {_diff(row.inexact_classes[row.best_class])})"
    modes = []
    for result in row.modes.values():
        if result.status != "ok":
            modes.append(result.status)
            continue
        time_ = "-" if result.time is None else f"{result.time:.2f}x"
        modes.append(f"{_num(result.peak)} / {time_}")
        if result.grad_diff:
            modes[-1] += f" (grad diff {_diff(result.grad_diff)})"
    return [
        row.name,
        ", ".join(f"{count} {name(cls)}" for count, cls in row.blocks) or "-",
        _diff(row.grad_diff),
        _num(row.peak),
        _num(row.retained),
        best,
        within,
        "-" if row.time is None else f"{row.time:.2f}x",
        *modes,
        "; ".join(error(e) for e in row.errors) or "none",
    ]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(cells(row, markdown=True)) + " |")
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    crashed = [r.name for r in rows if r.errors]
    inexact = [r.name for r in rows if r.grad_diff not in (None, 0.0)]
    missed = [r.name for r in rows if r.within_target is False]
    lines = [
        f"{len(rows)} models; errors: {len(crashed)} ({', '.join(crashed) or 'none'})",
        f"gradients not bit-identical: {len(inexact)} ({', '.join(inexact) or 'none'})",
        f"peak more than 10% above the best class: {len(missed)} ({', '.join(missed) or 'none'})",
    ]
    for mode in MODES:
        results = {r.name: r.modes[mode] for r in rows if mode in r.modes}
        if all(result.status == "n/a" for result in results.values()):
            continue
        failed = [name for name, result in results.items() if result.status == "error"]
        inexact = [name for name, result in results.items() if result.grad_diff]
        lines.append(
            f"{mode}: errors {len(failed)} ({', '.join(failed) or 'none'}), "
            f"gradients not bit-identical {len(inexact)} ({', '.join(inexact) or 'none'})"
        )
    explicit = [f"{r.name} {c} {d:.1e}" for r in rows for c, d in r.inexact_classes.items()]
    lines.append(
        f"explicit classes with gradients not bit-identical: {len(explicit)} "
        f"({', '.join(explicit) or 'none'})"
    )
    noisy = [r.name for r in rows if r.noise]
    if noisy:
        lines.append(f"not deterministic without checkpointing either: {', '.join(noisy)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (default: all); see --list")
    parser.add_argument("--list", action="store_true", help="print the model names and exit")
    parser.add_argument("--smoke", action="store_true", help="a few fast models, 1 repetition")
    parser.add_argument("--repetitions", type=int, default=7, help="timed rounds per setting")
    parser.add_argument("--max-candidates", type=int, default=8, help="classes tried per model")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument(
        "--candidates", action="store_true", help="also print every candidate class's peak"
    )
    # One thread: these inputs are too small to gain from more, and on a shared machine
    # oversubscribed threads make the timings several times slower and noisier.
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--wall-clock",
        action="store_true",
        help="time steps in wall seconds (default: the process's CPU seconds, which other "
        "jobs on a shared machine hardly change; the same on an idle one with 1 thread)",
    )
    args = parser.parse_args(argv)
    if args.list:
        for case in CASES:
            print(f"{case.name:28} {case.description}")
        return 0
    if args.repetitions < 1:
        parser.error(f"--repetitions must be at least 1, got {args.repetitions}")
    if args.max_candidates < 1:
        parser.error(f"--max-candidates must be at least 1, got {args.max_candidates}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    cases = [c for c in CASES if c.smoke] if args.smoke else CASES
    if args.smoke:
        args.repetitions = 1
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in names if n not in BY_NAME]
        if unknown or not names:
            parser.error(
                f"unknown --models {', '.join(unknown) or repr(args.models)}; known: "
                f"{', '.join(BY_NAME)}"
            )
        cases = [BY_NAME[n] for n in names]
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, torch_accum {torch_accum.__version__}, CPU, "
        f"{torch.get_num_threads()} threads, {'wall' if args.wall_clock else 'CPU'} time; "
        "ratios are checkpointing on / off"
    )
    rows = []
    started = time.perf_counter()
    for case in cases:
        clock = time.perf_counter if args.wall_clock else time.process_time
        row = measure(case, args.repetitions, args.max_candidates, clock)
        rows.append(row)
        # With --markdown the rows come as a table at the end; progress goes to stderr.
        progress = sys.stderr if args.markdown else sys.stdout
        print(f"{row.seconds:6.1f}s  " + " | ".join(cells(row)), file=progress, flush=True)
        if args.candidates:
            tried = ", ".join(f"{c} {_num(p)}" for c, p in row.candidates.items())
            print(f"        candidates: {tried or 'none'}", file=progress, flush=True)
    if args.markdown:
        print(markdown(rows))
    print(summary(rows))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
