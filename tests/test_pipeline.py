"""Grain input pipeline: batches, process shards, corpus mixing, worker-count invariance,
iterator checkpoints through Orbax, bad-data substitution and the failure-fraction stop,
eval sets and the global batch."""

import json
import os
from fractions import Fraction

import av
import grain
import numpy as np
import pytest
from PIL import Image

from input_pipeline import bad_data, pipeline, transforms, video_decode
from input_pipeline.config import corpus_config, data_config
from input_pipeline.frame_sampling import sample_frame_indices
from input_pipeline.synthetic import generate_dataset, write_video
from pipeline_helpers import take_batches

NUM_VIDEOS, FRAMES_PER_VIDEO, NUM_PAIRS, NUM_IMAGES = 8, 8, 16, 8
T, SIZE, MAX_LEN = 4, 16, 4
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "pair", "image"] + [str(i) for i in range(64)]


def write_faststart_video(path, frames, fps=8):
  """An MP4 with its index (moov) before the data, so that a cut file still opens."""
  with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
    stream = container.add_stream("libx264", rate=Fraction(fps), options={"threads": "1"})
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    for i, array in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(array, format="rgb24")
      frame.pts, frame.time_base = i, Fraction(1, fps)
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """8 clean videos (16 pairs, caption 'pair p' for pair p of video p // 2), 8 images
  (caption 'image i'), a vocab, and bad files of every kind."""
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  os.makedirs(root / "v")
  os.makedirs(root / "i")
  for v in range(NUM_VIDEOS):
    write_video(str(root / "v" / f"{v}.mp4"),
                rng.integers(0, 256, (FRAMES_PER_VIDEO, 32, 32, 3), dtype=np.uint8))
  for i in range(NUM_IMAGES):
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / "i" / f"{i}.png")
  (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  write_json(root / "train.json",
             [{"video": f"v/{p // 2}.mp4", "caption": f"Pair {p}."} for p in range(NUM_PAIRS)])
  write_json(root / "images.json",
             [{"image": f"i/{i}.png", "caption": f"image {i}"} for i in range(NUM_IMAGES)])

  # Bad files.
  good = (root / "v" / "0.mp4").read_bytes()
  (root / "v" / "empty.mp4").write_bytes(b"")
  (root / "v" / "truncated.mp4").write_bytes(good[:len(good) // 2])  # index at the end: lost
  (root / "v" / "garbage.mp4").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
  write_faststart_video(root / "v" / "fast.mp4",
                        rng.integers(0, 256, (FRAMES_PER_VIDEO, 32, 32, 3), dtype=np.uint8))
  with av.open(str(root / "v" / "fast.mp4")) as container:
    positions = [p.pos for p in container.demux(container.streams.video[0]) if p.size]
  # Cut at a packet boundary: opens, claims 8 frames, decodes 2.
  (root / "v" / "short.mp4").write_bytes((root / "v" / "fast.mp4").read_bytes()[:positions[2]])
  (root / "i" / "garbage.jpg").write_bytes(b"not a jpeg at all" * 10)
  return root


def write_json(path, entries):
  path.write_text(json.dumps(entries))


def make_cfg(data, corpora=("video",), num_workers=0, **overrides):
  cfg = data_config()
  cfg.tokenizer = str(data / "vocab.txt")
  cfg.max_len = MAX_LEN
  cfg.num_workers = num_workers
  cfg.worker_threads = 1
  cfg.prefetch = 1
  named = {"video": corpus_config("video", str(data / "train.json"), str(data)),
           "image": corpus_config("image", str(data / "images.json"), str(data), kind="image")}
  cfg.train_corpora = [named[c] if isinstance(c, str) else c for c in corpora]
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def take(cfg, n, *, global_batch=4, seed=0, process_index=0, process_count=1):
  ds = pipeline.make_train_dataset(cfg, tokenizer=None, global_batch_size=global_batch,
                                   num_frames=T, image_size=SIZE, seed=seed,
                                   process_index=process_index, process_count=process_count)
  return take_batches(ds, n)


def caption_numbers(batch):
  """The number in each caption ('pair 3' -> 3): input_ids are [CLS, word, number, PAD]."""
  return [int(VOCAB[i]) for i in batch["input_ids"][:, 2]]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout(data):
  (batch,) = take(make_cfg(data), 1)
  assert batch["frames"].dtype == np.uint8 and batch["frames"].shape == (4, T, SIZE, SIZE, 3)
  for key in ("input_ids", "attention_mask"):
    assert batch[key].dtype == np.int32 and batch[key].shape == (4, MAX_LEN)
  assert batch["video_idx"].dtype == np.int32 and batch["video_idx"].shape == (4,)
  cls, pair = VOCAB.index("[CLS]"), VOCAB.index("pair")
  np.testing.assert_array_equal(batch["input_ids"][:, :2], [[cls, pair]] * 4)
  np.testing.assert_array_equal(batch["input_ids"][:, 3], 0)  # no [SEP], padded
  np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 0]] * 4)
  # The caption belongs to the clip's video.
  np.testing.assert_array_equal(batch["video_idx"], [p // 2 for p in caption_numbers(batch)])
  np.testing.assert_array_equal(batch["decode_failures"], 0)


def test_epochs_cover_every_pair_once_and_reshuffle(data):
  batches = take(make_cfg(data), 8)  # 2 epochs of 4 steps
  epochs = [sum((caption_numbers(b) for b in batches[e * 4:(e + 1) * 4]), []) for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(NUM_PAIRS))
  assert epochs[0] != epochs[1]
  assert_same_batches(batches, take(make_cfg(data), 8))  # same seed, same batches
  other = take(make_cfg(data), 4, seed=1)
  assert sum((caption_numbers(b) for b in other), []) != epochs[0]


def test_process_shards_are_disjoint_and_form_the_global_batch(data):
  cfg = make_cfg(data)
  whole = take(cfg, 4, global_batch=4)
  shards = [take(cfg, 4, global_batch=4, process_index=p, process_count=2) for p in range(2)]
  seen = [sum((caption_numbers(b) for b in shard), []) for shard in shards]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(NUM_PAIRS))
  for step in range(4):
    assert all(b.shape[0] == 2 for b in (shards[0][step]["frames"], shards[1][step]["frames"]))
    # At each step the two local batches make up the single-process global batch, with
    # the same augmentation (a record's RNG depends on its place in the epoch only).
    frames = {n: f for shard in shards
              for n, f in zip(caption_numbers(shard[step]), shard[step]["frames"])}
    assert sorted(frames) == sorted(caption_numbers(whole[step]))
    for n, f in zip(caption_numbers(whole[step]), whole[step]["frames"]):
      np.testing.assert_array_equal(frames[n], f)


def test_image_video_mix_whole_batches_reproducible_order(data):
  cfg = make_cfg(data, corpora=("video", "image"))
  steps = 6  # 16 / 4 video + 8 / 4 image batches per epoch
  batches = take(cfg, 2 * steps)
  kinds = []
  for b in batches:
    words = set(b["input_ids"][:, 1].tolist())
    assert len(words) == 1  # one corpus per batch
    kind = "image" if words == {VOCAB.index("image")} else "video"
    assert b["frames"].shape[1] == (1 if kind == "image" else T)
    kinds.append(kind)
  for epoch in range(2):
    assert sorted(kinds[epoch * steps:(epoch + 1) * steps]) == ["image"] * 2 + ["video"] * 4
  image_numbers = sum((caption_numbers(b) for b in batches[:steps] if b["frames"].shape[1] == 1), [])
  assert sorted(image_numbers) == list(range(NUM_IMAGES))
  again = take(cfg, 2 * steps)
  assert_same_batches(batches, again)
  orders = {tuple(b["frames"].shape[1] for b in take(cfg, steps, seed=s)) for s in range(6)}
  assert len(orders) > 1  # the order is random across seeds


def test_workers_give_the_same_batches_and_orbax_restores_the_next_batch(data, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # Mixed corpora, one bad image: failure records must survive the worker processes.
  images = data / "images_bad.json"
  write_json(images, [{"image": f"i/{i}.png", "caption": f"image {i}"} for i in range(NUM_IMAGES - 1)]
             + [{"image": "i/garbage.jpg", "caption": "image 7"}])
  corpora = ("video", corpus_config("img", str(images), str(data), kind="image"))
  k, n = 4, 8
  reference = take(make_cfg(data, corpora), n)
  assert sum(int(b["decode_failures"].sum()) for b in reference[:6]) >= 1

  def dataset():
    return pipeline.make_train_dataset(make_cfg(data, corpora, num_workers=2), tokenizer=None,
                                       global_batch_size=4, num_frames=T, image_size=SIZE,
                                       seed=0, process_index=0, process_count=1)

  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  it = iter(dataset())
  first = [next(it) for _ in range(k)]
  manager.save(k, args=ocp.args.Composite(iterator=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  rest = [next(it) for _ in range(n - k)]
  it.close()
  assert_same_batches(first + rest, reference)  # 2 workers == 0 workers

  restored = iter(dataset())
  manager.restore(k, args=ocp.args.Composite(iterator=grain.checkpoint.CheckpointRestore(restored)))
  resumed = [next(restored) for _ in range(n - k)]
  restored.close()
  manager.close()
  assert_same_batches(resumed, reference[k:])


def test_state_dict_restore_in_process(data):
  ds = pipeline.make_train_dataset(make_cfg(data, ("video", "image")), tokenizer=None,
                                   global_batch_size=4, num_frames=T, image_size=SIZE, seed=3,
                                   process_index=0, process_count=1)
  it = iter(ds)
  for _ in range(5):  # 6 batches per epoch: the batches after the state cross into epoch 2
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  assert_same_batches([next(it2) for _ in range(3)], expected)


BAD_VIDEOS = {"missing": "v/missing.mp4", "empty": "v/empty.mp4",
              "undecodable": "v/truncated.mp4", "too_few_frames": "v/short.mp4"}


def bad_video_corpus(data):
  """16 pairs: 4 good videos (pairs 0..7) then the bad files (pairs 8..15)."""
  bad = list(BAD_VIDEOS.values()) + ["v/garbage.mp4"]
  entries = [{"video": f"v/{p // 2}.mp4", "caption": f"pair {p}"} for p in range(8)]
  entries += [{"video": bad[i % len(bad)], "caption": f"pair {8 + i}"} for i in range(8)]
  write_json(data / "bad.json", entries)
  return corpus_config("bad", str(data / "bad.json"), str(data))


def test_bad_files_are_counted_and_replaced(data):
  cfg = make_cfg(data, (bad_video_corpus(data),))
  batches = take(cfg, 4)  # one epoch
  tracker = bad_data.FailureTracker(failure_fraction=1.0, min_samples=1)
  failures = sum((tracker.update(b) for b in batches), [])
  # Every bad pair of the epoch was read once and failed; substitutes may fail again.
  assert tracker.samples == 16 and tracker.failures == len(failures) >= 8
  assert sum(int(b["decode_failures"].sum()) for b in batches) == tracker.failures
  expected = {reason: {str(data / rel)} for reason, rel in BAD_VIDEOS.items()}
  expected["undecodable"].add(str(data / "v/garbage.mp4"))
  for reason, paths in expected.items():
    assert {f.path for f in failures if f.reason == reason} == paths, reason
  for b in batches:  # only good videos remain, with their own captions
    assert b["frames"].shape == (4, T, SIZE, SIZE, 3)
    assert all(p < 8 for p in caption_numbers(b))
    np.testing.assert_array_equal(b["video_idx"], [p // 2 for p in caption_numbers(b)])
  counts = tracker.counts()
  assert counts["data/decode_failures"] == tracker.failures
  assert tracker.summary().startswith(f"{tracker.failures}/{tracker.reads} reads")
  assert bad_data.FailureTracker().summary() == ""
  assert counts["data/failures_missing"] >= 1 and counts["data/failures_too_few_frames"] >= 1
  assert_same_batches(batches, take(cfg, 4))  # substitutes are deterministic


def test_bad_image_is_replaced(data):
  write_json(data / "images_bad2.json",
             [{"image": "i/garbage.jpg", "caption": "image 0"},
              {"image": "i/nothere.png", "caption": "image 1"}]
             + [{"image": f"i/{i}.png", "caption": f"image {i}"} for i in range(2, 8)])
  cfg = make_cfg(data, (corpus_config("img", str(data / "images_bad2.json"), str(data), kind="image"),))
  batches = take(cfg, 2)
  tracker = bad_data.FailureTracker(failure_fraction=1.0, min_samples=1)
  reasons = {f.reason for b in batches for f in tracker.update(b)}
  assert reasons == {"undecodable", "missing"}
  assert all(n >= 2 for b in batches for n in caption_numbers(b))


def test_failure_fraction_stops_the_run_with_the_first_failures(data):
  batches = take(make_cfg(data, (bad_video_corpus(data),)), 4)
  tracker = bad_data.FailureTracker(failure_fraction=0.01, min_samples=20, max_listed=3)
  tracker.update(batches[0])  # below min_samples: no stop yet
  with pytest.raises(bad_data.DataFailureError) as err:
    for b in batches[1:]:
      tracker.update(b)
  message = str(err.value)
  assert "failure_fraction 1.00%" in message and "First failures" in message
  assert str(tracker.first_failures[0].path) in message and len(tracker.first_failures) == 3
  # The state survives a checkpoint.
  copy = bad_data.FailureTracker()
  copy.set_state(json.loads(json.dumps(tracker.get_state())))
  assert copy.counts() == tracker.counts()


def test_all_reads_failing_is_an_error(data):
  write_json(data / "allbad.json", [{"video": "v/missing.mp4", "caption": "pair 1"}] * 4)
  cfg = make_cfg(data, (corpus_config("allbad", str(data / "allbad.json"), str(data)),),
                 max_attempts=3)
  with pytest.raises(Exception, match="3 reads in a row failed"):
    take(cfg, 1)


def test_malformed_annotation_fails_before_reading(data):
  write_json(data / "malformed.json", [{"video": "v/0.mp4", "caption": "pair 0"}, {"video": "v/1.mp4"}])
  cfg = make_cfg(data, (corpus_config("m", str(data / "malformed.json"), str(data)),))
  with pytest.raises(ValueError, match=r"malformed\.json: entry 1: missing key 'caption'"):
    pipeline.make_train_dataset(cfg, tokenizer=None, global_batch_size=4, num_frames=T,
                                image_size=SIZE, seed=0, process_index=0, process_count=1)


def test_eval_data(data):
  write_json(data / "val.json",
             [{"video": f"v/{v}.mp4", "caption": [f"pair {2 * v}", f"pair {2 * v + 1}"]}
              for v in range(3)] + [{"video": "v/garbage.mp4", "caption": "pair 6"}])
  corpus = corpus_config("val", str(data / "val.json"), str(data))
  ev = pipeline.make_eval_data(corpus, tokenizer=str(data / "vocab.txt"), num_frames=T,
                               image_size=SIZE, max_len=MAX_LEN, process_index=0, process_count=1)
  assert ev.num_videos == len(ev.videos) == 4 and ev.num_frames == T
  np.testing.assert_array_equal(ev.txt2vid, [0, 0, 1, 1, 2, 2, 3])
  assert ev.vid2txt == [[0, 1], [2, 3], [4, 5], [6]]
  assert ev.input_ids.shape == (7, MAX_LEN) and ev.input_ids.dtype == np.int32
  assert [int(VOCAB[i]) for i in ev.input_ids[:, 2]] == [0, 1, 2, 3, 4, 5, 6]
  item = ev.videos[1]
  middle = sample_frame_indices(FRAMES_PER_VIDEO, T, "middle", None)
  expected = transforms.eval_transform(video_decode.decode_frames(str(data / "v/1.mp4"), middle), SIZE)
  np.testing.assert_array_equal(item["frames"], expected)
  assert item["video_idx"] == 1 and item["valid"] == 1 and item["decode_failures"] == 0
  bad = ev.videos[3]  # an unreadable eval video is a black clip, reported, not replaced
  assert bad["decode_failures"] == 1 and "garbage.mp4" in bad["failure_log"]
  assert bad["frames"].shape == (T, SIZE, SIZE, 3) and not bad["frames"].any()

  # Two processes, batches of 3: padded to 6 videos, 3 per process, each once.
  seen = []
  for p in range(2):
    shard = pipeline.make_eval_data(corpus, tokenizer=str(data / "vocab.txt"), num_frames=T,
                                    image_size=SIZE, batch_size=3, process_index=p, process_count=2)
    (batch,) = list(shard.videos)
    assert batch["frames"].shape == (3, T, SIZE, SIZE, 3)
    seen += [int(v) for v, ok in zip(batch["video_idx"], batch["valid"]) if ok]
  assert sorted(seen) == [0, 1, 2, 3]


def test_global_batch(data):
  import jax  # pylint: disable=g-import-not-at-top
  from t2v2t_jax import sharding  # pylint: disable=g-import-not-at-top
  (batch,) = take(make_cfg(data), 1)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  out = sharding.global_batch(batch, mesh, pipeline.MODEL_KEYS)
  # The model's fields go to the devices; the failure record stays on the host.
  assert set(out) == {"frames", "input_ids", "attention_mask", "video_idx"}
  assert set(bad_data.FAILURE_KEYS) <= set(batch)
  assert out["frames"].shape == batch["frames"].shape and out["frames"].dtype == np.uint8
  assert out["input_ids"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(out["input_ids"]), batch["input_ids"])


def test_synthetic_dataset_end_to_end(tmp_path):
  paths = generate_dataset(tmp_path, num_train=4, num_val=2, num_test=2, size=32, num_frames=8)
  cfg = data_config()
  cfg.tokenizer = paths["vocab"]
  cfg.num_workers = 0
  cfg.train_corpora = [corpus_config("synthetic", paths["train"], paths["root"])]
  ds = pipeline.make_train_dataset(cfg, tokenizer=None, global_batch_size=4, num_frames=T,
                                   image_size=SIZE, seed=0, process_index=0, process_count=1)
  batch = next(iter(ds))
  assert batch["frames"].shape == (4, T, SIZE, SIZE, 3) and batch["input_ids"].shape == (4, 32)
  assert 1 not in batch["input_ids"].tolist()  # [UNK] is id 1 in the synthetic vocab
  ev = pipeline.make_eval_data(corpus_config("val", paths["val"], paths["root"]),
                               tokenizer=paths["vocab"], num_frames=T, image_size=SIZE,
                               process_index=0, process_count=1)
  assert ev.num_videos == 2 and ev.vid2txt == [[0, 1], [2, 3]]
  assert ev.videos[0]["frames"].shape == (T, SIZE, SIZE, 3)
