"""The parts every converter shares: reading the official files, finding the videos, writing.

Each converter (msrvtt, didemo, anet) only knows its corpus's official layout: it turns
it into `Split`s, lists of entries whose `video` is still the name the official files
use. `write_splits` does the rest the same way for all of them:

- finds each referenced video under the video folder (official names are video ids with
  or without an extension, and downloads come as .mp4, .mkv, .webm, ... or, for DiDeMo's
  AWS copies, `<name>.avi.mp4`), writes the path it found, relative to that folder (the
  recipe's media folder), or `<id><ext>` for a video it did not find;
- counts and lists the missing ones (and drops their entries with `drop_missing`);
- writes our annotation files (`input_pipeline/annotations.py`) atomically;
- loads every written file back through `annotations.load_corpus`, as a run would, so a
  format mistake fails here and not at the start of a training run.

Bad input raises `ConversionError` (a `t2v2t_jax.errors.Refusal`) naming the file and the
entry; the CLIs print it as one line, `FATAL: <file>: <reason>`, and exit with status 2,
as `main.py` does.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import pickle
import sys
from collections.abc import Callable, Sequence

import tqdm

from t2v2t_jax import json_input
from t2v2t_jax.errors import Refusal, one_line

# Containers video downloads come in (DiDeMo's Flickr originals included); a file with
# another extension is found only by its exact name.
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".3gp", ".3g2", ".mpg", ".mpeg",
    ".wmv", ".flv", ".ogv", ".ts", ".mts", ".m2ts", ".asf", ".divx"})


class ConversionError(Refusal):
  """Missing or malformed input; the message names the file and the entry."""


def log(message: str) -> None:
  print(message, flush=True)


def progress(iterable, desc: str, total: int | None = None):
  """A progress bar on a terminal (none in logs and tests, where it would be noise)."""
  return tqdm.tqdm(iterable, desc=desc, total=total, unit="", mininterval=0.5,
                   disable=None, leave=False)


# ---------------------------------------------------------------------------------------
# Reading the official files.

def find_first(src: str, candidates: Sequence[str]) -> str | None:
  """The first of `candidates` (paths relative to `src`) that is a file, or None."""
  for rel in candidates:
    path = os.path.join(src, rel)
    if os.path.isfile(path):
      return path
  return None


def read_json(path: str):
  return json_input.read_json(path, error=ConversionError)


def _text_lines(path: str, f):
  """The lines of a text file open as `f`, a bad byte refused with the file and line."""
  try:
    yield from enumerate(f, 1)
  except UnicodeDecodeError:
    # The text layer decodes ahead in blocks, so where it failed says little: the first
    # bad byte is found again in the file's bytes (only on this error path).
    with open(path, "rb") as raw:
      data = raw.read()
    try:
      data.decode("utf-8")
      reason, start = "a bad byte", 0  # not expected: the text layer found one
    except UnicodeDecodeError as e:
      reason, start = e.reason, e.start
    line = data.count(b"\n", 0, start) + 1
    raise ConversionError(f"{path}: line {line}: not valid UTF-8 (byte {start}: "
                          f"{reason})") from None


def read_id_list(path: str) -> list[tuple[int, str]]:
  """(line number, id) of every non-empty line of a one-id-per-line file."""
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: file not found")
  with open(path, encoding="utf-8") as f:
    return [(n, line.strip()) for n, line in _text_lines(path, f) if line.strip()]


def read_csv(path: str, columns: Sequence[str]) -> list[tuple[int, dict]]:
  """(line number, row) of a CSV file with a header that has `columns`."""
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: file not found")
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(line for _, line in _text_lines(path, f))
    header = reader.fieldnames or []
    absent = [c for c in columns if c not in header]
    if absent:
      raise ConversionError(f"{path}: line 1: the header {header} lacks the column(s) "
                            f"{absent}")
    rows = []
    for row in reader:
      line = reader.line_num
      for c in columns:
        if not (row.get(c) or "").strip():
          raise ConversionError(f"{path}: line {line}: empty {c!r}")
      rows.append((line, row))
  return rows


class _PlainUnpickler(pickle.Unpickler):
  """Unpickles plain data only: dicts, lists, strings, numbers, numpy scalars.

  A pickle can run any code when loaded; a split file from the web has no need to, so
  every global except numpy's scalar constructors is refused.
  """

  _ALLOWED = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
              ("numpy", "dtype")}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"it needs {module}.{name}; only plain data is read")
    return super().find_class(module, name)


def read_plain_pickle(path: str):
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: file not found")
  with open(path, "rb") as f:
    data = f.read()
  try:
    return _PlainUnpickler(io.BytesIO(data)).load()
  except Exception as e:  # a refused global, a truncated or non-pickle file
    raise ConversionError(f"{path}: cannot read this pickle ({e})") from e


def check_text(path: str, where: str, value, what: str) -> str:
  if not isinstance(value, str):
    raise ConversionError(f"{path}: {where}: {what!r} must be a string, got {value!r:.80}")
  return value


# ---------------------------------------------------------------------------------------
# Finding the videos.

def strip_video_ext(name: str) -> str:
  stem, ext = os.path.splitext(name)
  return stem if ext.lower() in VIDEO_EXTENSIONS else name


class VideoIndex:
  """Every file under a folder, by name and by name without its extension.

  `find(name)` tries, in order: a file called `name`; a video `name.<ext>` (DiDeMo's AWS
  copies are `<name>.avi.mp4`); a video `<name without its extension>.<ext>`. Several
  files for one name (`a.mp4` and `a.webm`): the one with the preferred extension, else
  the first in sorted order.
  """

  def __init__(self, root: str, preferred_ext: str = ".mp4"):
    self.root = root
    self.preferred_ext = preferred_ext.lower()
    self._by_name: dict[str, list[str]] = {}
    self._by_stem: dict[str, list[str]] = {}
    self.num_files = 0
    walk = os.walk(root, followlinks=True)
    for folder, dirs, files in progress(walk, f"indexing {root}"):
      dirs.sort()
      for fname in sorted(files):
        if fname.startswith("."):
          continue
        rel = os.path.relpath(os.path.join(folder, fname), root).replace(os.sep, "/")
        self.num_files += 1
        self._by_name.setdefault(fname, []).append(rel)
        stem, ext = os.path.splitext(fname)
        if ext.lower() in VIDEO_EXTENSIONS:
          self._by_stem.setdefault(stem, []).append(rel)

  def _pick(self, paths: list[str]) -> str:
    for p in paths:
      if p.lower().endswith(self.preferred_ext):
        return p
    return paths[0]

  def find(self, name: str) -> str | None:
    for table, key in ((self._by_name, name), (self._by_stem, name),
                       (self._by_stem, strip_video_ext(name))):
      if key in table:
        return self._pick(table[key])
    return None


# ---------------------------------------------------------------------------------------
# Writing our files.

@dataclasses.dataclass
class Split:
  """One annotation file to write.

  filename: its name under the output folder (the name the recipe expects).
  entries: `{"video": official video name, "caption": str | [str, ...]}` in output order.
  paragraph: whether the recipe reads it with `paragraph=True` (the check loads it so).
  """
  filename: str
  entries: list[dict]
  paragraph: bool = False


def add_common_args(parser: argparse.ArgumentParser, videos_help: str) -> None:
  parser.add_argument("--src", required=True,
                      help="folder of the official download (see the layout above)")
  parser.add_argument("--out", required=True,
                      help="folder to write the annotation files to: the recipe's "
                           "{data_root}/anno")
  parser.add_argument("--videos", default=None, help=videos_help)
  parser.add_argument("--ext", default=".mp4",
                      help="extension written for a video that is not found under "
                           "--videos (default: .mp4, as VindLU's re-encoded copies)")
  parser.add_argument("--list-missing", type=int, default=10, metavar="N",
                      help="list at most N missing videos per file (default: 10)")
  parser.add_argument("--drop-missing", action="store_true",
                      help="leave out the entries whose video is missing (a test set "
                           "with videos left out gives numbers not comparable to "
                           "published ones)")


def run_main(parser: argparse.ArgumentParser, convert: Callable[[argparse.Namespace], object],
             argv: Sequence[str] | None) -> int:
  """Parses `argv`, runs `convert(args)`; a refusal (`ConversionError`, an annotation
  error, a file that is not there) is printed as one `FATAL:` line and gives 2. Anything
  else is a converter bug and keeps its traceback."""
  args = parser.parse_args(argv)
  try:
    convert(args)
  except (Refusal, FileNotFoundError, NotADirectoryError) as e:
    print(f"FATAL: {one_line(e)}", file=sys.stderr, flush=True)
    return 2
  return 0


def write_splits(splits: Sequence[Split], out_dir: str, videos_dir: str | None, *,
                 ext: str = ".mp4", list_missing: int = 10, drop_missing: bool = False,
                 candidates: Callable[[str], Sequence[str]] = lambda name: (name,),
                 ) -> dict[str, dict]:
  """Resolves the videos, reports the missing ones, writes and checks every split.

  Args:
    splits: the files to write, with official video names.
    out_dir: the annotation folder (created if needed).
    videos_dir: the folder the videos are in (the recipe's media folder, or the download
      when the videos are re-encoded into the media folder under the same names). None
      or a folder that does not exist: no check, every video written as `<id><ext>`.
    ext: extension for a video that is not found.
    list_missing: how many missing videos to print per split.
    drop_missing: leave out the entries of missing videos.
    candidates: the names to look a video up by, most likely first (e.g. ActivityNet's
      `v_<id>` and `<id>`).

  Returns: per file name, `{"path", "entries", "videos", "texts", "missing"}`.
  """
  if not ext.startswith("."):
    ext = "." + ext
  index = None
  if videos_dir and os.path.isdir(videos_dir):
    index = VideoIndex(videos_dir, ext)
    log(f"videos: {index.num_files:,} files under {videos_dir}")
  elif videos_dir:
    log(f"videos: {videos_dir} does not exist: videos not checked, written as <id>{ext}")
  else:
    log(f"videos: no --videos folder: videos not checked, written as <id>{ext}")

  resolved: dict[str, tuple[str, bool]] = {}  # official name -> (path, found)

  def resolve(name: str) -> tuple[str, bool]:
    if name not in resolved:
      found = None
      if index is not None:
        for cand in candidates(name):
          found = index.find(cand)
          if found:
            break
      resolved[name] = (found, True) if found else (strip_video_ext(name) + ext, False)
    return resolved[name]

  os.makedirs(out_dir, exist_ok=True)
  report = {}
  for split in splits:
    path = os.path.join(out_dir, split.filename)
    videos, missing = [], []
    seen = set()
    for entry in split.entries:
      name = entry["video"]
      if name not in seen:
        seen.add(name)
        videos.append(name)
        if not resolve(name)[1]:
          missing.append(resolve(name)[0])
    if index is not None:
      msg = f"{split.filename}: {len(videos) - len(missing):,} of {len(videos):,} videos found"
      if missing:
        shown = ", ".join(missing[:max(list_missing, 0)])
        more = len(missing) - min(len(missing), max(list_missing, 0))
        msg += f"; {len(missing):,} missing" + (f": {shown}" if shown else "")
        msg += f" (and {more:,} more)" if more else ""
        msg += "; their entries are left out (--drop-missing)" if drop_missing else ""
      log(msg)
    entries = []
    for entry in split.entries:
      video, found = resolve(entry["video"])
      if drop_missing and index is not None and not found:
        continue
      entries.append({"video": video, "caption": entry["caption"]})
    if not entries:
      raise ConversionError(f"{path}: no entries left to write (all {len(videos):,} videos "
                            f"are missing under {videos_dir} and --drop-missing is set)")
    _write_json(path, entries)
    corpus = _check_with_loader(path, videos_dir if index is not None else out_dir,
                                split.paragraph)
    texts = "paragraphs" if split.paragraph else "texts"
    log(f"wrote {path}: {len(entries):,} entries; loads as {corpus.num_videos:,} videos, "
        f"{corpus.num_pairs:,} {texts}")
    report[split.filename] = {"path": path, "entries": len(entries),
                              "videos": corpus.num_videos, "texts": corpus.num_pairs,
                              "missing": missing}
  return report


def _write_json(path: str, entries: list[dict]) -> None:
  """One entry per line (readable, diffable), written to a temporary file then renamed so
  that an interrupted run leaves no half-written file under the recipe's name."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("[\n")
    for i, entry in enumerate(entries):
      f.write(json.dumps(entry, ensure_ascii=False) + (",\n" if i + 1 < len(entries) else "\n"))
    f.write("]\n")
  os.replace(tmp, path)


def _check_with_loader(path: str, media_root: str, paragraph: bool):
  # Imported here: the converters' parsing needs nothing of the project, and a failure
  # here is a converter bug, reported as such.
  from input_pipeline.annotations import AnnotationError, load_corpus
  try:
    return load_corpus(path, media_root, kind="video", paragraph=paragraph)
  except AnnotationError as e:
    raise ConversionError(f"the written file does not load ({e}); this is a converter "
                          "bug") from e
