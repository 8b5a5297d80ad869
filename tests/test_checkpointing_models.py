"""checkpointing on the structures of real model families, built small by hand.

Which blocks ``True`` finds (stages, pieces, single-block stages, ModuleDict, attributes,
a shared layer), Hugging Face style KV caches, inputs mutated after the forward (DenseNet),
copies of the model inside the block, and the selective / every-n-th modes.
"""

import collections
import copy
import inspect
import io
import logging

import pytest
import torch
from torch import nn

from torch_accum import Accumulator, Checkpointing

WIDTH = 8


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


def chosen(model, policy=True):
    return Accumulator(model, sgd(model), 2, checkpointing=policy).checkpointed_modules


class Block(nn.Module):
    """A residual block: norm, then an MLP."""

    def __init__(self, width=WIDTH, dropout=0.0, batch_norm=False):
        super().__init__()
        self.norm = nn.BatchNorm1d(width) if batch_norm else nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * width, width)
        )

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Stage(nn.Module):
    """timm ConvNeXt / Swin: a downsample, then a Sequential of blocks."""

    def __init__(self, depth):
        super().__init__()
        self.downsample = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH))
        self.blocks = nn.Sequential(*(Block() for _ in range(depth)))

    def forward(self, x):
        return self.blocks(self.downsample(x))


class LinearNormAct(nn.Sequential):
    """torchvision's Conv2dNormActivation, with a Linear: a piece of a block."""

    def __init__(self, width=WIDTH):
        super().__init__(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU())


class InvertedResidual(nn.Module):
    """torchvision MobileNetV3: a Sequential of conv+norm+act pieces and a residual."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(LinearNormAct(), LinearNormAct(), LinearNormAct())

    def forward(self, x):
        return x + self.block(x)


class Sequenced(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x):
        for module in self.body.values() if isinstance(self.body, nn.ModuleDict) else self.body:
            x = module(x)
        return self.head(x)


# ----------------------------------------------------------------------------- block choice
def test_blocks_inside_same_class_stages_not_the_stages():
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Sequential(Stage(2), Stage(1), Stage(3)))
    assert chosen(model) == (
        "1.0.blocks.0",
        "1.0.blocks.1",
        "1.1.blocks.0",  # a stage holding a single block: its block
        "1.2.blocks.0",
        "1.2.blocks.1",
        "1.2.blocks.2",
    )


def test_blocks_made_of_pieces_not_the_pieces():
    # torchvision mobilenet_v3_small: stem and last conv pieces around the blocks.
    model = Sequenced(
        nn.Sequential(
            LinearNormAct(), InvertedResidual(), InvertedResidual(), Block(), LinearNormAct()
        )
    )
    # The stem piece before the first block is wrapped too; the last piece is not.
    assert chosen(model) == ("body.0", "body.1", "body.2", "body.3")


def test_stages_holding_one_block_are_not_skipped():
    # torchvision efficientnet_b0: features = Sequential(stem, Sequential(MBConv), ...).
    body = nn.Sequential(
        LinearNormAct(),
        nn.Sequential(InvertedResidual()),
        nn.Sequential(InvertedResidual(), InvertedResidual()),
        nn.Sequential(InvertedResidual()),
        LinearNormAct(),
    )
    assert chosen(Sequenced(body)) == ("body.0", "body.1.0", "body.2.0", "body.2.1", "body.3.0")


def test_blocks_in_a_module_dict_and_in_plain_attributes():
    in_dict = Sequenced(nn.ModuleDict({"first": Block(), "second": Block()}))
    assert chosen(in_dict) == ("body.first", "body.second")

    as_attributes = nn.Module()
    as_attributes.embed = nn.Linear(WIDTH, WIDTH)
    as_attributes.b1 = Block()
    as_attributes.b2 = Block()
    assert chosen(as_attributes) == ("b1", "b2")


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, x, memory):
        weights = (self.q(x) @ self.k(memory).transpose(-1, -2)).softmax(-1)
        return weights @ self.v(memory)


class DecoderLayer(nn.Module):
    """BART/Whisper: self- and cross-attention of one class, a norm between them."""

    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.self_attn_norm = nn.LayerNorm(WIDTH)
        self.cross_attn = Attention()
        self.mlp = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH))

    def forward(self, x, memory):
        x = self.self_attn_norm(x + self.self_attn(x, x))
        return x + self.mlp(x + self.cross_attn(x, memory))


class Embeddings(nn.Module):
    """ViT-style embeddings: a parameter of its own and a projection."""

    def __init__(self):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(WIDTH))
        self.projection = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH))

    def forward(self, x):
        return self.projection(x) + self.position


class Pooler(Embeddings):
    pass


def test_decoder_layers_with_two_attentions_are_blocks_not_stages():
    model = nn.Module()
    model.embeddings = Embeddings()  # before the first block: the stem, wrapped too
    model.layers = nn.ModuleList(DecoderLayer() for _ in range(3))
    model.pooler = Pooler()  # a lone module after the blocks is not
    assert chosen(model) == ("embeddings", "layers.0", "layers.1", "layers.2")


class TwoPartBlock(nn.Module):
    """A block of two sub-modules and no norm of its own (parallel attention + MLP)."""

    def __init__(self):
        super().__init__()
        self.mix = LinearNormAct()
        self.mlp = InvertedResidual()

    def forward(self, x):
        return x + self.mix(x) + self.mlp(x)


def test_a_block_of_two_sub_blocks_is_a_block_not_a_piece():
    # Two members with parameters, but not layers: a block, so the stem before it counts.
    model = Sequenced(nn.Sequential(LinearNormAct(), TwoPartBlock(), TwoPartBlock()))
    assert chosen(model) == ("body.0", "body.1", "body.2")


class SharedStack(nn.Module):
    """ALBERT: one layer, called `depth` times."""

    def __init__(self, depth=3):
        super().__init__()
        self.embed = nn.Linear(4, WIDTH)
        self.layer = Block()
        self.depth = depth
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x):
        x = self.embed(x)
        for _ in range(self.depth):
            x = self.layer(x)
        return self.head(x)


def test_a_shared_layer_raises_naming_its_class_and_works_when_passed():
    model = SharedStack()
    with pytest.raises(
        ValueError,
        match=r"found no repeated blocks in SharedStack.*one shared and called repeatedly|"
        r"found no repeated blocks in SharedStack.*Classes of modules with layers of their "
        r"own: Block;.*checkpointing=<block class>",
    ):
        chosen(model)
    x = torch.randn(6, 4)
    torch.manual_seed(0)
    plain = SharedStack()
    plain(x).square().mean().backward()
    torch.manual_seed(0)
    model = SharedStack()
    with Accumulator(model, sgd(model), 2, checkpointing=Block) as acc:
        model(x).square().mean().backward()
    assert acc.checkpointed_modules == ("layer",)
    for got, expected in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(got.grad, expected.grad, rtol=0, atol=0)


class Holder(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body


def test_the_no_blocks_error_names_at_most_eight_classes():
    # Nine classes of modules with three layers each, none of them twice: no blocks. The
    # Sequential holding them is a container, not a candidate.
    units = []
    for index in range(9):
        unit = type(f"Unit{index}", (nn.Module,), {})()
        unit.a, unit.b, unit.c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
        units.append(unit)
    listed = ", ".join(f"Unit{index}" for index in range(8))
    with pytest.raises(
        ValueError,
        match=rf"layers of their own: {listed}; pass the one your model runs once per layer "
        r"\(for one shared layer, that layer's class\)\. Say which",
    ):
        chosen(Holder(nn.Sequential(*units)))


def test_the_no_blocks_error_without_candidates_says_how_to_choose():
    with pytest.raises(
        ValueError, match=r"cannot be seen from the module tree\. Say which"
    ) as info:
        chosen(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    assert "Classes of modules" not in str(info.value)


def test_a_block_registered_again_inside_another_block_is_wrapped_once():
    model = stack()
    model.body[2].shared = model.body[0]  # e.g. tied layers
    assert chosen(model) == ("body.1", "body.2")


class ScaledBlock(nn.Module):
    """A parameter of its own (a layer scale) and three layers: a block, not a piece."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(WIDTH))
        self.fc1, self.norm, self.fc2 = (
            nn.Linear(WIDTH, WIDTH),
            nn.LayerNorm(WIDTH),
            nn.Linear(WIDTH, WIDTH),
        )

    def forward(self, x):
        return x + self.gamma * self.fc2(self.norm(self.fc1(x)))


class Scale(nn.Module):
    """A layer: its own parameter and a child without parameters."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(WIDTH))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x * self.weight)


def test_blocks_with_a_parameter_of_their_own_and_a_layer_before_them():
    model = Sequenced(nn.Sequential(Scale(), ScaledBlock(), ScaledBlock()))
    assert chosen(model) == ("body.1", "body.2")
    with pytest.raises(ValueError, match=r"layers of their own: ScaledBlock;"):
        chosen(Sequenced(nn.Sequential(Scale(), ScaledBlock())))  # one block: none repeated


class DoublingForward:
    """An instance-level forward, as hooking libraries install: doubles the block's output."""

    def __init__(self, block):
        self.block = block

    def __call__(self, x):
        return 2 * type(self.block).forward(self.block, x)


def test_a_blocks_own_instance_forward_is_used_and_restored():
    x = torch.randn(4, WIDTH)
    plain = stack()
    for block in plain.body:
        block.forward = DoublingForward(block)
    plain(x).square().mean().backward()
    model = stack()
    instance_forwards = [DoublingForward(block) for block in model.body]
    for block, forward in zip(model.body, instance_forwards):
        block.forward = forward
    with Accumulator(model, sgd(model), 2, checkpointing=True):
        model(x).square().mean().backward()
        clone = copy.deepcopy(model)  # a copy keeps the instance forwards, unwrapped
    assert [vars(block)["forward"] for block in model.body] == instance_forwards
    with torch.no_grad():
        torch.testing.assert_close(clone(x), plain(x), rtol=0, atol=0)
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


class Head(nn.Sequential):
    """torchvision FCNHead: a Sequential subclass of three parameterised layers."""

    def __init__(self):
        super().__init__(
            nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH)
        )


class Backbone(nn.Module):
    """A ResNet trunk: stem layers, then Sequential stages of blocks."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Linear(WIDTH, WIDTH)
        self.bn1 = nn.LayerNorm(WIDTH)
        self.layer1 = nn.Sequential(Block(), Block())
        self.layer2 = nn.Sequential(Block(), Block(), Block())

    def forward(self, x):
        return self.layer2(self.layer1(self.bn1(self.conv1(x))))


class Segmenter(nn.Module):
    """torchvision fcn_resnet50(aux_loss=True): a backbone, then two heads of one class."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.classifier = Head()
        self.aux_classifier = Head()

    def forward(self, x):
        features = self.backbone(x)
        return self.classifier(features) + self.aux_classifier(features)


def test_two_heads_of_one_class_beside_a_backbone_do_not_hide_its_blocks():
    # The heads repeat a class at the top level, but the backbone beside them holds the
    # blocks: the backbone is no stem to wrap whole (0.99 of the peak on fcn_resnet50 with
    # the backbone wrapped whole, 0.44 with its Bottlenecks).
    blocks = tuple(f"backbone.layer1.{i}" for i in range(2))
    blocks += tuple(f"backbone.layer2.{i}" for i in range(3))
    assert chosen(Segmenter()) == (*blocks, "classifier", "aux_classifier")


class GhostModule(nn.Module):
    """timm GhostNet's GhostModule: a conv-norm-act and a cheap conv-norm-act, in Sequentials."""

    def __init__(self):
        super().__init__()
        self.primary = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH), nn.ReLU())
        self.cheap = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH), nn.ReLU())

    def forward(self, x):
        return self.cheap(self.primary(x))


class GhostBottleneck(nn.Module):
    """Two GhostModules side by side as attributes, a residual around them: one block."""

    def __init__(self):
        super().__init__()
        self.ghost1 = GhostModule()
        self.ghost2 = GhostModule()

    def forward(self, x):
        return x + self.ghost2(self.ghost1(x))


class AttributeStage(nn.Module):
    """timm RegNet's RegStage: its blocks as attributes b1, b2, ..."""

    def __init__(self, depth):
        super().__init__()
        for index in range(depth):
            self.add_module(f"b{index + 1}", Block())

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


def test_a_block_of_two_same_class_halves_is_a_block_not_a_stage():
    # timm ghostnet_100: 16 GhostBottlenecks, not their 32 GhostModules (peak 0.33, not 0.48).
    body = nn.Sequential(
        nn.Sequential(GhostBottleneck()), nn.Sequential(GhostBottleneck(), GhostBottleneck())
    )
    assert chosen(Sequenced(body)) == ("body.0.0", "body.1.0", "body.1.1")


def test_stages_holding_their_blocks_as_attributes_are_still_stages():
    # Three side by side as attributes make a stage; its class is then a stage everywhere,
    # also where it holds one block (timm regnetx_002: depths 1, 1, 4, 7).
    body = nn.Sequential(AttributeStage(1), AttributeStage(3))
    assert chosen(Sequenced(body)) == ("body.0.b1", "body.1.b1", "body.1.b2", "body.1.b3")


class ReductionBlock(ScaledBlock):
    """Inception's reduction blocks (InceptionB, InceptionD): one of their class each."""


class OtherBlock(ScaledBlock):
    pass


def test_a_lone_block_between_repeated_blocks_is_a_block():
    # Inception v3: Mixed_5b-d (InceptionA), Mixed_6a (InceptionB, alone), Mixed_6b-e
    # (InceptionC), Mixed_7a (InceptionD, alone), Mixed_7b-c (InceptionE), as attributes.
    model = nn.Module()
    model.stem = LinearNormAct()
    model.a1, model.a2 = ScaledBlock(), ScaledBlock()
    model.reduce1 = ReductionBlock()
    model.c1, model.c2 = OtherBlock(), OtherBlock()
    model.reduce2 = Block()
    model.e1, model.e2 = ScaledBlock(), ScaledBlock()
    model.pooler = Pooler()  # after the last block: not one
    names = ("a1", "a2", "reduce1", "c1", "c2", "reduce2", "e1", "e2")
    assert chosen(model) == ("stem", *names)


class FirstConv(nn.Module):
    """wav2vec2's first feature conv: a conv and a group norm (a piece of its own class)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x):
        return self.norm(self.conv(x)).relu()


class Conv(nn.Module):
    """wav2vec2's other feature convs: a conv and an activation, a piece."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Linear(WIDTH, WIDTH)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.conv(x))


def test_a_stack_of_pieces_keeps_the_different_first_piece():
    # wav2vec2's feature encoder: the first conv, the largest activation, is wrapped too.
    model = Sequenced(nn.ModuleList([FirstConv(), Conv(), Conv(), Conv()]))
    assert chosen(model) == ("body.0", "body.1", "body.2", "body.3")
    assert chosen(model, Checkpointing(every=2)) == ("body.0", "body.1", "body.3")


# ----------------------------------------------------------------------------- KV caches
class Config:
    """A Hugging Face style config: use_cache is on by default."""

    def __init__(self):
        self.use_cache = True


class Cache:
    """Appends each layer's keys; `update` returns all keys so far (a DynamicCache)."""

    def __init__(self):
        self.keys = {}

    def update(self, keys, layer):
        self.keys[layer] = torch.cat([self.keys[layer], keys], 1) if layer in self.keys else keys
        return self.keys[layer]

    def get_seq_length(self):
        return 0 if not self.keys else next(iter(self.keys.values())).shape[1]


class CachingLayer(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.index = index
        self.query, self.key = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU())

    def forward(self, x, attention_mask, past_key_values=None, use_cache=False):
        keys = self.key(x)
        if past_key_values is not None:
            keys = past_key_values.update(keys, self.index)
        scores = self.query(x) @ keys.transpose(1, 2)  # (batch, tokens, cached tokens)
        # A padding mask built for the tokens of this call: recomputing with a doubled
        # cache fails as in Hugging Face ("size of tensor a ... must match ...").
        scores = scores.masked_fill(~attention_mask[:, None, :], -1e9)
        return x + self.mlp(scores.softmax(-1) @ keys)


class CachingModel(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        torch.manual_seed(0)
        self.config = Config()
        self.layers = nn.ModuleList(CachingLayer(i) for i in range(depth))

    def forward(self, x, attention_mask, use_cache=None, past_key_values=None):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = Cache()
        for layer in self.layers:
            x = layer(x, attention_mask, past_key_values=past_key_values, use_cache=use_cache)
        return x, past_key_values


def cache_batch():
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    return torch.randn(2, 5, WIDTH, generator=generator), mask


def test_kv_cache_is_switched_off_exact_and_restored(caplog):
    x, mask = cache_batch()
    plain = CachingModel()
    plain.config.use_cache = False
    out, _ = plain(x, mask)
    out.square().mean().backward()

    model = CachingModel()
    with (
        caplog.at_level(logging.INFO, logger="torch_accum"),
        Accumulator(model, sgd(model), 2, checkpointing=True),
    ):
        assert model.config.use_cache is False
        got, cache = model(x, mask)
        got.square().mean().backward()
    assert cache is None  # no cache built, so none that grows
    assert model.config.use_cache is True
    assert "set use_cache=False on config for the `with` block" in caplog.text
    torch.testing.assert_close(got, out, rtol=0, atol=0)
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


class TaskModel(nn.Module):
    """A head around a model with a config (AutoModelFor...): the config sits below the root."""

    def __init__(self):
        super().__init__()
        self.inner = CachingModel()

    def forward(self, x, attention_mask):
        return self.inner(x, attention_mask)


def test_the_config_of_a_submodule_is_switched_off_and_named(caplog):
    model = TaskModel()
    with (
        caplog.at_level(logging.INFO, logger="torch_accum"),
        Accumulator(model, sgd(model), 2, checkpointing=True),
    ):
        assert model.inner.config.use_cache is False
    assert model.inner.config.use_cache is True
    assert "set use_cache=False on inner.config for the `with` block" in caplog.text


class Transformers5Layer(CachingLayer):
    """transformers 5 passes the cache as ``cache=`` instead of ``past_key_values=``."""

    def forward(self, x, attention_mask, cache=None, use_cache=False):
        return super().forward(x, attention_mask, past_key_values=cache, use_cache=use_cache)


class Transformers5Model(CachingModel):
    def __init__(self, depth=3):
        super().__init__(depth)
        self.layers = nn.ModuleList(Transformers5Layer(i) for i in range(depth))

    def forward(self, x, attention_mask, use_cache=None):
        cache = Cache() if use_cache else None
        for layer in self.layers:
            x = layer(x, attention_mask, cache=cache, use_cache=use_cache)
        return x, cache


@pytest.mark.parametrize(
    ("make", "argument"), [(CachingModel, "past_key_values"), (Transformers5Model, "cache")]
)
def test_explicit_use_cache_runs_without_the_cache(caplog, make, argument):
    x, mask = cache_batch()
    model = make()
    with (
        caplog.at_level(logging.INFO, logger="torch_accum"),
        Accumulator(model, sgd(model), 2, checkpointing=True),
    ):
        out, cache = model(x, mask, use_cache=True)
        out.square().mean().backward()
    assert cache.get_seq_length() == 0
    assert f"layers.0 runs with use_cache=False, {argument}=None" in caplog.text
    assert caplog.text.count("runs with use_cache=False") == 1  # said once, not per block


class RotaryLayer(Block):
    """A block with a `cache` argument of its own, which is no KV cache."""

    def forward(self, x, cache=None):
        return super().forward(x) * cache["scale"]


def test_a_cache_argument_that_is_no_kv_cache_passes_through():
    model = Sequenced(nn.Sequential(RotaryLayer(), RotaryLayer()))
    model.forward = lambda x: model.head(
        model.body[1](model.body[0](x, cache={"scale": 2.0}), cache={"scale": 2.0})
    )
    with Accumulator(model, sgd(model), 2, checkpointing=True):
        model(torch.randn(3, WIDTH)).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_filled_cache_raises_naming_the_fix():
    x, mask = cache_batch()
    model = CachingModel()
    cache = Cache()
    for layer in range(3):
        cache.update(torch.zeros(2, 5, WIDTH), layer)
    with Accumulator(model, sgd(model), 2, checkpointing=True):
        with pytest.raises(
            ValueError,
            match=r"layers.0 received past_key_values= a cache that already holds 5 tokens.*"
            r"use_cache=False.*torch.no_grad\(\)",
        ):
            model(x, mask.repeat(1, 2), past_key_values=cache)
        with torch.no_grad():  # nothing is recomputed there: the cache is used as given
            model(x, torch.ones(2, 10, dtype=torch.bool), past_key_values=cache)


class UseCacheLayer(nn.Module):
    """Records the use_cache of every call; builds no cache itself."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.seen = []

    def forward(self, x, use_cache=False):
        """Adds an MLP of x to x."""
        self.seen.append(use_cache)
        return x + self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class UseCacheModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(UseCacheLayer() for _ in range(2))

    def forward(self, x, use_cache):
        for layer in self.layers:
            x = layer(x, use_cache=use_cache)
        return x


def test_use_cache_true_reaches_checkpointed_blocks_as_false_in_training():
    model = UseCacheModel()
    x = torch.randn(2, WIDTH)
    with Accumulator(model, sgd(model), 2, checkpointing=True):
        model(x, use_cache=True).sum().backward()  # the forward, then its recomputation
        with torch.no_grad():  # nothing recomputed: the cache may be used
            model(x, use_cache=True)
        model(x, use_cache=False).sum().backward()
    for layer in model.layers:
        assert layer.seen == [False, False, True, False, False]


class CacheWithoutLength:
    """A cache that cannot say how many tokens it holds (e.g. a legacy tuple cache)."""

    def update(self, keys, layer):
        return keys


def test_a_cache_that_cannot_say_its_length_is_refused():
    x, mask = cache_batch()
    model = CachingModel()
    with (
        Accumulator(model, sgd(model), 2, checkpointing=True),
        pytest.raises(ValueError, match=r"past_key_values= a cache that already holds tokens"),
    ):
        model(x, mask, past_key_values=CacheWithoutLength())


# ----------------------------------------------------------------------------- mutated inputs
class DenseLayer(nn.Module):
    """torchvision DenseNet: concatenates the list of all previous features."""

    def __init__(self, inputs):
        super().__init__()
        self.norm = nn.BatchNorm1d(inputs)
        self.linear = nn.Linear(inputs, 4)
        self.linear2 = nn.Linear(4, 4)

    def forward(self, features):
        return self.linear2(self.linear(self.norm(torch.cat(features, 1)).relu()).relu())


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers=3):
        super().__init__({f"layer{i}": DenseLayer(WIDTH + 4 * i) for i in range(layers)})

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))  # appends to the list the layer received
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block1 = DenseBlock()
        self.transition = nn.Sequential(nn.BatchNorm1d(WIDTH + 12), nn.Linear(WIDTH + 12, WIDTH))
        self.block2 = DenseBlock()
        self.head = nn.Linear(WIDTH + 12, 1)

    def forward(self, x):
        return self.head(self.block2(self.transition(self.block1(x))))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_dense_layers_that_see_a_list_appended_to_later(mode):
    x = torch.randn(6, WIDTH)
    plain = DenseNet()
    plain(x).square().mean().backward()
    model = DenseNet()
    with Accumulator(model, sgd(model), 2, checkpointing=mode) as acc:
        model(x).square().mean().backward()
    assert acc.checkpointed_modules == tuple(f"block{b}.layer{i}" for b in (1, 2) for i in range(3))
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    for a, b in zip(model.buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


Seen = collections.namedtuple("Seen", "tensors")


class Fields:
    """Not a tuple, though it has ``_fields`` like a namedtuple."""

    _fields = ("tensors",)

    def __init__(self, tensors):
        self.tensors = tensors


class SumBlock(nn.Module):
    """Reads every tensor of a container the caller keeps appending to."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, container):
        tensors = container["tensors"] if isinstance(container, dict) else container.tensors
        return self.c(torch.tanh(self.b(torch.tanh(self.a(sum(tensors))))))


class Gathering(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(SumBlock() for _ in range(3))
        self.wrap = wrap

    def forward(self, x):
        seen = [x]
        for block in self.blocks:
            seen.append(block(self.wrap(seen)))  # the list the block saw grows afterwards
        return seen[-1]


@pytest.mark.parametrize(
    "wrap", [lambda seen: {"tensors": seen}, Seen], ids=["dict_of_a_list", "namedtuple_of_a_list"]
)
def test_lists_inside_dicts_and_namedtuples_appended_to_later(wrap):
    x = torch.randn(4, WIDTH)
    plain = Gathering(wrap)
    plain(x).square().mean().backward()
    model = Gathering(wrap)
    with Accumulator(model, sgd(model), 2, checkpointing=True) as acc:
        model(x).square().mean().backward()
    assert acc.checkpointed_modules == ("blocks.0", "blocks.1", "blocks.2")
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_objects_that_only_look_like_namedtuples_are_passed_as_they_are():
    model = SumBlock()
    stacked = Sequenced(nn.Sequential(model, SumBlock()))
    container = Fields([torch.randn(4, WIDTH)])
    with Accumulator(stacked, sgd(stacked), 2, checkpointing=True):
        model(container).square().mean().backward()  # a checkpointed block, run directly
    assert model.a.weight.grad is not None


# ----------------------------------------------------------------------------- model copies
def stack(seed=0):
    torch.manual_seed(seed)
    return Sequenced(nn.Sequential(Block(), Block(), Block()))


def test_deepcopy_inside_the_block_runs_its_own_weights():
    x = torch.randn(4, WIDTH)
    model = stack()
    with Accumulator(model, sgd(model), 2, checkpointing=True):
        clone = copy.deepcopy(model)
        assert list(clone.state_dict()) == list(model.state_dict())
        with torch.no_grad():
            for p in clone.parameters():
                p.add_(1.0)
        got = clone(x)
    reference = stack()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(1.0)
    torch.testing.assert_close(got, reference(x), rtol=0, atol=0)
    assert not torch.equal(got, model(x))
    # The copy is a plain model: no checkpointing of its own once the block is over.
    assert all(not hasattr(vars(b).get("forward"), "owner") for b in clone.body)


def test_torch_save_inside_the_block_and_load():
    x = torch.randn(4, WIDTH)
    model = stack()
    buffer = io.BytesIO()
    with Accumulator(model, sgd(model), 2, checkpointing=True):
        keys = list(model.state_dict())
        torch.save(model, buffer)
        assert list(model.state_dict()) == keys
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    loaded(x).sum().backward()  # trains as a plain model


# ----------------------------------------------------------------------------- modes
class Deep(nn.Module):
    def __init__(self, depth=4, dropout=0.0, batch_norm=False):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(16, dropout, batch_norm) for _ in range(depth))
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def train_once(policy, dropout=0.3, batch_norm=True):
    model = Deep(dropout=dropout, batch_norm=batch_norm)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    with Accumulator(model, sgd(model), 2, checkpointing=policy) as acc:
        torch.manual_seed(123)  # the same dropout masks in every run
        out = model(x)
        out.square().mean().backward()
    return out.detach(), [p.grad for p in model.parameters()], list(model.buffers()), acc


@pytest.mark.parametrize(
    "policy",
    ["full", "selective", Checkpointing(every=2), Checkpointing(mode="selective", every=3)],
    ids=["full", "selective", "every-2", "selective-every-3"],
)
def test_modes_are_bit_exact_with_dropout_and_batch_norm(policy):
    expected = train_once(False)
    got = train_once(policy)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    for a, b in zip(got[1] + got[2], expected[1] + expected[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_every_n_th_counts_the_blocks_not_the_stem():
    # ViT-like: a patch embedding in front of the blocks. It is wrapped as with True, and
    # blocks 0, 2 (not the embedding as block 0, then blocks 1, 3) are the every-2nd ones.
    model = nn.Module()
    model.embeddings = Embeddings()
    model.layers = nn.ModuleList(Block() for _ in range(4))
    assert chosen(model) == ("embeddings", "layers.0", "layers.1", "layers.2", "layers.3")
    assert chosen(model, Checkpointing(every=2)) == ("embeddings", "layers.0", "layers.2")
    assert chosen(model, Checkpointing(every=3)) == ("embeddings", "layers.0", "layers.3")
    assert chosen(model, Checkpointing(every=5)) == ("embeddings", "layers.0")


def test_every_n_th_block_and_the_names():
    assert train_once(Checkpointing(every=2))[3].checkpointed_modules == ("blocks.0", "blocks.2")
    assert train_once(Checkpointing(every=3))[3].checkpointed_modules == ("blocks.0", "blocks.3")
    only = Checkpointing(blocks=lambda m: isinstance(m, Block), every=4)
    assert train_once(only)[3].checkpointed_modules == ("blocks.0",)


def test_selective_keeps_the_matmuls_and_recomputes_the_rest():
    def saved_bytes(policy):
        from torch_accum import measure_activation_memory

        model = Deep(depth=4, dropout=0.0, batch_norm=False)
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
        with Accumulator(model, sgd(model), 2, checkpointing=policy):
            memory = measure_activation_memory(
                lambda: model(x).square().mean(), parameters=model.parameters()
            )
        return memory.retained_after_forward

    plain, full, selective = saved_bytes(False), saved_bytes("full"), saved_bytes("selective")
    every2 = saved_bytes(Checkpointing(every=2))
    assert full < selective < plain
    assert full < every2 < plain


def test_selective_passes_through_in_eval_and_no_grad_and_restores():
    model = Deep()
    x = torch.randn(8, 16)
    with Accumulator(model, sgd(model), 2, checkpointing="selective"):
        with torch.no_grad():
            model(x)
        model.eval()
        model(x).sum().backward()
        model.train()
        assert all("forward" in vars(block) for block in model.blocks)
    assert all("forward" not in vars(block) for block in model.blocks)


def test_invalid_modes_name_the_argument_the_value_and_the_forms():
    model = Deep()
    with pytest.raises(
        ValueError, match=r"checkpointing='Selective' is not a mode: .*'full'.*'selective'"
    ):
        chosen(model, "Selective")
    with pytest.raises(
        ValueError, match=r"Checkpointing\(mode=...\) must be 'full' or 'selective', got 'fast'"
    ):
        Checkpointing(mode="fast")
    for every in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"Checkpointing\(every=...\) must be an int >= 1"):
            Checkpointing(every=every)
    with pytest.raises(TypeError, match=r"Checkpointing\(blocks=...\) must be True, an nn.Module"):
        Checkpointing(blocks="blocks")
    with pytest.raises(TypeError, match=r"checkpointing must be True, False, .*'selective'"):
        chosen(model, 2.5)
    with pytest.raises(AttributeError):
        Checkpointing().mode = "selective"  # frozen


def test_a_checkpointed_forward_keeps_the_name_signature_and_doc_of_the_forward():
    # Hugging Face reads a block's forward signature (which arguments it takes).
    model = UseCacheModel()
    layer = model.layers[0]
    plain = (layer.forward.__name__, inspect.signature(layer.forward), layer.forward.__doc__)
    with Accumulator(model, sgd(model), 2, checkpointing=True):
        assert "forward" in vars(layer)  # checkpointed
        wrapped = (layer.forward.__name__, inspect.signature(layer.forward), layer.forward.__doc__)
    assert wrapped == plain
