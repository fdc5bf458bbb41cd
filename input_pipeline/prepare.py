r"""`prepare`: decode a corpus once into shards of JPEG frames that training reads fast.

  python main.py --mode prepare --config configs/msrvtt_ft.py --config.data_root=/data
  python -m input_pipeline.prepare --name msrvtt_9k --anno-file /data/anno/x.json \
      --media-root /data/videos/msrvtt --out /data/prepared
  # On every host of a job (a folder all of them share), launched as training is:
  python main.py --mode prepare --config configs/webvid_pretrain.py --config.data_root=/data \
      --config.multihost.enabled=True

For every video of the corpus, in video-index order, the frames at `fps` (the source
frame nearest to each tick k / fps, from the packets' timestamps; `fps` = 0 keeps every
frame), within the first `max_seconds` (DiDeMo: 30 s), with the short side resized to
`short_side` when longer (PIL bicubic, as the augmentation resizes; 0: no resize), each
JPEG-encoded at `jpeg_quality`, go into one record, together with their presentation
indices and timestamps in the source (layout and record: `prepared_source`). A still
image (image corpora) is one frame. A video that cannot be read becomes a record without
frames that names the reason, so indices stay aligned and the reader counts it as a
failed decode; the failures are listed per shard and in `prepare_info.json`, and printed.

Work is split into shards of `shard_size` consecutive videos; worker processes write
whole shards, each to a temporary file renamed into place once complete, followed by its
`prepare_shards/NNNNN.json`. An interrupted prepare (killed, a worker died, Ctrl-C)
resumes when run again: finished shards are kept, unfinished ones are written anew, so
no record is lost or written twice. The shard layout and settings are fixed by the first
run (`prepare_plan.json`); a rerun with other settings or another video list stops with
an error instead of mixing them.

On several hosts the same command splits the work: host p of P (JAX's process index and
count when `jax.distributed` is initialised, as `main.py` does with
`--config.multihost.*`; `--process-index` / `--process-count` here) decodes and writes
only the shards with index mod P = p, its partial shards in its own temporary folder
(`prepare_tmp/process_p`, the only one it clears at start). The hosts meet through the
shared folder, not through JAX collectives (those give up when hosts arrive more than
seconds apart, and hosts finish hours apart on WebVid): host 0 waits for every shard's
`prepare_shards/NNNNN.json`, then writes the metadata; the others wait for
`prepare_info.json`, so every host's command returns once the corpus is complete. A host
that stops with an error leaves `prepare_tmp/process_p/FAILED`, and the waiting hosts
stop too instead of waiting for shards that will not come. The records do not depend on
the host count: P hosts write the very bytes one host does, and a rerun with any host
count resumes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import io
import multiprocessing
import os
import queue as queue_lib
import shutil
import sys
import time
from fractions import Fraction
from typing import Any, Callable

import numpy as np
import tqdm
from PIL import Image

from input_pipeline import bad_data, transforms, video_decode
from input_pipeline import prepared_source as ps
from input_pipeline.annotations import Corpus, load_corpus_from_config
from input_pipeline.config import corpus_field
from t2v2t_jax.errors import Refusal, one_line

TMP_DIR = "prepare_tmp"
FAILED_FILE = "FAILED"  # in a host's temporary folder: that host stopped with an error
POLL_SECONDS = 1.0  # how often a waiting host looks at the shared folder
REPORT_EVERY_S = 600.0  # how often a waiting host says what it waits for


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a prepared corpus holds; fixed for a prepared folder."""
  kind: str = "video"
  fps: float = 2.0  # 0: every frame
  short_side: int = 224  # 0: source size
  max_seconds: float | None = None
  jpeg_quality: int = 90

  def __post_init__(self):
    if self.fps < 0:
      raise Refusal(f"prepare fps must be >= 0 (0 keeps every frame), got {self.fps}")
    if self.short_side < 0:
      raise Refusal(f"prepare short_side must be >= 0 (0 keeps the size), got {self.short_side}")
    if not 1 <= self.jpeg_quality <= 95:
      raise Refusal(f"prepare jpeg_quality must be in [1, 95], got {self.jpeg_quality}")
    if self.max_seconds is not None and self.max_seconds <= 0:
      raise Refusal(f"max_seconds must be positive, got {self.max_seconds}")

  def to_json(self) -> dict:
    return {"kind": self.kind, "fps": float(self.fps), "short_side": int(self.short_side),
            "max_seconds": None if self.max_seconds is None else float(self.max_seconds),
            "jpeg_quality": int(self.jpeg_quality)}


def settings_for(corpus_cfg, data_cfg) -> Settings:
  """The prepare settings of a corpus: its own `prepare_fps` / `prepare_short_side` when
  set, else the data config's; its `max_seconds` and `kind`."""
  return Settings(
      kind=corpus_field(corpus_cfg, "kind", "video"),
      fps=float(corpus_field(corpus_cfg, "prepare_fps", data_cfg.get("prepare_fps", 2.0))),
      short_side=int(corpus_field(corpus_cfg, "prepare_short_side",
                                  data_cfg.get("prepare_short_side", 224))),
      max_seconds=corpus_field(corpus_cfg, "max_seconds"),
      jpeg_quality=int(data_cfg.get("prepare_jpeg_quality", 90)))


# ---------------------------------------------------------------------------------------
# One video


def select_frames(timestamps: np.ndarray, fps: float, max_seconds: float | None) -> list[int]:
  """Which frames of a video with these (sorted, from 0) frame times to keep: within the
  first `max_seconds`, the frame nearest to each tick k / fps up to the last frame's time
  (the earlier one on a tie; a frame nearest to several ticks is kept once); `fps` = 0:
  every frame."""
  ts = np.asarray(timestamps, np.float64)
  count = len(ts)
  if count == 0:
    return []
  if max_seconds is not None:
    count = max(1, int(np.sum(ts < max_seconds - 1e-6)))
  ts = ts[:count]
  if not fps:
    return list(range(count))
  ticks = np.arange(int(np.floor(ts[-1] * fps + 1e-6)) + 1) / fps
  after = np.clip(np.searchsorted(ts, ticks, side="left"), 0, count - 1)
  before = np.clip(after - 1, 0, count - 1)
  nearest = np.where(np.abs(ts[before] - ticks) <= np.abs(ts[after] - ticks), before, after)
  return sorted(set(int(i) for i in nearest))


def _packet_pts(container, stream) -> list[int] | None:
  """The sorted presentation timestamps of every frame, from one demux pass (no
  decoding); None when they cannot identify the frames (missing or repeated)."""
  pts = []
  for packet in container.demux(stream):
    if packet.size == 0 or packet.is_discard:  # flush packets; edit-list discards
      continue
    if packet.pts is None:
      return None
    pts.append(packet.pts)
  if not pts or len(set(pts)) != len(pts):
    return None
  return sorted(pts)


def _resize_short_side(frame: np.ndarray, short_side: int) -> np.ndarray:
  height, width = frame.shape[:2]
  if not short_side or min(height, width) <= short_side:
    return frame
  if height <= width:
    size = (short_side, max(1, round(width * short_side / height)))
  else:
    size = (max(1, round(height * short_side / width)), short_side)
  return transforms.resize_frames(frame[None], size)[0]


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(frame).save(buffer, format="JPEG", quality=int(quality))
  return buffer.getvalue()


def _decode_video(path: str, settings: Settings) -> dict:
  """The kept frames of one video file, JPEG-encoded. One demux pass finds every frame's
  timestamp, one decoding pass reads the kept frames: the packets of unwanted
  non-reference frames are not decoded (as `video_decode` does), and each kept frame is
  resized and encoded as it comes out, so memory holds one frame at a time."""
  import av  # pylint: disable=g-import-not-at-top
  info = video_decode.probe_video(path)
  # `_open_video`: the raw path's open (its errors, one decoder thread).
  open_video = video_decode._open_video  # pylint: disable=protected-access
  with open_video(path, threads=1) as (container, stream):
    pts = _packet_pts(container, stream)
    time_base = Fraction(stream.time_base) if stream.time_base else None
  if pts is not None and time_base:
    times = np.asarray([float((p - pts[0]) * time_base) for p in pts])
  else:  # no usable timestamps: frames in decoding order at the average rate
    if info.fps <= 0:
      raise video_decode.VideoDecodeError(path, "no timestamps and no frame rate")
    pts = None
    times = np.arange(info.num_frames) / info.fps
  keep = select_frames(times, settings.fps, settings.max_seconds)
  if not keep:
    raise video_decode.VideoDecodeError(path, "no frames")
  wanted = set(keep)
  pts_index = {p: i for i, p in enumerate(pts)} if pts is not None else {}
  wanted_pts = {pts[i] for i in keep} if pts is not None else set()
  jpegs: dict[int, bytes] = {}
  size = (0, 0)
  with open_video(path, threads=1) as (container, stream):
    ctx = stream.codec_context
    position = -1
    try:
      for packet in container.demux(stream):
        if pts is not None:  # sound with one decoder thread: each packet decodes as sent
          ctx.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in wanted_pts else "NONREF"
        for frame in packet.decode():
          position += 1
          index = pts_index.get(frame.pts) if pts is not None else position
          if index is None or index not in wanted or index in jpegs:
            continue
          rgb = _resize_short_side(frame.to_ndarray(format="rgb24"), settings.short_side)
          size = rgb.shape[:2]
          jpegs[index] = encode_jpeg(rgb, settings.jpeg_quality)
        if len(jpegs) == len(wanted):
          break
    except (av.FFmpegError, EOFError) as e:
      raise video_decode.VideoDecodeError(
          path, f"stream ended before frame {max(wanted)}: decoding failed after "
          f"{len(jpegs)} kept frames ({type(e).__name__}: {e})",
          "too_few_frames" if jpegs else "undecodable") from e
    finally:
      ctx.skip_frame = "DEFAULT"
  if len(jpegs) != len(wanted):
    first_missing = min(wanted - set(jpegs))
    raise video_decode.VideoDecodeError(
        path, f"stream ended before frame {first_missing} ({len(jpegs)} of {len(wanted)} "
        f"kept frames decoded)", "too_few_frames")
  return {"frames": [jpegs[i] for i in keep], "frame_index": np.asarray(keep, np.int32),
          "timestamp": np.asarray([times[i] for i in keep], np.float32),
          "height": int(size[0]), "width": int(size[1]), "source_num_frames": len(times),
          "source_fps": float(info.fps)}


def _read_image(path: str, settings: Settings) -> dict:
  image = _resize_short_side(video_decode.read_image(path)[0], settings.short_side)
  return {"frames": [encode_jpeg(image, settings.jpeg_quality)],
          "frame_index": np.zeros(1, np.int32), "timestamp": np.zeros(1, np.float32),
          "height": image.shape[0], "width": image.shape[1], "source_num_frames": 1,
          "source_fps": 0.0}


def prepare_media(video_idx: int, rel_path: str, media_root: str, settings: Settings) -> dict:
  """The record of one video (or image); a failure gives a record without frames that
  holds the failure's reason and message (never an exception)."""
  path = os.path.join(media_root, rel_path)
  record = {"video_idx": int(video_idx), "video": rel_path, "error_reason": "",
            "error_message": ""}
  try:
    bad_data.check_file(path)
    record.update(_read_image(path, settings) if settings.kind == "image"
                  else _decode_video(path, settings))
  except Exception as e:  # pylint: disable=broad-except
    failure = bad_data.classify(path, e)
    record.update(frames=[], frame_index=np.zeros(0, np.int32),
                  timestamp=np.zeros(0, np.float32), height=0, width=0, source_num_frames=0,
                  source_fps=0.0, error_reason=failure.reason,
                  error_message=failure.message)
  return record


# ---------------------------------------------------------------------------------------
# Shards


class PrepareInterrupted(RuntimeError):
  """A worker died or the run was stopped; finished shards are kept (rerun to resume)."""


@dataclasses.dataclass(frozen=True)
class _ShardTask:
  directory: str
  tmp_dir: str  # this host's temporary folder
  name: str
  shard: int
  num_shards: int
  first_video: int
  media: tuple[str, ...]  # the shard's media paths, from video `first_video` on
  media_root: str
  settings: Settings
  fail_at_video: int | None = None  # test hook: a worker dies (os._exit) at this video,
  # in-process writing raises PrepareInterrupted


_progress_queue = None  # set in worker processes: a video count per finished video


def _init_worker(progress_queue) -> None:
  global _progress_queue
  _progress_queue = progress_queue


def _write_shard(task: _ShardTask, on_video: Callable[[], None] | None = None) -> dict:
  """Writes one shard (temporary file, then renamed), then its shard info; returns it."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  serialize = ps.record_serializer()
  final = ps.shard_path(task.directory, task.name, task.shard, task.num_shards)
  tmp = os.path.join(task.tmp_dir, f"{os.path.basename(final)}.{os.getpid()}")
  failures, num_bytes = [], 0
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  try:
    for offset, rel_path in enumerate(task.media):
      video_idx = task.first_video + offset
      if task.fail_at_video == video_idx:  # test hook: die as a killed worker would
        if on_video is None:
          os._exit(3)
        raise PrepareInterrupted(f"test hook: stopped at video {video_idx}")
      record = prepare_media(video_idx, rel_path, task.media_root, task.settings)
      if record["error_reason"]:
        failures.append({"video_idx": video_idx, "video": rel_path,
                         "path": os.path.join(task.media_root, rel_path),
                         "reason": record["error_reason"], "message": record["error_message"]})
      data = serialize(record)
      num_bytes += len(data)
      writer.write(data)
      if on_video is not None:
        on_video()
      elif _progress_queue is not None:
        _progress_queue.put(1)
  finally:
    writer.close()
  with open(tmp, "rb") as f:
    os.fsync(f.fileno())
  info = {"shard": task.shard, "first_video": task.first_video, "num_records": len(task.media),
          "num_bytes": num_bytes, "file": os.path.basename(final), "failures": failures}
  os.replace(tmp, final)
  ps.write_json_atomic(_shard_info_path(task.directory, task.shard), info)
  return info


def _shard_info_path(directory: str, shard: int) -> str:
  return os.path.join(directory, ps.SHARD_INFO_DIR, f"{shard:05d}.json")


def _finished_shard(directory: str, name: str, shard: int, num_shards: int,
                    num_records: int) -> dict | None:
  """The shard's info when the shard is complete: its info file says `num_records` and
  its file holds that many records (else None: the shard is written anew). Opening the
  file reads only its footer."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  info_path = _shard_info_path(directory, shard)
  path = ps.shard_path(directory, name, shard, num_shards)
  if not (os.path.isfile(info_path) and os.path.isfile(path)):
    return None
  info = ps.read_json(info_path)
  if info.get("num_records") != num_records:
    return None
  try:
    reader = array_record_module.ArrayRecordReader(path)
    try:
      count = reader.num_records()
    finally:
      reader.close()
  except Exception:  # pylint: disable=broad-except  (a damaged file: written anew)
    return None
  return info if count == num_records else None


# ---------------------------------------------------------------------------------------
# Several hosts


def process_of_run() -> tuple[int, int]:
  """(index, count) of this process among the hosts running the same prepare: JAX's
  when `jax.distributed` is initialised (`main.py` does so with
  `--config.multihost.enabled`), else (0, 1). JAX is not imported for this."""
  jax = sys.modules.get("jax")
  if jax is None or not jax.distributed.is_initialized():
    return 0, 1
  return jax.process_index(), jax.process_count()


def host_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
  """The shards host `process_index` of `process_count` writes: index mod count = index
  (round robin: every host gets shards from the whole corpus, so hosts finish together
  even when video lengths drift along the annotation file)."""
  return list(range(process_index, num_shards, process_count))


def _host_tmp_dir(directory: str, process_index: int) -> str:
  return os.path.join(directory, TMP_DIR, f"process_{process_index}")


def _mark_failed(tmp_dir: str, error: BaseException) -> None:
  """Leaves this host's failure marker for the hosts that wait on its shards."""
  try:
    with open(os.path.join(tmp_dir, FAILED_FILE), "w", encoding="utf-8") as f:
      f.write(f"{type(error).__name__}: {error}")
  except OSError:  # the folder is gone (host 0 finished the corpus): nobody waits
    pass


def _peer_failures(directory: str, since: float) -> list[str]:
  """'process_p: message' for every host that left a failure marker at or after `since`
  (a time of the shared folder's clock); older markers are a past run's, not yet cleared
  by a host that has not started yet."""
  found = []
  for path in sorted(glob.glob(os.path.join(directory, TMP_DIR, "process_*", FAILED_FILE))):
    try:
      if os.stat(path).st_mtime < since:
        continue
      with open(path, encoding="utf-8") as f:
        message = f.read()
    except OSError:  # cleared meanwhile
      continue
    found.append(f"{os.path.basename(os.path.dirname(path))}: {message}")
  return found


def _wait(ready: Callable[[], bool], waiting_for: Callable[[], str], directory: str,
          since: float, progress: bool, host: str) -> None:
  """Polls the shared folder until `ready()`; raises PrepareInterrupted when another host
  stopped with an error (its shards would never come)."""
  last_report = None
  while not ready():
    failed = _peer_failures(directory, since)
    if failed:
      raise PrepareInterrupted(
          f"another host stopped ({'; '.join(failed)}); the finished shards are kept: run "
          "the same command on every host again to resume")
    now = time.monotonic()
    if progress and (last_report is None or now - last_report >= REPORT_EVERY_S):
      print(f"{host}waiting for {waiting_for()}", flush=True)
      last_report = now
    time.sleep(POLL_SECONDS)


def _usable_cores() -> int:
  """The cores this process may run on (SLURM's `--cpus-per-task`, a taskset), else all:
  several prepare processes on one node then share it instead of each taking every core."""
  try:
    return len(os.sched_getaffinity(0)) or 1
  except AttributeError:  # no affinity on this OS
    return os.cpu_count() or 1


def _run_tasks(tasks: list[_ShardTask], workers: int, progress: tqdm.tqdm) -> list[dict]:
  if workers <= 1 or len(tasks) <= 1:
    return [_write_shard(task, on_video=progress.update) for task in tasks]
  ctx = multiprocessing.get_context("spawn")  # the caller may hold threads (JAX, Grain)
  progress_queue = ctx.Queue()
  results = []

  def drain():
    while True:
      try:
        progress.update(progress_queue.get_nowait())
      except queue_lib.Empty:
        return

  with concurrent.futures.ProcessPoolExecutor(
      max_workers=workers, mp_context=ctx, initializer=_init_worker,
      initargs=(progress_queue,)) as pool:
    pending = {pool.submit(_write_shard, task) for task in tasks}
    try:
      while pending:
        done, pending = concurrent.futures.wait(
            pending, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED)
        drain()
        for future in done:
          results.append(future.result())
    except concurrent.futures.process.BrokenProcessPool as e:
      raise PrepareInterrupted(
          f"a prepare worker died ({e}); {len(results)} shards of this run were finished "
          "and are kept: run the same command again to resume") from e
    except BaseException:
      for future in pending:
        future.cancel()
      raise
    drain()
  return results


# ---------------------------------------------------------------------------------------
# A corpus


def _plan(corpus: Corpus, settings: Settings, shard_size: int, name: str) -> dict:
  num_shards = max(1, -(-corpus.num_videos // shard_size))
  return {"format": ps.FORMAT, "corpus": corpus.name, "name": name,
          "anno_file": corpus.anno_file, "media_root": corpus.media_root,
          "num_videos": corpus.num_videos, "media_fingerprint": ps.media_fingerprint(corpus.media),
          "settings": settings.to_json(), "shard_size": int(shard_size), "num_shards": num_shards}


def _check_plan(old: dict, new: dict, directory: str) -> None:
  diffs = []
  for key in ("format", "num_videos", "media_fingerprint"):
    if old.get(key) != new[key]:
      diffs.append(f"{key} {old.get(key)!r} there, {new[key]!r} now")
  for key, value in new["settings"].items():
    if old.get("settings", {}).get(key) != value:
      diffs.append(f"{key} {old.get('settings', {}).get(key)!r} there, {value!r} now")
  if diffs:
    raise Refusal(f"{directory} already holds a prepare of corpus {old.get('corpus')!r} "
                  f"with other settings or videos ({'; '.join(diffs)}). Delete that folder "
                  f"or set data.prepared_dir to another folder.")


def check_existing(corpus: Corpus, prepared_dir: str, settings: Settings) -> None:
  """Raises ValueError when `prepared_dir` already holds this corpus name prepared with
  other settings or another video list (before any work starts)."""
  directory = ps.corpus_dir(prepared_dir, corpus.name)
  plan_path = os.path.join(directory, ps.PLAN_FILE)
  if os.path.isfile(plan_path):
    _check_plan(ps.read_json(plan_path), _plan(corpus, settings, 1, ""), directory)


def prepare_corpus(corpus: Corpus, prepared_dir: str, settings: Settings, *,
                   shard_size: int = 128, workers: int = 0, progress: bool = True,
                   process_index: int = 0, process_count: int = 1,
                   _fail_at_video: int | None = None) -> dict:
  """Prepares (or finishes preparing) one corpus under `prepared_dir`; returns the summary
  that is also written to `prepare_info.json` (plus 'shards_written', 'shards_skipped':
  this host's shards written now and found finished).

  `workers`: processes writing shards (0: one per core this process may use; 1: this
  process).
  `process_index`, `process_count`: this host among the hosts that run the same prepare
  into the same (shared) `prepared_dir` (module docstring); returns once the whole
  corpus is prepared, on every host.
  Raises `PrepareInterrupted` when a worker dies or another host stopped (rerun to resume).
  """
  if settings.kind != corpus.kind:
    raise Refusal(f"settings kind {settings.kind!r} != corpus kind {corpus.kind!r}")
  if shard_size < 1:
    raise Refusal(f"shard_size must be >= 1, got {shard_size}")
  if not 0 <= process_index < process_count:
    raise Refusal(f"process_index {process_index} is not within [0, {process_count})")
  directory = ps.corpus_dir(prepared_dir, corpus.name)
  name = ps.tfds_name(corpus.name)
  plan = _plan(corpus, settings, shard_size, name)
  plan_path = os.path.join(directory, ps.PLAN_FILE)
  info_path = os.path.join(directory, ps.INFO_FILE)
  host = f"host {process_index} of {process_count}: " if process_count > 1 else ""
  if os.path.isfile(plan_path):
    old = ps.read_json(plan_path)
    _check_plan(old, plan, directory)
    plan.update(shard_size=old["shard_size"], num_shards=old["num_shards"])  # the first run's layout
    if os.path.isfile(info_path):
      info = ps.read_json(info_path)
      if progress:
        print(f"{host}{corpus.name}: already prepared in {directory} ({info['num_videos']} "
              f"videos, {info['num_failures']} failed)", flush=True)
      own = len(host_shards(plan["num_shards"], process_index, process_count))
      info.update(shards_written=0, shards_skipped=own)
      return info
  os.makedirs(os.path.join(directory, ps.SHARD_INFO_DIR), exist_ok=True)
  # This host's interrupted run's partial shards (other hosts' folders are theirs to clear).
  tmp_dir = _host_tmp_dir(directory, process_index)
  shutil.rmtree(tmp_dir, ignore_errors=True)
  os.makedirs(tmp_dir)
  started = os.stat(tmp_dir).st_mtime  # the shared folder's clock, for failure markers
  # Host 0 writes the plan; the others compute the same one (or read the first run's).
  if process_index == 0 and not os.path.isfile(plan_path):
    ps.write_json_atomic(plan_path, plan)

  size, num_shards = plan["shard_size"], plan["num_shards"]

  def num_records(shard: int) -> int:
    return len(corpus.media[shard * size:(shard + 1) * size])

  own = host_shards(num_shards, process_index, process_count)
  finished, tasks = {}, []
  for shard in own:
    info = _finished_shard(directory, name, shard, num_shards, num_records(shard))
    if info is not None:
      finished[shard] = info
    else:
      first = shard * size
      tasks.append(_ShardTask(directory, tmp_dir, name, shard, num_shards, first,
                              tuple(corpus.media[first:first + size]), corpus.media_root,
                              settings, _fail_at_video))
  workers = int(workers) if workers else _usable_cores()
  todo = sum(len(t.media) for t in tasks)
  if progress:
    mine = (f"this host writes the {len(own)} with index mod {process_count} = "
            f"{process_index}, " if process_count > 1 else "")
    print(f"{host}Preparing {corpus.name} ({corpus.num_videos} videos, {num_shards} shards; "
          f"{mine}{len(finished)} already done) into {directory} with "
          f"{min(workers, max(len(tasks), 1))} worker(s): {settings.to_json()}", flush=True)
  try:
    start = time.perf_counter()
    with tqdm.tqdm(total=todo, desc=f"prepare {corpus.name} (videos)",
                   disable=not progress) as bar:
      for info in _run_tasks(tasks, workers, bar):
        finished[info["shard"]] = info
    elapsed = time.perf_counter() - start
    if process_count > 1 and process_index != 0:
      # Host 0 writes the metadata once every host's shards are done.
      _wait(lambda: os.path.isfile(info_path),
            lambda: f"host 0 to finish {corpus.name} (the other hosts' shards, then the "
                    f"metadata: {info_path})", directory, started, progress, host)
      shutil.rmtree(tmp_dir, ignore_errors=True)
      info = ps.read_json(info_path)
      if progress:
        print(f"{host}{corpus.name}: {len(tasks)} of this host's {len(own)} shards written "
              f"in {elapsed:.1f} s; all {num_shards} ready in {directory}", flush=True)
      return dict(info, shards_written=len(tasks), shards_skipped=len(own) - len(tasks))
    if process_count > 1:
      others = [s for s in range(num_shards) if s not in finished]

      def all_done() -> bool:  # each shard is verified once, when it is first seen done
        for shard in list(others):
          info = _finished_shard(directory, name, shard, num_shards, num_records(shard))
          if info is not None:
            finished[shard] = info
            others.remove(shard)
        return not others

      _wait(all_done, lambda: f"{len(others)} shards of the other hosts (the first: "
            f"{others[:8]}; shard s is host s mod {process_count}'s)", directory, started,
            progress, host)
    info = _write_metadata(corpus, settings, directory, plan,
                           [finished[s] for s in range(num_shards)])
  except BaseException as e:
    if process_count > 1:
      _mark_failed(tmp_dir, e)
    raise
  shutil.rmtree(os.path.join(directory, TMP_DIR), ignore_errors=True)  # every host's
  failures = info["failures"]
  if progress:
    rate = todo / elapsed if elapsed > 0 else 0.0
    before = (f"{len(own) - len(tasks)} of this host's {len(own)} were done before, the "
              f"other hosts wrote or kept the rest" if process_count > 1
              else f"{num_shards - len(tasks)} were done before")
    print(f"{host}{corpus.name}: {corpus.num_videos} videos ready in {directory} "
          f"({info['num_bytes'] / 2**20:.1f} MiB; {len(tasks)} shards written in {elapsed:.1f} s, "
          f"{rate:.1f} videos/s; {before})", flush=True)
    if failures:
      reasons = ", ".join(f"{r} {n}" for r, n in sorted(info["failures_by_reason"].items()))
      print(f"  {len(failures)} of {corpus.num_videos} videos could not be prepared ({reasons}); "
            f"they read as failed decodes. Listed in {info_path}; the first:", flush=True)
      for f in failures[:10]:
        print(f"    {f['reason']}: {f['path']} ({f['message']})", flush=True)
  return dict(info, shards_written=len(tasks), shards_skipped=len(own) - len(tasks))


def _write_metadata(corpus: Corpus, settings: Settings, directory: str, plan: dict,
                    shards: list[dict]) -> dict:
  """The TFDS metadata and `prepare_info.json` (last: its presence says the corpus is
  complete) from every shard's info; returns the summary."""
  failures = [f for s in shards for f in s["failures"]]
  tfds = ps.import_tfds()
  tfds.folder_dataset.write_metadata(
      data_dir=directory, features=ps.features(), check_data=False,
      split_infos=[tfds.core.SplitInfo(name=ps.SPLIT,
                                       shard_lengths=[s["num_records"] for s in shards],
                                       num_bytes=sum(s["num_bytes"] for s in shards))],
      description=f"Frames of corpus {corpus.name!r} ({corpus.anno_file}) prepared by "
                  f"input_pipeline.prepare: {settings.to_json()}")
  by_reason: dict[str, int] = {}
  for f in failures:
    by_reason[f["reason"]] = by_reason.get(f["reason"], 0) + 1
  info = dict(plan, num_failures=len(failures), failures_by_reason=by_reason,
              failures=failures, num_bytes=sum(s["num_bytes"] for s in shards),
              shard_lengths=[s["num_records"] for s in shards])
  ps.write_json_atomic(os.path.join(directory, ps.INFO_FILE), info)
  return info


def config_corpora(data_cfg) -> list:
  """The train and eval corpus configs of a data config, each name once (a name used for
  two different annotation files is an error: they would share a folder)."""
  seen: dict[str, Any] = {}
  for corpus_cfg in list(data_cfg.train_corpora) + list(data_cfg.eval_corpora):
    name = corpus_field(corpus_cfg, "name")
    if name in seen:
      if corpus_field(seen[name], "anno_file") != corpus_field(corpus_cfg, "anno_file"):
        raise Refusal(f"two corpora are named {name!r} ({corpus_field(seen[name], 'anno_file')}, "
                      f"{corpus_field(corpus_cfg, 'anno_file')}): prepared folders are per name")
      continue
    seen[name] = corpus_cfg
  if not seen:
    raise Refusal("the config names no corpus (data.train_corpora and data.eval_corpora are empty)")
  return list(seen.values())


def check_config(data_cfg) -> list[tuple[Any, Corpus, Settings]]:
  """Validates every corpus of the config (annotation files, media folders, settings,
  what `data.prepared_dir` already holds) before any work; returns (corpus config,
  corpus, settings) per corpus."""
  if not data_cfg.get("prepared_dir"):
    raise Refusal("data.prepared_dir is not set: where should the prepared shards go?")
  out = []
  for corpus_cfg in config_corpora(data_cfg):
    corpus, settings = load_corpus_from_config(corpus_cfg), settings_for(corpus_cfg, data_cfg)
    check_existing(corpus, data_cfg.prepared_dir, settings)
    out.append((corpus_cfg, corpus, settings))
  return out


def prepare_from_config(data_cfg, *, progress: bool = True, process_index: int | None = None,
                        process_count: int | None = None) -> list[dict]:
  """Prepares every train and eval corpus of `data_cfg` under `data_cfg.prepared_dir`,
  one corpus after the other; on several hosts (`process_of_run()` unless given), this
  host's share of each."""
  if process_index is None or process_count is None:
    process_index, process_count = process_of_run()
  summaries = []
  for _, corpus, settings in check_config(data_cfg):
    summaries.append(prepare_corpus(
        corpus, data_cfg.prepared_dir, settings, shard_size=int(data_cfg.prepare_shard_size),
        workers=int(data_cfg.prepare_workers), progress=progress,
        process_index=process_index, process_count=process_count))
  if progress:
    failed = sum(s["num_failures"] for s in summaries)
    print(f"Prepared {len(summaries)} corpora in {data_cfg.prepared_dir} "
          f"({failed} videos failed). Train on them with --config.data.source=prepared.",
          flush=True)
  return summaries


def main(argv=None) -> None:
  from input_pipeline.annotations import load_corpus  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--name", required=True, help="corpus name (the folder under --out)")
  parser.add_argument("--anno-file", required=True)
  parser.add_argument("--media-root", required=True)
  parser.add_argument("--out", required=True, help="prepared_dir")
  parser.add_argument("--kind", default="video", choices=("video", "image"))
  parser.add_argument("--max-seconds", type=float, default=None)
  parser.add_argument("--fps", type=float, default=2.0, help="0: every frame")
  parser.add_argument("--short-side", type=int, default=224, help="0: keep the size")
  parser.add_argument("--jpeg-quality", type=int, default=90)
  parser.add_argument("--shard-size", type=int, default=128)
  parser.add_argument("--workers", type=int, default=0, help="0: one per core")
  parser.add_argument("--process-index", type=int, default=0,
                      help="this host among --process-count hosts running the same command "
                           "into the same shared --out (e.g. $SLURM_PROCID)")
  parser.add_argument("--process-count", type=int, default=1, help="e.g. $SLURM_NTASKS")
  args = parser.parse_args(argv)
  # A refusal (a bad annotation file, a setting out of range, a prepared folder of another
  # corpus) is one line and status 2; an interruption is one line and status 1 (rerun to
  # resume); anything else is a bug and keeps its traceback.
  try:
    corpus = load_corpus(args.anno_file, args.media_root, kind=args.kind, name=args.name)
    settings = Settings(kind=args.kind, fps=args.fps, short_side=args.short_side,
                        max_seconds=args.max_seconds, jpeg_quality=args.jpeg_quality)
    prepare_corpus(corpus, args.out, settings, shard_size=args.shard_size, workers=args.workers,
                   process_index=args.process_index, process_count=args.process_count)
  except PrepareInterrupted as e:
    sys.stderr.write(f"FATAL: interrupted: {one_line(e)}\n")
    sys.exit(1)
  except (ValueError, FileNotFoundError) as e:  # Refusal is a ValueError
    sys.stderr.write(f"FATAL: {one_line(e)}\n")
    sys.exit(2)


if __name__ == "__main__":
  main()
