"""Media files in and out: samples to MP4/PNG, a first frame from an image file, file names from
prompts. Used by goku-sample, in-training samples (metrics.MetricsLogger.media) and ShapesBench."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from goku_megatron.data.decode import decode_image, to_pixels


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def write_media(pixels: torch.Tensor, path: Path, fps: int = 8) -> Path:
    """One sample to ``path.png`` (one frame) or ``path.mp4`` (H.264, yuv420p: plays everywhere)."""
    frames = to_uint8(pixels)
    if frames.shape[0] == 1:
        out = path.with_suffix(".png")
        Image.fromarray(frames[0]).save(out)
        return out
    out = path.with_suffix(".mp4")
    h, w = frames.shape[1:3]
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        # yuv420p needs even sides; odd ones are padded by one edge pixel.
        stream.width, stream.height = w + w % 2, h + h % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            if h % 2 or w % 2:
                frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out


def load_frame(path: Path, height: int, width: int) -> torch.Tensor:
    """An image file -> [3, height, width] in [-1, 1] (resized to cover, centre-cropped), the
    same geometry training applies to clips."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image; pass the first frame as a PNG or JPEG file")
    return to_pixels(decode_image(path.read_bytes()), (height, width))[:, 0]


def slug(prompt: str, index: int) -> str:
    """A file name for the ``index``-th prompt: its words in lower case, at most 60 characters."""
    return f"{index:03d}_" + (re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] or "empty")
