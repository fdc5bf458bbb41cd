r"""MSR-VTT, 9k train / 1k-A test (JSFusion's split), from either common download.

  python -m input_pipeline.convert.msrvtt --src DIR --out DATA/anno --videos DATA/videos/msrvtt

writes what `configs/msrvtt_ft.py` reads:

  msrvtt_ret_train9k.json  one entry per caption: the 20 captions of each of the 9,000
                           training videos, {"video": "video0.mp4", "caption": str}
  msrvtt_ret_test1k.json   one entry per test video, with the one query caption JSFusion
                           chose for it (the 1k-A protocol): 1,000 entries

MSR-VTT (Xu et al., CVPR 2016) has 10,000 clips with 20 captions each; the 1k-A split
(Yu et al., "A Joint Sequence Fusion Model...", ECCV 2018) trains on 9,000 of them and
tests on 1,000, one caption each. `--src` is one of two layouts, found by its files:

  CLIP4Clip's `msrvtt_data.zip` (github.com/ArrowLuo/CLIP4Clip, release v0.0), unpacked
  (as `DIR/` or `DIR/msrvtt_data/`):
    MSRVTT_data.json          {"videos": [...], "sentences": [{"video_id": "video0",
                              "caption": str, "sen_id": int}, ...]}: all 200k captions
    MSRVTT_train.9k.csv       column video_id: the 9,000 training videos
    MSRVTT_JSFUSION_test.csv  columns key, vid_key, video_id, sentence: the 1,000 queries
    videos: MSRVTT_Videos/ if present (CLIP4Clip's --features_path), else pass --videos

  Frozen in Time's `MSRVTT.zip` (the video download VindLU's DATA.md links), unpacked (as
  `DIR/` or `DIR/MSRVTT/`):
    annotation/MSR_VTT.json   {"annotations": [{"image_id": "video0", "caption": str,
                              "id": int}, ...], "images": [...], ...}
    high-quality/structured-symlinks/train_list_jsfusion.txt  9,000 ids, one a line
    high-quality/structured-symlinks/val_list_jsfusion.txt    the 1,000 test ids
    high-quality/structured-symlinks/jsfusion_val_caption_idx.pkl  {video id: index of
                              the query among that video's captions, in file order}
    videos: videos/all/ (video0.mp4 ... video9999.mp4)

The captions are kept as written (lower case, no final period); the text pipeline
normalises them. Videos are referred to as `<id>.mp4` (or the file found under --videos).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from input_pipeline.convert import common
from input_pipeline.convert.common import ConversionError

TRAIN_FILE = "msrvtt_ret_train9k.json"
TEST_FILE = "msrvtt_ret_test1k.json"

CLIP4CLIP_DIRS = ("", "msrvtt_data")
FROZEN_DIRS = ("", "MSRVTT")
SPLIT_DIR = os.path.join("high-quality", "structured-symlinks")


def _captions_by_video(path: str, records, video_key: str) -> dict[str, list[str]]:
  """video id -> its captions in file order, from a list of caption records."""
  key = "sentences" if video_key == "video_id" else "annotations"
  by_video: dict[str, list[str]] = {}
  for i, rec in enumerate(common.progress(records, f"reading {os.path.basename(path)}")):
    where = f"{key}[{i}]"
    if not isinstance(rec, dict):
      raise ConversionError(f"{path}: {where}: expected an object, got {rec!r:.80}")
    for field in (video_key, "caption"):
      if field not in rec:
        raise ConversionError(f"{path}: {where}: missing key {field!r} (keys: {sorted(rec)})")
    video = common.check_text(path, where, rec[video_key], video_key)
    caption = common.check_text(path, where, rec["caption"], "caption")
    by_video.setdefault(video, []).append(caption)
  return by_video


def _records(path: str, key: str) -> list:
  data = common.read_json(path)
  if not isinstance(data, dict) or not isinstance(data.get(key), list):
    got = sorted(data) if isinstance(data, dict) else type(data).__name__
    raise ConversionError(f"{path}: expected an object with a list {key!r}, got {got}")
  return data[key]


def _train_entries(list_path: str, rows: list[tuple[int, str]],
                   captions: dict[str, list[str]], captions_path: str) -> list[dict]:
  entries, seen = [], set()
  for line, video in rows:
    if video in seen:
      raise ConversionError(f"{list_path}: line {line}: {video!r} is listed twice")
    seen.add(video)
    if video not in captions:
      raise ConversionError(f"{list_path}: line {line}: training video {video!r} has no "
                            f"caption in {captions_path}")
    entries.extend({"video": video, "caption": c} for c in captions[video])
  return entries


def from_clip4clip(folder: str) -> tuple[list[dict], list[dict]]:
  data_path = os.path.join(folder, "MSRVTT_data.json")
  train_path = os.path.join(folder, "MSRVTT_train.9k.csv")
  test_path = os.path.join(folder, "MSRVTT_JSFUSION_test.csv")
  captions = _captions_by_video(data_path, _records(data_path, "sentences"), "video_id")
  train_rows = [(line, row["video_id"].strip())
                for line, row in common.read_csv(train_path, ["video_id"])]
  train = _train_entries(train_path, train_rows, captions, data_path)
  test = [{"video": row["video_id"].strip(), "caption": row["sentence"]}
          for _, row in common.read_csv(test_path, ["video_id", "sentence"])]
  return train, test


def from_frozen(folder: str) -> tuple[list[dict], list[dict]]:
  anno_path = os.path.join(folder, "annotation", "MSR_VTT.json")
  split_dir = os.path.join(folder, SPLIT_DIR)
  train_path = os.path.join(split_dir, "train_list_jsfusion.txt")
  test_path = os.path.join(split_dir, "val_list_jsfusion.txt")
  idx_path = os.path.join(split_dir, "jsfusion_val_caption_idx.pkl")
  captions = _captions_by_video(anno_path, _records(anno_path, "annotations"), "image_id")
  train = _train_entries(train_path, common.read_id_list(train_path), captions, anno_path)
  query_index = common.read_plain_pickle(idx_path)
  if not isinstance(query_index, dict):
    raise ConversionError(f"{idx_path}: expected a dict of video id -> caption index, got "
                          f"{type(query_index).__name__}")
  test = []
  for line, video in common.read_id_list(test_path):
    if video not in captions:
      raise ConversionError(f"{test_path}: line {line}: test video {video!r} has no caption "
                            f"in {anno_path}")
    if video not in query_index:
      raise ConversionError(f"{idx_path}: no caption index for test video {video!r} "
                            f"({test_path}, line {line})")
    i = query_index[video]
    try:
      i = int(i)
    except (TypeError, ValueError):
      i = None
    if i is None or not 0 <= i < len(captions[video]):
      raise ConversionError(f"{idx_path}: entry {video!r}: caption index "
                            f"{query_index[video]!r} is not one of the video's "
                            f"{len(captions[video])} captions in {anno_path}")
    test.append({"video": video, "caption": captions[video][i]})
  return train, test


def detect_layout(src: str) -> tuple[str, str]:
  """('clip4clip' | 'frozen', the folder holding its files)."""
  for sub in CLIP4CLIP_DIRS:
    folder = os.path.join(src, sub)
    if os.path.isfile(os.path.join(folder, "MSRVTT_data.json")):
      return "clip4clip", folder
  for sub in FROZEN_DIRS:
    folder = os.path.join(src, sub)
    if os.path.isfile(os.path.join(folder, "annotation", "MSR_VTT.json")):
      return "frozen", folder
  raise ConversionError(
      f"{src}: no MSR-VTT download found: looked for MSRVTT_data.json (CLIP4Clip's "
      f"msrvtt_data.zip) in {src} and {os.path.join(src, 'msrvtt_data')}, and for "
      f"annotation/MSR_VTT.json (Frozen in Time's MSRVTT.zip) in {src} and "
      f"{os.path.join(src, 'MSRVTT')}")


def convert(args: argparse.Namespace) -> dict:
  layout, folder = detect_layout(args.src)
  common.log(f"MSR-VTT: {'CLIP4Clip' if layout == 'clip4clip' else 'Frozen in Time'} "
             f"layout in {folder}")
  train, test = (from_clip4clip if layout == "clip4clip" else from_frozen)(folder)
  videos = args.videos
  if videos is None:
    default = os.path.join(folder, "MSRVTT_Videos" if layout == "clip4clip" else
                           os.path.join("videos", "all"))
    videos = default if os.path.isdir(default) else None
  return common.write_splits(
      [common.Split(TRAIN_FILE, train), common.Split(TEST_FILE, test)], args.out, videos,
      ext=args.ext, list_missing=args.list_missing, drop_missing=args.drop_missing)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m input_pipeline.convert.msrvtt", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_common_args(
      parser, "folder the videos are in: the recipe's {data_root}/videos/msrvtt, or the "
              "download's video folder if the re-encoded copies keep its names (default: "
              "the layout's MSRVTT_Videos/ or videos/all/ if present)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  return common.run_main(build_parser(), convert, argv)


if __name__ == "__main__":
  sys.exit(main())
