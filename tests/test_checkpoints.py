"""Real checkpoints (wan_trt.checkpoints): both layouts load strictly and exactly, full-size key
coverage on the meta device, LoRA merging, and one clear error for every broken download.

The original-layout files are written from the tiny diffusers/transformers modules with an inverse
key mapping written here from the documented facts (checkpoint_pitfalls.md, the Wan2.2 module
names), independent of the loader's forward conversion, so a wrong conversion fails the tests.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from synthetic_checkpoints import (noisy_tiny_models, tiny_transformer_output, write_diffusers_checkpoint,
                                   write_tokenizer)
from wan_trt.checkpoints import (
    DIFFUSERS, ORIGINAL, StrictLoader, detect_layout, empty_transformer, load_checkpoint,
    load_original_transformer_tensors,
)
from wan_trt.errors import BadInputError
from wan_trt.lora import load_lora_file, merge_lora, parse_lora_arg
from wan_trt.metrics import relative_l2
from wan_trt.presets import get_preset
from wan_trt.reference_models import build_reference_models
from wan_trt.tokenizer import build_tiny_tokenizer

TINY = get_preset("tiny")
VOCAB = build_tiny_tokenizer().get_vocab_size()

# ----------------------------------------------------------------------------------- inverse maps
# diffusers / transformers names → the original Wan2.2 names, written from the documented facts.

_BLOCK_INVERSE = [  # applied in order to "blocks.{i}." suffixes
    (r"attn1\.", "self_attn."), (r"attn2\.", "cross_attn."),
    (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."), (r"\.add_v_proj\.", ".v_img."), (r"\.norm_added_k\.", ".norm_k_img."),
    (r"^norm2\.", "norm3."),  # only the affine cross-attention norm is stored: diffusers norm2 = original norm3
    (r"^scale_shift_table$", "modulation"), (r"^ffn\.net\.0\.proj\.", "ffn.0."), (r"^ffn\.net\.2\.", "ffn.2."),
]
_EMBEDDER_INVERSE = {
    "time_embedder.linear_1": "time_embedding.0", "time_embedder.linear_2": "time_embedding.2",
    "text_embedder.linear_1": "text_embedding.0", "text_embedder.linear_2": "text_embedding.2",
    "time_proj": "time_projection.1", "image_embedder.norm1": "img_emb.proj.0",
    "image_embedder.ff.net.0.proj": "img_emb.proj.1", "image_embedder.ff.net.2": "img_emb.proj.3",
    "image_embedder.norm2": "img_emb.proj.4",
}
_RES_INVERSE = {"conv1.weight": "conv1.0.weight", "conv1.act_fn.bias": "conv1.1.bias", "conv2.weight": "conv2.1.weight",
                "conv2.act_fn.bias": "conv2.2.bias", "conv_skip.weight": "skip.1.weight"}
_FACE_ADAPTER_INVERSE = {"to_q": "linear1_q", "to_out": "linear2", "norm_q": "q_norm", "norm_k": "k_norm"}
ME = "motion_encoder.enc.net_app.convs."


def _bias4(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)  # original motion-encoder biases are stored [1, C, 1, 1]


def _blur_kernel() -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = k[None, :] * k[:, None]
    return k / k.sum()


def transformer_to_original(state: dict[str, torch.Tensor], motion_res_blocks: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    kv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        if m := re.fullmatch(r"face_adapter\.(\d+)\.(to_k|to_v)\.(weight|bias)", key):
            kv.setdefault((m[1], m[3]), {})[m[2]] = t
            continue
        if m := re.fullmatch(r"face_adapter\.(\d+)\.(\w+)\.(weight|bias)", key):
            out[f"face_adapter.fuser_blocks.{m[1]}.{_FACE_ADAPTER_INVERSE[m[2]]}.{m[3]}"] = t
        elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
            rest = m[2]
            for pattern, repl in _BLOCK_INVERSE:
                rest = re.sub(pattern, repl, rest)
            out[f"blocks.{m[1]}.{rest}"] = t
        elif m := re.fullmatch(r"condition_embedder\.(.+)\.(weight|bias)", key):
            out[f"{_EMBEDDER_INVERSE[m[1]]}.{m[2]}"] = t
        elif key == "scale_shift_table":
            out["head.modulation"] = t
        elif m := re.fullmatch(r"proj_out\.(weight|bias)", key):
            out[f"head.head.{m[1]}"] = t
        elif key == "motion_encoder.motion_synthesis_weight":
            out["motion_encoder.dec.direction.weight"] = t
        elif key == "motion_encoder.conv_in.weight":
            out[ME + "0.0.weight"] = t
        elif key == "motion_encoder.conv_in.act_fn.bias":
            out[ME + "0.1.bias"] = _bias4(t)
        elif key == "motion_encoder.conv_out.weight":
            out[f"{ME}{motion_res_blocks + 1}.weight"] = t
        elif m := re.fullmatch(r"motion_encoder\.res_blocks\.(\d+)\.(.+)", key):
            new = _RES_INVERSE[m[2]]
            out[f"{ME}{int(m[1]) + 1}.{new}"] = _bias4(t) if new.endswith("bias") else t
        elif m := re.fullmatch(r"motion_encoder\.motion_network\.(\d+)\.(weight|bias)", key):
            out[f"motion_encoder.enc.fc.{m[1]}.{m[2]}"] = t
        elif m := re.fullmatch(r"face_encoder\.(conv1_local|conv2|conv3)\.(weight|bias)", key):
            out[f"face_encoder.{m[1]}.conv.{m[2]}"] = t
        elif re.fullmatch(r"(patch_embedding|pose_patch_embedding|face_encoder\.out_proj)\.(weight|bias)", key) or \
                key == "face_encoder.padding_tokens":
            out[key] = t
        else:
            raise KeyError(f"test inverse map misses {key}")
    for (index, kind), parts in kv.items():  # fused: K first, then V
        out[f"face_adapter.fuser_blocks.{index}.linear1_kv.{kind}"] = torch.cat([parts["to_k"], parts["to_v"]])
    for i in range(1, motion_res_blocks + 1):  # the constant blur buffers the original state dict carries
        out[f"{ME}{i}.conv2.0.kernel"] = _blur_kernel()
        out[f"{ME}{i}.skip.0.kernel"] = _blur_kernel()
    return out


_RESNET_INVERSE = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight",
                   "conv1.bias": "residual.2.bias", "norm2.gamma": "residual.3.gamma",
                   "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
                   "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}


def vae_to_original(state: dict[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    per_stage = num_res_blocks + 2  # decoder: (num_res_blocks + 1) residual blocks + 1 resampler per stage
    for key, t in state.items():
        if m := re.fullmatch(r"(encoder|decoder)\.conv_in\.(.+)", key):
            new = f"{m[1]}.conv1.{m[2]}"
        elif m := re.fullmatch(r"(post_quant_conv|quant_conv)\.(.+)", key):
            new = f"{'conv2' if m[1] == 'post_quant_conv' else 'conv1'}.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.norm_out\.gamma", key):
            new = f"{m[1]}.head.0.gamma"
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_out\.(.+)", key):
            new = f"{m[1]}.head.2.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
            new = f"{m[1]}.middle.{2 * int(m[2])}.{_RESNET_INVERSE[m[3]]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            new = f"{m[1]}.middle.1.{m[2]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
            new = f"encoder.downsamples.{m[1]}.{_RESNET_INVERSE.get(m[2], m[2])}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.upsamples.{int(m[1]) * per_stage + int(m[2])}.{_RESNET_INVERSE[m[3]]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.upsamples.{int(m[1]) * per_stage + num_res_blocks + 1}.{m[2]}"
        else:
            raise KeyError(f"test inverse map misses {key}")
        out[new] = t
    return out


def umt5_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    table = {"layer.0.layer_norm.weight": "norm1.weight", "layer.0.SelfAttention.q.weight": "attn.q.weight",
             "layer.0.SelfAttention.k.weight": "attn.k.weight", "layer.0.SelfAttention.v.weight": "attn.v.weight",
             "layer.0.SelfAttention.o.weight": "attn.o.weight",
             "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
             "layer.1.layer_norm.weight": "norm2.weight", "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
             "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
             "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight"}
    out = {}
    for key, t in state.items():
        if key in ("shared.weight", "encoder.embed_tokens.weight"):
            out["token_embedding.weight"] = t
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = t
        elif m := re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key):
            out[f"blocks.{m[1]}.{table[m[2]]}"] = t
        else:
            raise KeyError(key)
    return out


def clip_to_wan_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPVisionModel → Wan's XLMRobertaCLIP checkpoint (visual.* + an unused text tower and head)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    layer_table = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
                   "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}
    for key, t in state.items():
        key = key.removeprefix("vision_model.")
        if key == "embeddings.class_embedding":
            out["visual.cls_embedding"] = t.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = t.unsqueeze(0)
        elif key == "embeddings.patch_embedding.weight":
            out["visual.patch_embedding.weight"] = t
        elif m := re.fullmatch(r"(pre_layrnorm|post_layernorm)\.(weight|bias)", key):
            out[f"visual.{'pre_norm' if m[1] == 'pre_layrnorm' else 'post_norm'}.{m[2]}"] = t
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = t
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            out[f"visual.transformer.{m[1]}.{layer_table[m[2]]}.{m[3]}"] = t
        else:
            raise KeyError(key)
    for (layer, kind), parts in qkv.items():
        out[f"visual.transformer.{layer}.attn.to_qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    width = next(v for k, v in state.items() if k.endswith("pre_layrnorm.weight")).shape[0]
    out["visual.head"] = torch.randn(width, 8)  # contrastive head, text tower, temperature: present, unused
    out["textual.token_embedding.weight"] = torch.randn(5, 4)
    out["log_scale"] = torch.tensor(2.6)
    return out


# -------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def source():
    return noisy_tiny_models()


@pytest.fixture(scope="module")
def diffusers_dir(source, tmp_path_factory) -> Path:
    return write_diffusers_checkpoint(source, tmp_path_factory.mktemp("ckpt") / "diffusers")


def _write_original_transformer(root: Path, original: dict[str, torch.Tensor], shards: int = 2) -> None:
    keys = sorted(original)
    weight_map = {}
    for n in range(shards):
        name = f"diffusion_pytorch_model-{n + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: original[k].contiguous() for k in keys[n::shards]}
        save_file(part, str(root / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (root / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture(scope="module")
def original_dir(source, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt") / "original"
    root.mkdir()
    tr = TINY.transformer
    (root / "config.json").write_text(json.dumps({
        "_class_name": "WanAnimateModel", "dim": tr["num_attention_heads"] * tr["attention_head_dim"],
        "ffn_dim": tr["ffn_dim"], "num_heads": tr["num_attention_heads"], "num_layers": tr["num_layers"],
        "in_dim": tr["in_channels"], "out_dim": tr["out_channels"], "text_dim": tr["text_dim"],
        "freq_dim": tr["freq_dim"], "patch_size": tr["patch_size"]}))
    motion_blocks = len(source.transformer.motion_encoder.res_blocks)
    original = transformer_to_original(source.transformer.state_dict(), motion_blocks)
    _write_original_transformer(root, original)
    torch.save(vae_to_original(source.vae.state_dict(), TINY.vae["num_res_blocks"]), root / "Wan2.1_VAE.pth")
    torch.save(umt5_to_original(source.text_encoder.state_dict()), root / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(clip_to_wan_original(source.image_encoder.state_dict()),
               root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    write_tokenizer(root / "google" / "umt5-xxl")
    return root


# -------------------------------------------------------------------------------- exact loading


def _vae_outputs(vae: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    video = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(video).latent_dist.mode()
        return latents, vae.decode(torch.randn(latents.shape, generator=g)).sample


def _encoder_outputs(models) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(13)
    ids = torch.randint(3, VOCAB, (1, 20), generator=g)
    pixels = torch.randn(1, 3, 224, 224, generator=g)
    with torch.no_grad():
        text = models["text_encoder"](input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        image = models["image_encoder"](pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    return text, image


@pytest.fixture(scope="module")
def source_outputs(source):
    return {"transformer": tiny_transformer_output(source.transformer), "vae": _vae_outputs(source.vae),
            "encoders": _encoder_outputs({"text_encoder": source.text_encoder, "image_encoder": source.image_encoder})}


@pytest.mark.parametrize("layout", [DIFFUSERS, ORIGINAL])
def test_both_layouts_load_exactly_the_weights_they_were_made_from(layout, source, source_outputs, diffusers_dir,
                                                                   original_dir):
    root = diffusers_dir if layout == DIFFUSERS else original_dir
    assert detect_layout(root).kind == layout
    assert detect_layout(root).tokenizer_file is not None
    loaded = load_checkpoint(TINY, root, vocab_size=VOCAB)
    for name, module in loaded.items():
        want = getattr(source, name).state_dict()
        got = module.state_dict()
        assert sorted(got) == sorted(want), name
        for key in want:
            assert got[key].dtype == torch.float32 and torch.equal(got[key], want[key]), f"{layout} {name}.{key}"
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    # ... and the forward passes agree (non-persistent buffers such as RoPE and blur kernels included)
    assert relative_l2(tiny_transformer_output(loaded["transformer"]), source_outputs["transformer"]) <= 1e-6
    for got, want in zip(_vae_outputs(loaded["vae"]), source_outputs["vae"]):
        assert relative_l2(got, want) <= 1e-6
    for got, want in zip(_encoder_outputs(loaded), source_outputs["encoders"]):
        assert relative_l2(got, want) <= 1e-6


def test_build_reference_models_takes_a_checkpoint_and_a_lora(source, original_dir, tmp_path):
    from_checkpoint = build_reference_models(TINY, seed=5, vocab_size=VOCAB, checkpoint=original_dir)
    assert from_checkpoint.weights_hash() == source.weights_hash()  # the checkpoint's weights, not seed 5's
    lora, _ = _relight_style_lora(source.transformer, rank=4, default_infix=True)
    torch.save({"state_dict": lora}, tmp_path / "relighting_lora.ckpt")
    with_lora = build_reference_models(TINY, vocab_size=VOCAB, checkpoint=original_dir,
                                       lora=tmp_path / "relighting_lora.ckpt", lora_scale=0.5)
    assert with_lora.weights_hash() != source.weights_hash()
    assert torch.equal(with_lora.vae.decoder.conv_in.weight, source.vae.decoder.conv_in.weight)


@pytest.mark.parametrize("layout", [DIFFUSERS, ORIGINAL])
def test_a_load_of_some_components_reads_only_those(layout, source, diffusers_dir, original_dir, monkeypatch):
    """``--fast`` skips umT5 when every prompt is cached: the other components load exactly, umT5 stays structure
    on meta and its loader is never called."""
    import wan_trt.checkpoints as checkpoints

    root = diffusers_dir if layout == DIFFUSERS else original_dir
    for loader in ("load_diffusers_text_encoder", "load_original_text_encoder"):
        monkeypatch.setattr(checkpoints, loader, lambda *a, **k: pytest.fail("the text encoder was read"))
    loaded = load_checkpoint(TINY, root, vocab_size=VOCAB, components={"transformer", "vae", "image_encoder"})
    assert all(p.is_meta for p in loaded["text_encoder"].parameters())
    for name in ("transformer", "vae", "image_encoder"):
        want, got = getattr(source, name).state_dict(), loaded[name].state_dict()
        assert all(torch.equal(got[key], want[key]) for key in want), name
    assert sorted(loaded["text_encoder"].state_dict()) == sorted(source.text_encoder.state_dict())


def test_bf16_load_keeps_diffusers_fp32_modules(diffusers_dir):
    loaded = load_checkpoint(TINY, diffusers_dir, vocab_size=VOCAB, dtype=torch.bfloat16)
    state = loaded["transformer"].state_dict()
    assert state["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert state["blocks.0.scale_shift_table"].dtype == torch.float32  # _keep_in_fp32_modules, as from_pretrained
    assert state["blocks.0.norm2.weight"].dtype == torch.float32
    assert loaded["vae"].decoder.conv_in.weight.dtype == torch.bfloat16


# --------------------------------------------------------------------------- full size, on meta


def _meta_reference_transformer():
    from diffusers import WanAnimateTransformer3DModel

    config = dict(get_preset("animate-14b").transformer)
    config["patch_size"] = tuple(config["patch_size"])
    with torch.device("meta"):
        return WanAnimateTransformer3DModel(**config)


def test_full_size_diffusers_keys_cover_every_parameter_once():
    reference = _meta_reference_transformer().state_dict()
    model = empty_transformer(get_preset("animate-14b"))
    loader = StrictLoader(model, what="transformer")
    for key, tensor in reference.items():
        loader.put(key, tensor, "meta")
    loader.finish("meta")
    assert loader.loaded == set(loader.expected) and len(loader.expected) == len(reference) == 1443
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in reference.items()}
    with pytest.raises(BadInputError, match="blocks.39.attn1.to_q.weight.*provided twice"):
        loader.put("blocks.39.attn1.to_q.weight", reference["blocks.39.attn1.to_q.weight"], "meta")


def test_full_size_original_keys_map_to_every_parameter_once():
    reference = _meta_reference_transformer().state_dict()
    original = transformer_to_original(reference, motion_res_blocks=7)
    # 8 face adapters: to_k + to_v (weight, bias) fuse into linear1_kv; 7 residual blocks carry 2 blur kernels each
    assert len(original) == len(reference) - 2 * 8 + 14
    assert sum(k.endswith(".kernel") for k in original) == 14
    assert original["face_adapter.fuser_blocks.7.linear1_kv.weight"].shape == (2 * 5120, 5120)
    assert original[ME + "3.conv1.1.bias"].shape == (1, 128, 1, 1)  # 32→64→128: block 3 works at 128
    model = empty_transformer(get_preset("animate-14b"))
    seen: list[str] = []
    original_items = ((k, v, "meta") for k, v in original.items())
    load_original_transformer_tensors(model, (item for item in original_items if not seen.append(item[0])),
                                      source="meta")
    assert len(seen) == len(original)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in reference.items()}
    assert all(p.device.type == "meta" for p in model.parameters())  # every one assigned from the "file"

    # a blur kernel that is not the fixed [1, 3, 3, 1] one is refused (they are checked, not loaded)
    wrong_kernel = {**original, ME + "4.skip.0.kernel": _blur_kernel().flip(0) * 2}
    with pytest.raises(BadInputError, match=re.escape(ME + "4.skip.0.kernel") + "' differs"):
        load_original_transformer_tensors(empty_transformer(get_preset("animate-14b")),
                                          ((k, v, "meta") for k, v in wrong_kernel.items()), source="meta")

    # one key missing, or one extra, is an error naming it
    for broken, message in ((dict(list(original.items())[1:]), "missing"),
                            ({**original, "blocks.40.self_attn.q.weight": torch.empty(5120, 5120, device="meta")},
                             "blocks.40")):
        with pytest.raises(BadInputError, match=message):
            load_original_transformer_tensors(empty_transformer(get_preset("animate-14b")),
                                              ((k, v, "meta") for k, v in broken.items()), source="meta")


# ---------------------------------------------------------------------------------------- LoRA


_TARGETS = [("blocks.0.self_attn.q", "blocks.0.attn1.to_q"), ("blocks.3.cross_attn.k_img", "blocks.3.attn2.add_k_proj"),
            ("blocks.9.ffn.0", "blocks.9.ffn.net.0.proj"), ("blocks.1.ffn.2", "blocks.1.ffn.net.2"),
            ("blocks.2.cross_attn.o", "blocks.2.attn2.to_out.0"), ("blocks.5.self_attn.v", "blocks.5.attn1.to_v"),
            ("blocks.7.cross_attn.v_img", "blocks.7.attn2.add_v_proj")]


def _relight_style_lora(transformer, rank: int, default_infix: bool, prefix: str = ""):
    """Random PEFT-style LoRA with original Wan names; returns (state dict, {diffusers name: (A, B)})."""
    g = torch.Generator().manual_seed(21)
    infix = ".default" if default_infix else ""
    modules = dict(transformer.named_modules())
    state, factors = {}, {}
    for original, diffusers_name in _TARGETS:
        out_features, in_features = modules[diffusers_name].weight.shape
        a = torch.randn(rank, in_features, generator=g) * 0.3
        b = torch.randn(out_features, rank, generator=g) * 0.3
        state[f"{prefix}{original}.lora_A{infix}.weight"] = a
        state[f"{prefix}{original}.lora_B{infix}.weight"] = b
        factors[diffusers_name] = (a, b)
    return state, factors


def test_merged_lora_equals_running_the_lora_unmerged(source, tmp_path):
    rank, scale = 4, 0.7
    state, factors = _relight_style_lora(source.transformer, rank, default_infix=True)
    torch.save({"state_dict": state}, tmp_path / "relighting_lora.ckpt")
    merged = copy.deepcopy(source.transformer)
    report = merge_lora(merged, load_lora_file(tmp_path / "relighting_lora.ckpt"), scale)
    assert sorted(report.targets) == sorted(f"{name}.weight" for name in factors) and report.pairs == len(factors)

    # per Linear: merged W x + b == W x + b + scale · B (A x)
    base_modules, merged_modules = dict(source.transformer.named_modules()), dict(merged.named_modules())
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    for name, (a, b) in factors.items():
        x_in = x[:, : base_modules[name].in_features] if base_modules[name].in_features <= 32 else \
            torch.randn(5, base_modules[name].in_features)
        want = base_modules[name](x_in) + scale * ((x_in @ a.T) @ b.T)
        assert relative_l2(merged_modules[name](x_in), want) <= 1e-5, name

    # whole DiT: merged weights == the unmerged LoRA branches added at run time (forward hooks)
    def lora_hook(a, b):
        return lambda module, inputs, output: output + scale * ((inputs[0] @ a.T) @ b.T)

    handles = [base_modules[name].register_forward_hook(lora_hook(a, b)) for name, (a, b) in factors.items()]
    try:
        want = tiny_transformer_output(source.transformer)
    finally:
        for handle in handles:
            handle.remove()
    got = tiny_transformer_output(merged)
    assert relative_l2(got, want) <= 1e-5
    assert relative_l2(got, tiny_transformer_output(source.transformer)) > 1e-4  # the LoRA did change the output
    untouched = set(source.transformer.state_dict()) - {f"{n}.weight" for n in factors}
    assert all(torch.equal(merged.state_dict()[k], source.transformer.state_dict()[k]) for k in untouched)


def test_lora_scale_zero_is_the_base_and_alpha_scales(source, tmp_path):
    state, factors = _relight_style_lora(source.transformer, rank=4, default_infix=False, prefix="base_model.model.")
    zero = copy.deepcopy(source.transformer)
    merge_lora(zero, state, 0.0)
    assert all(torch.equal(v, source.transformer.state_dict()[k]) for k, v in zero.state_dict().items())

    # PEFT folder: adapter_model.safetensors + adapter_config.json with lora_alpha = 2 r → factor 2
    folder = tmp_path / "relighting_lora"
    folder.mkdir()
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    doubled, explicit = copy.deepcopy(source.transformer), copy.deepcopy(source.transformer)
    merge_lora(doubled, folder, 1.0)
    merge_lora(explicit, state, 2.0)
    for name in factors:
        assert torch.allclose(doubled.get_submodule(name).weight, explicit.get_submodule(name).weight, atol=1e-6)
        assert not torch.equal(doubled.get_submodule(name).weight, source.transformer.get_submodule(name).weight)


def test_lora_with_unknown_keys_is_refused_before_anything_changes(source, tmp_path):
    state, _ = _relight_style_lora(source.transformer, rank=4, default_infix=True)
    model = copy.deepcopy(source.transformer)
    for bad in ({"unet.down_blocks.0.attn.to_q.lora_A.default.weight": torch.zeros(4, 32)},
                {"blocks.0.self_attn.norm_q.lora_A.default.weight": torch.zeros(4, 24)},  # not a Linear
                {"face_adapter.fuser_blocks.0.linear1_kv.lora_A.default.weight": torch.zeros(4, 24)}):
        with pytest.raises(BadInputError, match="1 of its 15 keys map to no parameter"):
            merge_lora(model, {**state, **bad}, 1.0)
    broken = dict(state)
    broken.pop("blocks.9.ffn.0.lora_B.default.weight")
    with pytest.raises(BadInputError, match="'blocks.9.ffn.0.lora_A.default.weight' has no up weight"):
        merge_lora(model, broken, 1.0)
    wrong_rank = {**state, "blocks.0.self_attn.q.lora_B.default.weight": torch.zeros(24, 3)}
    with pytest.raises(BadInputError, match="does not fit 'blocks.0.attn1.to_q.weight'"):
        merge_lora(model, wrong_rank, 1.0)
    assert all(torch.equal(v, source.transformer.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(BadInputError, match="unknown LoRA file type"):
        (tmp_path / "lora.txt").write_text("x")
        load_lora_file(tmp_path / "lora.txt")
    assert parse_lora_arg("/data/relighting_lora.ckpt:0.5") == ("/data/relighting_lora.ckpt", 0.5)
    assert parse_lora_arg("relighting_lora.ckpt") == ("relighting_lora.ckpt", 1.0)


# --------------------------------------------------------------------------------- broken files


def _copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / root.name))


def test_missing_shard_listed_in_the_index(diffusers_dir, original_dir, tmp_path):
    for root, folder in ((diffusers_dir, "transformer"), (original_dir, ".")):
        copy_root = _copy(root, tmp_path / root.name)
        shard = sorted((copy_root / folder).glob("diffusion_pytorch_model-*.safetensors"))[1]
        shard.unlink()
        with pytest.raises(BadInputError, match=re.escape(str(shard)) + ".*missing"):
            load_checkpoint(TINY, copy_root, vocab_size=VOCAB)


def test_truncated_safetensors_file(diffusers_dir, original_dir, tmp_path):
    for root, relative in ((diffusers_dir, "vae/diffusion_pytorch_model.safetensors"),
                           (original_dir, "diffusion_pytorch_model-00002-of-00002.safetensors")):
        copy_root = _copy(root, tmp_path / root.name)
        path = copy_root / relative
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
        with pytest.raises(BadInputError, match=re.escape(str(path)) + ": truncated"):
            load_checkpoint(TINY, copy_root, vocab_size=VOCAB)


def test_checkpoint_of_another_model(original_dir, diffusers_dir, tmp_path):
    other = _copy(original_dir, tmp_path)
    for file in other.glob("diffusion_pytorch_model*"):
        file.unlink()
    unrelated = torch.nn.Linear(4, 3).state_dict()
    save_file(unrelated, str(other / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(BadInputError, match=re.escape(str(other / "diffusion_pytorch_model.safetensors"))
                       + ".*not a Wan-Animate transformer"):
        load_checkpoint(TINY, other, vocab_size=VOCAB)

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    save_file(unrelated, str(lonely / "model.safetensors"))
    with pytest.raises(BadInputError, match=re.escape(str(lonely)) + ": not a Wan2.2-Animate-14B checkpoint"):
        load_checkpoint(TINY, lonely, vocab_size=VOCAB)

    wrong_vae = _copy(original_dir, tmp_path / "vae")
    torch.save({"encoder.conv1.weight": torch.zeros(3)}, wrong_vae / "Wan2.1_VAE.pth")
    with pytest.raises(BadInputError, match=re.escape(str(wrong_vae / "Wan2.1_VAE.pth")) + ": not a Wan2.1 VAE"):
        load_checkpoint(TINY, wrong_vae, vocab_size=VOCAB)

    pipeline = _copy(diffusers_dir, tmp_path / "pipe")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    with pytest.raises(BadInputError, match="WanImageToVideoPipeline"):
        load_checkpoint(TINY, pipeline, vocab_size=VOCAB)

    # the right model at another size: the config says so before anything is read
    with pytest.raises(BadInputError, match=r"config.json: .*preset 'animate-14b' expects"):
        load_checkpoint(get_preset("animate-14b"), diffusers_dir, vocab_size=256384)


def test_missing_component_or_weight_or_extra_weight(diffusers_dir, original_dir, tmp_path):
    no_clip = _copy(diffusers_dir, tmp_path / "a")
    shutil.rmtree(no_clip / "image_encoder")
    with pytest.raises(BadInputError, match=re.escape(str(no_clip / "image_encoder")) + "/: download"):
        load_checkpoint(TINY, no_clip, vocab_size=VOCAB)

    no_t5 = _copy(original_dir, tmp_path / "b")
    (no_t5 / "models_t5_umt5-xxl-enc-bf16.pth").unlink()
    with pytest.raises(BadInputError, match=re.escape(str(no_t5 / "models_t5_umt5-xxl-enc-bf16.pth"))):
        load_checkpoint(TINY, no_t5, vocab_size=VOCAB)

    from safetensors.torch import load_file

    for edit, message in ((lambda s: s.pop("encoder.conv_in.weight"), r"missing \['encoder.conv_in.weight'\]"),
                          (lambda s: s.update(extra=torch.zeros(2)), r"not part of AutoencoderKLWan: \['extra'\]")):
        broken = _copy(diffusers_dir, tmp_path / f"vae-{len(message)}")
        path = broken / "vae" / "diffusion_pytorch_model.safetensors"
        state = load_file(str(path))
        edit(state)
        save_file(state, str(path))
        with pytest.raises(BadInputError, match=re.escape(str(broken / "vae")) + ".*" + message):
            load_checkpoint(TINY, broken, vocab_size=VOCAB)

    extra = _copy(diffusers_dir, tmp_path / "tr")
    shard = sorted((extra / "transformer").glob("*.safetensors"))[0]
    state = load_file(str(shard))
    state["blocks.0.attn1.to_z.weight"] = torch.zeros(2)
    save_file(state, str(shard))
    with pytest.raises(BadInputError, match=re.escape(str(shard)) + ": 'blocks.0.attn1.to_z.weight' is not a weight"):
        load_checkpoint(TINY, extra, vocab_size=VOCAB)

    t5 = _copy(original_dir, tmp_path / "t5")
    state = torch.load(t5 / "models_t5_umt5-xxl-enc-bf16.pth")
    state["blocks.0.attn.q.weight"] = state["blocks.0.attn.q.weight"][:, :-1]
    torch.save(state, t5 / "models_t5_umt5-xxl-enc-bf16.pth")
    with pytest.raises(BadInputError, match=r"'blocks.0.attn.q.weight' \(→ 'encoder.block.0.layer.0.SelfAttention"
                                            r".q.weight'\) has shape"):
        load_checkpoint(TINY, t5, vocab_size=VOCAB)


@pytest.mark.slow
def test_cli_build_from_a_checkpoint_with_a_lora_and_run_it(source, diffusers_dir, tmp_path):
    """wan-trt build --checkpoint DIR --lora PATH:SCALE: the engines record both, the torch backend
    rebuilds exactly those weights (hash-checked), and infer runs end to end."""
    from click.testing import CliRunner

    from wan_trt.cli import main
    from wan_trt.demo_media import make_demo_inputs
    from wan_trt.runtime.loading import torch_engines
    from wan_trt.runtime.manifest import read_manifest

    lora, _ = _relight_style_lora(source.transformer, rank=4, default_infix=True)
    torch.save({"state_dict": lora}, tmp_path / "relighting_lora.ckpt")
    out = tmp_path / "engines"
    result = CliRunner().invoke(main, ["build", "--checkpoint", str(diffusers_dir), "--lora",
                                       f"{tmp_path / 'relighting_lora.ckpt'}:0.5", "--out", str(out), "--no-verify"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert [record["scale"] for record in manifest.loras] == [0.5] and manifest.checkpoint == str(diffusers_dir.resolve())
    assert manifest.weights_hash != source.weights_hash()  # the LoRA is merged
    torch_engines(manifest)  # raises if the rebuilt reference weights differ from the engines'
    inputs = make_demo_inputs(tmp_path / "in", width=48, height=32, num_frames=5)
    result = CliRunner().invoke(main, ["infer", "--engines", str(out), "--input", str(inputs), "--out",
                                       str(tmp_path / "a.mp4"), "--steps", "2", "--segment-frames", "5",
                                       "--compare", "torch"])
    assert result.exit_code == 0, result.output
