"""Image and video I/O: Pillow for images, PyAV (FFmpeg) for video.

Everything a user hands us goes through here, so every way a file can be unusable
(missing, a directory, empty, not a video, no frames, a pixel format that does not
convert to RGB) ends as one :class:`~wan_trt.errors.BadInputError` line that names the
file and says what to do. Callers pass ``what=`` (``"pose video"``, ``"reference
image"``) so the message speaks the user's language.

Arrays are always ``uint8`` RGB: images ``[H, W, 3]``, videos ``[T, H, W, 3]``.

Writing is atomic: :class:`VideoWriter` and :func:`write_image` write to a hidden
temporary file next to the target and rename it onto the target only once the file is
complete, so a crash or an exception never leaves a half-written file at ``path``.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Iterator, Mapping, NamedTuple, Self, Sequence, Union

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wan_trt.errors import BadInputError

__all__ = [
    "Video",
    "VideoInfo",
    "VideoReader",
    "VideoSizeError",
    "VideoWriter",
    "open_video",
    "probe_video",
    "read_image",
    "read_video",
    "write_image",
    "write_video",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# FFmpeg demuxers that read a single still image; a PNG or JPEG renamed to .mp4 opens
# through one of these and "decodes" as a one-frame video, which is never what the
# user meant when we asked for a video.
_IMAGE_DEMUXERS = ("image2", "image2pipe")
_IMAGE_DEMUXER_SUFFIX = "_pipe"

# NTSC-style rates written as 23.976 etc. are really n*1000/1001.
_NTSC_BASES = (24, 30, 48, 60, 120, 240)


class VideoSizeError(BadInputError, ValueError):
    """A frame size the H.264/yuv420p encoder cannot take (odd or non-positive)."""


@dataclass(frozen=True, eq=False)
class Video:
    """Decoded video: ``frames`` is ``[T, H, W, 3]`` uint8 RGB, ``fps`` frames per second."""

    frames: np.ndarray
    fps: float

    def __post_init__(self) -> None:
        f = self.frames
        if not isinstance(f, np.ndarray) or f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8:
            shape = getattr(f, "shape", None)
            dtype = getattr(f, "dtype", type(f).__name__)
            raise ValueError(f"Video.frames must be a [T, H, W, 3] uint8 array, got shape {shape} dtype {dtype}")

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def duration(self) -> float:
        """Seconds, ``num_frames / fps`` (0 when the rate is unknown)."""
        return self.num_frames / self.fps if self.fps > 0 else 0.0


class VideoInfo(NamedTuple):
    """What :func:`probe_video` learns without keeping any frame."""

    num_frames: int
    height: int
    width: int
    fps: float


# --------------------------------------------------------------------------- messages


def _q(path: PathLike) -> str:
    """The path as it appears in messages: quoted, on one line."""
    text = os.fspath(path)
    return "'" + text.replace("\n", "\\n").replace("\r", "\\r") + "'"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _bad(what: str, path: PathLike, problem: str, fix: str) -> BadInputError:
    return BadInputError(_one_line(f"{what} {_q(path)} {problem}: {fix}"))


def _check_readable_file(path: PathLike, what: str, fix_missing: str) -> Path:
    """Reject what is not a non-empty regular file before any decoder sees it."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise _bad(what, p, "does not exist", fix_missing)
    if p.is_dir():
        raise _bad(what, p, "is a directory, not a file", f"pass the {what} file itself")
    if not p.is_file():
        raise _bad(what, p, "is not a regular file", f"pass a regular {what} file")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise _bad(what, p, f"cannot be read ({exc.strerror or exc})", "check its permissions") from exc
    if size == 0:
        raise _bad(what, p, "is empty (0 bytes)", "re-export or re-copy the file")
    if not os.access(p, os.R_OK):
        raise _bad(what, p, "is not readable", "check its permissions")
    return p


# --------------------------------------------------------------------------- images


def read_image(path: PathLike, *, what: str = "image") -> np.ndarray:
    """Read any image Pillow understands as ``[H, W, 3]`` uint8 RGB.

    The format is taken from the bytes, not the suffix (a JPEG named ``.png`` is fine).
    EXIF orientation is applied. Alpha is dropped (transparent pixels keep their colour
    channels), 16-bit and float greyscale are scaled to 8 bits, and of a multi-frame
    file (GIF, TIFF) the first frame is used.
    """
    p = _check_readable_file(path, what, "check the path")
    fix = "pass a PNG or JPEG (any format Pillow reads)"
    try:
        with Image.open(p) as im:
            im.load()
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                log.debug("%s %s has %d frames; using the first", what, _q(p), frames)
            im = ImageOps.exif_transpose(im)
            arr = _pil_to_rgb(im)
    except UnidentifiedImageError as exc:
        raise _bad(what, p, "is not an image Pillow can read", fix) from exc
    except Image.DecompressionBombError as exc:
        raise _bad(what, p, "is too large to decode safely", "downscale it below 80 megapixels") from exc
    except (OSError, SyntaxError, ValueError, TypeError) as exc:
        raise _bad(what, p, f"cannot be decoded ({_one_line(exc)})", "re-export it as PNG or JPEG") from exc
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise _bad(what, p, "has no pixels", "pass a real image")
    log.debug("read %s %s: %dx%d", what, _q(p), arr.shape[1], arr.shape[0])
    return arr


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        arr = np.asarray(im)
    elif mode.startswith("I;16") or mode in ("I", "F"):
        # High bit depth greyscale: Pillow's convert("RGB") clips instead of scaling.
        g = np.asarray(im).astype(np.float64)
        if mode == "F":
            top = 1.0 if g.size and float(np.nanmax(g)) <= 1.0 else 255.0
        else:
            top = 65535.0 if g.size and float(g.max()) > 255 else 255.0
        g8 = np.clip(np.nan_to_num(g) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        arr = np.repeat(g8[..., None], 3, axis=-1)
    else:
        # P, L, LA, RGBA, CMYK, YCbCr, LAB, 1, ... ; palette transparency is dropped too.
        arr = np.asarray(im.convert("RGB"))
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"pixel mode {mode} did not convert to RGB")
    return arr


def write_image(path: PathLike, image: np.ndarray, *, quality: int = 95) -> None:
    """Write ``image`` (``[H, W, 3]``, ``[H, W, 4]`` or ``[H, W]`` uint8) atomically.

    The format comes from the suffix (``.png``, ``.jpg``, ``.webp``, ...); ``quality``
    applies to lossy formats.
    """
    target = Path(os.fspath(path))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"write_image needs [H, W, 3|4] or [H, W] uint8, got shape {arr.shape} dtype {arr.dtype}")
    ext = target.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise _bad("output image", target, f"has an unknown suffix {ext or '(none)'}", "name it .png or .jpg")
    im = Image.fromarray(np.ascontiguousarray(arr))
    if fmt == "JPEG" and im.mode == "RGBA":
        im = im.convert("RGB")
    params = {"quality": int(quality)} if fmt in ("JPEG", "WEBP") else {}
    tmp = _prepare_output(target, "output image")
    try:
        with open(tmp, "wb") as fh:
            im.save(fh, format=fmt, **params)
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    log.debug("wrote image %s (%dx%d %s)", _q(target), arr.shape[1], arr.shape[0], fmt)


# --------------------------------------------------------------------------- video reading


def _open_video(path: PathLike, what: str) -> tuple[Path, "av.container.InputContainer", "av.video.stream.VideoStream"]:
    p = _check_readable_file(path, what, "check the path")
    fix = "pass a video FFmpeg can decode (an H.264 .mp4 is safest)"
    try:
        container = av.open(os.fspath(p), mode="r")
    except av.FFmpegError as exc:
        raise _bad(what, p, "is not a video FFmpeg can open", fix) from exc
    except (OSError, ValueError, UnicodeError) as exc:
        raise _bad(what, p, f"cannot be opened ({_one_line(exc)})", fix) from exc
    try:
        fmt = container.format.name or ""
        if fmt in _IMAGE_DEMUXERS or any(n.endswith(_IMAGE_DEMUXER_SUFFIX) for n in fmt.split(",")):
            raise _bad(what, p, f"is a still image ({fmt.replace('_pipe', '')}), not a video", fix)
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise _bad(what, p, f"has no video stream (found {', '.join(kinds)})", fix)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
    except BaseException:
        container.close()
        raise
    return p, container, stream


def _decoded_frames(container, stream, p: Path, what: str) -> Iterator["av.VideoFrame"]:
    n = 0
    try:
        for frame in container.decode(stream):
            n += 1
            yield frame
    except av.FFmpegError as exc:
        where = f"after frame {n}" if n else "at the first frame"
        raise _bad(what, p, f"is corrupt {where} ({_one_line(exc)})", "re-export or re-copy the file") from exc


def _snap_rate(rate: Fraction) -> Fraction:
    for base in _NTSC_BASES:
        ntsc = Fraction(base * 1000, 1001)
        if abs(rate - ntsc) < Fraction(1, 500):
            return ntsc
    return rate


def _stream_fps(stream, first_time: float | None, last_time: float | None, n: int) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    if n > 1 and first_time is not None and last_time is not None and last_time > first_time:
        return (n - 1) / (last_time - first_time)
    return 0.0


def _check_no_frames(n: int, p: Path, what: str) -> None:
    if n == 0:
        raise _bad(what, p, "has no decodable video frames", "re-export the video")


def _frame_size(frame) -> tuple[int, int]:
    return int(frame.height), int(frame.width)


def _to_rgb(frame, p: Path, what: str) -> np.ndarray:
    try:
        return frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, ValueError, TypeError) as exc:
        raise _bad(
            what, p, f"uses pixel format {frame.format.name}, which does not convert to RGB",
            "re-encode it as yuv420p H.264",
        ) from exc


def _size_change(n: int, old: tuple[int, int], new: tuple[int, int], p: Path, what: str) -> BadInputError:
    """``old`` and ``new`` are ``(height, width)``."""
    return _bad(what, p, f"changes size at frame {n} from {old[1]}x{old[0]} to {new[1]}x{new[0]}",
                "re-encode it at one fixed size")


def _scan(path: PathLike, what: str, *, check: bool) -> tuple[Path, VideoInfo, BadInputError | None]:
    """Decode every frame without keeping it: the info, and (``check``) the first frame :func:`read_video` refuses.

    With ``check``, every pixel format met is converted to RGB once and frame sizes are compared,
    so a video that passes is one :func:`read_video` reads; the refusal is returned, not raised
    (corruption is raised at once, as :func:`probe_video` does).
    """
    p, container, stream = _open_video(path, what)
    n = 0
    size: tuple[int, int] | None = None
    first = last = None
    converts: str | None = None  # the last pixel format proven to convert to RGB
    problem: BadInputError | None = None
    with container:
        for frame in _decoded_frames(container, stream, p, what):
            if check and problem is None:
                try:
                    if frame.format.name != converts:
                        _to_rgb(frame, p, what)
                        converts = frame.format.name
                    if size is not None and _frame_size(frame) != size:
                        raise _size_change(n, size, _frame_size(frame), p, what)
                except BadInputError as exc:
                    problem = exc
            if size is None:
                size = _frame_size(frame)
                first = frame.time
            last = frame.time
            n += 1
        _check_no_frames(n, p, what)
        fps = _stream_fps(stream, first, last, n)
    assert size is not None
    info = VideoInfo(num_frames=n, height=size[0], width=size[1], fps=fps)
    log.debug("probed %s %s: %d frames %dx%d @ %.3f fps", what, _q(p), n, size[1], size[0], fps)
    return p, info, problem


def probe_video(path: PathLike, *, what: str = "video") -> VideoInfo:
    """Frame count, size and rate, found by decoding every frame without converting or keeping it.

    Decoding (rather than trusting container metadata) makes the count agree with
    :func:`read_video` and proves the file is decodable; it costs no RGB conversion and
    no memory.
    """
    return _scan(path, what, check=False)[1]


def read_video(path: PathLike, *, what: str = "video", max_frames: int | None = None) -> Video:
    """Decode a video to ``[T, H, W, 3]`` uint8 RGB (all frames, or the first ``max_frames``)."""
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    p, container, stream = _open_video(path, what)
    first = last = None
    n = 0
    buf: np.ndarray | None = None
    with container:
        hint = int(stream.frames or 0)
        for frame in _decoded_frames(container, stream, p, what):
            rgb = _to_rgb(frame, p, what)
            if buf is None:
                # Preallocate from the container's frame count (usually exact for mp4), but
                # never more than ~4 GiB on its word alone; growing covers any undercount.
                cap = max(1, min(hint, (4 << 30) // max(rgb.nbytes, 1)))
                if max_frames is not None:
                    cap = min(cap, max_frames)
                buf = np.empty((cap,) + rgb.shape, dtype=np.uint8)
                first = frame.time
            elif rgb.shape != buf.shape[1:]:
                raise _size_change(n, buf.shape[1:3], rgb.shape[:2], p, what)
            if n == buf.shape[0]:  # metadata undercounted: grow geometrically
                grow = max(16, n // 2)
                if max_frames is not None:
                    grow = min(grow, max_frames - n)
                buf = np.concatenate([buf, np.empty((grow,) + buf.shape[1:], np.uint8)])
            buf[n] = rgb
            last = frame.time
            n += 1
            if max_frames is not None and n >= max_frames:
                break
        _check_no_frames(n, p, what)
        fps = _stream_fps(stream, first, last, n)
    assert buf is not None
    frames = buf if n == buf.shape[0] else buf[:n].copy()
    log.debug("read %s %s: %d frames %dx%d @ %.3f fps", what, _q(p), n, frames.shape[2], frames.shape[1], fps)
    return Video(frames=frames, fps=fps)


# --------------------------------------------------------------------------- lazy reading


class VideoReader:
    """A checked video whose frames are decoded on demand: ``reader[indices]`` → ``[N, H, W, 3]`` uint8.

    Made by :func:`open_video`, which decodes the whole file once (without keeping frames) to
    learn its size, count and rate and to prove every frame converts to RGB. Afterwards
    ``reader[[i, j, ...]]`` (also an int, a slice or a ``range``) decodes forward from where the
    last request stopped and returns a read-only array; the frames of the last request stay
    available, and an index before both re-opens the file and decodes again from the start. Memory is thus bounded by the
    frames of one request, whatever the video's length, and the pixels are exactly those of
    :func:`read_video` (the same decoder, frame by frame in the same order).
    ``frames`` decodes the whole video (for short clips and callers that want an array).
    """

    def __init__(self, path: Path, info: VideoInfo, what: str, problem: BadInputError | None = None) -> None:
        self.path, self.info, self.what = path, info, what
        self.problem = problem  # a frame read_video would refuse; raised by check()
        self._container = None
        self._decoded: Iterator | None = None
        self._next = 0  # index of the frame the decoder yields next
        self._kept: dict[int, np.ndarray] = {}  # the frames of the last request

    # -- what Video offers
    @property
    def num_frames(self) -> int:
        return self.info.num_frames

    @property
    def height(self) -> int:
        return self.info.height

    @property
    def width(self) -> int:
        return self.info.width

    @property
    def fps(self) -> float:
        return self.info.fps

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_frames, self.height, self.width, 3)

    @property
    def frames(self) -> np.ndarray:
        """Every frame, ``[T, H, W, 3]`` uint8, a new writable array (memory grows with the length: prefer indexing)."""
        return self._take(list(range(self.num_frames)), keep=False)

    def __len__(self) -> int:
        return self.num_frames

    def check(self) -> None:
        """Raise the refusal :func:`read_video` would raise for this file, if any."""
        if self.problem is not None:
            raise self.problem

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[[int(key)]][0]
        indices = range(self.num_frames)[key] if isinstance(key, slice) else [int(i) for i in np.asarray(key).ravel()]
        n = self.num_frames
        for i in indices:
            if not -n <= i < n:
                raise IndexError(f"frame {i} is out of range for {self.what} {_q(self.path)} with {n} frames")
        return self._take([i % n for i in indices])

    def _take(self, indices: list[int], keep: bool = True) -> np.ndarray:
        at: dict[int, list[int]] = {}  # frame index -> its positions in the result
        for k, i in enumerate(indices):
            at.setdefault(i, []).append(k)
        # Copy what the last request already has, then let go of its array before allocating this one.
        reused = {i: f.copy() for i, f in self._kept.items() if i in at} if keep else {}
        self._kept = {}
        out = np.empty((len(indices), self.height, self.width, 3), dtype=np.uint8)
        for i, frame in reused.items():
            out[at[i]] = frame
        missing = sorted(at.keys() - reused.keys())
        del reused
        if missing:
            if self._decoded is None or missing[0] < self._next:
                self._restart()
            todo, last = set(missing), missing[-1]
            while self._next <= last:
                frame = next(self._decoded, None)
                if frame is None:
                    raise self._changed(f"it now ends after {self._next} frames")
                index = self._next
                self._next += 1
                if index in todo:
                    rgb = _to_rgb(frame, self.path, self.what)
                    if rgb.shape != (self.height, self.width, 3):
                        raise self._changed(f"frame {index} is now {rgb.shape[1]}x{rgb.shape[0]}")
                    out[at[index]] = rgb
        if keep:  # views, so nothing beyond the returned array is held; read-only, so they stay the file's pixels
            out.flags.writeable = False
            self._kept = {i: out[ks[0]] for i, ks in at.items()}
        return out

    def _restart(self) -> None:
        self.close()
        self.path, self._container, stream = _open_video(self.path, self.what)
        self._decoded = _decoded_frames(self._container, stream, self.path, self.what)
        self._next = 0

    def _changed(self, how: str) -> BadInputError:
        return _bad(self.what, self.path, f"changed while it was being read ({how}; it had {self.num_frames} "
                    f"frames of {self.width}x{self.height})", "do not modify the inputs during a run")

    def close(self) -> None:
        """Close the decoder (a later request re-opens the file)."""
        if self._decoded is not None:
            self._decoded.close()
            self._decoded = None
        if self._container is not None:
            self._container.close()
            self._container = None
        self._next = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_video(path: PathLike, *, what: str = "video", defer: bool = False) -> VideoReader:
    """Check a video in full (every frame decoded, none kept) and return a :class:`VideoReader` on it.

    Every refusal :func:`read_video` would make is made here, before any frame is kept; with
    ``defer`` the one :func:`probe_video` would not make (a pixel format that does not convert
    to RGB, a size change) waits in the reader until :meth:`VideoReader.check`, so callers can
    keep the order of their checks.
    """
    p, info, problem = _scan(path, what, check=True)
    reader = VideoReader(p, info, what, problem)
    if not defer:
        reader.check()
    return reader


# --------------------------------------------------------------------------- writing


def _prepare_output(target: Path, what: str) -> Path:
    """Check the target, create its folder, and reserve a hidden temp file beside it."""
    if target.is_dir():
        raise _bad(what, target, "is an existing directory", "pass a file path")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _bad(what, target, f"cannot be written: its folder cannot be created ({_one_line(exc)})",
                   "choose a writable location") from exc
    for _ in range(100):
        tmp = parent / f".{target.stem}.{secrets.token_hex(4)}.part{target.suffix}"
        try:
            # O_EXCL: never clobber; mode 0o666 so the umask decides the final permissions.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _bad(what, target, f"cannot be written ({_one_line(exc)})", "choose a writable location") from exc
        os.close(fd)
        return tmp
    raise _bad(what, target, "cannot get a temporary file beside it", "clean up stale .part files")


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - best effort cleanup
        log.warning("could not remove temporary file %s: %s", _q(p), exc)


def _rate_fraction(fps: float) -> Fraction:
    if not isinstance(fps, (int, float, Fraction)) or isinstance(fps, bool) or not np.isfinite(float(fps)) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if isinstance(fps, Fraction):
        return fps
    rate = Fraction(float(fps)).limit_denominator(1001)
    return _snap_rate(rate)


class VideoWriter:
    """Stream RGB frames into an H.264 (libx264, yuv420p) video, atomically.

    Frames go to a hidden temporary file in the same directory, which is renamed onto
    ``path`` only when the writer closes without error; on an exception inside the
    ``with`` block (or :meth:`abort`) the temporary file is deleted and ``path`` is left
    untouched. ``fps`` may be fractional: 23.976, 29.97, ... are stored exactly as
    24000/1001, 30000/1001, ... ``preset`` is the x264 speed preset; ``options`` are
    extra libx264 options (e.g. ``{"x264-params": "mbtree=0"}``).

    >>> with VideoWriter("out.mp4", width=832, height=480, fps=16) as w:  # doctest: +SKIP
    ...     for chunk in chunks:
    ...         w.write(chunk)          # [T, H, W, 3] or [H, W, 3] uint8
    """

    def __init__(
        self,
        path: PathLike,
        width: int,
        height: int,
        fps: float,
        crf: int = 18,
        *,
        preset: str = "medium",
        options: Mapping[str, str] | None = None,
        what: str = "output video",
    ) -> None:
        self.path = Path(os.fspath(path))
        self.width = int(width)
        self.height = int(height)
        self.what = what
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            even = f"{max(2, self.width + (self.width % 2))}x{max(2, self.height + (self.height % 2))}"
            raise VideoSizeError(_one_line(
                f"{what} {_q(self.path)} cannot be {self.width}x{self.height}: H.264 yuv420p needs a positive "
                f"even width and height; crop or pad the frames to e.g. {even}"
            ))
        if not 0 <= int(crf) <= 51:
            raise ValueError(f"crf must be within 0..51, got {crf}")
        self.rate = _rate_fraction(fps)
        self.fps = float(self.rate)
        self.crf = int(crf)
        self.num_frames = 0
        self._closed = False
        self._tmp = _prepare_output(self.path, what)
        try:
            suffix = self.path.suffix.lower()
            fmt = None if suffix else "mp4"
            opts = {"movflags": "+faststart"} if suffix in ("", ".mp4", ".mov", ".m4v") else {}
            self._container = av.open(os.fspath(self._tmp), mode="w", format=fmt, options=opts)
            stream = self._container.add_stream("libx264", rate=self.rate)
            stream.width = self.width
            stream.height = self.height
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(self.crf), "preset": preset, **{k: str(v) for k, v in (options or {}).items()}}
            self._stream = stream
        except BaseException as exc:
            _unlink_quietly(self._tmp)
            self._closed = True
            if isinstance(exc, (av.FFmpegError, ValueError)):
                raise _bad(what, self.path, f"cannot be created ({_one_line(exc)})",
                           "use a .mp4 name and check that FFmpeg has libx264") from exc
            raise

    # -- context manager
    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:  # never leave a temp file behind when dropped unclosed
        if not getattr(self, "_closed", True):
            try:
                self.abort()
            except Exception:  # pragma: no cover
                pass

    def write(self, frames: np.ndarray) -> None:
        """Append ``[T, H, W, 3]`` or ``[H, W, 3]`` uint8 RGB frames."""
        if self._closed:
            raise ValueError(f"VideoWriter for {_q(self.path)} is already closed")
        arr = np.asarray(frames)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"VideoWriter for {_q(self.path)} expects frames [T, {self.height}, {self.width}, 3] "
                f"or [{self.height}, {self.width}, 3], got shape {np.shape(frames)}"
            )
        if arr.dtype != np.uint8:
            raise ValueError(f"VideoWriter expects uint8 frames, got {arr.dtype} (convert with np.clip(x, 0, 255).astype(np.uint8))")
        try:
            for rgb in arr:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame.pts = self.num_frames
                for packet in self._stream.encode(frame):
                    self._container.mux(packet)
                self.num_frames += 1
        except av.FFmpegError as exc:
            raise _bad(self.what, self.path, f"could not be encoded ({_one_line(exc)})", "check free disk space") from exc

    def close(self) -> None:
        """Flush the encoder, finish the file and move it onto ``path``. Idempotent."""
        if self._closed:
            return
        try:
            if self.num_frames == 0:
                raise ValueError(f"no frames were written to {_q(self.path)}; nothing to save")
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            os.replace(self._tmp, self.path)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, av.FFmpegError):
                raise _bad(self.what, self.path, f"could not be finished ({_one_line(exc)})",
                           "check free disk space") from exc
            raise
        self._closed = True
        log.info("wrote %s %s: %d frames %dx%d @ %.3f fps", self.what, _q(self.path),
                 self.num_frames, self.width, self.height, self.fps)

    def abort(self) -> None:
        """Discard everything written so far; ``path`` is left as it was."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.close()
        except Exception:  # the container may be half-initialised; the temp file goes anyway
            pass
        _unlink_quietly(self._tmp)


def write_video(
    path: PathLike,
    frames: np.ndarray,
    fps: float,
    crf: int = 18,
    *,
    preset: str = "medium",
    options: Mapping[str, str] | None = None,
) -> None:
    """Write all ``frames`` (``[T, H, W, 3]`` uint8 RGB) to an H.264 mp4 at ``path``, atomically."""
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"write_video needs [T, H, W, 3] frames, got shape {arr.shape}")
    with VideoWriter(path, arr.shape[2], arr.shape[1], fps, crf, preset=preset, options=options) as writer:
        writer.write(arr)
