"""VindLU-format annotation files: validation, video indices, training pairs, eval sets.

An annotation file is a JSON list of dicts. Video corpora: `{"video": "rel/path.mp4",
"caption": "..."}`; image corpora: `{"image": "rel/path.jpg", "caption": "..."}`. The
caption is a string or a list of strings. Media paths are relative to the corpus's media
root.

The video index (`idx`) of an entry is the index of its video (or image) among the
distinct videos of the file, in order of first appearance. Two training pairs with the
same index are positives for each other in the contrastive loss.

The whole file is validated before any work starts: a missing key, a wrong type or a
missing media root raises `AnnotationError` naming the file and the entry index.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import numpy as np

from input_pipeline.config import corpus_field

MEDIA_KEY = {"video": "video", "image": "image"}


class AnnotationError(ValueError):
  """A malformed annotation file or entry; the message names the file and entry index."""


@dataclasses.dataclass
class Corpus:
  """A validated annotation file.

  Attributes:
    name: corpus name (logs, errors).
    anno_file: the JSON file it was read from.
    media_root: folder the media paths are relative to.
    kind: 'video' or 'image'.
    media: the distinct media paths (as written in the file), index = video index.
    pair_video: int32 [P], the video index of each training pair.
    pair_caption: the raw caption of each training pair (a paragraph in paragraph mode).
    vid2txt: for each video, the indices of its texts.

  The eval texts are the training pairs' texts in the same order (`texts`, with
  `txt2vid` = `pair_video`): every caption of every entry, or one paragraph per entry.
  """
  name: str
  anno_file: str
  media_root: str
  kind: str
  media: list[str]
  pair_video: np.ndarray
  pair_caption: list[str]
  vid2txt: list[list[int]]

  @property
  def texts(self) -> list[str]:
    return self.pair_caption

  @property
  def txt2vid(self) -> np.ndarray:
    return self.pair_video

  @property
  def num_pairs(self) -> int:
    return len(self.pair_caption)

  @property
  def num_videos(self) -> int:
    return len(self.media)

  def media_path(self, video_idx: int) -> str:
    return os.path.join(self.media_root, self.media[video_idx])

  def pair_path(self, pair_index: int) -> str:
    return self.media_path(int(self.pair_video[pair_index]))


def _read_json(anno_file: str) -> list:
  if not os.path.isfile(anno_file):
    raise AnnotationError(f"{anno_file}: annotation file not found")
  try:
    with open(anno_file, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise AnnotationError(f"{anno_file}: not valid JSON ({e})") from e
  if not isinstance(data, list):
    raise AnnotationError(f"{anno_file}: expected a JSON list of entries, got {type(data).__name__}")
  if not data:
    raise AnnotationError(f"{anno_file}: the file holds no entries")
  return data


def _entry_captions(anno_file: str, index: int, entry: dict) -> list[str]:
  if "caption" not in entry:
    raise AnnotationError(f"{anno_file}: entry {index}: missing key 'caption' "
                          f"(keys: {sorted(entry)})")
  caption = entry["caption"]
  if isinstance(caption, str):
    return [caption]
  if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
    return list(caption)
  raise AnnotationError(f"{anno_file}: entry {index}: 'caption' must be a string or a "
                        f"non-empty list of strings, got {caption!r:.80}")


def validate(anno_file: str, media_root: str, kind: str) -> list[tuple[str, list[str]]]:
  """Checks the whole file; returns `(media path, captions)` per entry."""
  if kind not in MEDIA_KEY:
    raise AnnotationError(f"{anno_file}: corpus kind {kind!r} is not one of {sorted(MEDIA_KEY)}")
  data = _read_json(anno_file)
  key = MEDIA_KEY[kind]
  other = "image" if kind == "video" else "video"
  entries = []
  for i, entry in enumerate(data):
    if not isinstance(entry, dict):
      raise AnnotationError(f"{anno_file}: entry {i}: expected a JSON object, got "
                            f"{type(entry).__name__}")
    if key not in entry:
      hint = f" (it has {other!r}: is this an {other} corpus?)" if other in entry else ""
      raise AnnotationError(f"{anno_file}: entry {i}: missing key {key!r} for a {kind} "
                            f"corpus{hint}")
    path = entry[key]
    if not isinstance(path, str) or not path:
      raise AnnotationError(f"{anno_file}: entry {i}: {key!r} must be a non-empty string "
                            f"path, got {path!r:.80}")
    entries.append((path, _entry_captions(anno_file, i, entry)))
  if not isinstance(media_root, str) or not os.path.isdir(media_root):
    raise AnnotationError(f"{anno_file}: entry 0: media root {media_root!r} does not exist "
                          f"(entry 0 refers to {entries[0][0]!r})")
  return entries


# Start-up reads each annotation file from several places (the config check, the steps
# per epoch, the dataset, the evaluator); a WebVid-size file takes tens of seconds to parse
# and validate, so a file that has not changed on disk is read once per process.
_CACHE_SIZE = 8
_cache: collections.OrderedDict = collections.OrderedDict()


def load_corpus(anno_file: str, media_root: str, *, kind: str = "video",
                paragraph: bool = False, name: str | None = None) -> Corpus:
  """Validates and indexes one annotation file.

  Training pairs: one per caption (a list of captions gives several pairs of the same
  video), or one per entry with the captions joined by a space in paragraph mode.
  Eval texts: the same texts in the same order, with text->video and video->texts maps.

  The result is shared by every caller that loads the same unchanged file with the same
  arguments (keyed on the file's size and modification time); treat it as read-only.
  """
  try:
    st = os.stat(anno_file)
  except OSError:
    st = None  # `validate` raises the error that names the file
  key = None
  if st is not None:
    key = (os.path.realpath(anno_file), st.st_mtime_ns, st.st_size, media_root, kind,
           paragraph, name)
    if key in _cache and os.path.isdir(media_root):
      _cache.move_to_end(key)
      return _cache[key]
  corpus = _load_corpus_uncached(anno_file, media_root, kind=kind, paragraph=paragraph,
                                 name=name)
  if key is not None:
    _cache[key] = corpus
    while len(_cache) > _CACHE_SIZE:
      _cache.popitem(last=False)
  return corpus


def _load_corpus_uncached(anno_file: str, media_root: str, *, kind: str, paragraph: bool,
                          name: str | None) -> Corpus:
  entries = validate(anno_file, media_root, kind)
  video_of_path: dict[str, int] = {}
  media: list[str] = []
  pair_video: list[int] = []
  pair_caption: list[str] = []
  for path, captions in entries:
    idx = video_of_path.get(path)
    if idx is None:
      idx = video_of_path[path] = len(media)
      media.append(path)
    texts = [" ".join(c.strip() for c in captions)] if paragraph else captions
    for text in texts:
      pair_video.append(idx)
      pair_caption.append(text)
  vid2txt: list[list[int]] = [[] for _ in media]
  for t, v in enumerate(pair_video):
    vid2txt[v].append(t)
  pair_video_arr = np.asarray(pair_video, np.int32)
  pair_video_arr.setflags(write=False)  # shared between callers (see `load_corpus`)
  return Corpus(name=name or os.path.splitext(os.path.basename(anno_file))[0],
                anno_file=anno_file, media_root=media_root, kind=kind, media=media,
                pair_video=pair_video_arr, pair_caption=pair_caption, vid2txt=vid2txt)


def load_corpus_from_config(corpus_cfg) -> Corpus:
  """`load_corpus` from a `config.corpus_config` (ConfigDict or plain dict)."""
  for key in ("anno_file", "media_root"):
    if not corpus_field(corpus_cfg, key):
      raise AnnotationError(f"corpus {corpus_field(corpus_cfg, 'name', '?')!r}: {key} is not set")
  return load_corpus(corpus_field(corpus_cfg, "anno_file"), corpus_field(corpus_cfg, "media_root"),
                     kind=corpus_field(corpus_cfg, "kind", "video"),
                     paragraph=bool(corpus_field(corpus_cfg, "paragraph", False)),
                     name=corpus_field(corpus_cfg, "name"))
