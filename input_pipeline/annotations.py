"""VindLU-format annotation files: validation, video indices, training pairs, eval sets.

An annotation file is a JSON list of dicts, or one of VindLU's SQLite files (a `.db`,
`.sqlite` or `.sqlite3` suffix; table `annos(id, video | image, caption)`). Video
corpora: `{"video": "rel/path.mp4", "caption": "..."}`; image corpora:
`{"image": "rel/path.jpg", "caption": "..."}`. The caption is a string or a list of
strings. Media paths are relative to the corpus's media root. The file may be a local
path or a `gs://` URL.

The video index (`idx`) of an entry is the index of its video (or image) among the
distinct videos of the file, in order of first appearance. Two training pairs with the
same index are positives for each other in the contrastive loss.

The whole file is validated before any work starts: a missing key, a wrong type, a media
path outside the media root (absolute, or climbing out with `..`), JSON nested deeper than
any entry can be, or a missing media root raises `AnnotationError` (a `t2v2t_jax.errors.
Refusal`) naming the file and the entry index. Media paths are kept in normal form
(`videos/./x` is `videos/x`); a file that names one video by several spellings is warned
about. `shared_videos` finds the media files two corpora share (the training videos an
evaluation would score).

A corpus is not held in Python lists: the file is indexed once per host into flat
arrays on local disk (`annotation_index`), from which each process reads what it looks
up. A `Corpus` pickles as the index folder's path, so Grain's worker processes open the
same files instead of each receiving a copy of millions of strings.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys

import numpy as np

from input_pipeline import annotation_index
from input_pipeline.annotation_index import MEDIA_KEY, AnnotationError  # noqa: F401 (re-export)
from input_pipeline.config import corpus_field


@dataclasses.dataclass(eq=False)
class Corpus:
  """A validated annotation file.

  Attributes:
    name: corpus name (logs, errors).
    anno_file: the annotation file it was read from.
    media_root: folder the media paths are relative to.
    kind: 'video' or 'image'.
    index: its `annotation_index.AnnotationIndex` (arrays on local disk).

  Read-only views of the index (sequences read from its files on access):
    media: the distinct media paths (as written in the file), index = video index.
    pair_video: int32 [P], the video index of each training pair (a read-only memory
      map; `video_of_pair(i)` reads one element without mapping the array).
    pair_caption: the raw caption of each training pair (a paragraph in paragraph mode).
    vid2txt: for each video, the indices of its texts (lists of ints).

  The eval texts are the training pairs' texts in the same order (`texts`, with
  `txt2vid` = `pair_video`): every caption of every entry, or one paragraph per entry.
  """
  name: str
  anno_file: str
  media_root: str
  kind: str
  index: annotation_index.AnnotationIndex

  @property
  def media(self) -> annotation_index.StringTable:
    return self.index.media

  @property
  def pair_video(self) -> np.ndarray:
    return self.index.pair_video

  @property
  def pair_caption(self) -> annotation_index.StringTable:
    return self.index.captions

  @property
  def vid2txt(self) -> annotation_index.Ragged:
    return self.index.vid2txt

  @property
  def texts(self) -> annotation_index.StringTable:
    return self.pair_caption

  @property
  def txt2vid(self) -> np.ndarray:
    return self.pair_video

  @property
  def num_pairs(self) -> int:
    return self.index.num_pairs

  @property
  def num_videos(self) -> int:
    return self.index.num_videos

  def video_of_pair(self, pair_index: int) -> int:
    return self.index.video_of_pair(pair_index)

  def media_path(self, video_idx: int) -> str:
    return os.path.join(self.media_root, self.media[video_idx])

  def pair_path(self, pair_index: int) -> str:
    return self.media_path(self.video_of_pair(pair_index))


# Start-up loads each annotation file from several places (the config check, the steps
# per epoch, the dataset, the evaluator): a file that has not changed on disk gives the
# same Corpus object within a process (and its index is built once per host).
_CACHE_SIZE = 8
_cache: collections.OrderedDict = collections.OrderedDict()


def _check_media_root(anno_file: str, media_root: str, corpus_media) -> None:
  if not isinstance(media_root, str) or not os.path.isdir(media_root):
    raise AnnotationError(f"{anno_file}: entry 0: media root {media_root!r} does not exist "
                          f"(entry 0 refers to {corpus_media[0]!r})")


def _warn_aliases(anno_file: str, info: dict) -> None:
  """Says when a file names one video by several spellings of its path (`videos/x`,
  `videos/./x`): they are counted as one video, which is right, but the file was likely
  assembled from sources that disagree, which is worth a look. A warning, not an error:
  the index is correct either way."""
  aliased = info.get("aliased_videos", 0)
  if aliased:
    examples = "; ".join(info.get("alias_examples", []))
    videos = "1 video is" if aliased == 1 else f"{aliased:,} videos are"
    sys.stderr.write(f"WARNING: {anno_file}: {videos} named by more than one "
                     f"spelling of its path ({info.get('respelt_entries', 0):,} entries not "
                     f"in normal form), each counted as one video (e.g. {examples})\n")


def shared_videos(a: Corpus, b: Corpus, limit: int = 3) -> tuple[int, list[str]]:
  """How many of `b`'s distinct media files are also media files of `a`, and the first
  `limit` of them (as paths under `b`'s media root).

  Files are compared by the real path of their media root joined with their normalised
  path, so two corpora whose roots are the same folder (or one inside the other) are
  compared file by file; corpora with unrelated roots share nothing and cost nothing.
  `b` is read whole into a set (the eval side, usually the small one), `a` is streamed.
  """
  if a.kind != b.kind:
    return 0, []
  root_a, root_b = os.path.realpath(a.media_root), os.path.realpath(b.media_root)
  common = os.path.commonpath([root_a, root_b])
  if common not in (root_a, root_b):
    return 0, []
  prefix_a = os.path.relpath(root_a, common).replace(os.sep, "/")
  prefix_b = os.path.relpath(root_b, common).replace(os.sep, "/")

  def under_common(prefix: str, path: str) -> str:
    return path if prefix == "." else f"{prefix}/{path}"

  wanted = {under_common(prefix_b, p): p for p in b.media}
  found = set()
  for path in a.media:
    key = under_common(prefix_a, path)
    if key in wanted:
      found.add(key)
  shown = [wanted[k] for k in sorted(found)[:limit]]
  return len(found), shown


def load_corpus(anno_file: str, media_root: str, *, kind: str = "video",
                paragraph: bool = False, name: str | None = None,
                cache_dir: str | None = None) -> Corpus:
  """Validates and indexes one annotation file (JSON or VindLU SQLite, by its suffix).

  Training pairs: one per caption (a list of captions gives several pairs of the same
  video), or one per entry with the captions joined by a space in paragraph mode.
  Eval texts: the same texts in the same order, with text->video and video->texts maps.

  The result is shared by every caller that loads the same unchanged file with the same
  arguments (keyed on the file's size, modification time and a sample of its bytes);
  it is read-only. `cache_dir`: where the index folder goes (default:
  `annotation_index.cache_root`).
  """
  if kind not in MEDIA_KEY:
    raise AnnotationError(f"{anno_file}: corpus kind {kind!r} is not one of {sorted(MEDIA_KEY)}")
  identity = annotation_index.stamp(anno_file)
  key = (tuple(sorted(identity.items())), media_root, kind, paragraph, name, cache_dir)
  if key in _cache and isinstance(media_root, str) and os.path.isdir(media_root):
    _cache.move_to_end(key)
    return _cache[key]
  index = annotation_index.open_index(anno_file, kind=kind, paragraph=paragraph,
                                      identity=identity, cache_dir=cache_dir)
  _check_media_root(anno_file, media_root, index.media)
  _warn_aliases(anno_file, index.info)
  corpus = Corpus(name=name or annotation_index.default_name(anno_file), anno_file=anno_file,
                  media_root=media_root, kind=kind, index=index)
  _cache[key] = corpus
  while len(_cache) > _CACHE_SIZE:
    _cache.popitem(last=False)
  return corpus


def load_corpus_from_config(corpus_cfg) -> Corpus:
  """`load_corpus` from a `config.corpus_config` (ConfigDict or plain dict)."""
  for key in ("anno_file", "media_root"):
    if not corpus_field(corpus_cfg, key):
      raise AnnotationError(f"corpus {corpus_field(corpus_cfg, 'name', '?')!r}: {key} is not set")
  return load_corpus(corpus_field(corpus_cfg, "anno_file"), corpus_field(corpus_cfg, "media_root"),
                     kind=corpus_field(corpus_cfg, "kind", "video"),
                     paragraph=bool(corpus_field(corpus_cfg, "paragraph", False)),
                     name=corpus_field(corpus_cfg, "name"))
