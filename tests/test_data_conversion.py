"""The converters from the official downloads (input_pipeline/convert/) on small fixtures.

Each test writes a few entries in the official layout (file names, nesting and fields of
the real downloads, as docs/data.md describes them), runs the converter's CLI entry point,
and checks the exact files written; then it loads them through the recipe's own corpus
configs and `load_corpus_from_config`, as a run does, which is what makes them ours.
Empty files stand in for the videos: only their presence is checked.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from configs import anet_ft, didemo_ft, msrvtt_ft
from input_pipeline.annotations import load_corpus_from_config
from input_pipeline.convert import anet, didemo, msrvtt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _index_cache(tmp_path, monkeypatch):
  # The loader indexes each file it reads; keep this test's indices in its own folder.
  monkeypatch.setenv("T2V2T_ANNOTATION_CACHE", str(tmp_path / "index_cache"))


def touch(folder, *names):
  os.makedirs(folder, exist_ok=True)
  for name in names:
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def dump(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f)


def read(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def recipe_corpora(recipe, data_root):
  """The recipe's training corpus and its last eval corpus (the reported test split; DiDeMo
  also evaluates val, which selects its best epoch)."""
  config = recipe.get_config()
  config.data_root = str(data_root)
  train, = config.data.train_corpora
  test = config.data.eval_corpora[-1]
  return load_corpus_from_config(train), load_corpus_from_config(test)


# --------------------------------------------------------------------------------------
# MSR-VTT

# Four videos with three captions each; video0, video1 and video2 train, video3 test.
MSRVTT_CAPTIONS = {f"video{v}": [f"clip {v} caption {k}" for k in range(3)] for v in range(4)}


def write_clip4clip(src):
  """CLIP4Clip's msrvtt_data.zip, unpacked: msrvtt_data/{MSRVTT_data.json, csv files}."""
  folder = os.path.join(src, "msrvtt_data")
  sentences, sen_id = [], 0
  # Interleaved as in the real file's order by sen_id, not grouped by video.
  for k in range(3):
    for v in range(4):
      sentences.append({"caption": MSRVTT_CAPTIONS[f"video{v}"][k], "video_id": f"video{v}",
                        "sen_id": sen_id})
      sen_id += 1
  dump(os.path.join(folder, "MSRVTT_data.json"), {
      "info": {}, "videos": [{"video_id": f"video{v}", "category": 0, "url": "u",
                              "start time": 0.0, "end time": 10.0, "split": "train",
                              "id": v} for v in range(4)],
      "sentences": sentences})
  with open(os.path.join(folder, "MSRVTT_train.9k.csv"), "w") as f:
    f.write("video_id\nvideo2\nvideo0\nvideo1\n")
  with open(os.path.join(folder, "MSRVTT_JSFUSION_test.csv"), "w") as f:
    # A query with a comma is quoted, as pandas writes it.
    f.write("key,vid_key,video_id,sentence\n"
            'ret0,msr3,video3,"a man, a dog and a ball"\n')
  return folder


MSRVTT_TRAIN = ([{"video": "video2.mp4", "caption": c} for c in MSRVTT_CAPTIONS["video2"]]
                + [{"video": "video0.mp4", "caption": c} for c in MSRVTT_CAPTIONS["video0"]]
                + [{"video": "video1.mp4", "caption": c} for c in MSRVTT_CAPTIONS["video1"]])


def test_msrvtt_clip4clip_layout(tmp_path, capsys):
  src = tmp_path / "download"
  write_clip4clip(str(src))
  data = tmp_path / "data"
  # The re-encoded videos under the recipe's media folder; video1 not there.
  touch(str(data / "videos" / "msrvtt"), "video0.mp4", "video2.mp4", "video3.mp4")
  rc = msrvtt.main(["--src", str(src), "--out", str(data / "anno"),
                    "--videos", str(data / "videos" / "msrvtt")])
  assert rc == 0
  out = capsys.readouterr().out
  assert read(data / "anno" / "msrvtt_ret_train9k.json") == MSRVTT_TRAIN
  assert read(data / "anno" / "msrvtt_ret_test1k.json") == [
      {"video": "video3.mp4", "caption": "a man, a dog and a ball"}]
  assert "msrvtt_ret_train9k.json: 2 of 3 videos found; 1 missing: video1.mp4" in out
  assert "msrvtt_ret_test1k.json: 1 of 1 videos found" in out

  train, test = recipe_corpora(msrvtt_ft, data)
  assert list(train.media) == ["video2.mp4", "video0.mp4", "video1.mp4"]
  assert train.num_pairs == 9 and list(train.pair_video) == [0] * 3 + [1] * 3 + [2] * 3
  assert list(test.media) == ["video3.mp4"] and list(test.texts) == ["a man, a dog and a ball"]


def write_frozen(src, query_index):
  """Frozen in Time's MSRVTT.zip, unpacked: MSRVTT/{annotation, high-quality, videos}."""
  root = os.path.join(src, "MSRVTT")
  # Interleaved across videos; each video's captions in order 0, 1, 2.
  pairs = [(v, caps[k]) for k in range(3) for v, caps in MSRVTT_CAPTIONS.items()]
  annotations = [{"caption": c, "image_id": v, "id": i} for i, (v, c) in enumerate(pairs)]
  dump(os.path.join(root, "annotation", "MSR_VTT.json"),
       {"info": {}, "licenses": [], "type": "caption",
        "images": [{"id": v} for v in MSRVTT_CAPTIONS], "annotations": annotations})
  split_dir = os.path.join(root, "high-quality", "structured-symlinks")
  os.makedirs(split_dir)
  with open(os.path.join(split_dir, "train_list_jsfusion.txt"), "w") as f:
    f.write("video2\nvideo0\nvideo1\n")
  with open(os.path.join(split_dir, "val_list_jsfusion.txt"), "w") as f:
    f.write("video3\n")
  with open(os.path.join(split_dir, "jsfusion_val_caption_idx.pkl"), "wb") as f:
    pickle.dump(query_index, f)
  touch(os.path.join(root, "videos", "all"), *[f"{v}.mp4" for v in MSRVTT_CAPTIONS])
  return root


def test_msrvtt_frozen_layout_picks_jsfusion_query(tmp_path):
  src = tmp_path / "download"
  # numpy integers as index values, as a pickle written from numpy holds them.
  write_frozen(str(src), {"video3": np.int64(2)})
  out_dir = tmp_path / "data" / "anno"
  assert msrvtt.main(["--src", str(src), "--out", str(out_dir)]) == 0  # videos/all found
  assert read(out_dir / "msrvtt_ret_train9k.json") == MSRVTT_TRAIN
  assert read(out_dir / "msrvtt_ret_test1k.json") == [
      {"video": "video3.mp4", "caption": "clip 3 caption 2"}]


def test_msrvtt_refuses_a_pickle_that_runs_code(tmp_path, capsys):
  src = tmp_path / "download"
  root = write_frozen(str(src), {"video3": 0})

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  pkl = os.path.join(root, "high-quality", "structured-symlinks", "jsfusion_val_caption_idx.pkl")
  with open(pkl, "wb") as f:
    pickle.dump({"video3": Evil()}, f)
  assert msrvtt.main(["--src", str(src), "--out", str(tmp_path / "anno")]) == 2
  err = capsys.readouterr().err
  assert pkl in err and "only plain data is read" in err
  assert not os.path.exists(tmp_path / "anno" / "msrvtt_ret_test1k.json")


@pytest.mark.parametrize("case", ["no_caption_key", "train_video_without_captions",
                                  "query_index_out_of_range", "no_layout"])
def test_msrvtt_bad_input_names_file_and_entry(tmp_path, capsys, case):
  src = tmp_path / "download"
  if case == "no_caption_key":
    folder = write_clip4clip(str(src))
    path = os.path.join(folder, "MSRVTT_data.json")
    data = read(path)
    del data["sentences"][5]["caption"]
    dump(path, data)
    expected = [path, "sentences[5]", "missing key 'caption'"]
  elif case == "train_video_without_captions":
    folder = write_clip4clip(str(src))
    path = os.path.join(folder, "MSRVTT_train.9k.csv")
    with open(path, "a") as f:
      f.write("video77\n")
    expected = [path, "line 5", "'video77' has no caption"]
  elif case == "query_index_out_of_range":
    root = write_frozen(str(src), {"video3": 7})
    expected = [os.path.join(root, "high-quality", "structured-symlinks",
                             "jsfusion_val_caption_idx.pkl"), "'video3'", "index 7"]
  else:
    os.makedirs(src)
    expected = [str(src), "MSRVTT_data.json", "MSR_VTT.json"]
  assert msrvtt.main(["--src", str(src), "--out", str(tmp_path / "anno")]) == 2
  err = capsys.readouterr().err
  for part in expected:
    assert part in err, (part, err)


def test_missing_videos_listed_up_to_n_and_dropped(tmp_path, capsys):
  src = tmp_path / "download"
  write_clip4clip(str(src))
  videos = tmp_path / "videos"
  touch(str(videos), "video0.mp4", "video3.mp4")
  args = ["--src", str(src), "--out", str(tmp_path / "anno"), "--videos", str(videos)]
  assert msrvtt.main(args + ["--list-missing", "1", "--drop-missing"]) == 0
  out = capsys.readouterr().out
  assert ("msrvtt_ret_train9k.json: 1 of 3 videos found; 2 missing: video2.mp4 "
          "(and 1 more); their entries are left out") in out
  assert read(tmp_path / "anno" / "msrvtt_ret_train9k.json") == [
      {"video": "video0.mp4", "caption": c} for c in MSRVTT_CAPTIONS["video0"]]
  # Every training video missing and dropped: nothing left to write is an error.
  os.remove(videos / "video0.mp4")
  assert msrvtt.main(args + ["--drop-missing"]) == 2
  assert "msrvtt_ret_train9k.json: no entries left" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# DiDeMo

def didemo_entry(i, video, description, times):
  return {"annotation_id": i, "description": description, "video": video, "times": times,
          "download_link": "https://www.flickr.com/video_download.gne?id=1",
          "num_segments": 6}


def write_didemo(src):
  """LocalizingMoments' data/ folder: {train,val,test}_data.json."""
  folder = os.path.join(src, "data")
  dump(os.path.join(folder, "train_data.json"), [
      didemo_entry(0, "1@N00_11_aa.mov", "the dog runs off.", [[3, 3], [3, 4]]),
      didemo_entry(1, "2@N00_22_bb.avi", "a car drives by", [[0, 1], [0, 0]]),
      didemo_entry(2, "1@N00_11_aa.mov", "first the dog sits", [[0, 0], [0, 1]]),
      didemo_entry(3, "1@N00_11_aa.mov", "  ", [[1, 1]]),  # empty: left out
  ])
  dump(os.path.join(folder, "val_data.json"), [
      didemo_entry(4, "3@N00_33_cc.mp4", "a bird lands", [[2, 2]])])
  dump(os.path.join(folder, "test_data.json"), [
      didemo_entry(5, "4@N00_44_dd.m4v", "people wave", [[5, 5]]),
      didemo_entry(6, "4@N00_44_dd.m4v", "a child laughs", [[1, 2]])])
  return folder


def test_didemo_paragraphs(tmp_path, capsys):
  src = tmp_path / "LocalizingMoments"
  write_didemo(str(src))
  data = tmp_path / "data"
  media = data / "videos" / "didemo"
  # An AWS copy (<name>.mp4), a re-encoded copy (<stem>.mp4); the others missing.
  touch(str(media), "1@N00_11_aa.mov.mp4", "sub/4@N00_44_dd.mp4")
  rc = didemo.main(["--src", str(src), "--out", str(data / "anno"), "--videos", str(media)])
  assert rc == 0
  out = capsys.readouterr().out
  assert read(data / "anno" / "didemo_ret_train.json") == [
      {"video": "1@N00_11_aa.mov.mp4", "caption": ["the dog runs off.", "first the dog sits"]},
      {"video": "2@N00_22_bb.mp4", "caption": ["a car drives by"]}]
  assert read(data / "anno" / "didemo_ret_val.json") == [
      {"video": "3@N00_33_cc.mp4", "caption": ["a bird lands"]}]
  assert read(data / "anno" / "didemo_ret_test.json") == [
      {"video": "sub/4@N00_44_dd.mp4", "caption": ["people wave", "a child laughs"]}]
  assert "1 empty descriptions left out" in out
  assert "didemo_ret_train.json: 1 of 2 videos found; 1 missing: 2@N00_22_bb.mp4" in out

  train, test = recipe_corpora(didemo_ft, data)
  assert list(train.texts) == ["the dog runs off. first the dog sits", "a car drives by"]
  assert list(test.texts) == ["people wave a child laughs"]
  assert [list(t) for t in test.vid2txt] == [[0]]


def test_didemo_time_order_and_bad_times(tmp_path, capsys):
  src = tmp_path / "LocalizingMoments"
  folder = write_didemo(str(src))
  out_dir = tmp_path / "anno"
  assert didemo.main(["--src", str(src), "--out", str(out_dir), "--order", "time"]) == 0
  assert read(out_dir / "didemo_ret_train.json")[0]["caption"] == [
      "first the dog sits", "the dog runs off."]
  assert read(out_dir / "didemo_ret_test.json")[0]["caption"] == [
      "a child laughs", "people wave"]

  path = os.path.join(folder, "test_data.json")
  entries = read(path)
  entries[1]["times"] = [[4, 2]]
  dump(path, entries)
  assert didemo.main(["--src", str(src), "--out", str(out_dir), "--order", "time"]) == 2
  err = capsys.readouterr().err
  assert path in err and "entry 1" in err and "'times'" in err
  # File order does not read the times.
  assert didemo.main(["--src", str(src), "--out", str(out_dir)]) == 0


# --------------------------------------------------------------------------------------
# ActivityNet Captions

ANET_TRAIN = {
    "v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81]],
                      "sentences": ["A young woman is seen dancing.",
                                    " The girl dances around the room. "]},
    "v_ehGHCYKzyZ8": {"duration": 61.72, "timestamps": [[20.0, 61.0], [0.0, 20.5]],
                      "sentences": ["Then he jumps.", "A man stands on a board."]},
}
ANET_VAL1 = {"v_uqiMw7tQ1Cc": {"duration": 55.15, "timestamps": [[0.28, 55.15]],
                               "sentences": ["A weight lifting tutorial is given."]}}


def write_anet(src):
  folder = os.path.join(src, "captions")  # captions.zip unpacks into captions/
  dump(os.path.join(folder, "train.json"), ANET_TRAIN)
  dump(os.path.join(folder, "val_1.json"), ANET_VAL1)
  dump(os.path.join(folder, "val_2.json"), ANET_VAL1)
  return folder


def test_anet_paragraphs(tmp_path, capsys):
  src = tmp_path / "download"
  write_anet(str(src))
  data = tmp_path / "data"
  media = data / "videos" / "activitynet"
  # Downloads name videos with or without "v_" and in several containers.
  touch(str(media), "v_QOlSCBRmfWY.mkv", "uqiMw7tQ1Cc.webm")
  rc = anet.main(["--src", str(src), "--out", str(data / "anno"), "--videos", str(media)])
  assert rc == 0
  out = capsys.readouterr().out
  assert read(data / "anno" / "anet_ret_train.json") == [
      {"video": "v_QOlSCBRmfWY.mkv", "caption": ["A young woman is seen dancing.",
                                                 "The girl dances around the room."]},
      {"video": "v_ehGHCYKzyZ8.mp4", "caption": ["Then he jumps.", "A man stands on a board."]}]
  assert read(data / "anno" / "anet_ret_val_1.json") == [
      {"video": "uqiMw7tQ1Cc.webm", "caption": ["A weight lifting tutorial is given."]}]
  assert "anet_ret_train.json: 1 of 2 videos found; 1 missing: v_ehGHCYKzyZ8.mp4" in out

  train, test = recipe_corpora(anet_ft, data)
  assert list(train.texts) == ["A young woman is seen dancing. The girl dances around the room.",
                         "Then he jumps. A man stands on a board."]
  assert list(test.media) == ["uqiMw7tQ1Cc.webm"] and test.num_pairs == 1

  assert anet.main(["--src", str(src), "--out", str(data / "anno"), "--order", "time"]) == 0
  assert read(data / "anno" / "anet_ret_train.json")[1]["caption"] == [
      "A man stands on a board.", "Then he jumps."]


def test_anet_bad_entry_names_file_and_video(tmp_path, capsys):
  src = tmp_path / "download"
  folder = write_anet(str(src))
  path = os.path.join(folder, "val_1.json")
  bad = {"v_uqiMw7tQ1Cc": {"duration": 5.0, "timestamps": [[0, 1], [1, 2]],
                           "sentences": ["only one"]}}
  dump(path, bad)
  assert anet.main(["--src", str(src), "--out", str(tmp_path / "anno")]) == 2
  err = capsys.readouterr().err
  assert path in err and "'v_uqiMw7tQ1Cc'" in err and "one [start, end] pair" in err


@pytest.mark.parametrize("case", ["deep_json", "id_list_not_utf8", "csv_not_utf8"])
def test_crafted_files_are_one_fatal_line(tmp_path, capsys, case):
  """Nesting that would exhaust json's recursion and bytes that are not UTF-8: refused in
  one line naming the file (and the line), status 2, no traceback."""
  folder = write_clip4clip(str(tmp_path / "download"))
  if case == "deep_json":
    path = os.path.join(folder, "MSRVTT_data.json")
    with open(path, "w") as f:
      f.write("[" * 100_000 + "]" * 100_000)
    expected = [path, "JSON nested too deeply"]
  elif case == "id_list_not_utf8":
    path = os.path.join(folder, "MSRVTT_train.9k.csv")
    with open(path, "wb") as f:
      f.write(b"video_id\nvideo2\nvid\xe9o0\n")
    expected = [path, "line 3: not valid UTF-8"]
  else:
    path = os.path.join(folder, "MSRVTT_JSFUSION_test.csv")
    with open(path, "ab") as f:
      f.write(b'ret1,msr2,video2,"caf\xe9"\n')
    expected = [path, "line 3: not valid UTF-8"]
  assert msrvtt.main(["--src", str(tmp_path / "download"), "--out", str(tmp_path / "anno")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("FATAL: ") and len(err.splitlines()) == 1, err
  for part in expected:
    assert part in err, (part, err)


# --------------------------------------------------------------------------------------
# The command lines

@pytest.mark.parametrize("module", ["msrvtt", "didemo", "anet"])
def test_help(module):
  result = subprocess.run([sys.executable, "-m", f"input_pipeline.convert.{module}", "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert "--src" in result.stdout and "--videos" in result.stdout
  assert f"python -m input_pipeline.convert.{module}" in result.stdout
