"""Every exported graph in ONNX Runtime (CPU) equals its PyTorch module, at two shapes from one file;
and the export-friendly modules equal the untouched diffusers/transformers references."""

from __future__ import annotations

import pytest
import torch

from conftest import as_torch, fresh_reference_models
from wan_trt.components import segment_sizes
from wan_trt.metrics import relative_l2

TOLERANCE = 1e-4

# Two different (frames, height, width, batch) per graph: frames and H×W both change.
SHAPES = [segment_sizes(9, 32, 48, batch=1), segment_sizes(21, 64, 32, batch=2, face_frames=7)]
SHAPES[1]["L"] = 40  # the text encoder also varies its token count


@pytest.mark.parametrize("graph", [
    "text_encoder", "image_encoder", "vae_encoder_first", "vae_encoder_step",
    "vae_decoder_first", "vae_decoder_step", "motion_encoder", "transformer",
])
def test_onnx_in_ort_equals_pytorch_at_two_shapes(graph, ort_engines, torch_engines_):
    spec = ort_engines[graph].spec
    for index, sizes in enumerate(SHAPES):
        feed = as_torch(spec.sample_inputs(sizes, seed=100 + index))
        got = ort_engines[graph].run(feed)
        want = torch_engines_[graph].run(feed)
        for name in spec.output_names:
            assert got[name].shape == want[name].shape == spec.outputs[spec.output_names.index(name)].shape(sizes)
            error = relative_l2(got[name], want[name])
            assert error <= TOLERANCE, f"{graph}.{name} at {sizes}: rel-L2 {error:.2e}"


def test_transformer_and_motion_graphs_equal_the_diffusers_forward(torch_engines_):
    """Motion encoder graph + DiT graph == WanAnimateTransformer3DModel(face_pixel_values=...)."""
    reference = fresh_reference_models().transformer
    spec = torch_engines_["transformer"].spec
    sizes = segment_sizes(13, 48, 32)
    feed = as_torch(spec.sample_inputs(sizes, seed=7))
    face = torch.rand(1, 3, 13, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    motion = torch_engines_["motion_encoder"].run({"face_pixels": face[0].transpose(0, 1)})["motion_vectors"]
    feed["motion_vectors"] = motion.unsqueeze(0)
    got = torch_engines_["transformer"].run(feed)["velocity"]
    with torch.no_grad():
        want = reference(hidden_states=feed["latent_input"], timestep=feed["timestep"],
                         encoder_hidden_states=feed["text_embeds"], encoder_hidden_states_image=feed["image_embeds"],
                         pose_hidden_states=feed["pose_latents"], face_pixel_values=face, return_dict=False)[0]
    assert relative_l2(got, want) <= 1e-5


def test_text_graph_zeroes_padding_like_the_reference_pipeline(torch_engines_):
    """The reference trims the umT5 output to the prompt's tokens and zero-pads to 512."""
    reference = fresh_reference_models().text_encoder
    ids = torch.zeros(1, 512, dtype=torch.int64)
    ids[0, :6] = torch.tensor([14, 15, 40, 41, 42, 1])
    mask = (ids > 0).to(torch.int64)
    mask[0, 5] = 1
    got = torch_engines_["text_encoder"].run({"input_ids": ids, "attention_mask": mask})["text_embeds"]
    with torch.no_grad():
        full = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.count_nonzero(got[0, 6:]) == 0
    assert relative_l2(got[0, :6], full[0, :6]) <= 1e-6


def test_image_graph_is_the_penultimate_clip_layer(torch_engines_):
    reference = fresh_reference_models().image_encoder
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    got = torch_engines_["image_encoder"].run({"clip_pixels": pixels})["image_embeds"]
    with torch.no_grad():
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert relative_l2(got, hidden[-2]) <= 1e-6
    assert relative_l2(got, hidden[-1]) > 1e-3  # and not the last one


def test_exported_files_pass_onnx_checker(tiny_engines, manifest):
    import onnx

    for entry in manifest.graphs.values():
        model = onnx.load(str(tiny_engines / entry.file))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version >= 19
        ops = {node.op_type for node in model.graph.node}
        assert not ops & {"SplitToSequence", "SequenceAt", "ScatterND"}, f"{entry.file}: {ops}"
