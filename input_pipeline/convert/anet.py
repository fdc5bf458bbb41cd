r"""ActivityNet Captions paragraph retrieval (train / val_1), from the official captions.

  python -m input_pipeline.convert.anet --src captions --out DATA/anno \
      --videos DATA/videos/activitynet

writes what `configs/anet_ft.py` reads:

  anet_ret_train.json   10,009 videos   one entry per video, {"video": "v_<id>.mp4",
  anet_ret_val_1.json    4,917 videos   "caption": [sentence, ...]}: the recipe reads them
                                        with `paragraph=True` (the sentences joined with a
                                        space: paragraph-to-video retrieval on val_1, as in
                                        VindLU)

ActivityNet Captions (Krishna et al., "Dense-Captioning Events in Videos", ICCV 2017)
publishes `captions.zip` (cs.stanford.edu/people/ranjaykrishna/densevid/): `train.json`,
`val_1.json`, `val_2.json` (and id lists); `--src` is the unpacked folder (or its
parent, holding `captions/`). Each file maps a video id to its events:

  {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], ...],
                     "sentences": ["A young woman is seen ...", " The girl dances ...", ...]},
   ...}

A video's sentences form its paragraph, in file order (`--order file`, the default) or
sorted by their timestamps (`--order time`); surrounding spaces are stripped.

Videos are ActivityNet v1.3's YouTube videos (activity-net.org/download.html). A video is
looked up under --videos as `v_<id>.<ext>` and `<id>.<ext>` (downloads use both names and
.mp4, .mkv or .webm); one not found is written as `v_<id><--ext>`.
"""

from __future__ import annotations

import argparse
import numbers
import os
import sys
from collections.abc import Sequence

from input_pipeline.convert import common
from input_pipeline.convert.common import ConversionError

SPLITS = (("train", "train.json", "anet_ret_train.json"),
          ("val_1", "val_1.json", "anet_ret_val_1.json"))
SEARCH_DIRS = ("", "captions")


def _candidates(video: str) -> tuple[str, ...]:
  return (video, video[2:]) if video.startswith("v_") else (video, "v_" + video)


def paragraphs(path: str, order: str = "file") -> list[dict]:
  """One `{"video", "caption": [sentences]}` per video of an official file, in file order."""
  data = common.read_json(path)
  if not isinstance(data, dict) or not data:
    got = "an empty object" if isinstance(data, dict) else type(data).__name__
    raise ConversionError(f"{path}: expected a JSON object of video id -> events, got {got}")
  out = []
  for video, rec in common.progress(data.items(), f"reading {os.path.basename(path)}",
                                    total=len(data)):
    where = f"entry {video!r}"
    if not isinstance(rec, dict) or "sentences" not in rec:
      keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
      raise ConversionError(f"{path}: {where}: expected an object with 'sentences', got {keys}")
    sentences = rec["sentences"]
    if (not isinstance(sentences, list) or not sentences
        or not all(isinstance(s, str) for s in sentences)):
      raise ConversionError(f"{path}: {where}: 'sentences' must be a non-empty list of "
                            f"strings, got {sentences!r:.80}")
    sentences = [s.strip() for s in sentences]
    stamps = rec.get("timestamps")
    if stamps is not None or order == "time":
      ok = isinstance(stamps, list) and len(stamps) == len(sentences) and all(
          isinstance(t, list) and len(t) == 2
          and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in t)
          for t in stamps)
      if not ok:
        raise ConversionError(f"{path}: {where}: 'timestamps' must be one [start, end] "
                              f"pair per sentence ({len(sentences)}), got {stamps!r:.80}")
      if order == "time":
        sentences = [s for _, _, s in sorted(
            (tuple(t), i, s) for i, (t, s) in enumerate(zip(stamps, sentences)))]
    sentences = [s for s in sentences if s]
    if not sentences:
      raise ConversionError(f"{path}: {where}: every sentence is empty")
    out.append({"video": video, "caption": sentences})
  return out


def convert(args: argparse.Namespace) -> dict:
  folder = next((os.path.join(args.src, d) for d in SEARCH_DIRS
                 if os.path.isfile(os.path.join(args.src, d, "train.json"))), None)
  if folder is None:
    raise ConversionError(
        f"{args.src}: no ActivityNet Captions found: looked for train.json in {args.src} "
        f"and {os.path.join(args.src, 'captions')} (the unpacked captions.zip)")
  common.log(f"ActivityNet Captions: annotations in {folder}, paragraphs in {args.order} "
             "order")
  splits = [common.Split(ours, paragraphs(os.path.join(folder, official), args.order),
                         paragraph=True)
            for _, official, ours in SPLITS]
  return common.write_splits(splits, args.out, args.videos, ext=args.ext,
                             list_missing=args.list_missing, drop_missing=args.drop_missing,
                             candidates=_candidates)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m input_pipeline.convert.anet", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_common_args(
      parser, "folder the videos are in: the recipe's {data_root}/videos/activitynet, or "
              "the download folder if the re-encoded copies keep its names (default: no "
              "check)")
  parser.add_argument("--order", choices=("file", "time"), default="file",
                      help="order of a video's sentences in its paragraph (default: file)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  return common.run_main(build_parser(), convert, argv)


if __name__ == "__main__":
  sys.exit(main())
