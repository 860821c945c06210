"""diffusers' ``WanAnimatePipeline`` as shipped (bf16, its defaults), on the weights and inputs that
``benchmarks/end_to_end.py`` gives ``wan-trt infer``: the baseline of the end-to-end ratio.

``python -m benchmarks.diffusers_pipeline --work /tmp/e2e --out results/JSON [--sizes 832x480,1280x720]``

The weights are ``animate-14b``'s ``counter`` random weights (the seed of ``build --random-weights``,
0), made on the GPU in bf16 with diffusers' fp32-kept modules in fp32 (as ``from_pretrained(torch_dtype=
torch.bfloat16)`` loads a checkpoint); the tokenizer is the offline one the random-weights engines use.
The inputs are the end-to-end benchmark's synthetic demo inputs (made here if missing). Timed: the
pipeline call (prompt encoding, CLIP, VAE encode, motion encoder, 20 DiT steps, whole-clip VAE decode),
with the DiT's, the VAE's and the encoders' calls timed separately (CUDA-synchronised wrappers); not timed: building the modules.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import benchmarks  # noqa: F401  (maps wan_trt.* subpackages on a plain checkout)


def _pipeline(models):
    import torch
    from diffusers import UniPCMultistepScheduler, WanAnimatePipeline
    from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

    from wan_trt.tokenizer import build_tiny_tokenizer

    dtype = models.transformer.patch_embedding.weight.dtype
    models.transformer.motion_encoder.to(dtype)  # diffusers keeps only its own list in fp32
    return WanAnimatePipeline(
        tokenizer=PreTrainedTokenizerFast(tokenizer_object=build_tiny_tokenizer(), pad_token="<pad>",
                                          eos_token="</s>", unk_token="<unk>"),
        text_encoder=models.text_encoder, vae=models.vae, image_encoder=models.image_encoder,
        transformer=models.transformer, image_processor=CLIPImageProcessor(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          num_train_timesteps=1000, flow_shift=5.0))


def main(argv: list[str] | None = None) -> int:
    import torch
    from PIL import Image

    from benchmarks.end_to_end import segment_arguments
    from benchmarks.timing import environment, write_json
    from wan_trt.demo_media import make_demo_inputs
    from wan_trt.driving_inputs import load_driving_inputs
    from wan_trt.presets import DEFAULT_PROMPT, get_preset
    from wan_trt.reference_models import build_reference_models
    from wan_trt.tokenizer import build_tiny_tokenizer

    parser = segment_arguments(__doc__.splitlines()[0])
    parser.add_argument("--preset", default="animate-14b", help="(tiny with --device cpu: a smoke test of this script)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    preset = get_preset(args.preset)
    start = time.perf_counter()
    vocab = int(preset.text_encoder.get("vocab_size", build_tiny_tokenizer().get_vocab_size()))
    models = build_reference_models(preset, seed=0, vocab_size=vocab, random_weights=True, device=args.device,
                                    dtype=torch.bfloat16 if cuda else torch.float32)
    pipe = _pipeline(models)
    results: dict[str, Any] = {"kind": "diffusers_pipeline", "env": environment(), "weights_hash": models.weights_hash(),
                               "build_modules_s": round(time.perf_counter() - start, 1), "steps": args.steps,
                               "frames": args.frames, "runs": {}}
    stages = {name: {"seconds": 0.0, "calls": 0} for name in ("DiT", "vae_encode", "vae_decode", "text_encoder",
                                                               "image_encoder")}

    def timed(name: str, call):
        """``call`` with its CUDA-synchronised seconds and calls added to ``stages[name]``."""
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            result = call(*a, **k)
            sync()
            stages[name]["seconds"] += time.perf_counter() - t
            stages[name]["calls"] += 1
            return result
        return wrapper

    models.transformer.forward = timed("DiT", models.transformer.forward)
    models.vae.encode = timed("vae_encode", models.vae.encode)
    models.vae.decode = timed("vae_decode", models.vae.decode)
    models.text_encoder.forward = timed("text_encoder", models.text_encoder.forward)
    models.image_encoder.forward = timed("image_encoder", models.image_encoder.forward)
    for size in [s for s in args.sizes.split(",") if s]:
        width, height = (int(v) for v in size.split("x"))
        folder = work / f"inputs-{size}"
        if not folder.is_dir():
            make_demo_inputs(folder, width=width, height=height, num_frames=args.frames)
        inputs = load_driving_inputs(str(folder))
        pose = [Image.fromarray(f) for f in inputs.pose.frames]
        face = [Image.fromarray(f) for f in inputs.face.frames]
        for stage in stages.values():
            stage.update(seconds=0.0, calls=0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            video = pipe(image=Image.fromarray(inputs.ref_image), pose_video=pose, face_video=face,
                         prompt=DEFAULT_PROMPT, height=height, width=width, segment_frame_length=args.frames,
                         num_inference_steps=args.steps, generator=torch.Generator(args.device).manual_seed(0),
                         output_type="np").frames[0]
        sync()
        results["runs"][size] = {"total_s": round(time.perf_counter() - t0, 2), "DiT_s": round(stages["DiT"]["seconds"], 2),
                                 "dit_calls": stages["DiT"]["calls"], "frames_out": int(len(video)),
                                 "stages": {name: {"seconds": round(s["seconds"], 2), "calls": s["calls"]}
                                            for name, s in stages.items()}}
        if cuda:
            results["runs"][size]["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        write_json(out, results)
        print(f"{size}: {results['runs'][size]}", file=sys.stderr, flush=True)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
