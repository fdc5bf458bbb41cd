"""PyAV decoding: exact frames back from lossless files on every decode path, errors for bad
files, probing, clip reading and still images."""

import os

import av
import numpy as np
import pytest
from PIL import Image

from input_pipeline import video_decode as vd
from input_pipeline.synthetic import write_video
from input_pipeline.video_decode import VideoDecodeError, decode_frames, probe_video, read_clip, read_image


def _frames(num, height=48, width=64, seed=0):
  """Frames that differ everywhere from one another (noise plus a per-frame level)."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (num, height, width, 3), dtype=np.uint8)


def _decode_with(path, indices, strategy):
  """(frames, stats: how they were reached)."""
  stats = {}
  frames = decode_frames(path, indices, strategy=strategy, stats=stats)
  return frames, stats


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  short = _frames(40)
  long_gop = _frames(120, 32, 48, seed=1)
  # smooth content that yuv420p keeps well, shifted 6 pixels per frame
  texture = np.asarray(Image.fromarray(_frames(1, 4, 4, seed=2)[0]).resize((64, 64), Image.BICUBIC))
  smooth = np.stack([np.roll(texture, 6 * t, axis=1) for t in range(60)])
  paths = {
      # lossless (libx264rgb qp 0): one keyframe every 8 frames
      "short": (root / "short.mp4", short),
      # lossless, one keyframe only (GOP 250 > 120 frames)
      "long_gop": (root / "long_gop.mp4", long_gop),
      # same frames in Matroska, which stores no frame count
      "mkv": (root / "short.mkv", short),
      # lossy yuv420p with B-frames (decode order != presentation order), GOP 10
      "bframes": (root / "bframes.mp4", smooth),
  }
  write_video(paths["short"][0], short, fps=8, lossless=True, gop=8)
  write_video(paths["long_gop"][0], long_gop, fps=25, lossless=True, gop=250)
  write_video(paths["mkv"][0], short, fps=8, lossless=True, gop=8)
  write_video(paths["bframes"][0], smooth, fps=25, gop=10, crf=12)
  return {k: (str(p), f) for k, (p, f) in paths.items()}


INDEX_SETS = [[0], [39], [0, 5, 17, 39], [7, 8, 9, 15, 16], [39, 3, 3, 20, 0], [1, 1, 1, 1],
              list(range(0, 40, 5)), [8, 16, 24, 32]]


def test_probe(videos):
  info = probe_video(videos["short"][0])
  assert (info.num_frames, info.fps, info.width, info.height) == (40, 8.0, 64, 48)
  assert info.duration == pytest.approx(5.0)
  info = probe_video(videos["long_gop"][0])
  assert (info.num_frames, info.fps, info.width, info.height) == (120, 25.0, 48, 32)
  assert info.duration == pytest.approx(4.8)


def test_probe_counts_frames_when_the_container_does_not(videos):
  path = videos["mkv"][0]
  with av.open(path) as container:
    assert container.streams.video[0].frames == 0  # Matroska: no stored count
  info = probe_video(path)
  assert (info.num_frames, info.fps, info.width, info.height) == (40, 8.0, 64, 48)


@pytest.mark.parametrize("name", ["short", "mkv"])
@pytest.mark.parametrize("strategy", ["sequential", "seek", "auto"])
def test_decode_is_exact_on_lossless_files(videos, name, strategy):
  path, frames = videos[name]
  for indices in INDEX_SETS:
    out = decode_frames(path, indices, strategy=strategy)
    assert out.dtype == np.uint8 and out.shape == (len(indices), 48, 64, 3)
    np.testing.assert_array_equal(out, frames[indices])


def test_seek_path_really_seeks(videos):
  path, frames = videos["short"]  # lossless: no B-frames, every frame a reference
  out, stats = _decode_with(path, [3, 30, 38], "seek")
  np.testing.assert_array_equal(out, frames[[3, 30, 38]])
  # keyframes every 8: 0..3, then 24..30 and 32..38
  assert stats == {"path": "table", "seeks": 3, "decoded": 4 + 7 + 7}
  _, stats = _decode_with(path, [3, 30, 38], "sequential")
  assert stats == {"path": "sequential", "decoded": 39}
  _, stats = _decode_with(path, [3, 30, 38], "auto")  # 24 - 3 - 1 > 4 frames skipped: seek
  assert stats == {"path": "table", "seeks": 2, "decoded": 4 + 7 + 8}
  _, stats = _decode_with(path, [3, 6, 10], "auto")  # keyframe 8 saves only 4: go on
  assert stats == {"path": "table", "seeks": 1, "decoded": 11}


@pytest.mark.parametrize("strategy", ["sequential", "seek", "auto"])
def test_decode_is_exact_on_a_long_gop_file(videos, strategy):
  path, frames = videos["long_gop"]
  for indices in ([0, 60, 119], [119, 118, 5], list(range(3, 120, 15)), [100]):
    out = decode_frames(path, indices, strategy=strategy)
    np.testing.assert_array_equal(out, frames[indices])
  _, stats = _decode_with(path, [100, 110], "auto")  # one keyframe: nothing to skip
  assert stats == {"path": "table", "seeks": 1, "decoded": 111}


def test_b_frame_file_same_frames_on_every_path(videos):
  path, frames = videos["bframes"]
  with av.open(path) as container:  # the file does reorder frames
    packets = [p for p in container.demux(container.streams.video[0]) if p.size]
    assert any(p.pts != p.dts for p in packets)
  # the frame just before each keyframe is the case a dts-based seek gets wrong
  indices = [9, 10, 19, 20, 29, 31, 45, 59, 2]
  reference = decode_frames(path, indices, strategy="sequential")
  for strategy in ("seek", "auto"):
    np.testing.assert_array_equal(decode_frames(path, indices, strategy=strategy), reference)
  assert _decode_with(path, indices, "seek")[1]["path"] == "table"  # no fallback to sequential
  # and they are the right frames (lossy: close to the source, far from the neighbours)
  error = np.abs(reference.astype(int) - frames[indices].astype(int)).mean(axis=(1, 2, 3))
  assert (error < 6).all(), error
  wrong = np.abs(reference.astype(int) - frames[[i - 1 if i else 1 for i in indices]].astype(int)).mean(axis=(1, 2, 3))
  assert (wrong > 2 * error).all(), (wrong, error)


def test_table_path_skips_decoding(videos):
  """Seeks land on the keyframe before each target (not a GOP early: MP4 with B-frames
  has an edit-list offset between pts and dts), and unwanted non-reference B-frames are
  not decoded."""
  path, _ = videos["bframes"]  # keyframes every 10 frames
  indices = [5, 45, 58]
  reference, stats = _decode_with(path, indices, "sequential")
  assert stats["decoded"] == 59
  out, stats = _decode_with(path, indices, "seek")
  np.testing.assert_array_equal(out, reference)
  # at most 0..5, 40..45 and 50..58: 6 + 6 + 9 frames, fewer with B-frames skipped
  assert stats["seeks"] == 3 and 8 <= stats["decoded"] <= 21, stats
  out, stats = _decode_with(path, list(range(0, 60, 2)), "auto")  # dense: straight through
  np.testing.assert_array_equal(out, decode_frames(path, list(range(0, 60, 2)), strategy="sequential"))
  assert stats["seeks"] == 1 and stats["decoded"] < 59  # odd non-reference frames skipped
  # with decoder threads, no frame is skipped (skipping is set packet by packet)
  stats = {}
  out = decode_frames(path, indices, strategy="seek", threads=2, stats=stats)
  np.testing.assert_array_equal(out, reference)
  assert stats["decoded"] >= 21


def test_read_clip(videos):
  path, frames = videos["short"]
  clip, indices = read_clip(path, 4, "middle", None)
  assert indices == [4, 14, 24, 34]  # edges 0,10,20,30,40
  np.testing.assert_array_equal(clip, frames[indices])
  clip, indices = read_clip(path, 8, "rand", np.random.default_rng(0))
  np.testing.assert_array_equal(clip, frames[indices])
  # trimmed to the first 2 s at 8 fps: 16 frames
  clip, indices = read_clip(path, 4, "middle", None, max_seconds=2.0)
  assert indices == [1, 5, 9, 13]
  np.testing.assert_array_equal(clip, frames[indices])
  # fewer frames than asked for: the last one repeats
  clip, indices = read_clip(path, 4, "middle", None, max_seconds=0.25)
  assert indices == [0, 1, 1, 1]
  np.testing.assert_array_equal(clip, frames[indices])


def test_read_clip_on_matroska(videos):
  path, frames = videos["mkv"]
  clip, indices = read_clip(path, 8, "rand", np.random.default_rng(1))
  np.testing.assert_array_equal(clip, frames[indices])


def _faststart_copy(src, dst):
  """Remux with the index (moov) first, so that a truncated copy still opens."""
  with av.open(src) as inp, av.open(dst, "w", options={"movflags": "+faststart"}) as out:
    stream = out.add_stream_from_template(inp.streams.video[0])
    for packet in inp.demux(inp.streams.video[0]):
      if packet.dts is None:
        continue
      packet.stream = stream
      out.mux(packet)


def _assert_error_names(path, call):
  with pytest.raises(VideoDecodeError) as info:
    call(path)
  assert str(path) in str(info.value)
  assert info.value.path == str(path)
  return info.value


def test_errors_name_the_path(videos, tmp_path):
  calls = [probe_video, lambda p: decode_frames(p, [0]), lambda p: read_clip(p, 4, "middle", None)]
  missing = tmp_path / "missing.mp4"
  empty = tmp_path / "empty.mp4"
  empty.write_bytes(b"")
  garbage = tmp_path / "garbage.mp4"
  garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
  text = tmp_path / "notes.avi"
  text.write_text("not a video\n" * 100)
  # truncated with the index at the end: the index is gone
  data = open(videos["short"][0], "rb").read()
  truncated = tmp_path / "truncated.mp4"
  truncated.write_bytes(data[: len(data) // 2])
  for path in (missing, empty, garbage, text, truncated):
    for call in calls:
      _assert_error_names(path, call)
  assert "not found" in str(_assert_error_names(missing, probe_video))
  assert "empty" in str(_assert_error_names(empty, probe_video))
  kinds = {p.name: _assert_error_names(p, probe_video).kind for p in (missing, empty, garbage, text, truncated)}
  assert kinds == {"missing.mp4": "missing", "empty.mp4": "empty", "garbage.mp4": "undecodable",
                   "notes.avi": "undecodable", "truncated.mp4": "undecodable"}


def test_truncated_file_with_index_first_raises_instead_of_short_clip(videos, tmp_path):
  faststart = tmp_path / "faststart.mp4"
  _faststart_copy(videos["short"][0], faststart)
  np.testing.assert_array_equal(decode_frames(faststart, [0, 39]), videos["short"][1][[0, 39]])
  data = faststart.read_bytes()
  truncated = tmp_path / "truncated_faststart.mp4"
  truncated.write_bytes(data[: len(data) // 2])
  assert probe_video(truncated).num_frames == 40  # the index still claims 40 frames
  assert decode_frames(truncated, [0, 2]).shape == (2, 48, 64, 3)  # the start is intact
  for strategy in ("sequential", "seek", "auto"):
    with pytest.raises(VideoDecodeError, match="truncated_faststart.mp4") as info:
      decode_frames(truncated, [0, 39], strategy=strategy)
    assert info.value.kind == "too_few_frames"
  with pytest.raises(VideoDecodeError, match="truncated_faststart.mp4"):
    read_clip(truncated, 8, "middle", None)


def test_index_past_the_end(videos):
  path = videos["short"][0]
  for strategy in ("sequential", "seek", "auto"):
    with pytest.raises(VideoDecodeError, match="short.mp4") as info:
      decode_frames(path, [5, 40], strategy=strategy)
    assert info.value.kind == "too_few_frames"
  with pytest.raises(ValueError):
    decode_frames(path, [-1])
  with pytest.raises(ValueError):
    decode_frames(path, [0], strategy="fast")


def test_read_image(tmp_path):
  array = _frames(1, 30, 20)[0]
  Image.fromarray(array).save(tmp_path / "x.png")
  out = read_image(tmp_path / "x.png")
  assert out.shape == (1, 30, 20, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0], array)
  Image.fromarray(array[..., 0]).save(tmp_path / "gray.png")  # other modes become RGB
  np.testing.assert_array_equal(read_image(tmp_path / "gray.png")[0], np.repeat(array[..., :1], 3, -1))
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  for name in ("bad.jpg", "none.jpg"):
    with pytest.raises(VideoDecodeError, match=name):
      read_image(tmp_path / name)
  assert vd.is_image_path("a/B.JPG") and not vd.is_image_path("a/b.mp4")


def test_containers_are_closed(videos):
  # Many reads must not leak file descriptors.
  path = videos["short"][0]
  before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
  for _ in range(30):
    decode_frames(path, [1, 20], strategy="seek")
    read_clip(path, 2, "middle", None)
    with pytest.raises(VideoDecodeError):
      decode_frames(path, [41])
  if before is not None:
    assert len(os.listdir("/proc/self/fd")) <= before + 2
