"""Every graph of the deployed model, declared once: one :class:`Graph` entry per exported graph.

An entry holds what the rest of the package needs to know about a graph: its tensors (``io``, turned
into a :class:`~wan_trt.components.GraphSpec` by :func:`graph_specs`), whether classifier-free
guidance batches it, whether TensorRT builds it per shape bucket, which float build precisions it
follows, its tolerance once Q/DQ, and whose parameters it holds. The torch module that computes it
is the one thing kept out (it needs diffusers): ``wan_trt.models.graphs.GRAPH_FACTORIES`` holds one
factory per entry, keyed by the same names.

Graph names are written out here only (and in the pipeline's calls, ``wan_trt.runtime.pipeline``);
other modules use the constants below (``tests/test_registry.py`` fails otherwise). Four graphs
share their name with a part of the model they come from (``transformer``, ``text_encoder``,
``image_encoder``: checkpoint components, ``wan_trt.presets.Component``; ``motion_encoder``: the DiT's
sub-module): where code means the component, it says ``Component.…``, not the graph constant.

This module needs numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from wan_trt.components import (
    CACHE_INPUT_PREFIX,
    CACHE_OUTPUT_PREFIX,
    CacheSlot,
    GraphSpec,
    TensorSpec,
    vae_cache_specs,
)
from wan_trt.presets import CLIP_IMAGE_SIZE, TEXT_TOKENS, Component, Preset

TEXT_ENCODER = "text_encoder"
IMAGE_ENCODER = "image_encoder"
VAE_ENCODER_FIRST = "vae_encoder_first"
VAE_ENCODER_STEP = "vae_encoder_step"
VAE_DECODER_FIRST = "vae_decoder_first"
VAE_DECODER_STEP = "vae_decoder_step"
MOTION_ENCODER = "motion_encoder"
TRANSFORMER = "transformer"

# Tolerances (rel-L2 per graph output) of the engines vs the PyTorch reference (``--compare torch``).
COMPONENT_TOLERANCE = 1e-4  # fp32 engines vs PyTorch, every graph
QDQ_TOLERANCE = 1e-3  # a Q/DQ graph in ORT vs the same quantization simulated in PyTorch
# A Q/DQ VAE decoder in ORT vs its fake-quant module, end to end: proven equal layer by layer at build
# time, but an input within float rounding of a quantization boundary takes the neighbouring code on
# one side, and through ~20 quantized convs those one-step differences compound (5e-2 seen, INT8).
VAE_QDQ_TOLERANCE = 1e-1
EVERY_QUANTIZED_BUILD = "*"  # ``Graph.quantized_by``: Q/DQ in every fp8/int8 build (the DiT)
VAE_DECODER_CONVS = "vae_decoder_convs"  # the policy's (and the manifest record's) switch for the VAE decoder's convs


@dataclass(frozen=True)
class SpecSizes:
    """What a graph's tensor declarations are built from: the preset, the streamed VAE's cache layouts
    (read off the VAE at export time) and the tokenizer's vocabulary."""

    preset: Preset
    encoder_caches: list[CacheSlot]
    decoder_caches: list[CacheSlot]
    vocab_size: int

    @property
    def latent(self) -> tuple[str, str]:
        return ("2*h2", "2*w2")

    @property
    def pixels(self) -> tuple[str, str]:
        return ("16*h2", "16*w2")

    @property
    def z(self) -> int:
        return self.preset.latent_channels

    @property
    def clip_tokens(self) -> int:
        """CLIP's CLS token and patches."""
        return (CLIP_IMAGE_SIZE // int(self.preset.image_encoder["patch_size"])) ** 2 + 1

    @property
    def motion_dim(self) -> int:
        return int(self.preset.transformer["motion_encoder_dim"])


@dataclass(frozen=True)
class Io:
    """A graph's own inputs and outputs (a streamed VAE graph's caches are added by :meth:`Graph.spec`)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    vocab_size: int = 0


@dataclass(frozen=True)
class Parameters:
    """Whose parameters a graph holds: a checkpoint component, or some of its sub-modules (``parts``,
    attribute names), less ``excluding`` (sub-modules another graph holds)."""

    component: str
    parts: tuple[str, ...] = ()
    excluding: tuple[str, ...] = ()


@dataclass(frozen=True)
class Graph:
    """One exported graph (one ONNX file; one TensorRT engine, or one per bucket)."""

    name: str
    component: str  # the part of the model it computes (``GraphSpec.component``, recorded in the manifest)
    doc: str
    io: Callable[[SpecSizes], Io]
    parameters: Parameters
    #: Batch 2 with classifier-free guidance (the TensorRT profile's largest batch); others run batch 1.
    batched: bool = False
    #: One static-shape TensorRT engine per shape bucket (its shapes depend on the video's size or length;
    #: ``wan_trt.buckets.is_bucketed`` reads the same off the spec, and a test checks the two agree).
    bucketed: bool = False
    #: The float build precisions (fp16/bf16) the graph is exported in; under any other it stays fp32.
    half_precisions: tuple[str, ...] = ()
    #: When the graph is Q/DQ: ``EVERY_QUANTIZED_BUILD``, or the key of the manifest's quantization record
    #: that says so; and its ``--compare`` tolerance then. None: never quantized (``COMPONENT_TOLERANCE``).
    quantized_by: str | None = None
    qdq_tolerance: float = COMPONENT_TOLERANCE
    #: Streamed VAE graphs: ``"encoder"`` / ``"decoder"`` (whose cache layout), and whether this is the
    #: first chunk's graph (no cache inputs; it starts the caches).
    vae_side: str | None = None
    first_chunk: bool = False
    #: Called once per video before the DiT (its module may wait on the host between calls).
    once_per_video: bool = False

    def spec(self, sizes: SpecSizes) -> GraphSpec:
        """The graph's declaration: tensor names, dtypes, symbolic dims."""
        io = self.io(sizes)
        inputs, outputs, pairs = io.inputs, io.outputs, ()
        if self.vae_side is not None:
            slots = sizes.encoder_caches if self.vae_side == "encoder" else sizes.decoder_caches
            cache_in = vae_cache_specs(CACHE_INPUT_PREFIX, slots)
            cache_out = vae_cache_specs(CACHE_OUTPUT_PREFIX, slots)
            outputs = outputs + tuple(cache_out)
            if not self.first_chunk:
                inputs = inputs + tuple(cache_in)
                pairs = tuple((i.name, o.name) for i, o in zip(cache_in, cache_out))
        return GraphSpec(name=self.name, component=self.component, inputs=inputs, outputs=outputs, doc=self.doc,
                         vocab_size=io.vocab_size, cache_pairs=pairs)

    def dtype(self, precision: str) -> str:
        """The float type the graph is exported in at a float build ``precision``."""
        return precision if precision in self.half_precisions else "fp32"

    def is_quantized(self, quantization: Mapping) -> bool:
        """Whether the graph is Q/DQ in engines with this manifest quantization record (empty: none)."""
        if self.quantized_by is None or not quantization:
            return False
        return self.quantized_by == EVERY_QUANTIZED_BUILD or bool(quantization.get(self.quantized_by))


def _text_encoder(s: SpecSizes) -> Io:
    return Io(
        inputs=(TensorSpec("input_ids", "int64", ("B", "L"), "tokens"),
                TensorSpec("attention_mask", "int64", ("B", "L"), "mask")),
        outputs=(TensorSpec("text_embeds", "float32", ("B", "L", int(s.preset.text_encoder["d_model"]))),),
        vocab_size=s.vocab_size,
    )


def _image_encoder(s: SpecSizes) -> Io:
    return Io(
        inputs=(TensorSpec("clip_pixels", "float32", ("B", 3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE)),),
        outputs=(TensorSpec("image_embeds", "float32",
                            ("B", s.clip_tokens, int(s.preset.image_encoder["hidden_size"]))),),
    )


def _vae_encoder(frames: int) -> Callable[[SpecSizes], Io]:
    def io(s: SpecSizes) -> Io:
        return Io(inputs=(TensorSpec("video", "float32", ("B", 3, frames, *s.pixels), "pixels"),),
                  outputs=(TensorSpec("latents", "float32", ("B", s.z, 1, *s.latent)),))
    return io


def _vae_decoder(frames: int) -> Callable[[SpecSizes], Io]:
    def io(s: SpecSizes) -> Io:
        return Io(inputs=(TensorSpec("latents", "float32", ("B", s.z, 1, *s.latent)),),
                  outputs=(TensorSpec("video", "float32", ("B", 3, frames, *s.pixels)),))
    return io


def _motion_encoder(s: SpecSizes) -> Io:
    face = s.preset.face_size
    return Io(inputs=(TensorSpec("face_pixels", "float32", ("N", 3, face, face), "pixels"),),
              outputs=(TensorSpec("motion_vectors", "float32", ("N", s.motion_dim)),))


def _transformer(s: SpecSizes) -> Io:
    tr = s.preset.transformer
    return Io(
        inputs=(
            TensorSpec("latent_input", "float32", ("B", int(tr["in_channels"]), "F+1", *s.latent)),
            TensorSpec("timestep", "float32", ("B",), "timestep"),
            TensorSpec("text_embeds", "float32", ("B", TEXT_TOKENS, int(tr["text_dim"]))),
            TensorSpec("image_embeds", "float32", ("B", s.clip_tokens, int(tr["image_dim"]))),
            TensorSpec("pose_latents", "float32", ("B", s.z, "F", *s.latent)),
            TensorSpec("motion_vectors", "float32", ("B", "4*F-3", s.motion_dim)),
        ),
        outputs=(TensorSpec("velocity", "float32", ("B", int(tr["out_channels"]), "F+1", *s.latent)),),
    )


_VAE_ENCODER = Parameters(Component.VAE, parts=("encoder", "quant_conv"))
_VAE_DECODER = Parameters(Component.VAE, parts=("decoder", "post_quant_conv"))

#: The graphs, in the order the pipeline first uses them.
GRAPHS: dict[str, Graph] = {g.name: g for g in (
    Graph(
        name=TEXT_ENCODER, component="text_encoder", io=_text_encoder,
        doc="umT5 encoder; padded positions are zeroed as the reference pipeline does",
        parameters=Parameters(Component.TEXT_ENCODER), batched=True, once_per_video=True,
        half_precisions=("bf16",),  # umT5 overflows in fp16
    ),
    Graph(
        name=IMAGE_ENCODER, component="image_encoder", io=_image_encoder,
        doc="CLIP vision tower, penultimate layer's hidden states (CLS + patches)",
        parameters=Parameters(Component.IMAGE_ENCODER), once_per_video=True,  # fp32, as the official recipe
    ),
    # The VAE is all convolutions (no bf16 Conv before opset 22) and unproven in fp16 with real weights: fp32.
    Graph(
        name=VAE_ENCODER_FIRST, component="vae_encoder", io=_vae_encoder(1),
        doc="first chunk (1 frame) → its normalised latent and the caches",
        parameters=_VAE_ENCODER, bucketed=True, vae_side="encoder", first_chunk=True,
    ),
    Graph(
        name=VAE_ENCODER_STEP, component="vae_encoder", io=_vae_encoder(4),
        doc="every later chunk (4 frames) → one normalised latent frame",
        parameters=_VAE_ENCODER, bucketed=True, vae_side="encoder",
    ),
    Graph(
        name=VAE_DECODER_FIRST, component="vae_decoder", io=_vae_decoder(1),
        doc="first latent frame → 1 pixel frame in [-1, 1] and the caches",
        parameters=_VAE_DECODER, bucketed=True, vae_side="decoder", first_chunk=True,
        quantized_by=VAE_DECODER_CONVS, qdq_tolerance=VAE_QDQ_TOLERANCE,
    ),
    Graph(
        name=VAE_DECODER_STEP, component="vae_decoder", io=_vae_decoder(4),
        doc="every later latent frame → 4 pixel frames in [-1, 1]",
        parameters=_VAE_DECODER, bucketed=True, vae_side="decoder",
        quantized_by=VAE_DECODER_CONVS, qdq_tolerance=VAE_QDQ_TOLERANCE,
    ),
    Graph(
        name=MOTION_ENCODER, component="motion_encoder", io=_motion_encoder,
        doc="face crops → motion vectors (the QR of the motion basis is precomputed from the weights)",
        parameters=Parameters(Component.TRANSFORMER, parts=("motion_encoder",)),
        half_precisions=("fp16",),  # its convs are custom (no bf16 Conv before opset 22): fp32 under bf16
    ),
    Graph(
        name=TRANSFORMER, component="transformer", io=_transformer,
        doc="DiT with pose patch embedding, face encoder and face blocks → flow velocity",
        parameters=Parameters(Component.TRANSFORMER, excluding=("motion_encoder",)),  # the motion encoder's own graph
        batched=True, bucketed=True, half_precisions=("fp16", "bf16"),
        quantized_by=EVERY_QUANTIZED_BUILD, qdq_tolerance=QDQ_TOLERANCE,
    ),
)}
GRAPH_NAMES = tuple(GRAPHS)


def graph_specs(preset: Preset, encoder_caches: list[CacheSlot], decoder_caches: list[CacheSlot],
                vocab_size: int) -> dict[str, GraphSpec]:
    """All graphs of a preset, keyed by graph name, in the order the pipeline first uses them."""
    sizes = SpecSizes(preset, encoder_caches, decoder_caches, vocab_size)
    return {name: graph.spec(sizes) for name, graph in GRAPHS.items()}


def graph_dtype(name: str, precision: str) -> str:
    """The float type a graph is exported in at build ``precision`` (fp32 under fp32, fp8 or int8 and for an
    unknown name; a quantized build's ``--high-precision`` is the float precision to ask about)."""
    graph = GRAPHS.get(name)
    return graph.dtype(precision) if graph is not None else "fp32"


def graph_tolerances(quantization: Mapping | None) -> dict[str, float]:
    """``--compare`` tolerances of the Q/DQ graphs of engines with this quantization record (others:
    ``COMPONENT_TOLERANCE``)."""
    return {name: graph.qdq_tolerance for name, graph in GRAPHS.items() if graph.is_quantized(quantization or {})}
