"""checkpointing=True on real model code: transformers, torchvision, timm (tiny, random init).

Each test skips when its library is missing; CI runs them in the examples environment.
Gradients are compared bit for bit (float32, same seed) with the same model trained
without checkpointing.
"""

import copy
import logging

import pytest
import torch

from torch_accum import Accumulator


def train_step(make, call, checkpointing):
    """Gradients, the model's output and the checkpointed names for one micro-batch."""
    torch.manual_seed(0)
    model = make()
    model.train()
    acc = Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), 2, checkpointing=checkpointing
    )
    with acc:
        torch.manual_seed(1)
        output = call(model)
        loss = output if isinstance(output, torch.Tensor) else output.loss
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return grads, output, acc.checkpointed_modules


def assert_same_gradients(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- transformers
def batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 12), generator=generator)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    return ids, mask


def causal_lm(name, attention):
    transformers = pytest.importorskip("transformers")
    if name == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0
        )
        model_class = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=100,
        )
        model_class = transformers.LlamaForCausalLM
    config._attn_implementation = attention
    return lambda: model_class(config)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_causal_lm_with_a_padding_mask_is_exact_and_builds_no_cache(name, attention, caplog):
    make = causal_lm(name, attention)
    ids, mask = batch()

    def call(model):
        return model(input_ids=ids, attention_mask=mask, labels=ids)

    expected, plain_output, _ = train_step(make, call, False)
    assert plain_output.past_key_values.get_seq_length() == 12  # the config's default
    with caplog.at_level(logging.INFO, logger="torch_accum"):
        got, output, names = train_step(make, call, True)
    assert len(names) == 2
    assert output.past_key_values is None  # no cache, so none that doubles
    assert "use_cache=False" in caplog.text
    assert_same_gradients(got, expected)


def test_llama_with_use_cache_passed_explicitly():
    make = causal_lm("llama", "sdpa")
    ids, mask = batch()

    def call(model):
        return model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=True)

    expected, _, _ = train_step(make, call, False)
    got, output, _ = train_step(make, call, True)
    assert output.past_key_values.get_seq_length() == 0
    assert_same_gradients(got, expected)


def test_t5_with_labels():
    transformers = pytest.importorskip("transformers")
    ids, mask = batch()

    def make(use_cache=True):
        config = transformers.T5Config(
            num_layers=2,
            num_decoder_layers=2,
            d_model=32,
            d_ff=64,
            num_heads=2,
            d_kv=16,
            vocab_size=100,
            decoder_start_token_id=0,
            pad_token_id=0,
            use_cache=use_cache,
        )
        return transformers.T5ForConditionalGeneration(config)

    def call(model):
        return model(input_ids=ids, attention_mask=mask, labels=ids[:, :6].contiguous())

    got, _, names = train_step(make, call, True)
    assert names == tuple(f"{part}.block.{i}" for part in ("encoder", "decoder") for i in (0, 1))
    # T5 itself computes slightly differently with its cache on (~1e-7): the exact reference
    # is the model without the cache, which is what it runs inside the block.
    expected, _, _ = train_step(lambda: make(use_cache=False), call, False)
    assert_same_gradients(got, expected)
    selective, _, _ = train_step(make, call, "selective")
    assert_same_gradients(selective, expected)


def test_albert_shared_layer_names_its_class():
    transformers = pytest.importorskip("transformers")
    config = transformers.AlbertConfig(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        embedding_size=16,
        vocab_size=100,
    )
    model = transformers.AlbertForMaskedLM(config)
    with pytest.raises(ValueError, match=r"found no repeated blocks.*AlbertLayer"):
        Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpointing=True)


# ----------------------------------------------------------------------------- vision
def block_classes(model):
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpointing=True)
    modules = dict(model.named_modules())
    return [type(modules[name]).__name__ for name in acc.checkpointed_modules]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet18", ["BasicBlock"] * 8),
        ("mobilenet_v3_small", ["Conv2dNormActivation"] + ["InvertedResidual"] * 11),
        ("efficientnet_b0", ["Conv2dNormActivation"] + ["MBConv"] * 16),
        ("regnet_y_400mf", ["SimpleStemIN"] + ["ResBottleneckBlock"] * 16),
        ("densenet121", ["_DenseLayer"] * 58),
    ],
)
def test_torchvision_blocks(name, expected):
    torchvision = pytest.importorskip("torchvision")
    assert block_classes(getattr(torchvision.models, name)()) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("convnext_atto", ["ConvNeXtBlock"] * 12),
        ("efficientnet_b0", ["DepthwiseSeparableConv"] + ["InvertedResidual"] * 15),
        ("mobilenetv3_small_100", ["DepthwiseSeparableConv"] + ["InvertedResidual"] * 10),
        ("regnetx_002", ["ConvNormAct"] + ["Bottleneck"] * 13),
    ],
)
def test_timm_blocks(name, expected):
    timm = pytest.importorskip("timm")
    assert block_classes(timm.create_model(name)) == expected


def test_timm_swin_blocks():
    timm = pytest.importorskip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=2)
    assert block_classes(model) == ["PatchEmbed"] + ["SwinTransformerBlock"] * 12


def test_densenet_exact_and_deepcopy_inside_the_block():
    torchvision = pytest.importorskip("torchvision")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def make():
        return torchvision.models.densenet121(num_classes=5)

    def call(model):
        return model(x).square().mean()

    expected, _, _ = train_step(make, call, False)
    got, _, names = train_step(make, call, True)
    assert len(names) == 58
    assert_same_gradients(got, expected)

    model = make()
    with Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpointing=True):
        clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
    clone.eval()
    model.eval()
    assert not torch.equal(clone(x), model(x))  # the copy runs its own weights


# ----------------------------------------------------------------------------- issue 24 models
def test_more_torchvision_blocks():
    torchvision = pytest.importorskip("torchvision")
    fcn = torchvision.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=True
    )
    # Its two FCNHeads beside the backbone once made the whole backbone a stem.
    assert block_classes(fcn) == ["Bottleneck"] * 16 + ["FCNHead"] * 2
    inception = torchvision.models.inception_v3(weights=None, init_weights=False)
    mixed = ["InceptionA"] * 3 + ["InceptionB"] + ["InceptionC"] * 4 + ["InceptionAux"]
    mixed += ["InceptionD"] + ["InceptionE"] * 2
    assert block_classes(inception) == ["BasicConv2d"] * 5 + mixed
    googlenet = torchvision.models.googlenet(aux_logits=True, init_weights=False)
    assert (
        block_classes(googlenet) == ["BasicConv2d"] * 3 + ["Inception"] * 9 + ["InceptionAux"] * 2
    )


def test_more_timm_blocks():
    timm = pytest.importorskip("timm")
    # Not the two GhostModules of each GhostBottleneck.
    assert block_classes(timm.create_model("ghostnet_100")) == ["GhostBottleneck"] * 16
    mixed = ["InceptionA"] * 3 + ["InceptionB"] + ["InceptionC"] * 4 + ["InceptionD"]
    assert (
        block_classes(timm.create_model("inception_v3"))
        == ["ConvNormAct"] * 5 + mixed + ["InceptionE"] * 2
    )


def wav2vec2():
    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2Config(
        vocab_size=32,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        mask_time_prob=0.0,  # SpecAugment draws from numpy's RNG, which is not seeded here
    )
    return transformers.Wav2Vec2ForCTC(config)


def test_wav2vec2_wraps_its_first_feature_conv_and_is_exact():
    generator = torch.Generator().manual_seed(0)
    audio = torch.randn(2, 4000, generator=generator)
    labels = torch.randint(1, 32, (2, 4), generator=generator)

    def call(model):
        return model(input_values=audio, labels=labels)

    expected, _, _ = train_step(wav2vec2, call, False)
    got, _, names = train_step(wav2vec2, call, True)
    convs = tuple(f"wav2vec2.feature_extractor.conv_layers.{i}" for i in range(7))
    layers = tuple(f"wav2vec2.encoder.layers.{i}" for i in range(2))
    assert names == (*convs, "wav2vec2.encoder.pos_conv_embed", *layers)
    assert_same_gradients(got, expected)


def images_and_loss(side):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, side, side, generator=generator)
    targets = torch.randint(0, 5, (2,), generator=generator)

    def call(model):
        output = model(images)
        if isinstance(output, tuple):  # GoogLeNet's auxiliary logits in training
            return sum(torch.nn.functional.cross_entropy(o, targets) for o in output)
        return torch.nn.functional.cross_entropy(output, targets)

    return call


@pytest.mark.parametrize(
    ("library", "name", "kwargs"),
    [
        # attn[:, :, 1:, 1:] += rel_pos on a 4-D q @ k^T: silently wrong gradients before
        ("timm", "mvitv2_tiny", {"img_size": 64}),
        # F.relu(self.fc1(x), inplace=True) in its auxiliary heads: "cached ... mutated"
        ("torchvision", "googlenet", {"aux_logits": True, "init_weights": True}),
        # Linear, ReLU(inplace=True), Linear in cpb_mlp: "cached ... mutated"
        ("torchvision", "swin_v2_t", {}),
    ],
)
def test_selective_is_exact_where_a_model_writes_into_a_matmul_result(library, name, kwargs):
    module = pytest.importorskip(library)
    if library == "timm":

        def make():
            return module.create_model(name, num_classes=5, **kwargs)
    else:

        def make():
            return module.models.get_model(name, weights=None, num_classes=5, **kwargs)

    call = images_and_loss(64)
    expected, _, _ = train_step(make, call, False)
    got, _, _ = train_step(make, call, "selective")
    assert_same_gradients(got, expected)
