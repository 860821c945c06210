"""Synthetic but structured demo inputs in the layout of the official preprocessing.

:func:`make_demo_inputs` writes a folder that :func:`wan_trt.driving_inputs.load_driving_inputs`
accepts, so the whole pipeline can be exercised without a real photo or driving video:

* ``src_ref.png`` - a photo-like portrait: a smooth vertical gradient background with a
  little low-frequency texture, and a person (head with eyes, brows, nose and mouth,
  hair, neck, a coloured torso and arms), anti-aliased by supersampling, with soft
  lighting and a trace of sensor grain.
* ``src_pose.mp4`` - an OpenPose-style skeleton on black: the 18 COCO body keypoints
  (nose, neck, shoulders, elbows, wrists, hips, knees, ankles, eyes, ears), one colour
  per limb and per joint, arms waving and body swaying smoothly over time.
* ``src_face.mp4`` - square crops of a cartoon face whose mouth opens and closes, whose
  eyes blink and whose head turns and tilts slightly.

Everything is drawn with numpy and Pillow and is deterministic for a given ``seed``.
"""

from __future__ import annotations

import colorsys
import logging
import math
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from wan_trt.driving_inputs import FACE_FILE, POSE_FILE, REF_FILE, SIZE_MULTIPLE, nearest_valid_size
from wan_trt.errors import BadInputError
from wan_trt.media import VideoWriter, write_image

__all__ = [
    "BODY_KEYPOINTS",
    "BODY_LIMBS",
    "draw_face_frame",
    "draw_pose_frame",
    "make_demo_inputs",
    "make_face_frames",
    "make_pose_frames",
    "make_ref_image",
    "pose_keypoints",
]

log = logging.getLogger(__name__)

#: The 18 COCO/OpenPose body keypoints, in OpenPose order.
BODY_KEYPOINTS = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)
_K = {name: i for i, name in enumerate(BODY_KEYPOINTS)}

#: The 17 limbs of the OpenPose body skeleton, as pairs of keypoint indices.
BODY_LIMBS = tuple(
    (_K[a], _K[b])
    for a, b in (
        ("neck", "right_shoulder"), ("neck", "left_shoulder"),
        ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
        ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
        ("neck", "right_hip"), ("right_hip", "right_knee"), ("right_knee", "right_ankle"),
        ("neck", "left_hip"), ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
        ("neck", "nose"), ("nose", "right_eye"), ("right_eye", "right_ear"),
        ("nose", "left_eye"), ("left_eye", "left_ear"),
    )
)


def _hue_wheel(n: int) -> list[tuple[int, int, int]]:
    """``n`` fully saturated colours evenly around the hue circle, starting at red."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb(i / n, 1.0, 1.0)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


_JOINT_COLOURS = _hue_wheel(len(BODY_KEYPOINTS))
# Limbs are drawn dimmer than joints, as in OpenPose renderings (limbs blended at ~60%).
_LIMB_COLOURS = [tuple(int(c * 0.6) for c in rgb) for rgb in _hue_wheel(len(BODY_LIMBS))]


# --------------------------------------------------------------------------- pose


def pose_keypoints(t: float, width: int, height: int, phase: float = 0.0) -> np.ndarray:
    """The 18 keypoints ``[18, 2]`` (x, y in pixels) at time ``t`` seconds.

    A standing figure fills ~90% of the frame height; it sways and leans slowly, waves
    both arms out of phase, bends its knees a little and turns its head.
    """
    w = 2.0 * math.pi
    sway = 0.05 * math.sin(w * 0.23 * t + phase)
    lean = 0.06 * math.sin(w * 0.23 * t + phase + 0.7)  # radians, about the hips
    bob = 0.012 * math.sin(w * 0.9 * t + phase)
    # Arms: angle of the upper arm away from hanging straight down, and elbow bend.
    r_up = 0.35 + 1.6 * (0.5 + 0.5 * math.sin(w * 0.5 * t + phase))
    r_fore = r_up + 0.3 + 0.9 * (0.5 + 0.5 * math.sin(w * 0.5 * t + phase + 1.2))
    l_up = 0.35 + 1.1 * (0.5 + 0.5 * math.sin(w * 0.37 * t + phase + 2.1))
    l_fore = l_up + 0.2 + 0.7 * (0.5 + 0.5 * math.sin(w * 0.37 * t + phase + 3.0))
    knee = 0.10 * (0.5 + 0.5 * math.sin(w * 0.9 * t + phase))
    turn = 0.025 * math.sin(w * 0.31 * t + phase + 0.4)

    def side(angle: float, sign: float) -> np.ndarray:  # sign -1: figure's right (image left)
        return np.array([sign * math.sin(angle), math.cos(angle)])

    p = np.zeros((18, 2))
    hip_c = np.array([0.0, 0.36 + bob])
    # Legs hang from the hips (not leaned), knees bend forward-out a little.
    for s, hip, kn, an in ((-1, "right_hip", "right_knee", "right_ankle"), (1, "left_hip", "left_knee", "left_ankle")):
        p[_K[hip]] = hip_c + [s * 0.065, 0.0]
        p[_K[kn]] = p[_K[hip]] + 0.24 * side(0.06 + knee, s)
        p[_K[an]] = p[_K[kn]] + 0.23 * side(0.02 - knee * 0.6, s)
    # Upper body in neck-relative coordinates, then leaned about the hip centre.
    up = {
        "neck": (0.0, 0.0),
        "nose": (turn, -0.12),
        "right_eye": (turn - 0.03, -0.15), "left_eye": (turn + 0.03, -0.15),
        "right_ear": (turn * 0.5 - 0.065, -0.13), "left_ear": (turn * 0.5 + 0.065, -0.13),
        "right_shoulder": (-0.11, 0.012), "left_shoulder": (0.11, 0.012),
    }
    neck_rest = np.array([0.0, bob])
    for name, off in up.items():
        p[_K[name]] = neck_rest + off
    p[_K["right_elbow"]] = p[_K["right_shoulder"]] + 0.17 * side(r_up, -1)
    p[_K["right_wrist"]] = p[_K["right_elbow"]] + 0.15 * side(r_fore, -1)
    p[_K["left_elbow"]] = p[_K["left_shoulder"]] + 0.17 * side(l_up, 1)
    p[_K["left_wrist"]] = p[_K["left_elbow"]] + 0.15 * side(l_fore, 1)
    upper = [i for i, n in enumerate(BODY_KEYPOINTS) if "hip" not in n and "knee" not in n and "ankle" not in n]
    c, s_ = math.cos(lean), math.sin(lean)
    rot = np.array([[c, -s_], [s_, c]])
    p[upper] = (p[upper] - hip_c) @ rot.T + hip_c
    p[:, 0] += sway

    # Units -> pixels: the figure spans about y in [-0.2, 0.85] and x in [-0.45, 0.45].
    scale = min(0.9 * height / 1.05, 0.92 * width / 0.95)
    cx = width / 2.0
    top = (height - 1.05 * scale) / 2.0
    return np.stack([cx + p[:, 0] * scale, top + (p[:, 1] + 0.2) * scale], axis=1)


def draw_pose_frame(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Render keypoints ``[18, 2]`` as an OpenPose-style skeleton on black, ``[H, W, 3]`` uint8."""
    im = Image.new("RGB", (width, height), (0, 0, 0))
    d = ImageDraw.Draw(im)
    size = min(width, height)
    thick = max(1, round(size * 0.028))
    radius = max(1.0, size * 0.018)
    for (a, b), colour in zip(BODY_LIMBS, _LIMB_COLOURS):
        d.line([tuple(points[a]), tuple(points[b])], fill=colour, width=thick)
    for (x, y), colour in zip(points, _JOINT_COLOURS):
        d.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return np.asarray(im)


def make_pose_frames(width: int, height: int, num_frames: int, fps: float, seed: int = 0) -> np.ndarray:
    """The pose video ``[T, H, W, 3]`` uint8."""
    phase = float(np.random.default_rng([seed, 1]).uniform(0, 2 * math.pi))
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        out[i] = draw_pose_frame(pose_keypoints(i / fps, width, height, phase), width, height)
    return out


# --------------------------------------------------------------------------- face


def _face_palette(seed: int) -> dict[str, tuple[int, int, int]]:
    rng = np.random.default_rng([seed, 2])
    skin_base = np.array([224, 182, 150]) * rng.uniform(0.75, 1.05)
    hair = np.array([70, 45, 30]) * rng.uniform(0.5, 1.6)
    bg = rng.uniform(90, 170, size=3)
    iris = rng.choice(np.array([[70, 110, 60], [60, 90, 150], [90, 60, 40]]))
    return {
        "skin": tuple(int(v) for v in np.clip(skin_base, 0, 255)),
        "skin_dark": tuple(int(v) for v in np.clip(skin_base * 0.82, 0, 255)),
        "hair": tuple(int(v) for v in np.clip(hair, 0, 255)),
        "bg": tuple(int(v) for v in bg),
        "iris": tuple(int(v) for v in iris),
        "lip": (170, 70, 75),
        "mouth": (80, 20, 30),
    }


def draw_face_frame(size: int, t: float, palette: dict[str, tuple[int, int, int]], phase: float = 0.0) -> np.ndarray:
    """One ``[size, size, 3]`` cartoon face crop at time ``t`` seconds."""
    s = float(size)
    w = 2.0 * math.pi
    yaw = 0.06 * s * math.sin(w * 0.21 * t + phase)  # features slide sideways as the head turns
    roll = 6.0 * math.sin(w * 0.29 * t + phase + 1.0)  # degrees
    mouth_open = min(1.0, max(0.0, 0.45 + 0.4 * math.sin(w * 1.7 * t + phase) + 0.25 * math.sin(w * 0.9 * t + 2 * phase + 0.5)))
    # Blink: a short smooth dip every ~2.2 s.
    blink_t = (t + phase) % 2.2
    eye_open = 1.0 - math.exp(-(((blink_t - 1.1) / 0.07) ** 2))

    im = Image.new("RGB", (size, size), palette["bg"])
    d = ImageDraw.Draw(im)
    cx, cy = s / 2 + yaw * 0.3, s * 0.54
    d.ellipse([cx - 0.40 * s, cy - 0.52 * s, cx + 0.40 * s, cy + 0.30 * s], fill=palette["hair"])  # hair mass
    d.ellipse([cx - 0.43 * s, cy - 0.06 * s, cx - 0.31 * s, cy + 0.12 * s], fill=palette["skin_dark"])  # ears
    d.ellipse([cx + 0.31 * s, cy - 0.06 * s, cx + 0.43 * s, cy + 0.12 * s], fill=palette["skin_dark"])
    d.ellipse([cx - 0.34 * s, cy - 0.38 * s, cx + 0.34 * s, cy + 0.44 * s], fill=palette["skin"])  # face
    d.chord([cx - 0.37 * s, cy - 0.50 * s, cx + 0.37 * s, cy - 0.05 * s], 180, 360, fill=palette["hair"])  # fringe
    fx = cx + yaw
    for sx in (-1, 1):
        ex, ey = fx + sx * 0.14 * s, cy - 0.02 * s
        rx, ry = 0.075 * s, 0.045 * s * max(eye_open, 0.06)
        d.ellipse([ex - rx, ey - ry, ex + rx, ey + ry], fill=(245, 245, 240))
        if eye_open > 0.25:
            ir = min(0.035 * s, ry * 0.95)
            d.ellipse([ex - ir, ey - ir, ex + ir, ey + ir], fill=palette["iris"])
            pr = ir * 0.45
            d.ellipse([ex - pr, ey - pr, ex + pr, ey + pr], fill=(15, 15, 15))
        else:
            d.line([(ex - rx, ey), (ex + rx, ey)], fill=(60, 40, 35), width=max(1, round(s * 0.008)))
        by = ey - 0.085 * s - 0.01 * s * (1 - eye_open)
        d.line([(ex - 0.08 * s, by + 0.012 * s), (ex + 0.07 * s, by)], fill=palette["hair"], width=max(1, round(s * 0.018)))
    d.line([(fx, cy + 0.02 * s), (fx - 0.03 * s, cy + 0.14 * s), (fx + 0.02 * s, cy + 0.15 * s)],
           fill=palette["skin_dark"], width=max(1, round(s * 0.012)))  # nose
    mx, my = fx, cy + 0.25 * s
    mw, mh = 0.13 * s, 0.012 * s + 0.075 * s * mouth_open
    d.ellipse([mx - mw, my - mh, mx + mw, my + mh], fill=palette["lip"])
    if mh > 0.02 * s:
        d.ellipse([mx - mw * 0.8, my - mh * 0.7, mx + mw * 0.8, my + mh * 0.7], fill=palette["mouth"])
        d.rectangle([mx - mw * 0.5, my - mh * 0.7, mx + mw * 0.5, my - mh * 0.45], fill=(235, 235, 230))  # teeth
    else:
        d.line([(mx - mw, my), (mx + mw, my)], fill=palette["mouth"], width=max(1, round(s * 0.008)))
    im = im.rotate(roll, resample=Image.Resampling.BILINEAR, center=(s / 2, s * 0.55), fillcolor=palette["bg"])
    return np.asarray(im)


def make_face_frames(size: int, num_frames: int, fps: float, seed: int = 0) -> np.ndarray:
    """The face video ``[T, size, size, 3]`` uint8."""
    palette = _face_palette(seed)
    phase = float(np.random.default_rng([seed, 3]).uniform(0, 2 * math.pi))
    out = np.empty((num_frames, size, size, 3), np.uint8)
    for i in range(num_frames):
        out[i] = draw_face_frame(size, i / fps, palette, phase)
    return out


# --------------------------------------------------------------------------- reference photo


def make_ref_image(width: int, height: int, seed: int = 0, supersample: int = 3) -> np.ndarray:
    """A photo-like half-body portrait, ``[height, width, 3]`` uint8."""
    rng = np.random.default_rng([seed, 4])
    ss = max(1, int(supersample))
    W, H = width * ss, height * ss
    # Background: vertical gradient between two seeded colours plus low-frequency texture.
    top = rng.uniform(150, 220, size=3)
    bottom = top * rng.uniform(0.45, 0.7, size=3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    bg = top * (1 - ramp) + bottom * ramp
    coarse = rng.normal(0.0, 1.0, size=(5, 6, 3)).astype(np.float32)
    tex = np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(coarse[..., c])).resize((width, height), Image.Resampling.BICUBIC))
        for c in range(3)
    ], axis=-1)
    bg = bg + 10.0 * tex
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8)).resize((W, H), Image.Resampling.BILINEAR)

    skin = np.array([226, 184, 152]) * rng.uniform(0.72, 1.05)
    shade = tuple(int(v) for v in np.clip(skin * 0.85, 0, 255))
    skin_c = tuple(int(v) for v in np.clip(skin, 0, 255))
    hair = tuple(int(v) for v in np.clip(np.array([60, 40, 28]) * rng.uniform(0.5, 1.8), 0, 255))
    shirt_rgb = colorsys.hsv_to_rgb(float(rng.uniform(0, 1)), float(rng.uniform(0.45, 0.8)), float(rng.uniform(0.45, 0.8)))
    shirt = tuple(int(v * 255) for v in shirt_rgb)
    shirt_dark = tuple(int(v * 0.75) for v in shirt)

    d = ImageDraw.Draw(canvas)
    u = H  # the person is laid out in units of the frame height
    cx = W / 2 + rng.uniform(-0.04, 0.04) * W
    head_cy, hr_x, hr_y = 0.30 * u, 0.105 * u, 0.135 * u
    # Torso and arms (behind the head): shoulders at ~0.55 H, cut by the bottom edge.
    sh_y, sh_w = 0.50 * u, 0.25 * u
    d.rounded_rectangle([cx - sh_w, sh_y, cx + sh_w, 1.2 * u], radius=0.09 * u, fill=shirt)
    for sx in (-1, 1):  # sleeves then forearms/hands
        x0 = cx + sx * sh_w
        d.polygon([(x0, sh_y + 0.04 * u), (x0 + sx * 0.07 * u, sh_y + 0.12 * u),
                   (x0 + sx * 0.05 * u, 1.05 * u), (x0 - sx * 0.06 * u, 1.05 * u)], fill=shirt_dark)
        d.ellipse([x0 + sx * 0.01 * u - 0.045 * u, 0.88 * u, x0 + sx * 0.01 * u + 0.045 * u, 0.99 * u], fill=skin_c)
    d.polygon([(cx - 0.07 * u, sh_y), (cx, sh_y + 0.09 * u), (cx + 0.07 * u, sh_y)], fill=shade)  # neckline
    d.rectangle([cx - 0.045 * u, head_cy + 0.08 * u, cx + 0.045 * u, sh_y + 0.01 * u], fill=shade)  # neck
    d.ellipse([cx - hr_x * 1.2, head_cy - hr_y * 1.2, cx + hr_x * 1.2, head_cy + hr_y * 0.75], fill=hair)  # hair
    d.ellipse([cx - hr_x * 1.08, head_cy - 0.01 * u, cx - hr_x * 0.85, head_cy + 0.05 * u], fill=shade)  # ears
    d.ellipse([cx + hr_x * 0.85, head_cy - 0.01 * u, cx + hr_x * 1.08, head_cy + 0.05 * u], fill=shade)
    d.ellipse([cx - hr_x, head_cy - hr_y, cx + hr_x, head_cy + hr_y], fill=skin_c)  # face
    d.chord([cx - hr_x * 1.05, head_cy - hr_y * 1.22, cx + hr_x * 1.05, head_cy - hr_y * 0.1], 180, 360, fill=hair)
    for sx in (-1, 1):
        ex, ey = cx + sx * 0.042 * u, head_cy + 0.005 * u
        d.ellipse([ex - 0.018 * u, ey - 0.010 * u, ex + 0.018 * u, ey + 0.010 * u], fill=(245, 245, 240))
        d.ellipse([ex - 0.008 * u, ey - 0.008 * u, ex + 0.008 * u, ey + 0.008 * u], fill=(40, 30, 25))
        d.line([(ex - 0.022 * u, ey - 0.028 * u), (ex + 0.02 * u, ey - 0.032 * u)], fill=hair, width=max(1, round(0.008 * u)))
    d.line([(cx, head_cy + 0.015 * u), (cx - 0.008 * u, head_cy + 0.05 * u), (cx + 0.006 * u, head_cy + 0.055 * u)],
           fill=shade, width=max(1, round(0.005 * u)))
    d.chord([cx - 0.04 * u, head_cy + 0.055 * u, cx + 0.04 * u, head_cy + 0.095 * u], 0, 180, fill=(170, 75, 80))

    img = np.asarray(canvas.resize((width, height), Image.Resampling.BOX)).astype(np.float32)
    # Soft key light from the upper left, and a trace of grain.
    yy, xx = np.mgrid[0:height, 0:width]
    light = 1.08 - 0.16 * (xx / max(width - 1, 1)) - 0.06 * (yy / max(height - 1, 1))
    img = img * light[..., None] + rng.normal(0.0, 1.5, size=img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- folder


# libx264's macroblock-tree rate control (mbtree) makes the bitstream vary from run to run
# on some sparse content such as a skeleton on black (seen at 64x48 and 96x96); without
# it the encoded demo is the same for the same seed. "fast" keeps the default demo < 1 s.
_ENCODE = {"preset": "fast", "options": {"x264-params": "mbtree=0"}}


def _check_args(width: int, height: int, num_frames: int, fps: float, face_size: int) -> None:
    if width <= 0 or height <= 0 or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        nw, nh = nearest_valid_size(width, height)
        raise BadInputError(
            f"demo size {width}x{height} (WxH) is not a multiple of {SIZE_MULTIPLE} in both: use e.g. {nw}x{nh}"
        )
    if num_frames < 1:
        raise BadInputError(f"demo frame count {num_frames} is not positive: use e.g. 77")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise BadInputError(f"demo fps {fps!r} is not a positive number: use e.g. 16")
    if face_size <= 0 or face_size % 2:
        raise BadInputError(f"demo face size {face_size} must be a positive even number: use 512")


def _new_sibling_dir(target: Path, tag: str) -> Path:
    for _ in range(100):
        p = target.parent / f".{target.name}.{tag}-{secrets.token_hex(4)}"
        try:
            os.mkdir(p, 0o777)  # the umask decides the final permissions
        except FileExistsError:
            continue
        return p
    raise BadInputError(f"demo folder '{target}' cannot get a temporary folder beside it: clean up stale .tmp folders")


def make_demo_inputs(
    out_dir: str | os.PathLike[str],
    *,
    width: int = 128,
    height: int = 96,
    num_frames: int = 77,
    fps: float = 16.0,
    face_size: int = 512,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a preprocessed-style demo folder (src_ref.png, src_pose.mp4, src_face.mp4) and return it.

    The folder is built in a hidden temporary sibling and renamed into place, so
    ``out_dir`` is either the complete folder or untouched. An existing non-empty
    ``out_dir`` is refused unless ``overwrite=True`` (then it is replaced as a whole).
    """
    width, height, num_frames, face_size, seed = int(width), int(height), int(num_frames), int(face_size), int(seed)
    _check_args(width, height, num_frames, fps, face_size)
    target = Path(os.fspath(out_dir))
    if target.exists() and not target.is_dir():
        raise BadInputError(f"demo folder '{target}' exists and is a file: choose a folder path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise BadInputError(
            f"demo folder '{target}' already exists and is not empty: choose another folder or pass overwrite=True"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"demo folder '{target}' cannot be created ({exc}): choose a writable location") from exc

    tmp = _new_sibling_dir(target, "tmp")
    try:
        write_image(tmp / REF_FILE, make_ref_image(width, height, seed))
        with VideoWriter(tmp / POSE_FILE, width, height, fps, **_ENCODE, what="demo pose video") as w:
            w.write(make_pose_frames(width, height, num_frames, fps, seed))
        with VideoWriter(tmp / FACE_FILE, face_size, face_size, fps, **_ENCODE, what="demo face video") as w:
            w.write(make_face_frames(face_size, num_frames, fps, seed))
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote demo inputs to '%s': %d frames at %dx%d, %.3f fps, face %dx%d, seed %d",
             target, num_frames, width, height, fps, face_size, face_size, seed)
    return target


def _move_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    try:
        os.rename(tmp, target)  # POSIX: replaces an empty directory atomically
        return
    except OSError:
        pass
    old = _new_sibling_dir(target, "old")
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
