"""Clip augmentation on the host (uint8, numpy/PIL).

Train: RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3/4, 4/3), bicubic) then a
horizontal flip with probability 0.5, the SAME crop and flip for every frame of a clip.
Eval: bicubic resize to size x size (aspect ratio not kept), no crop. Resizing is PIL's
bicubic (`Image.BICUBIC`, which widens its filter by the scale factor when downsampling,
i.e. antialiased), per frame; the crop is cut out first and then resized, as
torchvision's `resized_crop` does (pixels outside the crop never leak in at its edges).

The frames stay uint8 until the device: the model normalises them itself
(`t2v2t_jax.models.t2v2t.normalize_frames`), so four times fewer bytes cross to the device.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

def random_resized_crop_params(height: int, width: int, rng: np.random.Generator,
                               scale: tuple[float, float] = (0.5, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """`(top, left, h, w)` of a random crop, with torchvision's RandomResizedCrop semantics.

  Up to 10 tries: an area fraction uniform in `scale`, an aspect ratio (w / h) log-uniform
  in `ratio`, `w = round(sqrt(area * ratio))`, `h = round(sqrt(area / ratio))`; the first
  that fits the frame is placed uniformly at random. If none fits, a central crop of the
  whole frame clamped to the ratio range.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _check_clip(frames: np.ndarray) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
  return frames


def resize_frames(frames: np.ndarray, size: int | tuple[int, int],
                  box: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """Bicubic resize of every frame (optionally of the crop `box` = (top, left, h, w)) to
  `size` (an int for square, or (height, width)); uint8 in, uint8 out."""
  frames = _check_clip(frames)
  out_h, out_w = (size, size) if isinstance(size, int) else size
  num, height, width, _ = frames.shape
  top, left, h, w = box if box is not None else (0, 0, height, width)
  if (h, w) == (out_h, out_w):  # nothing to resample: exact crop
    return np.ascontiguousarray(frames[:, top:top + h, left:left + w])
  out = np.empty((num, out_h, out_w, 3), np.uint8)
  for i in range(num):
    image = Image.fromarray(np.ascontiguousarray(frames[i, top:top + h, left:left + w]))
    out[i] = np.asarray(image.resize((out_w, out_h), Image.BICUBIC))
  return out


def train_transform(frames: np.ndarray, size: int, rng: np.random.Generator,
                    scale: tuple[float, float] = (0.5, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Random resized crop to `size` x `size` and random horizontal flip (p = 0.5), the same
  for all frames. uint8 `[T, H, W, 3]` -> uint8 `[T, size, size, 3]`. Draws from `rng`:
  the crop (as `random_resized_crop_params`), then one uniform for the flip."""
  frames = _check_clip(frames)
  _, height, width, _ = frames.shape
  box = random_resized_crop_params(height, width, rng, scale, ratio)
  out = resize_frames(frames, size, box)
  if rng.random() < 0.5:
    out = np.ascontiguousarray(out[:, :, ::-1])
  return out


def eval_transform(frames: np.ndarray, size: int) -> np.ndarray:
  """Bicubic resize to `size` x `size` (aspect ratio not kept): uint8 `[T, size, size, 3]`."""
  return resize_frames(frames, size)
