"""The videos a search ranks: which files, and how each is read (as evaluation reads it).

`list_videos` gives every video file of a folder and its subfolders (any container PyAV
reads, by extension, case-insensitive: `VIDEO_EXTENSIONS`; hidden files and folders are
skipped), sorted by path, or, by default, the videos of the config's first eval corpus. Each is read as at evaluation
('middle' frames, `config.eval.num_frames` of them, bicubic resize to the model's image
size) by Grain threads (`video_batches`); a file that cannot be read becomes a black clip
and is recorded, so the search can leave it out.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import grain
import jax
import numpy as np

from input_pipeline import transforms
from input_pipeline import video_decode
from input_pipeline.annotations import load_corpus_from_config
from input_pipeline.config import corpus_field

# The containers FFmpeg (so PyAV) demuxes that hold video, by their usual extensions. The
# extension decides what is listed; whether a file really decodes is found out when it is
# read (an unreadable one is recorded, not fatal).
VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".qt", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".m2v",
    ".ts", ".mts", ".m2ts", ".flv", ".f4v", ".wmv", ".asf", ".3gp", ".3g2", ".ogv",
    ".vob", ".mxf", ".dv", ".y4m", ".divx")


@dataclasses.dataclass
class VideoList:
  """The videos searched: absolute paths, how each is read, and where they came from."""
  paths: list[str]
  kind: str = "video"             # 'video' or 'image' (an image corpus: 1-frame clips)
  max_seconds: float | None = None
  max_len: int | None = None      # text length of the corpus (None: config.data.max_len)
  source: str = ""
  root: str = ""                  # the library root: the index stores paths relative to it


def find_video_files(folder: str) -> list[str]:
  """Absolute paths of the video files under `folder` (recursive), sorted by relative path.

  Hidden files and folders (a leading '.': `.git`, macOS `._clip.mp4` resource forks,
  thumbnail caches) are skipped; symbolic links to files are listed, links to folders
  are not followed (a link back up the tree would never end)."""
  folder = os.path.abspath(folder)
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for name in filenames:
      path = os.path.join(dirpath, name)
      if (not name.startswith(".") and name.lower().endswith(VIDEO_EXTENSIONS)
          and os.path.isfile(path)):
        found.append(path)
  return sorted(found, key=lambda p: os.path.relpath(p, folder))


def list_videos(config, videos: str | None = None) -> VideoList:
  """`videos` (a folder: its video files, recursive, sorted) or the config's first eval
  corpus."""
  if videos:
    if not os.path.isdir(videos):
      raise FileNotFoundError(f"--videos {videos}: no such folder")
    paths = find_video_files(videos)
    if not paths:
      raise FileNotFoundError(f"--videos {videos}: no video files in it or its subfolders "
                              f"({' '.join(VIDEO_EXTENSIONS)})")
    root = os.path.abspath(videos)
    return VideoList(paths=paths, source=root, root=root)
  corpora = list(config.data.eval_corpora)
  if not corpora:
    raise ValueError("config.data.eval_corpora is empty: pass --videos FOLDER")
  corpus_cfg = corpora[0]
  corpus = load_corpus_from_config(corpus_cfg)
  paths = [os.path.abspath(corpus.media_path(i)) for i in range(corpus.num_videos)]
  # The corpus's videos may sit in several folders: the index is relative to their
  # common folder.
  root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
  return VideoList(paths=paths, kind=corpus.kind, root=root,
                   max_seconds=corpus_field(corpus_cfg, "max_seconds"),
                   max_len=corpus_field(corpus_cfg, "max_len"),
                   source=f"eval corpus {corpus.name!r} ({corpus.anno_file})")


def read_frames(path: str, num_frames: int, image_size: int, *, kind: str = "video",
                max_seconds: float | None = None) -> np.ndarray:
  """The clip the model sees at evaluation: uint8 [T, S, S, 3] ('middle' frames, resize)."""
  if kind == "image":
    frames = video_decode.read_image(path)
  else:
    frames, _ = video_decode.read_clip(path, num_frames, "middle", None, max_seconds=max_seconds)
  return transforms.eval_transform(frames, image_size)


class _ReadClip:
  """Grain `map`: (video index, valid) -> clip; an unreadable file gives a black clip."""

  def __init__(self, videos: VideoList, num_frames: int, image_size: int):
    self.videos = videos
    self.num_frames = 1 if videos.kind == "image" else int(num_frames)
    self.image_size = int(image_size)

  def __call__(self, item) -> dict:
    index, valid = int(item[0]), int(item[1])
    path = self.videos.paths[index]
    error = ""
    try:
      frames = read_frames(path, self.num_frames, self.image_size, kind=self.videos.kind,
                           max_seconds=self.videos.max_seconds)
      if frames.shape[0] != self.num_frames:
        raise ValueError(f"decoded {frames.shape[0]} of {self.num_frames} frames")
    except Exception as e:  # pylint: disable=broad-except
      error = f"{type(e).__name__}: {e}"
      frames = np.zeros((self.num_frames, self.image_size, self.image_size, 3), np.uint8)
    return {"frames": np.ascontiguousarray(frames, np.uint8), "video_idx": np.int32(index),
            "valid": np.int32(valid), "error": error}


@dataclasses.dataclass
class VideoBatches:
  """What `RetrievalEvaluator.embed_videos` reads: batches of this process's videos."""
  videos: Iterable
  num_videos: int


def video_batches(videos: VideoList, config, failures: dict) -> VideoBatches:
  """Batches of this process's share of `videos`; every file that could not be read is
  added to `failures` {path: error} as its batch is read."""
  n = len(videos.paths)
  count, index = jax.process_count(), jax.process_index()
  local_devices = jax.local_device_count()
  batch = max(1, config.eval.video_batch_size // count)
  # No batch much larger than the videos need, and a power of two below the configured
  # size: adding a few videos to a library compiles the encoder for one of a handful of
  # shapes (a searcher reuses them), not for every count.
  need = -(-n // count)
  if need < batch:
    batch = 1 << (need - 1).bit_length()
  batch = -(-batch // local_devices) * local_devices
  chunk = count * batch
  padded = -(-n // chunk) * chunk
  ids = np.concatenate([np.arange(n), np.full(padded - n, n - 1)]).astype(np.int32)
  valid = (np.arange(padded) < n).astype(np.int32)
  items = np.stack([ids, valid], axis=1)[index::count]
  ds = grain.MapDataset.source([tuple(x) for x in items.tolist()])
  ds = ds.map(_ReadClip(videos, config.eval.num_frames, config.model.vision.image_size))
  threads = max(1, int(config.data.worker_threads))
  it = ds.batch(batch).to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                         prefetch_buffer_size=2))

  def batches():
    for b in it:
      for i, v, err in zip(b["video_idx"], b["valid"], b["error"]):
        if v and str(err):
          failures[videos.paths[int(i)]] = str(err)
      yield b

  return VideoBatches(videos=batches(), num_videos=n)
