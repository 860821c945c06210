"""Building the model's inputs from pixels, exactly as the reference pipeline does.

* the reference photo is letter-boxed (aspect kept, centred, black bars; bilinear) to the pose
  video's size;
* pixels map to [-1, 1] as ``2 * (x / 255) - 1``;
* CLIP input, two conventions (:data:`CLIP_PREPROCESSING`, chosen per request):
  ``"original"`` (default, the official Wan code): the letter-boxed photo squashed to 224² (bicubic)
  and normalised with CLIP's mean/std (see docs/conventions.md); ``"diffusers"`` (its
  WanAnimatePipeline, whose ``image_processor`` is a CLIPImageProcessor): the *raw* photo's short
  side resized to 224 (PIL bicubic), centre-cropped to 224², rescaled by 1/255, normalised;
* the 4-channel mask packing of the latent conditioning (``get_i2v_mask`` in the reference):
  pixel-frame mask ``[T]`` with the first frame repeated 4×, folded into 4 channels per latent frame.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wan_trt.errors import BadInputError
from wan_trt.presets import CLIP_IMAGE_SIZE, CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)

TEMPORAL_STRIDE = 4


def letterbox(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fit ``image`` (HxWx3 uint8) inside height × width keeping its aspect ratio, centred on black."""
    src_h, src_w = image.shape[:2]
    if (src_h, src_w) == (height, width):
        return image.copy()
    if width / height < src_w / src_h:  # wider than the target: full width, bars above and below
        new_w, new_h = width, src_h * width // src_w
    else:
        new_w, new_h = src_w * height // src_h, height
    resized = Image.fromarray(image).resize((new_w, new_h), resample=Image.BILINEAR)
    canvas = Image.new("RGB", (width, height), color=0)
    canvas.paste(resized, box=(width // 2 - new_w // 2, height // 2 - new_h // 2))
    return np.asarray(canvas)


def to_unit_range(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames ``[T, H, W, 3]`` (or one ``[H, W, 3]`` image) → float32 ``[1, 3, T, H, W]`` in [-1, 1]."""
    if frames.ndim == 3:
        frames = frames[None]
    pixels = torch.from_numpy(np.array(frames, dtype=np.float32)) / 255.0
    return (2.0 * pixels - 1.0).permute(3, 0, 1, 2).unsqueeze(0)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """``[1, 3, T, H, W]`` in [-1, 1] → uint8 frames ``[T, H, W, 3]``."""
    frames = ((video[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1.0) * 127.5).round()
    return frames.to(torch.uint8).cpu().numpy()


def clip_pixels(ref_pixels: torch.Tensor) -> torch.Tensor:
    """Letter-boxed reference ``[1, 3, 1, H, W]`` in [-1, 1] → CLIP input ``[1, 3, 224, 224]``."""
    image = F.interpolate(ref_pixels[:, :, 0], size=(CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE), mode="bicubic",
                          align_corners=False)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (image * 0.5 + 0.5 - mean) / std


def clip_pixels_diffusers(image: np.ndarray) -> torch.Tensor:
    """Raw reference photo ``[H, W, 3]`` uint8 → CLIP input ``[1, 3, 224, 224]``, as diffusers'
    CLIPImageProcessor (shortest edge 224, bicubic, centre crop 224², x/255, CLIP mean/std) with its
    PIL backend (bit-equal). transformers ≥ 5 with torchvision installed resizes with torchvision's
    antialiased bicubic instead: not bit-equal (about 1% rel-L2 on random-noise photos, measured with
    torch's antialiased bicubic as a stand-in)."""
    src_h, src_w = image.shape[:2]
    short, long = min(src_h, src_w), max(src_h, src_w)
    new_long = int(CLIP_IMAGE_SIZE * long / short)  # truncated, as transformers does
    new_h, new_w = (CLIP_IMAGE_SIZE, new_long) if src_h <= src_w else (new_long, CLIP_IMAGE_SIZE)
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).convert("RGB").resize(
        (new_w, new_h), resample=Image.BICUBIC))
    top, left = (new_h - CLIP_IMAGE_SIZE) // 2, (new_w - CLIP_IMAGE_SIZE) // 2
    crop = resized[top:top + CLIP_IMAGE_SIZE, left:left + CLIP_IMAGE_SIZE]
    unit = (crop.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)  # float64 first, as transformers
    normalised = (unit - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))[None]


CLIP_PREPROCESSING = ("original", "diffusers")


def clip_input(preprocess: str, ref_image: np.ndarray | None, ref_pixels: torch.Tensor) -> torch.Tensor:
    """The image encoder's input under the named convention: ``"original"`` uses the letter-boxed
    ``ref_pixels`` ``[1, 3, 1, H, W]``, ``"diffusers"`` the raw photo ``ref_image`` ``[H, W, 3]`` uint8."""
    if preprocess == "original":
        return clip_pixels(ref_pixels)
    if preprocess == "diffusers":
        if ref_image is None:
            raise ValueError("CLIP preprocessing 'diffusers' needs the raw reference photo (ref_image)")
        return clip_pixels_diffusers(ref_image)
    raise BadInputError(f"CLIP preprocessing '{preprocess}' is unknown: use one of {', '.join(CLIP_PREPROCESSING)}")


def resize_faces(frames: np.ndarray, size: int) -> np.ndarray:
    """Face crops ``[T, S, S, 3]`` uint8 resized to the motion encoder's input side (bicubic)."""
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), resample=Image.BICUBIC)) for f in frames])


def pack_mask(pixel_mask: torch.Tensor) -> torch.Tensor:
    """Pixel-frame mask ``[B, 1, T, h, w]`` (T = 4F-3) → latent mask ``[B, 4, F, h, w]``."""
    first = pixel_mask[:, :, :1].repeat_interleave(TEMPORAL_STRIDE, dim=2)
    mask = torch.cat([first, pixel_mask[:, :, 1:]], dim=2)
    batch, _, frames4, height, width = mask.shape
    return mask.view(batch, frames4 // TEMPORAL_STRIDE, TEMPORAL_STRIDE, height, width).transpose(1, 2)


def replacement_mask(person: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Replacement mode: person mask ``[T, H, W]`` in [0, 1] → keep-mask ``1 - mask`` ``[1, 1, T, h, w]``,
    nearest-downsampled to the latent grid (1 = keep the background, 0 = generate)."""
    keep = 1.0 - torch.from_numpy(np.asarray(person, dtype=np.float32))[:, None]
    keep = F.interpolate(keep, size=(height, width), mode="nearest")
    return keep.transpose(0, 1).unsqueeze(0)


def ping_pong(num_frames: int, target: int) -> list[int]:
    """Frame indices that extend ``num_frames`` to ``target`` by reflection: 0,1,…,n-1,n-2,…,0,1,…"""
    if num_frames == 1:
        return [0] * target
    indices, index, step = [], 0, 1
    while len(indices) < target:
        indices.append(index)
        if not 0 <= index + step < num_frames:
            step = -step
        index += step
    return indices


def segment_plan(num_frames: int, segment_frames: int, guide_frames: int) -> tuple[int, int]:
    """(padded frame count, number of segments) for a video of ``num_frames``, as the reference pipeline."""
    stride = segment_frames - guide_frames
    remainder = (num_frames - guide_frames) % stride
    padded = num_frames + (stride - remainder if remainder else 0)
    return padded, padded // stride
