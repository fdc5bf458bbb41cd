"""`compute_losses` against a reference built pair by pair: the VTM rows (positive, negative
video, negative text) and their labels.

The batches are chosen so that the hard negatives are forced (each text has exactly one
video that is not its own, and the other way round), so the reference can name every
pair by hand: it fuses each (video, text) pair on its own, with that text's own mask, and
takes the cross-entropy with label 1 for the positives and 0 for the negatives in NumPy.
Any mix-up in compute_losses (a block in the wrong order against the labels, a negative
text fused with its positive's mask, a positive drawn as a negative) changes the loss.
"""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t2v2t_jax.checkpoints.params import assign_into
from t2v2t_jax.models import cpu_ops
from t2v2t_jax.models.config import model_config
from t2v2t_jax.models.t2v2t import create_model
from t2v2t_jax.models.t2v2t import similarity
from t2v2t_jax.training.objective import _hard_negatives, compute_losses

SPECIAL_IDS = {"cls": 1, "pad": 0, "mask": 2, "vocab_size": 64}
FRAMES, SIZE = 2, 32

# (video_idx, caption lengths, frames/caption of entry j copied from entry `same[j]`,
#  the reference pairs (video entry, text entry, label) in the order of the labels).
CASES = {
    # Two videos: each text's only negative video is the other one, and each video's only
    # negative text is the other one.
    "two_videos": ([0, 1], [6, 3], [0, 1],
                   [(0, 0, 1), (1, 1, 1),        # positives
                    (1, 0, 0), (0, 1, 0),        # (negative video, text)
                    (0, 1, 0), (1, 0, 0)]),      # (video, negative text)
    # Entries 0 and 1 are the same video with the same caption: a positive of each other,
    # never a negative; entry 2 is the only negative of both.
    "repeated_video": ([0, 0, 1], [5, 5, 3], [0, 0, 2],
                       [(0, 0, 1), (1, 1, 1), (2, 2, 1),
                        (2, 0, 0), (2, 1, 0), (0, 2, 0),
                        (0, 2, 0), (1, 2, 0), (2, 0, 0)]),
}


def _model():
  cfg = model_config("test/16", "test", "t2v2t")
  cfg.vision.image_size, cfg.vision.num_frames = SIZE, FRAMES
  cfg.text.vocab_size = SPECIAL_IDS["vocab_size"]
  model = create_model(cfg, seed=0)
  # A matching head whose logits (about +-0.5) differ from pair to pair but stay where the
  # cross-entropy is steep (the initial head's are nearly equal; large ones saturate it).
  rng = np.random.default_rng(0)
  assign_into(model, {"itm_head.kernel": 0.1 * rng.normal(size=(cfg.text.width, 2)),
                      "itm_head.bias": np.zeros(2)})
  return model


def _batch(video_idx, lengths, same):
  rng = np.random.default_rng(1)
  b, max_len = len(video_idx), 8
  frames = rng.integers(0, 256, (b, FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
  ids = rng.integers(3, SPECIAL_IDS["vocab_size"], (b, max_len)).astype(np.int32)
  mask = np.zeros((b, max_len), np.int32)
  for j, n in enumerate(lengths):
    ids[j, 0], ids[j, n:], mask[j, :n] = SPECIAL_IDS["cls"], SPECIAL_IDS["pad"], 1
  frames, ids, mask = frames[same], ids[same], mask[same]
  return {"frames": frames, "input_ids": ids, "attention_mask": mask,
          "video_idx": np.asarray(video_idx, np.int32)}


def _reference(model, batch, pairs):
  """(mean cross-entropy, accuracy on the positives, on the negatives), pair by pair."""
  _, tokens = model.encode_video(jnp.asarray(batch["frames"]))
  hidden, _ = model.encode_text(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
  losses, correct = [], []
  for video, text, label in pairs:
    fused, _ = model.fuse(hidden[text:text + 1], jnp.asarray(batch["attention_mask"][text:text + 1]),
                          tokens[video:video + 1])
    logits = np.asarray(model.itm_logits(fused), np.float64)[0]
    log_probs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    losses.append(-log_probs[label])
    correct.append(float(np.argmax(logits) == label))
  positives = [c for c, (_, _, label) in zip(correct, pairs) if label == 1]
  negatives = [c for c, (_, _, label) in zip(correct, pairs) if label == 0]
  return np.mean(losses), np.mean(positives), np.mean(negatives)


@pytest.mark.parametrize("case", sorted(CASES))
def test_vtm_rows_and_labels_match_a_pair_by_pair_reference(case):
  video_idx, lengths, same, pairs = CASES[case]
  model, batch = _model(), _batch(video_idx, lengths, same)
  weights = {"vtc": 0.0, "vtm": 1.0, "mlm": 0.0}
  want_loss, want_pos, want_neg = _reference(model, batch, pairs)
  for seed in (0, 1):  # the negatives are forced: any key draws the same ones
    total, metrics = compute_losses(model, jax.tree.map(jnp.asarray, batch),
                                    jax.random.key(seed), loss_weights=weights,
                                    special_ids=SPECIAL_IDS, deterministic=True)
    np.testing.assert_allclose(float(metrics["loss_vtm"]), want_loss, rtol=1e-5)
    np.testing.assert_allclose(float(total), want_loss, rtol=1e-5)
    assert float(metrics["vtm_acc_pos"]) == pytest.approx(want_pos)
    assert float(metrics["vtm_acc_neg"]) == pytest.approx(want_neg)
  # The reference is sensitive to the labels: swapping them changes the loss.
  swapped = [(v, t, 1 - label) for v, t, label in pairs]
  assert abs(_reference(model, batch, swapped)[0] - want_loss) > 1e-3


def test_per_device_negatives_come_from_the_rows_own_group():
  # Four videos in two groups of two (vtm_negatives='per_device' on two devices): within
  # its group each text has one negative video and each video one negative text, so the
  # pairs are forced again; drawn from the whole batch they would not be.
  video_idx, lengths, same = [0, 1, 2, 3], [6, 3, 4, 5], [0, 1, 2, 3]
  pairs = ([(j, j, 1) for j in range(4)]
           + [(1, 0, 0), (0, 1, 0), (3, 2, 0), (2, 3, 0)]     # (negative video, text)
           + [(0, 1, 0), (1, 0, 0), (2, 3, 0), (3, 2, 0)])    # (video, negative text)
  model, batch = _model(), _batch(video_idx, lengths, same)
  weights = {"vtc": 0.0, "vtm": 1.0, "mlm": 0.0}
  want_loss, _, _ = _reference(model, batch, pairs)
  for seed in range(3):
    _, metrics = compute_losses(model, jax.tree.map(jnp.asarray, batch), jax.random.key(seed),
                                loss_weights=weights, special_ids=SPECIAL_IDS,
                                deterministic=True, negative_groups=2)
    np.testing.assert_allclose(float(metrics["loss_vtm"]), want_loss, rtol=1e-5)
  # The fused pairs above barely depend on which video is the negative (an untrained
  # model), so the draws themselves: within the groups with 2, across them with 1.
  pooled, _ = model.encode_video(jnp.asarray(batch["frames"]))
  hidden, _ = model.encode_text(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
  video_emb, text_emb = model.video_embedding(pooled), model.text_embedding(hidden)
  sim = similarity(video_emb, text_emb)
  crossed = False
  for seed in range(4):
    key, idx = jax.random.key(seed), jnp.asarray(video_idx)
    grouped = _hard_negatives(sim, 0.07, idx, key, 2)
    assert all(np.array_equal(np.asarray(g), [[1, 0], [1, 0]]) for g in grouped)
    whole = _hard_negatives(sim, 0.07, idx, key, 1)
    crossed |= any((np.asarray(w)[0] // 2 != np.arange(4) // 2).any() for w in whole)
  assert crossed


def test_per_device_negatives_need_two_rows_per_device():
  from t2v2t_jax.sharding import make_mesh  # noqa: PLC0415
  from t2v2t_jax.training.train_step import negative_groups  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=jax.devices()[:1])
  assert negative_groups("global", 8, mesh) == 1
  assert negative_groups("per_device", 8, mesh) == 1
  with pytest.raises(ValueError, match="at least 2 rows per device"):
    negative_groups("per_device", 1, mesh)


def _batch_sized_random_bits(portable: bool) -> list[str]:
  """Shapes of the RngBitGenerator draws of rank >= 3 in the lowered training loss."""
  model, batch = _model(), jax.tree.map(jnp.asarray, _batch([0, 1, 2, 3], [6, 3, 4, 5], [0, 1, 2, 3]))
  graphdef, state = nnx.split(model)

  def loss(state, batch, key):
    return compute_losses(nnx.merge(graphdef, state), batch, key, special_ids=SPECIAL_IDS,
                          loss_weights={"vtc": 1.0, "vtm": 1.0, "mlm": 1.0})[0]

  with cpu_ops.portable_forms() if portable else contextlib.nullcontext():
    text = jax.jit(jax.grad(loss)).lower(state, batch, jax.random.key(0, impl="rbg")).as_text()
  shapes = re.findall(r"stablehlo.rng_bit_generator.*-> \(tensor<\S+>, tensor<(\S+)>\)", text)
  return [s for s in shapes if s.count("x") >= 3]


def test_dropout_bits_off_the_cpu_are_partitionable():
  # RngBitGenerator is not split by the SPMD partitioner: each device would draw the whole
  # global batch's dropout bits (docs/benchmarks.md, TPU). Traced for an accelerator, the
  # step's dropout draws threefry bits instead; on the CPU it keeps the RBG draws.
  assert _batch_sized_random_bits(portable=False), "the CPU step should draw RBG dropout bits"
  assert _batch_sized_random_bits(portable=True) == []
