"""The ``counter`` random weights (wan_trt/random_weights.py): the same values whatever the device, dtype,
chunking or subset generated; the distributions they stand for; tied tensors stay tied; the hash."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from wan_trt.presets import get_preset
from wan_trt.random_weights import fill_uniform_, uniform_values
from wan_trt.reference_models import COMPONENTS, build_reference_models
from wan_trt.tokenizer import build_tiny_tokenizer

PRESET = get_preset("tiny-gpu")  # the counter scheme at a CPU size
VOCAB = build_tiny_tokenizer().get_vocab_size()


def _models(**kwargs):
    return build_reference_models(PRESET, seed=kwargs.pop("seed", 0), vocab_size=VOCAB, **kwargs)


@pytest.fixture(scope="module")
def fp32_models():
    return _models()


def test_values_do_not_depend_on_chunking_and_fill_the_interval():
    key = (12345, 678)
    whole = uniform_values(3000, 0, key, "cpu")
    assert torch.equal(whole, torch.cat([uniform_values(1000, 0, key, "cpu"), uniform_values(2000, 1000, key, "cpu")]))
    many = uniform_values(1 << 20, 0, key, "cpu")
    assert many.min() >= -1.0 and many.max() < 1.0
    assert abs(many.mean().item()) < 5e-3
    assert abs(many.std().item() - 3 ** -0.5) < 5e-3  # U(-1, 1)
    assert not torch.equal(many[:1000], uniform_values(1000, 0, (12345, 679), "cpu"))  # another stream


def test_chunked_fill_equals_one_pass(monkeypatch):
    import wan_trt.random_weights as rw

    one = fill_uniform_(torch.empty(7, 300), (1, 2), 0.5, draw_on="cpu")
    monkeypatch.setattr(rw, "_CPU_CHUNK", 64)
    assert torch.equal(fill_uniform_(torch.empty(7, 300), (1, 2), 0.5, draw_on="cpu"), one)
    monkeypatch.setattr(rw, "_CPU_CHUNK", 1 << 24)
    assert torch.equal(fill_uniform_(torch.empty(7, 300), (1, 2), 0.5, draw_on="cpu"), one)


def test_bf16_weights_are_the_fp32_weights_rounded_and_the_kept_modules_stay_fp32(fp32_models):
    half = _models(dtype=torch.bfloat16)
    keep = tuple(fp32_models.transformer._keep_in_fp32_modules) + ("motion_encoder",)
    checked = 0
    for name in COMPONENTS:
        want = getattr(fp32_models, name).state_dict()
        for key, value in getattr(half, name).state_dict().items():
            if not value.is_floating_point():
                continue
            kept = name == "transformer" and any(k in key.split(".") for k in keep)
            assert value.dtype == (torch.float32 if kept else torch.bfloat16), key
            assert torch.equal(value, want[key].to(value.dtype)), key
            checked += 1
    assert checked > 100
    assert half.weights_hash() == fp32_models.weights_hash()


def test_distributions_follow_the_init_they_stand_for(fp32_models):
    transformer = fp32_models.transformer
    block = transformer.blocks[0]
    linear = block.attn1.to_q
    bound = linear.weight.shape[1] ** -0.5
    assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
    assert linear.bias.abs().max() <= bound
    assert torch.all(block.norm2.weight == 1) if block.norm2.weight is not None else True
    table = transformer.scale_shift_table
    assert table.abs().max() <= 3 ** 0.5 / table.shape[-1] ** 0.5
    embedding = fp32_models.text_encoder.shared.weight
    assert abs(embedding.std().item() - 1.0) < 0.05


def test_tied_parameters_stay_tied(fp32_models):
    encoder = fp32_models.text_encoder
    assert encoder.encoder.embed_tokens.weight is encoder.shared.weight


def test_a_subset_leaves_the_rest_on_meta_with_the_same_hash(fp32_models):
    partial = _models(components=("text_encoder",))
    assert partial.transformer.patch_embedding.weight.device.type == "meta"
    assert torch.equal(partial.text_encoder.shared.weight, fp32_models.text_encoder.shared.weight)
    assert partial.weights_hash() == fp32_models.weights_hash()


def test_the_hash_names_seed_architecture_and_lora(fp32_models, tmp_path):
    assert _models(seed=1, components=()).weights_hash() != fp32_models.weights_hash()
    wider = dataclasses.replace(PRESET, transformer={**PRESET.transformer, "ffn_dim": 1024})
    assert build_reference_models(wider, vocab_size=VOCAB, components=()).weights_hash() != fp32_models.weights_hash()
    from safetensors.torch import save_file

    lora = tmp_path / "lora.safetensors"
    rank, dim = 2, fp32_models.transformer.blocks[0].attn1.to_q.weight.shape[1]
    save_file({"blocks.0.attn1.to_q.lora_A.weight": torch.ones(rank, dim),
               "blocks.0.attn1.to_q.lora_B.weight": torch.ones(dim, rank)}, str(lora))
    merged = _models(lora=str(lora))
    assert merged.weights_hash() != fp32_models.weights_hash()
    assert not torch.equal(merged.transformer.blocks[0].attn1.to_q.weight, fp32_models.transformer.blocks[0].attn1.to_q.weight)
