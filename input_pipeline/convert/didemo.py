r"""DiDeMo paragraph retrieval, from the official annotation files.

  python -m input_pipeline.convert.didemo --src LocalizingMoments/data --out DATA/anno \
      --videos DATA/videos/didemo

writes what `configs/didemo_ft.py` reads (and a val file, as VindLU has):

  didemo_ret_train.json, didemo_ret_val.json, didemo_ret_test.json
      one entry per video, {"video": "<name>.mp4", "caption": [description, ...]}: every
      description of the video; the recipe reads them with `paragraph=True`, which joins
      them with a space into one paragraph (paragraph-to-video retrieval, as in VindLU)

DiDeMo (Hendricks et al., "Localizing Moments in Video with Natural Language", ICCV 2017)
publishes its annotations in github.com/LisaAnne/LocalizingMoments, folder `data/`:
`train_data.json`, `val_data.json`, `test_data.json` (`--src` is that folder or the
repository), each a list of moment descriptions:

  {"annotation_id": int, "description": str, "video": "<flickr name>.<ext>",
   "times": [[start, end], ...] (5-second segments 0-5, one pair per annotator),
   "download_link": str, "num_segments": int}

A video's descriptions form its paragraph, in file order (`--order file`, the default) or
in the order of their moments (`--order time`: by the annotators' mean start, then mean
end segment). Only the first 30 s were annotated (six segments): the recipe samples
frames from the first 30 s only (`max_seconds=30`).

Videos: the repository's download scripts (from the YFCC100M copies on AWS, which write
`<name>.mp4`, or from Flickr) or its Google Drive folder. A video is looked up under
--videos by its name, by `<name>.<ext>` and by `<name without extension>.<ext>`; one not
found is written as `<name without extension><--ext>`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from input_pipeline.convert import common
from input_pipeline.convert.common import ConversionError

SPLITS = (("train", "train_data.json", "didemo_ret_train.json", True),
          ("val", "val_data.json", "didemo_ret_val.json", False),
          ("test", "test_data.json", "didemo_ret_test.json", True))
SEARCH_DIRS = ("", "data")


def _times(path: str, where: str, times) -> tuple[float, float]:
  """The annotators' mean (start, end) segment; checks the `times` field."""
  ok = isinstance(times, list) and times and all(
      isinstance(t, list) and len(t) == 2
      and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in t)
      and 0 <= t[0] <= t[1] for t in times)
  if not ok:
    raise ConversionError(f"{path}: {where}: 'times' must be a non-empty list of "
                          f"[start, end] segment pairs with 0 <= start <= end, got "
                          f"{times!r:.80}")
  return (sum(t[0] for t in times) / len(times), sum(t[1] for t in times) / len(times))


def paragraphs(path: str, order: str = "file") -> list[dict]:
  """One `{"video", "caption": [descriptions]}` per video of an official file, in order of
  first appearance."""
  data = common.read_json(path)
  if not isinstance(data, list) or not data:
    got = "an empty list" if isinstance(data, list) else type(data).__name__
    raise ConversionError(f"{path}: expected a non-empty JSON list of descriptions, got {got}")
  by_video: dict[str, list[tuple[tuple[float, float], int, str]]] = {}
  skipped = 0
  for i, rec in enumerate(common.progress(data, f"reading {os.path.basename(path)}")):
    where = f"entry {i}"
    if not isinstance(rec, dict):
      raise ConversionError(f"{path}: {where}: expected an object, got {rec!r:.80}")
    for field in ("video", "description"):
      if field not in rec:
        raise ConversionError(f"{path}: {where}: missing key {field!r} (keys: {sorted(rec)})")
    video = common.check_text(path, where, rec["video"], "video")
    text = common.check_text(path, where, rec["description"], "description").strip()
    if not video:
      raise ConversionError(f"{path}: {where}: empty 'video'")
    span = (0.0, 0.0)
    if order == "time":  # only read when used: file order needs nothing from `times`
      if "times" not in rec:
        raise ConversionError(f"{path}: {where}: missing key 'times' (needed by --order "
                              f"time; keys: {sorted(rec)})")
      span = _times(path, where, rec["times"])
    if not text:
      skipped += 1  # an empty description adds nothing to a paragraph
      continue
    by_video.setdefault(video, []).append((span, i, text))
  if skipped:
    common.log(f"{path}: {skipped} empty descriptions left out")
  out = []
  for video, items in by_video.items():
    if order == "time":
      items = sorted(items)  # (mean start, mean end, file position): stable on ties
    out.append({"video": video, "caption": [text for _, _, text in items]})
  return out


def convert(args: argparse.Namespace) -> dict:
  folder = next((os.path.join(args.src, d) for d in SEARCH_DIRS
                 if os.path.isfile(os.path.join(args.src, d, "train_data.json"))), None)
  if folder is None:
    raise ConversionError(
        f"{args.src}: no DiDeMo annotations found: looked for train_data.json in "
        f"{args.src} and {os.path.join(args.src, 'data')} (the data/ folder of "
        "github.com/LisaAnne/LocalizingMoments)")
  common.log(f"DiDeMo: annotations in {folder}, paragraphs in {args.order} order")
  splits = []
  for name, official, ours, required in SPLITS:
    path = os.path.join(folder, official)
    if not os.path.isfile(path):
      if required:
        raise ConversionError(f"{path}: file not found (the {name} split)")
      common.log(f"{path}: not found, no {name} file written")
      continue
    splits.append(common.Split(ours, paragraphs(path, args.order), paragraph=True))
  return common.write_splits(splits, args.out, args.videos, ext=args.ext,
                             list_missing=args.list_missing, drop_missing=args.drop_missing)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m input_pipeline.convert.didemo", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_common_args(
      parser, "folder the videos are in: the recipe's {data_root}/videos/didemo, or the "
              "download folder if the re-encoded copies keep its names (default: no check)")
  parser.add_argument("--order", choices=("file", "time"), default="file",
                      help="order of a video's descriptions in its paragraph (default: file)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  return common.run_main(build_parser(), convert, argv)


if __name__ == "__main__":
  sys.exit(main())
