"""One casting rule (``wan_trt.dtypes``) for the reference models, the exported graphs and the fast path."""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_reference_models

from wan_trt.dtypes import cast_floats, keeps_fp32


def test_keep_names_match_whole_components_only():
    keep = ("norm2", "wo")
    assert keeps_fp32("blocks.0.norm2.weight", keep) and keeps_fp32("encoder.block.1.layer.1.DenseReluDense.wo.weight", keep)
    assert not keeps_fp32("blocks.0.prenorm2.weight", keep) and not keeps_fp32("word_embeddings", keep)


def test_cast_floats_keeps_named_tensors_and_leaves_integers_and_quantized_ones():
    model = fresh_reference_models().transformer
    model.register_buffer("index", torch.arange(4))
    model.register_buffer("codes", torch.zeros(4, dtype=torch.float8_e4m3fn))
    keep = tuple(model._keep_in_fp32_modules)
    cast_floats(model, torch.bfloat16, keep)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in ("index", "codes"):
            continue
        assert tensor.dtype == (torch.float32 if keeps_fp32(name, keep) else torch.bfloat16), name
    assert model.index.dtype == torch.int64 and model.codes.dtype == torch.float8_e4m3fn
    assert model.blocks[0].scale_shift_table.dtype == torch.float32
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_cast_floats_keeps_tied_weights_tied_and_parameters_themselves():
    text = fresh_reference_models().text_encoder
    shared = text.shared.weight
    assert text.encoder.embed_tokens.weight is shared
    cast_floats(text, torch.bfloat16, device="cpu")
    assert text.shared.weight is shared and text.encoder.embed_tokens.weight is shared
    assert shared.dtype == torch.bfloat16


def test_skip_prefixes_and_fp32_modules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    cast_floats(model, torch.float16, skip=("0.",), fp32_modules={"1"})
    assert [m.weight.dtype for m in model] == [torch.float32, torch.float32, torch.float16]


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_whole_name_matching_equals_the_substring_rule_the_fast_path_used(component):
    """The fast path matched keep names as substrings; on the real modules' names the two rules agree."""
    module = getattr(fresh_reference_models(), component)
    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    assert keep
    names = [name for name, _ in [*module.named_parameters(), *module.named_buffers()]]
    assert [keeps_fp32(n, keep) for n in names] == [any(k in n for k in keep) for n in names]
