"""Reading frames from video files with PyAV, and still images with PIL.

Frame numbers are presentation-order indices, 0-based, as `frame_sampling` produces
them. `decode_frames` returns exactly the frames asked for, or raises `VideoDecodeError`
(missing, empty, truncated or undecodable file, or a file that yields fewer frames than
the indices need); it never pads or substitutes frames.

Ways to reach the wanted frames (`strategy`):
- `sequential`: decode the stream once from the start, keeping the wanted frames, and stop
  after the last one. Costs `max(indices) + 1` frame decodes; needs nothing but the
  decoder, and is the fallback of the others.
- `auto` (default): first a frame table, from a demux pass over the packets up to the
  last wanted frame (no decoding): every frame's presentation timestamp and the
  keyframes. Then decode forward, seeking to the keyframe before a wanted frame when that
  skips more than `SEEK_COST_FRAMES` frame decodes (sparse clips of long videos with
  frequent keyframes seek; short videos, long GOPs and dense clips go straight through).
  A single-threaded decoder is also told to drop the non-reference frames (most
  B-frames) that are not wanted: they are never needed to decode other frames.
- `seek`: as `auto`, but seeks whenever a keyframe lies between the decoder and the next
  wanted frame (for tests and measurements).

The table path maps decoded frames to indices by their presentation timestamps (the sorted
packet pts), so it is exact for B-frames, variable frame rate and open GOPs. A seek that
lands after the frame it was meant to reach is retried from the keyframe before; without
usable timestamps, or with no keyframe early enough, the read falls back to `sequential`.

On the 20 s, 456x256, 25 fps test videos of `benchmarks/input_pipeline.py`, an 8-frame
'rand' clip costs about 210 ms of CPU decoding straight through; see docs/benchmarks.md
for what the table path saves with keyframes every 250 and every 25 frames.

Threads: each decoder runs `threads` FFmpeg threads (default 1): loaders get their
parallelism from worker processes, and one thread per decoder avoids oversubscribing the
cores; it also lets the table path drop unwanted non-reference frames, which is only
sound when each packet is decoded as it is sent. `threads=0` lets FFmpeg pick (one per
core, frame and slice threading).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from fractions import Fraction

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from input_pipeline.frame_sampling import sample_frame_indices

DECODE_STRATEGIES = ("auto", "seek", "sequential")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# What a seek costs, in frame decodes (flush, container I/O, decoder restart, B-frame
# delay): `auto` seeks only when it skips more frames than this.
SEEK_COST_FRAMES = 4.0
# Packets read past the last wanted frame before its timestamp order is certain (H.264
# and HEVC reorder by at most 16 frames).
REORDER_MARGIN = 32


ERROR_KINDS = ("missing", "empty", "too_few_frames", "undecodable")


class VideoDecodeError(Exception):
  """A video or image could not be read; the message names the path and the reason.

  `kind` sorts the failure for bad-data accounting: 'missing' (no such file), 'empty'
  (zero bytes), 'too_few_frames' (the file holds fewer frames than the indices need:
  truncated, or a frame count in the header that the stream does not reach) or
  'undecodable' (anything else: not a media file, no video stream, corrupt data)."""

  def __init__(self, path, reason: str, kind: str = "undecodable"):
    if kind not in ERROR_KINDS:
      raise ValueError(f"unknown error kind {kind!r}")
    self.path = os.fspath(path)
    self.reason = reason
    self.kind = kind
    super().__init__(f"{self.path}: {reason}")


class _SeekMissed(Exception):
  """The table path cannot reach a frame (no keyframe early enough, or its timestamp never
  came out of the decoder); internal: the read falls back to `sequential`."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  num_frames: int  # frames in the stream (see `probe_video` for where the count comes from)
  fps: float  # average frame rate
  width: int
  height: int
  duration: float  # seconds


@dataclasses.dataclass(frozen=True)
class _FrameTable:
  """Presentation-ordered frame timestamps and the keyframes to seek to."""
  pts: list[int]  # pts of frame i, sorted
  pts_to_index: dict[int, int]
  keyframes: list[int]  # presentation indices of keyframes, sorted
  keyframe_seek_ts: list[int]  # timestamp that `container.seek` reaches each keyframe with
  complete: bool  # the whole stream was scanned (else: its first frames only)


def is_image_path(path) -> bool:
  return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------------------
# Opening and probing


def _check_file(path: str) -> None:
  if not os.path.exists(path):
    raise VideoDecodeError(path, "file not found", "missing")
  if not os.path.isfile(path):
    raise VideoDecodeError(path, "not a regular file")
  if os.path.getsize(path) == 0:
    raise VideoDecodeError(path, "empty file", "empty")


@contextlib.contextmanager
def _open_video(path, threads: int = 1) -> Iterator[tuple[av.container.InputContainer,
                                                          av.video.stream.VideoStream]]:
  """Opens `path`, yields `(container, first video stream)`; FFmpeg errors become
  `VideoDecodeError`, and the container is always closed."""
  path = os.fspath(path)
  _check_file(path)
  try:
    container = av.open(path, mode="r", metadata_errors="ignore")
  except (av.FFmpegError, OSError, ValueError, EOFError, UnicodeDecodeError) as e:
    raise VideoDecodeError(path, f"cannot open as a video ({type(e).__name__}: {e})") from e
  with container:
    if not container.streams.video:
      raise VideoDecodeError(path, "no video stream")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    ctx.thread_type = "AUTO"
    ctx.thread_count = max(0, int(threads))
    try:
      yield container, stream
    except (av.FFmpegError, EOFError) as e:
      raise VideoDecodeError(path, f"decoding failed ({type(e).__name__}: {e})") from e


def _frame_rate(stream) -> Fraction | None:
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate:
      return Fraction(rate)
  return None


def _count_packets(container, stream) -> int:
  """Frames of `stream` by counting its packets (reads the file once, no decoding)."""
  return sum(1 for packet in container.demux(stream)
             if packet.size and not packet.is_discard)  # skip flush packets, edit-list discards


def _probe(container, stream, path: str) -> VideoInfo:
  rate = _frame_rate(stream)
  time_base = stream.time_base
  duration = None
  if stream.duration and time_base:
    duration = float(stream.duration * time_base)
  elif container.duration:
    duration = container.duration / av.time_base

  num_frames = int(stream.frames or 0)
  if num_frames <= 0:
    # Some containers (Matroska/WebM, raw streams, some AVI) do not store a frame count:
    # count the packets (one per frame for video codecs; no decoding).
    try:
      num_frames = _count_packets(container, stream)
    except (av.FFmpegError, EOFError):
      num_frames = 0
    if num_frames <= 0 and duration and rate:
      num_frames = int(round(duration * float(rate)))
  if num_frames <= 0:
    raise VideoDecodeError(path, "no frames")
  fps = float(rate) if rate else (num_frames / duration if duration else 0.0)
  if duration is None:
    duration = num_frames / fps if fps else 0.0
  ctx = stream.codec_context
  return VideoInfo(num_frames=num_frames, fps=fps, width=int(ctx.width), height=int(ctx.height),
                   duration=float(duration))


def probe_video(path) -> VideoInfo:
  """Frame count, frame rate, size and duration of the first video stream.

  `num_frames` is the container's frame count (the MP4/MOV sample table) when it has one;
  when it reports 0 (Matroska/WebM, raw streams), the packets are counted instead (one
  demux pass, no decoding); as a last resort, `round(duration * fps)`. A file truncated
  after its header can report more frames than it holds: `decode_frames` then raises.
  """
  path = os.fspath(path)
  with _open_video(path) as (container, stream):
    return _probe(container, stream, path)


# ---------------------------------------------------------------------------------------
# Decoding


def _decoded_frames(container, stream) -> Iterator[av.VideoFrame]:
  """Frames in presentation order from the container's current position (flushes at EOF)."""
  for packet in container.demux(stream):
    yield from packet.decode()


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
  return frame.to_ndarray(format="rgb24")


def _mid_stream_error(path: str, target: int, decoded: int, error: Exception) -> VideoDecodeError:
  """A decoder error after the file opened: a truncated or corrupt stream. With frames
  already decoded it counts as too few frames (a cut-off file's usual symptom)."""
  return VideoDecodeError(
      path, f"stream ended before frame {target}: decoding failed after {decoded} frames "
      f"({type(error).__name__}: {error})", "too_few_frames" if decoded else "undecodable")


def _decode_sequential(container, stream, path: str, wanted: list[int],
                       stats: dict) -> dict[int, np.ndarray]:
  wanted_set = set(wanted)
  last = wanted[-1]
  out: dict[int, np.ndarray] = {}
  count = 0
  try:
    for index, frame in enumerate(_decoded_frames(container, stream)):
      count = index + 1
      if index in wanted_set:
        out[index] = _to_rgb(frame)
      if index >= last:
        stats["decoded"] = count
        return out
  except (av.FFmpegError, EOFError) as e:
    raise _mid_stream_error(path, last, count, e) from e
  raise VideoDecodeError(path, f"only {count} frames could be decoded; frame {last} was requested",
                         "too_few_frames")


def _frame_table(container, stream, needed: int) -> _FrameTable | None:
  """pts and keyframes of the first `needed` frames, from one demux pass that stops
  `REORDER_MARGIN` packets after the `needed`-th (decoders reorder frames by at most 16
  positions, so the `needed` smallest timestamps are known by then). None when the
  timestamps cannot identify frames (missing or repeated pts)."""
  packets = []
  complete = True
  for packet in container.demux(stream):
    if packet.size == 0 or packet.is_discard:  # flush packets; edit-list discards
      continue
    if packet.pts is None:
      return None
    packets.append((packet.pts, packet.is_keyframe))
    if len(packets) >= needed + REORDER_MARGIN:
      complete = False
      break
  if not packets:
    return None
  pts = sorted(t for t, _ in packets)
  if len(set(pts)) != len(pts):
    return None
  if not complete:
    pts = pts[:needed]  # later entries may still miss frames not yet demuxed
  pts_to_index = {t: i for i, t in enumerate(pts)}
  keyframes = sorted(pts_to_index[t] for t, key in packets if key and t in pts_to_index)
  if not keyframes:
    return None
  # Seek by the keyframe's pts: FFmpeg's MP4 and Matroska demuxers seek in presentation
  # time (the MP4 demuxer shifts the request by the edit-list offset before searching
  # its dts-based index); a request at a keyframe's dts lands a whole GOP early.
  return _FrameTable(pts=pts, pts_to_index=pts_to_index, keyframes=keyframes,
                     keyframe_seek_ts=[pts[k] for k in keyframes], complete=complete)


def _decode_seeking(container, stream, path: str, wanted: list[int], table: _FrameTable,
                    seek_cost: float, skip_unwanted: bool, stats: dict) -> dict[int, np.ndarray]:
  """Decodes `wanted` (sorted, unique) frames by the frame table.

  Seeks to the keyframe before a wanted frame when that skips more than `seek_cost`
  frame decodes, else decodes forward. A seek that lands after its target is retried
  from the keyframe before; `_SeekMissed` when none is left. `skip_unwanted`: the decoder
  drops non-reference frames that are not wanted (`skip_frame='NONREF'`, set packet by
  packet; only sound with a single-threaded decoder, which decodes each packet as it is
  sent)."""
  if table.complete and wanted[-1] >= len(table.pts):
    raise VideoDecodeError(path, f"has {len(table.pts)} frames; frame {wanted[-1]} was requested",
                           "too_few_frames")
  wanted_set = set(wanted)
  wanted_pts = {table.pts[i] for i in wanted}
  ctx = stream.codec_context
  out: dict[int, np.ndarray] = {}
  frames = None  # decoded-frame iterator, None until the first seek
  position = -1  # presentation index of the last decoded frame; None right after a seek
  decoded = 0
  stats["seeks"] = 0

  def decoded_frames():
    for packet in container.demux(stream):
      if skip_unwanted:
        ctx.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in wanted_pts else "NONREF"
      yield from packet.decode()

  def seek(k: int):
    if k < 0:
      raise _SeekMissed()  # no keyframe early enough (e.g. an open-GOP start)
    container.seek(int(table.keyframe_seek_ts[k]), stream=stream, backward=True, any_frame=False)
    stats["seeks"] += 1
    return decoded_frames()

  try:
    for target in wanted:
      if target in out:
        continue
      k = bisect.bisect_right(table.keyframes, target) - 1
      if frames is None or (k >= 0 and table.keyframes[k] > position
                            and table.keyframes[k] - position - 1 > seek_cost):
        frames, position = seek(k), None
      while True:
        try:
          for frame in frames:
            decoded += 1
            index = table.pts_to_index.get(frame.pts)
            if index is None:
              continue
            if position is None and index > target:
              break  # the seek overshot
            position = index
            if index in wanted_set and index not in out:
              out[index] = _to_rgb(frame)
            if index >= target:
              break
          else:
            raise VideoDecodeError(path, f"stream ended before frame {target} (truncated or corrupt)",
                                   "too_few_frames")
        except (av.FFmpegError, EOFError) as e:
          raise _mid_stream_error(path, target, decoded, e) from e
        if position is not None:
          break
        k -= 1
        frames = seek(k)
      if target not in out:
        raise _SeekMissed()  # went past the target without seeing its timestamp
  finally:
    if skip_unwanted:
      ctx.skip_frame = "DEFAULT"
    stats["decoded"] = decoded
  return out


def _decode(container, stream, path: str, indices: Sequence[int], strategy: str,
            num_frames: int | None, fresh: bool, stats: dict | None = None) -> np.ndarray:
  """Decodes `indices` from an open container. `num_frames`: the probed count, if known.
  `fresh`: no packets have been read yet (the sequential path must start at frame 0).
  `stats`, if given, receives 'path' ('table' or 'sequential'), 'decoded' (frames the
  decoder output) and, on the table path, 'seeks'."""
  stats = {} if stats is None else stats
  if strategy not in DECODE_STRATEGIES:
    raise ValueError(f"unknown decode strategy {strategy!r}; expected one of {DECODE_STRATEGIES}")
  indices = [int(i) for i in indices]
  if not indices:
    ctx = stream.codec_context
    return np.zeros((0, ctx.height, ctx.width, 3), np.uint8)
  if min(indices) < 0:
    raise ValueError(f"negative frame index in {indices}")
  wanted = sorted(set(indices))
  if num_frames is not None and wanted[-1] >= num_frames:
    raise VideoDecodeError(path, f"has {num_frames} frames; frame {wanted[-1]} was requested",
                           "too_few_frames")

  frames = None
  stats["path"] = "sequential"
  if strategy != "sequential":
    table = _frame_table(container, stream, needed=wanted[-1] + 1)
    fresh = False
    if table is not None:
      # 'seek': to every keyframe ahead of the decoder; 'auto': only when that saves work.
      seek_cost = 0.0 if strategy == "seek" else SEEK_COST_FRAMES
      single_thread = stream.codec_context.thread_count == 1
      try:
        frames = _decode_seeking(container, stream, path, wanted, table, seek_cost,
                                 skip_unwanted=single_thread, stats=stats)
        stats["path"] = "table"
      except _SeekMissed:
        frames = None
  if frames is None:
    if not fresh:  # rewind by reopening: seeking to the start is not exact in every container
      with _open_video(path, threads=stream.codec_context.thread_count) as (container2, stream2):
        frames = _decode_sequential(container2, stream2, path, wanted, stats)
    else:
      frames = _decode_sequential(container, stream, path, wanted, stats)
  return np.stack([frames[i] for i in indices])


def decode_frames(path, indices: Sequence[int], *, strategy: str = "auto", threads: int = 1,
                  stats: dict | None = None) -> np.ndarray:
  """Decodes the frames at presentation indices `indices` (any order, repeats allowed).

  Returns uint8 `[len(indices), H, W, 3]` RGB. `strategy`: 'auto', 'seek' or
  'sequential' (module docstring). Raises `VideoDecodeError` naming the path when the
  file is missing, empty, not a video, corrupt, or has fewer frames than `indices` need.
  `stats`: a dict that receives how the frames were reached ('path': 'table' or
  'sequential', 'decoded': frames decoded, 'seeks').
  """
  path = os.fspath(path)
  with _open_video(path, threads) as (container, stream):
    frames = _decode(container, stream, path, indices, strategy, num_frames=None, fresh=True,
                     stats=stats)
  return frames


def read_clip(path, num_frames: int, mode: str, rng: np.random.Generator | None, *,
              max_seconds: float | None = None, strategy: str = "auto",
              threads: int = 1, stats: dict | None = None) -> tuple[np.ndarray, list[int]]:
  """Probes the video, samples `num_frames` indices (`frame_sampling`), decodes them.

  `max_seconds`: only the first `max_seconds` of the video are sampled from (trimming at
  decode time, as VindLU's DiDeMo setup trims to 30 s): `vlen = min(num_frames_in_file,
  ceil(max_seconds * fps))`. Returns `(frames uint8 [num_frames, H, W, 3], indices)`.
  `strategy`, `threads`, `stats`: as for `decode_frames`.
  """
  path = os.fspath(path)
  with _open_video(path, threads) as (container, stream):
    info = _probe(container, stream, path)
    fresh = bool(stream.frames)  # _probe demuxed the file when it had to count packets
    vlen = info.num_frames
    if max_seconds is not None:
      if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
      if info.fps > 0:
        vlen = min(vlen, max(1, math.ceil(max_seconds * info.fps - 1e-6)))
    indices = sample_frame_indices(vlen, num_frames, mode, rng)
    frames = _decode(container, stream, path, indices, strategy, num_frames=info.num_frames,
                     fresh=fresh, stats=stats)
  return frames, indices


def read_image(path) -> np.ndarray:
  """A still image as a one-frame clip: uint8 `[1, H, W, 3]` RGB (PIL; any mode converted)."""
  path = os.fspath(path)
  _check_file(path)
  try:
    with Image.open(path) as image:
      image.load()
      array = np.asarray(image.convert("RGB"), dtype=np.uint8)
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    raise VideoDecodeError(path, f"cannot read image ({type(e).__name__}: {e})") from e
  return array[None]
