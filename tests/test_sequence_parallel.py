"""Ulysses sequence parallelism (``wan_trt.runtime.sequence_parallel``) on CPU over gloo, 2 and 4 processes.

Each worker process builds the same seeded DiT, wraps it and runs it on the same seeded inputs; its
output must equal the single-process DiT's (fp32, rel-L2 ≤ 1e-5). The all-to-all and the final
gather are also checked on their own against slices of one full tensor (exact: they move data).
The tiny preset has 2 attention heads, so these tests use a variant with 4 (declared below).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from wan_trt.runtime.sequence_parallel import (
    TokenLayout,
    check_world_size,
    shard_tokens,
)

from wan_trt.errors import BadInputError
from wan_trt.metrics import psnr, relative_l2
from wan_trt.presets import get_preset

# the tiny DiT with 4 attention heads (tiny has 2) so that 2 and 4 ranks divide them; the CLIP K/V width follows
SP_TRANSFORMER = {**get_preset("tiny").transformer, "num_attention_heads": 4, "added_kv_proj_dim": 48}

# (batch, latent frames F of the video, latent height, latent width): tokens = (F+1)·(h/2)·(w/2)
CASES = {
    "cfg_batch_frames_straddle_ranks": (2, 4, 6, 8),  # 60 tokens of 12 per frame: rank slices cut frames
    "tokens_not_divisible": (1, 4, 6, 10),  # 75 tokens: padded to 76, 2 and 4 ranks
}


BF16_CASE = (2, 4, 6, 10)  # bf16 DiT (a half-precision graph around the fp32 one), padded tokens, batch 2
FP8_CASE = (1, 4, 6, 10)  # the fake-quant FP8 self-attention of a quantized reference, padded tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graph():
    from diffusers import WanAnimateTransformer3DModel
    from wan_trt.models.graphs import TransformerGraph

    torch.manual_seed(7)
    config = dict(SP_TRANSFORMER, patch_size=tuple(SP_TRANSFORMER["patch_size"]))
    model = WanAnimateTransformer3DModel(**config).eval().requires_grad_(False)
    # the random init leaves some weights at 0 or 1 (biases, norms): perturb all so every path matters
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return TransformerGraph(model).eval()


def _bf16_graph():
    from wan_trt.models.precision import HalfPrecisionGraph

    names = ["latent_input", "timestep", "text_embeds", "image_embeds", "pose_latents", "motion_vectors"]
    return HalfPrecisionGraph(_graph(), "bf16", names).eval()


def _fp8_attention_graph():
    """The DiT with every block's self-attention replaced by the FP8 fake-quant attention (fixed scales)."""
    from wan_trt.calibration.attention import AttentionPlan, FakeQuantAttention, self_attention_processors
    from wan_trt.calibration.quantize import fake_quant

    graph = _graph()
    for block, processor in self_attention_processors(graph).items():
        processor.self_attention = FakeQuantAttention(AttentionPlan(block, 0.01, 0.01, 0.01, 1 / 448), "fp8", fake_quant)
    return graph


def _inputs(batch: int, frames: int, height: int, width: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tr = SP_TRANSFORMER
    return [
        torch.randn(batch, tr["in_channels"], frames + 1, height, width, generator=g),
        torch.rand(batch, generator=g) * 998 + 1,
        torch.randn(batch, 512, tr["text_dim"], generator=g),
        torch.randn(batch, 257, tr["image_dim"], generator=g),
        torch.randn(batch, tr["latent_channels"], frames, height, width, generator=g),
        torch.randn(batch, 4 * frames - 3, tr["motion_encoder_dim"], generator=g),
    ]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One gloo rank: collectives against slices of a full tensor, then the sequence-parallel DiT."""
    from wan_trt.runtime.sequence_parallel import (
        SequenceParallelDiT,
        gather_tokens,
        heads_to_seq,
        seq_to_heads,
        shard_dit_engine,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # all-to-all: my tokens × all heads  <->  all tokens × my heads (3 stacked tensors, batch 2)
        full = torch.randn(3, 2, 5 * world, 2 * world, 6, generator=torch.Generator().manual_seed(1))
        mine = full[:, :, rank * 5:(rank + 1) * 5]
        heads = seq_to_heads(mine)
        assert torch.equal(heads, full[:, :, :, rank * 2:(rank + 1) * 2]), "seq_to_heads"
        assert torch.equal(heads_to_seq(heads), mine), "heads_to_seq"
        # sharding + gather of a token sequence that needs padding
        layout = TokenLayout(tokens=7 * world - 1, tokens_per_frame=3, rank=rank, world=world)
        tokens = torch.randn(2, layout.tokens, 4, generator=torch.Generator().manual_seed(2))
        assert torch.equal(gather_tokens(shard_tokens(tokens, layout), layout), tokens), "shard/gather"

        dit = SequenceParallelDiT(_graph())
        engine = SimpleNamespace(module=_bf16_graph())  # the torch backend's DiT engine for bf16 engines
        shard_dit_engine(engine)
        with torch.no_grad():
            for index, (name, shape) in enumerate(CASES.items()):
                (velocity,) = dit(*_inputs(*shape, seed=100 + index))
                torch.save(velocity, Path(out_dir) / f"{name}_rank{rank}.pt")
            (velocity,) = engine.module(*_inputs(*BF16_CASE, seed=200))
            torch.save(velocity, Path(out_dir) / f"bf16_rank{rank}.pt")
            (velocity,) = SequenceParallelDiT(_fp8_attention_graph())(*_inputs(*FP8_CASE, seed=300))
            torch.save(velocity, Path(out_dir) / f"fp8_attention_rank{rank}.pt")
        dist.barrier()  # every rank's outputs are on disk
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing gloo down: its destructors sometimes abort the process at exit
    # ("terminate called without an active exception", SIGABRT) after all the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def single_process_outputs() -> dict[str, torch.Tensor]:
    graph = _graph()
    with torch.no_grad():
        outputs = {name: graph(*_inputs(*shape, seed=100 + i))[0] for i, (name, shape) in enumerate(CASES.items())}
        outputs["bf16"] = _bf16_graph()(*_inputs(*BF16_CASE, seed=200))[0]
        outputs["fp8_attention"] = _fp8_attention_graph()(*_inputs(*FP8_CASE, seed=300))[0]
        plain = graph(*_inputs(*FP8_CASE, seed=300))[0]
    assert relative_l2(outputs["fp8_attention"].numpy(), plain.numpy()) > 1e-3  # the fake-quant attention is in use
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_dit_equals_single_process(world, single_process_outputs, tmp_path):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    for name, reference in single_process_outputs.items():
        for rank in range(world):
            velocity = torch.load(tmp_path / f"{name}_rank{rank}.pt")
            assert velocity.shape == reference.shape
            error = relative_l2(velocity.numpy(), reference.numpy())
            # bf16: its rounding class; FP8 attention: the Q/DQ bound (a shard's q/k/v can round across an FP8
            # boundary where the whole sequence's did not); fp32: the bound
            tolerance = {"bf16": 1e-2, "fp8_attention": 1e-3}.get(name, 1e-5)
            assert error <= tolerance, f"{name}, {world} ranks, rank {rank}: rel-L2 {error:.2e}"


def test_layout_slices_cover_the_sequence_once():
    for tokens, per, world in [(60, 12, 4), (75, 15, 4), (75, 15, 2), (3, 3, 4), (75600, 3600, 8)]:
        layouts = [TokenLayout(tokens, per, rank, world) for rank in range(world)]
        assert sum(lay.real for lay in layouts) == tokens
        assert all(lay.padded % world == 0 and lay.padded - tokens < world for lay in layouts)
        covered = np.concatenate([np.arange(lay.start, lay.start + lay.real) for lay in layouts])
        assert np.array_equal(covered, np.arange(tokens))
        for lay in layouts:
            if lay.real:
                first, last = lay.frame_window()
                assert first * per <= lay.start and lay.start + lay.real <= last * per
                assert (last - first - 1) * per < lay.real + per  # no frame more than needed


def test_shard_tokens_pads_the_last_rank():
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).view(2, 7, 3)
    last = shard_tokens(x, TokenLayout(7, 7, rank=1, world=2))
    assert last.shape == (2, 4, 3)
    assert torch.equal(last[:, :3], x[:, 4:]) and not last[:, 3].any()


def test_world_size_must_divide_the_heads():
    check_world_size(40, 8)
    with pytest.raises(BadInputError, match=r"--gpus 3: .* 40 attention heads .*1, 2, 4, 5, 8, 10, 20, 40"):
        check_world_size(40, 3)
    with pytest.raises(BadInputError, match="--gpus 4"):
        check_world_size(int(get_preset("tiny").transformer["num_attention_heads"]), 4)  # tiny has 2 heads


@pytest.mark.slow
def test_infer_gpus_2_on_cpu_matches_one_process(tiny_engines, tmp_path):
    """``wan-trt infer --backend torch --device cpu --gpus 2`` (torchrun, gloo) = the same run in one process:
    the same latents up to fp32 rounding (each worker runs one thread, the single process two), so the same
    pixels ±1, except where that rounding flips one of H.264's near-tie choices in a block (seen: one block
    of one frame off by up to 7, 60.8 dB). So: ≥ 50 dB PSNR and under 2% of values off by more than 1; a
    wrong shard or gather costs tens of dB (a one-pixel shift of the video: 22 dB)."""
    from wan_trt.demo_media import make_demo_inputs
    from wan_trt.media import read_video

    inputs = make_demo_inputs(tmp_path / "inputs", width=64, height=48, num_frames=9, fps=12.0)
    frames = {}
    for gpus in (1, 2):
        out = tmp_path / f"gpus{gpus}.mp4"
        result = subprocess.run([sys.executable, "-m", "wan_trt.cli", "infer", "--engines", str(tiny_engines),
                                 "--input", str(inputs), "--out", str(out), "--backend", "torch", "--steps", "2",
                                 "--gpus", str(gpus)], check=False, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip().splitlines()[-1] == str(out)
        frames[gpus] = read_video(out).frames.astype(np.float64)
    assert frames[1].shape == frames[2].shape == (9, 48, 64, 3)
    off = np.abs(frames[1] - frames[2])
    assert psnr(frames[1], frames[2]) >= 50.0 and (off > 1).mean() < 0.02, (psnr(frames[1], frames[2]), off.max())


def test_infer_gpus_refuses_other_backends_and_bad_counts(tiny_engines, tmp_path):
    from click.testing import CliRunner

    from wan_trt.cli import main

    base = ["infer", "--engines", str(tiny_engines), "--ref", "r.png", "--pose", "p.mp4", "--face", "f.mp4",
            "--out", str(tmp_path / "o.mp4")]
    result = CliRunner().invoke(main, [*base, "--gpus", "2"])  # default backend onnxruntime
    assert result.exit_code == 2 and "--gpus 2 needs --backend torch" in result.output
    result = CliRunner().invoke(main, [*base, "--backend", "torch", "--gpus", "4"])  # tiny: 2 heads
    assert result.exit_code == 2 and "must divide 2" in result.output
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.slow
def test_infer_gpus_worker_error_is_one_line_and_its_exit_code(tiny_engines, tmp_path):
    """A bad input found inside the workers: exit 2, the error printed once (not once per rank), no output."""
    out = tmp_path / "o.mp4"
    result = subprocess.run([sys.executable, "-m", "wan_trt.cli", "infer", "--engines", str(tiny_engines),
                             "--input", str(tmp_path / "missing"), "--out", str(out), "--backend", "torch",
                             "--gpus", "2"], check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("wan-trt: error:")]
    assert len(errors) == 1 and "missing" in errors[0], result.stderr[-3000:]
    assert not out.exists()
