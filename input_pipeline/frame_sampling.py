"""Which frames of a video a clip is made of (VindLU's segment-based sampling).

The video of `vlen` frames is cut into `num_frames` (T) segments of (nearly) equal length,
`edges = linspace(0, vlen, T + 1).astype(int)`, and one frame is taken from each:

- `rand` (training): a uniformly random index in `[start, end - 1)`. The last frame of a
  segment is never picked, as in VindLU (`random.choice(range(start, end - 1))`); where
  that range is empty (`end - 1 <= start`: a one-frame segment) the segment's first
  frame `start` is used.
- `middle` (evaluation): `(start + end - 1) // 2`, the middle frame of the segment.

Short videos (`vlen < T`): every frame is used once, in order, and the last one is
repeated to fill the clip: `[0, 1, ..., vlen - 1, vlen - 1, ...]`, for both modes. (The
segment formula would give empty segments there; VindLU pads its index list by repeating
the last index, which this matches.)

Indices are presentation-order frame numbers, 0-based; `video_decode.decode_frames` reads
exactly these.
"""

from __future__ import annotations

import numpy as np

SAMPLING_MODES = ("rand", "middle")


def segment_edges(vlen: int, num_frames: int) -> np.ndarray:
  """`num_frames + 1` integer segment boundaries over `[0, vlen]`."""
  return np.linspace(0, vlen, num_frames + 1).astype(int)


def sample_frame_indices(vlen: int, num_frames: int, mode: str,
                         rng: np.random.Generator | None = None) -> list[int]:
  """Returns `num_frames` frame indices in `[0, vlen)`, non-decreasing.

  Args:
    vlen: number of frames of the video (>= 1).
    num_frames: T, the clip length (>= 1).
    mode: 'rand' (train) or 'middle' (eval).
    rng: the generator 'rand' draws from (one `rng.integers` call per segment whose
      range is not empty, in segment order). None: a fresh, unseeded generator.
      'middle' ignores it.
  """
  if mode not in SAMPLING_MODES:
    raise ValueError(f"unknown frame sampling mode {mode!r}; expected one of {SAMPLING_MODES}")
  vlen, num_frames = int(vlen), int(num_frames)
  if vlen < 1:
    raise ValueError(f"cannot sample frames from a video of {vlen} frames")
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")

  if vlen < num_frames:
    return list(range(vlen)) + [vlen - 1] * (num_frames - vlen)

  edges = segment_edges(vlen, num_frames)
  starts, ends = edges[:-1], edges[1:]
  if mode == "middle":
    return [int((start + end - 1) // 2) for start, end in zip(starts, ends)]

  if rng is None:
    rng = np.random.default_rng()
  indices = []
  for start, end in zip(starts, ends):
    if end - 1 <= start:
      indices.append(int(start))
    else:
      indices.append(int(rng.integers(start, end - 1)))  # high is exclusive
  return indices
