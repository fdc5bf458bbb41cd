"""A small synthetic text-video retrieval corpus whose captions need temporal order.

Each video shows one or two coloured shapes over a dark background and two events, one
in each half of the clip: a shape moves (left/right/up/down), appears, disappears, grows,
shrinks or changes colour (gradual events span their half; sudden ones happen in its
middle, so that a clip of 4 or more evenly spread frames sees both states). Captions name the shapes, the events and their ORDER, from
templates with synonyms ("a red circle moves left, then a blue square appears", "after a
red circle moves left, a blue square shows up"). Some videos come in order pairs: the same
shapes and events in swapped order, with captions that differ only in event order, so
that retrieval can only tell them apart by temporal order (`test_order.json`); by default
half of every split, the training split included, is made of such pairs.

Layout written by `generate_dataset(out_dir, ...)` (VindLU annotation format; paths in
the annotation files are relative to `out_dir`):

  videos/{split}_{i:05d}.mp4   H.264, `num_frames` frames at `fps`, `size` x `size`
  train.json        [{"video": "videos/train_00000.mp4", "caption": str}, ...] one entry
                    per caption (a video repeats with different captions)
  val.json, test.json  [{"video": ..., "caption": [str, ...]}, ...] one entry per video
  test_order.json   the test split's order pairs: entries 2i and 2i+1 show the same shapes
                    and events in swapped order; captions are position-for-position
                    identical except for the order of the two events; extra keys
                    "pair" (i) and "swapped" (bool)
  vocab.txt         WordPiece vocabulary: [PAD]=0, [UNK], [CLS], [SEP], [MASK], ",", then
                    every word the templates can produce (whole, lower-case words)
  dataset_info.json  generation settings and each video's events

Every video's semantics (shapes, colours, events, order) are unique across the whole
dataset and the synonym sets are disjoint, so no two videos share a caption. The same
seed gives byte-identical JSON and vocab files, and byte-identical videos (x264 with one
thread and MB-tree off: see `write_video`). About 1000 videos of 16 64x64 frames take
5-10 s on 2 cores.

CLI: python -m input_pipeline.synthetic --out DIR --num-train 800 --num-val 100 \
       --num-test 100 --seed 0 --size 64 --fps 8 --num-frames 16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from fractions import Fraction

import av
import numpy as np

# ---------------------------------------------------------------------------------------
# Writing videos


def write_video(path, frames: np.ndarray, fps: int = 8, codec: str = "libx264",
                lossless: bool = False, gop: int | None = None, crf: int = 18) -> None:
  """Encodes uint8 `[T, H, W, 3]` RGB frames to `path` (container from the extension).

  libx264: `yuv420p` (H and W must be even), constant quality `crf`, one encoder thread
  and MB-tree off (x264's output then depends only on its input: same frames, same
  bytes). `gop`: exactly
  one keyframe every `gop` frames (no scene-cut keyframes); None: x264's default (250,
  plus scene cuts). B-frames stay on (x264 default), so decoders must reorder.

  `lossless=True` with libx264 encodes RGB losslessly with libx264rgb (qp 0, rgb24):
  decoding to rgb24 gives back exactly `frames`. (Lossless yuv444p would still lose up to
  a few levels in the RGB->YUV->RGB round trip; yuv420p also halves chroma resolution.)
  Other codecs (e.g. 'mpeg4') are passed to FFmpeg as they are, in yuv420p.
  """
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
  num, height, width, _ = frames.shape
  if num == 0:
    raise ValueError("no frames to write")
  options: dict[str, str] = {}
  x264 = codec in ("libx264", "libx264rgb")
  if x264 and lossless:
    codec, pix_fmt = "libx264rgb", "rgb24"
    options["qp"] = "0"
  else:
    pix_fmt = "rgb24" if codec == "libx264rgb" else "yuv420p"
    if pix_fmt == "yuv420p" and (height % 2 or width % 2):
      raise ValueError(f"yuv420p needs even frame sizes, got {height}x{width}")
    if x264:
      options["crf"] = str(crf)
  x264_params = []
  if x264:
    # One thread and no macroblock-tree rate control: with MB-tree on, x264's output
    # changed between runs on identical input (about 3% of the synthetic videos);
    # without it, it is reproducible byte for byte.
    options["threads"] = "1"
    x264_params.append("mbtree=0")
    if gop is not None:
      x264_params += [f"keyint={gop}", f"min-keyint={gop}", "scenecut=0"]
  elif gop is not None:
    options["g"] = str(gop)
  if x264_params:
    options["x264-params"] = ":".join(x264_params)

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with av.open(os.fspath(path), mode="w") as container:
    stream = container.add_stream(codec, rate=Fraction(fps), options=options)
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    if not x264:
      stream.codec_context.thread_count = 1
    for i, array in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
      frame.pts = i
      frame.time_base = Fraction(1, fps)
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


# ---------------------------------------------------------------------------------------
# Vocabulary of the captions (disjoint synonym sets keep captions injective)

COLOURS = {  # name -> RGB
    "red": (225, 35, 35),
    "green": (40, 200, 60),
    "blue": (45, 95, 235),
    "yellow": (240, 225, 40),
    "purple": (160, 60, 210),
    "orange": (250, 140, 25),
    "white": (245, 245, 245),
}
SHAPES = {  # shape -> nouns naming it
    "circle": ("circle", "disc", "ball"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
}
DIRECTIONS = ("left", "right", "up", "down")
VERBS = {  # event kind -> verb phrases; "{}" is the direction or the new colour
    "move": ("moves {}", "slides {}", "goes {}", "travels {}"),
    "appear": ("appears", "shows up", "comes into view"),
    "disappear": ("disappears", "vanishes", "goes out of view"),
    "grow": ("grows", "gets bigger", "becomes larger"),
    "shrink": ("shrinks", "gets smaller", "becomes smaller"),
    "recolour": ("turns {}", "changes to {}", "becomes {}"),
}
ARTICLES = ("a", "the")
# (template, allows eliding the subject of a same-shape second event: "..., then grows")
CONNECTORS = (
    ("{x}, then {y}", True),
    ("first {x}, then {y}", True),
    ("{x}, and then {y}", True),
    ("{x}, after that {y}", False),
    ("{x} before {y}", False),
    ("after {x}, {y}", False),
)
PRONOUN = "it"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PUNCTUATION = (",",)
EVENT_KINDS = tuple(VERBS)


def caption_words() -> list[str]:
  """Every word a caption can contain (sorted); `vocab.txt` lists exactly these."""
  words = set(COLOURS) | set(DIRECTIONS) | set(ARTICLES) | {PRONOUN}
  for nouns in SHAPES.values():
    for noun in nouns:
      words.update(noun.split())
  for phrases in VERBS.values():
    for phrase in phrases:
      words.update(phrase.replace("{}", "").split())
  for template, _ in CONNECTORS:
    words.update(template.replace("{x}", " ").replace("{y}", " ").replace(",", " ").split())
  return sorted(words)


def vocabulary() -> list[str]:
  return [*SPECIAL_TOKENS, *PUNCTUATION, *caption_words()]


# ---------------------------------------------------------------------------------------
# What happens in a video (its "key"), and captions for it

Shape = tuple[str, str]  # (colour, shape)
Event = tuple[int, str, str | None]  # (shape number 0/1, kind, direction or new colour)


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  shapes: tuple[Shape, ...]  # one or two (colour, shape) pairs, different shape kinds
  events: tuple[Event, Event]  # first half, second half

  def swapped(self) -> "VideoSpec":
    """The same shapes and events in the other temporal order."""
    return VideoSpec(self.shapes, (self.events[1], self.events[0]))

  def to_json(self) -> dict:
    return {"shapes": [list(s) for s in self.shapes],
            "events": [{"shape": e[0], "kind": e[1], "arg": e[2]} for e in self.events]}


def is_consistent(spec: VideoSpec) -> bool:
  """Can the events happen in this order? (appear needs an invisible shape, every other
  event a visible one; a colour change needs a new colour; no event twice in a row.)"""
  if spec.events[0] == spec.events[1]:
    return False
  for number, (colour, _) in enumerate(spec.shapes):
    own = [e for e in spec.events if e[0] == number]
    visible = not (own and _first_visibility_kind(own) == "appear")
    for _, kind, arg in own:
      if kind == "appear":
        if visible:
          return False
        visible = True
      elif not visible:
        return False
      elif kind == "disappear":
        visible = False
      elif kind == "recolour":
        if arg == colour:
          return False
        colour = arg
  return True


def _first_visibility_kind(events) -> str | None:
  for _, kind, _ in events:
    if kind in ("appear", "disappear"):
      return kind
  return None


def _random_event(rng: np.random.Generator, number: int) -> Event:
  kind = EVENT_KINDS[rng.integers(len(EVENT_KINDS))]
  if kind == "move":
    return (number, kind, DIRECTIONS[rng.integers(len(DIRECTIONS))])
  if kind == "recolour":
    return (number, kind, list(COLOURS)[rng.integers(len(COLOURS))])
  return (number, kind, None)


def random_spec(rng: np.random.Generator, same_shape_prob: float = 0.3) -> VideoSpec:
  """A random consistent spec: two events of one shape, or one event each of two shapes."""
  colours, shapes = list(COLOURS), list(SHAPES)
  while True:
    first = (colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))])
    if rng.random() < same_shape_prob:
      spec = VideoSpec((first,), (_random_event(rng, 0), _random_event(rng, 0)))
    else:
      other = [s for s in shapes if s != first[1]]
      second = (colours[rng.integers(len(colours))], other[rng.integers(len(other))])
      spec = VideoSpec((first, second), (_random_event(rng, 0), _random_event(rng, 1)))
    if is_consistent(spec):
      return spec


@dataclasses.dataclass(frozen=True)
class CaptionStyle:
  """The free choices of one caption; applied to a spec and its swap, the two captions
  differ only in event order."""
  connector: int
  nouns: tuple[int, ...]  # noun synonym per shape
  articles: tuple[int, int]  # per clause
  verbs: tuple[int, ...]  # verb synonym per event kind (indexed by EVENT_KINDS)
  elide: bool  # same shape: "..., then grows" (where the connector allows) vs "then it grows"


def random_style(rng: np.random.Generator) -> CaptionStyle:
  return CaptionStyle(
      connector=int(rng.integers(len(CONNECTORS))),
      nouns=tuple(int(rng.integers(len(SHAPES[s]))) for s in SHAPES),
      articles=(int(rng.integers(2)), int(rng.integers(2))),
      verbs=tuple(int(rng.integers(len(VERBS[k]))) for k in EVENT_KINDS),
      elide=bool(rng.integers(2)))


def caption(spec: VideoSpec, style: CaptionStyle) -> str:
  template, can_elide = CONNECTORS[style.connector]
  shape_names = list(SHAPES)

  def verb(event: Event) -> str:
    _, kind, arg = event
    phrase = VERBS[kind][style.verbs[EVENT_KINDS.index(kind)] % len(VERBS[kind])]
    return phrase.format(arg) if "{}" in phrase else phrase

  def subject(number: int, clause: int) -> str:
    colour, shape = spec.shapes[number]
    kind = shape_names.index(shape)
    noun = SHAPES[shape][style.nouns[kind] % len(SHAPES[shape])]
    return f"{ARTICLES[style.articles[clause]]} {colour} {noun}"

  (a, _, _), (b, _, _) = spec.events
  x = f"{subject(a, 0)} {verb(spec.events[0])}"
  if a != b:
    y = f"{subject(b, 1)} {verb(spec.events[1])}"
  elif style.elide and can_elide:
    y = verb(spec.events[1])
  else:
    y = f"{PRONOUN} {verb(spec.events[1])}"
  return template.format(x=x, y=y)


def captions_for(spec: VideoSpec, styles: list[CaptionStyle]) -> list[str]:
  return [caption(spec, style) for style in styles]


def distinct_styles(rng: np.random.Generator, spec: VideoSpec, count: int) -> list[CaptionStyle]:
  """`count` styles giving different captions for `spec` (and, by construction of
  `caption`, for its swap); gives up on distinctness after a few tries."""
  styles, seen = [], set()
  for _ in range(20 * count):
    style = random_style(rng)
    text = caption(spec, style)
    if text not in seen:
      styles.append(style)
      seen.add(text)
      if len(styles) == count:
        break
  while len(styles) < count:
    styles.append(random_style(rng))
  return styles


# ---------------------------------------------------------------------------------------
# Rendering


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
  dx, dy = xx - cx, yy - cy
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= 1.15 * r
  if shape == "triangle":  # apex up, base at +0.8 r
    return (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
  if shape == "cross":
    arm = 0.34 * r
    return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
  raise ValueError(shape)


GROW, SHRINK = 1.7, 0.55
_MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _trajectory(spec: VideoSpec, number: int, num_frames: int, radius: float, distance: float):
  """Per frame: offset from the start position (dx, dy), scale, colour name, visible."""
  half = num_frames // 2
  segments = ((0, half), (half, num_frames))
  colour = spec.shapes[number][0]
  own = [(segments[i], e) for i, e in enumerate(spec.events) if e[0] == number]
  visible0 = _first_visibility_kind([e for _, e in own]) != "appear"
  states = []
  for t in range(num_frames):
    dx = dy = 0.0
    scale, col, visible = 1.0, colour, visible0
    for (start, end), (_, kind, arg) in own:
      progress = min(max((t - start) / max(end - start - 1, 1), 0.0), 1.0)
      switched = t >= start + (end - start) // 2
      if kind == "move":
        ux, uy = _MOVES[arg]
        dx, dy = dx + ux * distance * progress, dy + uy * distance * progress
      elif kind == "grow":
        scale *= 1 + (GROW - 1) * progress
      elif kind == "shrink":
        scale *= 1 + (SHRINK - 1) * progress
      elif switched:
        if kind == "appear":
          visible = True
        elif kind == "disappear":
          visible = False
        elif kind == "recolour":
          col = arg
    states.append((dx, dy, radius * scale, col, visible))
  return states


def render_video(spec: VideoSpec, seed, size: int = 64, num_frames: int = 16) -> np.ndarray:
  """uint8 [num_frames, size, size, 3] for `spec`; layout and background from `seed`."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  # Background: a dark colour with a soft vertical gradient (not described by captions).
  base = rng.uniform(10, 70, size=3)
  tilt = rng.uniform(-25, 25, size=3)
  background = base + tilt * (yy[..., None] / size - 0.5)

  tracks = []
  for number in range(len(spec.shapes)):
    radius = size * rng.uniform(0.10, 0.14)
    distance = size * rng.uniform(0.28, 0.38)
    tracks.append(_trajectory(spec, number, num_frames, radius, distance))

  def fits(starts) -> bool:
    for (x0, y0), track in zip(starts, tracks):
      for dx, dy, r, _, _ in track:
        if not (r <= x0 + dx <= size - r and r <= y0 + dy <= size - r):
          return False
    if len(starts) == 2:  # keep the two shapes apart while both are visible
      for (a, b) in zip(tracks[0], tracks[1]):
        if a[4] and b[4]:
          d = np.hypot(starts[0][0] + a[0] - starts[1][0] - b[0], starts[0][1] + a[1] - starts[1][1] - b[1])
          if d < 1.05 * (a[2] + b[2]):
            return False
    return True

  starts = None
  for _ in range(200):
    candidate = [tuple(rng.uniform(0, size, size=2)) for _ in tracks]
    if fits(candidate):
      starts = candidate
      break
  if starts is None:  # crowded: keep each shape in frame, allow overlap
    starts = []
    for track in tracks:
      lo_x = max(r - dx for dx, _, r, _, _ in track)
      hi_x = min(size - r - dx for dx, _, r, _, _ in track)
      lo_y = max(r - dy for _, dy, r, _, _ in track)
      hi_y = min(size - r - dy for _, dy, r, _, _ in track)
      starts.append(((lo_x + hi_x) / 2, (lo_y + hi_y) / 2))

  video = np.empty((num_frames, size, size, 3), np.uint8)
  for t in range(num_frames):
    frame = background.copy()
    for (x0, y0), track, (_, shape) in zip(starts, tracks, spec.shapes):
      dx, dy, r, colour, visible = track[t]
      if visible:
        frame[_shape_mask(shape, xx, yy, x0 + dx, y0 + dy, r)] = COLOURS[colour]
    video[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
  return video


def _render_and_write(job) -> str:
  path, spec, seed, size, num_frames, fps = job
  write_video(path, render_video(spec, seed, size, num_frames), fps=fps)
  return path


# ---------------------------------------------------------------------------------------
# The dataset


def _plan_split(rng: np.random.Generator, count: int, used: set, pair_fraction: float):
  """`count` specs new to `used`, the first ones in swap pairs; returns (specs, pair ids)."""
  specs, pairs = [], []
  num_pairs = int(round(count * pair_fraction)) // 2
  while len(specs) < 2 * num_pairs:
    spec = random_spec(rng)
    partner = spec.swapped()
    if spec in used or partner in used or not is_consistent(partner):
      continue
    used.update((spec, partner))
    pair = len(specs) // 2
    specs += [spec, partner]
    pairs += [pair, pair]
  while len(specs) < count:
    spec = random_spec(rng)
    if spec in used:
      continue
    used.add(spec)
    specs.append(spec)
    pairs.append(None)
  return specs, pairs


def _json_bytes(obj) -> bytes:
  return (json.dumps(obj, indent=1, ensure_ascii=True) + "\n").encode()


def generate_dataset(out_dir, *, num_train: int = 800, num_val: int = 100, num_test: int = 100,
                     seed: int = 0, size: int = 64, fps: int = 8, num_frames: int = 16,
                     train_captions: int = 3, eval_captions: int = 2, pair_fraction: float = 0.5,
                     workers: int | None = None, write_videos: bool = True,
                     progress: bool = False) -> dict[str, str]:
  """Writes the dataset (module docstring) and returns paths by name: 'root', 'videos',
  'train', 'val', 'test', 'test_order', 'vocab', 'info'.

  `pair_fraction` of each split's videos come in order pairs (same shapes and events,
  swapped order). `workers`: processes rendering and encoding (None: up to the CPU count
  for large sets, in-process for small ones). `write_videos=False` writes only the text
  files (annotations and vocab depend on `seed` and the counts alone).
  """
  if num_frames < 2:
    raise ValueError("num_frames must be >= 2 (one event per half)")
  out_dir = os.fspath(out_dir)
  video_dir = os.path.join(out_dir, "videos")
  os.makedirs(video_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  used: set[VideoSpec] = set()
  splits = {}
  for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
    specs, pairs = _plan_split(rng, count, used, pair_fraction)
    n_caps = train_captions if split == "train" else eval_captions
    videos = []
    for i, (spec, pair) in enumerate(zip(specs, pairs)):
      if pair is not None and i % 2 == 1:
        styles = videos[-1]["styles"]  # the partner's styles: captions differ only in order
      else:
        styles = distinct_styles(rng, spec, n_caps)
      videos.append({"video": f"videos/{split}_{i:05d}.mp4", "spec": spec, "pair": pair,
                     "styles": styles, "captions": captions_for(spec, styles)})
    splits[split] = videos

  paths = {name: os.path.join(out_dir, f"{name}.json")
           for name in ("train", "val", "test", "test_order")}
  paths.update(root=out_dir, videos=video_dir, vocab=os.path.join(out_dir, "vocab.txt"),
               info=os.path.join(out_dir, "dataset_info.json"))
  annotations = {
      "train": [{"video": v["video"], "caption": c} for v in splits["train"] for c in v["captions"]],
      "val": [{"video": v["video"], "caption": v["captions"]} for v in splits["val"]],
      "test": [{"video": v["video"], "caption": v["captions"]} for v in splits["test"]],
      "test_order": [{"video": v["video"], "caption": v["captions"], "pair": v["pair"],
                      "swapped": bool(i % 2)}
                     for i, v in enumerate(x for x in splits["test"] if x["pair"] is not None)],
  }
  for name, entries in annotations.items():
    with open(paths[name], "wb") as f:
      f.write(_json_bytes(entries))
  with open(paths["vocab"], "w") as f:
    f.write("\n".join(vocabulary()) + "\n")
  info = {"seed": seed, "size": size, "fps": fps, "num_frames": num_frames,
          "counts": {s: len(v) for s, v in splits.items()},
          "pair_fraction": pair_fraction, "train_captions": train_captions,
          "eval_captions": eval_captions,
          "videos": {v["video"]: {**v["spec"].to_json(), "pair": v["pair"]}
                     for s in splits.values() for v in s}}
  with open(paths["info"], "wb") as f:
    f.write(_json_bytes(info))

  if write_videos:
    seeds = np.random.SeedSequence(seed).spawn(sum(len(v) for v in splits.values()))
    jobs = [(os.path.join(out_dir, v["video"]), v["spec"], s, size, num_frames, fps)
            for v, s in zip((v for s in splits.values() for v in s), seeds)]
    _run_jobs(jobs, workers, progress)
  return paths


def _run_jobs(jobs, workers: int | None, progress: bool) -> None:
  if workers is None:
    workers = min(os.cpu_count() or 1, 8) if len(jobs) >= 64 else 1
  start, done = time.perf_counter(), 0
  step = max(1, len(jobs) // 10)

  def report():
    if progress and (done % step == 0 or done == len(jobs)):
      print(f"  {done}/{len(jobs)} videos, {time.perf_counter() - start:.1f} s", flush=True)

  if workers <= 1:
    for job in jobs:
      _render_and_write(job)
      done += 1
      report()
    return
  # spawn, not fork: the caller may have started threads (JAX, Grain) that fork would copy.
  # An executor, not multiprocessing.Pool: a worker that dies (killed, out of memory) makes
  # the executor raise BrokenProcessPool, where a Pool silently loses the worker's tasks
  # and waits for their results forever.
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    for _ in pool.map(_render_and_write, jobs, chunksize=8):
      done += 1
      report()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--num-train", type=int, default=800)
  parser.add_argument("--num-val", type=int, default=100)
  parser.add_argument("--num-test", type=int, default=100)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size", type=int, default=64, help="frame height and width in pixels")
  parser.add_argument("--fps", type=int, default=8)
  parser.add_argument("--num-frames", type=int, default=16, help="frames per video")
  parser.add_argument("--train-captions", type=int, default=3, help="captions per train video")
  parser.add_argument("--eval-captions", type=int, default=2, help="captions per val/test video")
  parser.add_argument("--pair-fraction", type=float, default=0.5,
                      help="fraction of videos in swapped-order pairs")
  parser.add_argument("--workers", type=int, default=None)
  args = parser.parse_args(argv)
  total = args.num_train + args.num_val + args.num_test
  print(f"writing {total} videos ({args.num_frames} frames, {args.size}x{args.size}, "
        f"{args.fps} fps) to {args.out}", flush=True)
  start = time.perf_counter()
  paths = generate_dataset(args.out, num_train=args.num_train, num_val=args.num_val,
                           num_test=args.num_test, seed=args.seed, size=args.size, fps=args.fps,
                           num_frames=args.num_frames, train_captions=args.train_captions,
                           eval_captions=args.eval_captions, pair_fraction=args.pair_fraction,
                           workers=args.workers, progress=True)
  print(f"done in {time.perf_counter() - start:.1f} s: " +
        ", ".join(f"{k}={v}" for k, v in paths.items()), flush=True)


if __name__ == "__main__":
  sys.exit(main())
