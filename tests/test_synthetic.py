"""Synthetic dataset: reproducibility, vocabulary coverage, caption uniqueness, order pairs,
and that the pictures show what the captions say."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from input_pipeline import synthetic
from input_pipeline.synthetic import VideoSpec, generate_dataset, is_consistent, render_video
from input_pipeline.video_decode import probe_video, read_clip

TEXT_FILES = ("train.json", "val.json", "test.json", "test_order.json", "vocab.txt", "dataset_info.json")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """Annotations only (no videos): enough captions to exercise every template."""
  root = tmp_path_factory.mktemp("synthetic_text")
  generate_dataset(root, num_train=400, num_val=60, num_test=120, seed=3, write_videos=False)
  return root


def _load(root, name):
  return json.loads((root / name).read_text())


def test_same_seed_same_bytes(tmp_path):
  a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
  kwargs = dict(num_train=6, num_val=3, num_test=4, size=32, num_frames=8, workers=1)
  generate_dataset(a, seed=7, **kwargs)
  generate_dataset(c, seed=8, **kwargs)
  # b in another process (other memory layout): the encoder must not depend on it
  subprocess.run([sys.executable, "-m", "input_pipeline.synthetic", "--out", str(b), "--seed", "7",
                  "--num-train", "6", "--num-val", "3", "--num-test", "4", "--size", "32",
                  "--num-frames", "8", "--workers", "1"],
                 check=True, capture_output=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  for name in TEXT_FILES:
    assert (a / name).read_bytes() == (b / name).read_bytes(), name
  assert (a / "train.json").read_bytes() != (c / "train.json").read_bytes()
  videos = sorted(p.name for p in (a / "videos").iterdir())
  assert len(videos) == 13
  for name in videos:  # x264 with one thread: deterministic
    assert (a / "videos" / name).read_bytes() == (b / "videos" / name).read_bytes(), name
  # the videos decode to what was asked for
  for entry in _load(a, "test.json"):
    info = probe_video(a / entry["video"])
    assert (info.num_frames, info.width, info.height, info.fps) == (8, 32, 32, 8.0)
    frames, _ = read_clip(a / entry["video"], 4, "middle", None)
    assert frames.shape == (4, 32, 32, 3)


def test_annotation_format(dataset):
  train, val, test = (_load(dataset, f"{s}.json") for s in ("train", "val", "test"))
  assert len(train) == 400 * 3 and len({e["video"] for e in train}) == 400
  assert all(isinstance(e["caption"], str) for e in train)
  assert [len(x) for x in (val, test)] == [60, 120]
  for entry in val + test:
    assert isinstance(entry["caption"], list) and len(entry["caption"]) == 2
    assert entry["video"].startswith("videos/") and entry["video"].endswith(".mp4")
  # a video's train captions are all different
  by_video = {}
  for e in train:
    by_video.setdefault(e["video"], []).append(e["caption"])
  assert all(len(set(c)) == len(c) for c in by_video.values())


def test_vocab_covers_captions_without_unk(dataset):
  from transformers import BertTokenizer  # pylint: disable=g-import-not-at-top

  vocab = (dataset / "vocab.txt").read_text().split("\n")[:-1]
  assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  assert len(vocab) == len(set(vocab)) < 256
  tokenizer = BertTokenizer(vocab=str(dataset / "vocab.txt"))
  assert tokenizer.pad_token_id == 0 and tokenizer.unk_token_id == 1
  captions = [e["caption"] for e in _load(dataset, "train.json")]
  captions += [c for s in ("val", "test") for e in _load(dataset, f"{s}.json") for c in e["caption"]]
  used = set()
  for text in captions:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids, text
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == text.replace(",", " ,").split()  # whole words, one token each
    used.update(tokens)
  # every word the templates can produce is a single known token
  for word in synthetic.caption_words():
    assert tokenizer.convert_tokens_to_ids(word) > 4
  assert len(used) > 0.8 * len(synthetic.caption_words())  # the captions use most of them


def test_captions_identify_videos(dataset):
  info = _load(dataset, "dataset_info.json")
  specs = [json.dumps(v, sort_keys=True) for v in info["videos"].values()]
  events = [json.dumps({k: v[k] for k in ("shapes", "events")}, sort_keys=True) for v in info["videos"].values()]
  assert len(set(events)) == len(events) == len(specs)  # unique semantics across the dataset
  for split in ("val", "test"):
    owner = {}
    for entry in _load(dataset, f"{split}.json"):
      for text in entry["caption"]:
        assert owner.setdefault(text, entry["video"]) == entry["video"], text
  owner = {}
  for entry in _load(dataset, "train.json"):
    assert owner.setdefault(entry["caption"], entry["video"]) == entry["video"]


def test_order_pairs(dataset):
  pairs = _load(dataset, "test_order.json")
  test = {e["video"]: e["caption"] for e in _load(dataset, "test.json")}
  info = _load(dataset, "dataset_info.json")["videos"]
  assert len(pairs) == 60  # pair_fraction 0.5 of 120
  for i in range(0, len(pairs), 2):
    a, b = pairs[i], pairs[i + 1]
    assert (a["pair"], b["pair"], a["swapped"], b["swapped"]) == (i // 2, i // 2, False, True)
    assert test[a["video"]] == a["caption"] and test[b["video"]] == b["caption"]
    # the same shapes and events, in the other order
    ea, eb = info[a["video"]], info[b["video"]]
    assert ea["shapes"] == eb["shapes"] and ea["events"] == eb["events"][::-1]
    for ca, cb in zip(a["caption"], b["caption"]):
      assert ca != cb and sorted(ca.replace(",", " ,").split()) == sorted(cb.replace(",", " ,").split())


def test_consistency_rules():
  red_circle, blue_square = ("red", "circle"), ("blue", "square")
  appear, move = (0, "appear", None), (0, "move", "left")
  assert is_consistent(VideoSpec((red_circle,), (appear, move)))
  assert not is_consistent(VideoSpec((red_circle,), (move, appear)))  # moves while invisible
  assert is_consistent(VideoSpec((red_circle,), ((0, "disappear", None), appear)))
  assert not is_consistent(VideoSpec((red_circle,), ((0, "recolour", "red"), move)))
  assert not is_consistent(VideoSpec((red_circle,), (move, move)))
  assert is_consistent(VideoSpec((red_circle, blue_square), (move, (1, "appear", None))))


def _pixels(frame, colour):
  return np.argwhere(np.all(frame == np.array(synthetic.COLOURS[colour], np.uint8), axis=-1))


def test_rendering_shows_the_events():
  spec = VideoSpec((("red", "circle"), ("blue", "square")), ((0, "move", "right"), (1, "appear", None)))
  video = render_video(spec, seed=0, size=64, num_frames=16)
  assert video.shape == (16, 64, 64, 3) and video.dtype == np.uint8
  x = [_pixels(video[t], "red")[:, 1].mean() for t in range(16)]
  assert x[7] - x[0] > 15 and x[15] == x[7]  # moves right in the first half, then rests
  blue = [len(_pixels(video[t], "blue")) for t in range(16)]
  assert blue[:12] == [0] * 12 and min(blue[12:]) > 20  # appears in the middle of the second half

  spec = VideoSpec((("green", "triangle"),), ((0, "grow", None), (0, "recolour", "yellow")))
  video = render_video(spec, seed=1, size=64, num_frames=16)
  area = [len(_pixels(video[t], "green")) + len(_pixels(video[t], "yellow")) for t in range(16)]
  assert area[7] > 2 * area[0] and area[15] == area[7]
  # the colour switches in the middle of the second half (frame 8 + 8 // 2)
  assert len(_pixels(video[12], "green")) == 0 and len(_pixels(video[12], "yellow")) == area[12]
  assert len(_pixels(video[11], "yellow")) == 0


def test_cli(tmp_path, capsys):
  synthetic.main(["--out", str(tmp_path / "d"), "--num-train", "3", "--num-val", "2", "--num-test", "2",
                  "--seed", "1", "--size", "32", "--fps", "4", "--num-frames", "6"])
  out = capsys.readouterr().out
  assert "7/7 videos" in out and "done" in out
  assert len(list((tmp_path / "d" / "videos").iterdir())) == 7
  assert len(_load(tmp_path / "d", "train.json")) == 9
  assert probe_video(tmp_path / "d" / "videos" / "val_00001.mp4").num_frames == 6
