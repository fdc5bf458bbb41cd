"""Losses against independent NumPy references, plus sampling and masking statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2v2t_jax import losses
from t2v2t_jax.models.t2v2t import similarity


def _normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax_np(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _vtc_reference(sim, temp, video_idx):
  """Loop-by-loop VTC: soft multi-positive targets, (CE_v2t + CE_t2v) / 2."""
  b = sim.shape[0]
  logits = sim.astype(np.float64) / temp
  total_v2t = total_t2v = 0.0
  for i in range(b):
    positives = [j for j in range(b) if video_idx[j] == video_idx[i]]
    lv = _log_softmax_np(logits[i])       # video i over texts
    lt = _log_softmax_np(logits[:, i])    # text i over videos
    total_v2t += -sum(lv[j] for j in positives) / len(positives)
    total_t2v += -sum(lt[j] for j in positives) / len(positives)
  return (total_v2t / b + total_t2v / b) / 2


@pytest.mark.parametrize("video_idx", [[0, 1, 2, 3, 4, 5], [0, 1, 0, 2, 1, 0], [3, 3, 3, 3, 3, 3]])
def test_vtc_matches_numpy_reference(video_idx):
  rng = np.random.default_rng(1)
  sim = np.tanh(rng.normal(size=(6, 6)))
  video_idx = np.asarray(video_idx)
  loss, aux = jax.jit(losses.vtc_loss)(jnp.asarray(sim, jnp.float32), jnp.float32(0.07),
                                       jnp.asarray(video_idx))
  np.testing.assert_allclose(float(loss), _vtc_reference(sim, 0.07, video_idx), rtol=1e-5)
  assert 0.0 <= float(aux["vtc_acc_v2t"]) <= 1.0


def test_vtc_invariant_to_batch_permutation():
  rng = np.random.default_rng(2)
  video = _normalise(rng.normal(size=(8, 3, 16)))
  text = _normalise(rng.normal(size=(8, 16)))
  video_idx = np.array([0, 1, 2, 1, 3, 4, 0, 5])
  sim = similarity(jnp.asarray(video), jnp.asarray(text))
  loss, _ = losses.vtc_loss(sim, 0.05, jnp.asarray(video_idx))
  perm = rng.permutation(8)
  sim_p = similarity(jnp.asarray(video[perm]), jnp.asarray(text[perm]))
  loss_p, _ = losses.vtc_loss(sim_p, 0.05, jnp.asarray(video_idx[perm]))
  np.testing.assert_allclose(float(loss), float(loss_p), rtol=1e-6)


def test_hard_negatives_never_positive():
  rng = np.random.default_rng(3)
  sample = jax.jit(jax.vmap(losses.sample_hard_negatives, in_axes=(0, None, 0, 0)))
  trials, batch = 400, 8
  video_idx = rng.integers(0, 3, size=(trials, batch))   # many repeats
  video_idx[:, 0] = 0
  video_idx[:, 1] = 1                                     # every row has a negative
  # Sharp, adversarial similarities: positives score highest, tiny temperature.
  sim = rng.uniform(-1, 1, size=(trials, batch, batch))
  sim = np.where(video_idx[:, :, None] == video_idx[:, None, :], 1.0, sim)
  keys = jax.random.split(jax.random.key(0), trials)
  neg_v, neg_t = sample(jnp.asarray(sim, jnp.float32), jnp.float32(0.001),
                        jnp.asarray(video_idx), keys)
  neg_v, neg_t = np.asarray(neg_v), np.asarray(neg_t)
  rows = np.arange(batch)
  for n in range(trials):
    assert np.all(video_idx[n, neg_v[n]] != video_idx[n, rows])
    assert np.all(video_idx[n, neg_t[n]] != video_idx[n, rows])


def test_hard_negative_frequencies_follow_softmax():
  sim = np.array([[0.9, 0.5, 0.3, 0.1],
                  [0.2, 0.8, 0.6, 0.0],
                  [0.4, 0.1, 0.7, 0.3],
                  [0.3, 0.2, 0.5, 0.6]], np.float32)
  video_idx = np.array([0, 1, 2, 0])    # entries 0 and 3 are positives of each other
  temp, trials = 0.2, 20000
  keys = jax.random.split(jax.random.key(1), trials)
  neg_v, neg_t = jax.jit(jax.vmap(losses.sample_hard_negatives, in_axes=(None, None, None, 0)))(
      sim, temp, video_idx, keys)
  positive = video_idx[:, None] == video_idx[None, :]
  for logits, draws in ((sim / temp, np.asarray(neg_t)), (sim.T / temp, np.asarray(neg_v))):
    weights = np.exp(logits - logits.max(axis=1, keepdims=True)) * ~positive
    weights /= weights.sum(axis=1, keepdims=True)
    for row in range(4):
      freq = np.bincount(draws[:, row], minlength=4) / trials
      np.testing.assert_allclose(freq, weights[row], atol=0.015)


def test_hard_negatives_degenerate_batch_falls_back_to_other_entries():
  sim = jnp.eye(4, dtype=jnp.float32)
  video_idx = jnp.zeros((4,), jnp.int32)
  for seed in range(20):
    neg_v, neg_t, aux = losses.sample_hard_negatives(sim, 0.07, video_idx, jax.random.key(seed),
                                                      return_aux=True)
    assert np.all(np.asarray(neg_v) != np.arange(4))
    assert np.all(np.asarray(neg_t) != np.arange(4))
    assert int(aux["vtm_rows_without_negative"]) == 4
  # One entry of another video is enough: every row has a negative, and it is used.
  neg_v, neg_t, aux = losses.sample_hard_negatives(sim, 0.07, jnp.array([0, 0, 0, 1]),
                                                   jax.random.key(0), return_aux=True)
  assert int(aux["vtm_rows_without_negative"]) == 0
  assert list(np.asarray(neg_v)[:3]) == [3, 3, 3] and int(neg_v[3]) != 3
  assert list(np.asarray(neg_t)[:3]) == [3, 3, 3] and int(neg_t[3]) != 3


def test_vtm_loss_matches_numpy():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(9, 2)).astype(np.float32)
  labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0])
  expected = -np.mean(_log_softmax_np(logits.astype(np.float64))[np.arange(9), labels])
  loss, aux = jax.jit(losses.vtm_loss)(jnp.asarray(logits))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(aux["vtm_acc"]), np.mean(logits.argmax(1) == labels))
  with pytest.raises(ValueError):
    losses.vtm_loss(jnp.zeros((4, 2)))


def test_mask_tokens_respects_specials_and_80_10_10():
  rng = np.random.default_rng(5)
  batch, length, vocab = 512, 32, 1000
  mask_id, cls_id, pad_id = 103, 101, 0
  lengths = rng.integers(2, length + 1, size=batch)
  ids = rng.integers(200, vocab, size=(batch, length))
  ids[:, 0] = cls_id
  attention = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  ids = np.where(attention == 1, ids, pad_id)
  ids[:, 1] = np.where(lengths > 2, cls_id, ids[:, 1])   # a stray [CLS] mid-sequence
  masked, labels = jax.jit(losses.mask_tokens, static_argnames=(
      "vocab_size", "mask_token_id", "cls_token_id", "pad_token_id"))(
          jnp.asarray(ids, jnp.int32), jnp.asarray(attention), jax.random.key(0),
          vocab_size=vocab, mask_token_id=mask_id, cls_token_id=cls_id, pad_token_id=pad_id)
  masked, labels = np.asarray(masked), np.asarray(labels)

  chosen = labels != -100
  specials = (ids == cls_id) | (ids == pad_id) | (attention == 0)
  assert not np.any(chosen & specials)
  assert np.array_equal(masked[specials], ids[specials])
  assert np.array_equal(masked[~chosen], ids[~chosen])
  assert np.array_equal(labels[chosen], ids[chosen])

  eligible = ~specials
  np.testing.assert_allclose(chosen.sum() / eligible.sum(), 0.5, atol=0.02)
  n = chosen.sum()
  became_mask = (masked == mask_id) & chosen
  kept = (masked == ids) & chosen
  random = chosen & ~became_mask & ~kept
  # A random draw can hit the original token (1/vocab) or [MASK]; both are rare here.
  np.testing.assert_allclose(became_mask.sum() / n, 0.8, atol=0.02)
  np.testing.assert_allclose(kept.sum() / n, 0.1, atol=0.02)
  np.testing.assert_allclose(random.sum() / n, 0.1, atol=0.02)
  assert masked.min() >= 0 and masked.max() < vocab


def test_mlm_loss_matches_numpy_and_handles_no_masks():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
  labels = np.full((2, 5), -100)
  labels[0, 1], labels[0, 3], labels[1, 4] = 7, 2, 10
  logp = _log_softmax_np(logits.astype(np.float64))
  picks = [(0, 1), (0, 3), (1, 4)]
  expected = -np.mean([logp[b, l, labels[b, l]] for b, l in picks])
  expected_acc = np.mean([logits[b, l].argmax() == labels[b, l] for b, l in picks])
  loss, aux = jax.jit(losses.mlm_loss)(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(aux["mlm_acc"]), expected_acc)
  assert int(aux["mlm_num_masked"]) == 3

  none = jnp.full((2, 5), -100)
  loss0, grad0 = jax.value_and_grad(lambda x: losses.mlm_loss(x, none)[0])(jnp.asarray(logits))
  assert float(loss0) == 0.0
  assert np.all(np.isfinite(np.asarray(grad0))) and not np.any(np.asarray(grad0))


def test_mlm_loss_in_groups_is_the_mean_of_each_groups_mean():
  # VindLU: each GPU's mean over its own masked positions, averaged over the GPUs. Rows 0-1
  # are one group (three masked positions), rows 2-3 the other (one), row 4-5 a third with
  # none (counted as 0).
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(6, 4, 9)).astype(np.float32)
  labels = np.full((6, 4), -100)
  labels[0, 1], labels[0, 2], labels[1, 3], labels[3, 0] = 5, 1, 8, 2
  logp = _log_softmax_np(logits.astype(np.float64))
  ce = {(b, l): -logp[b, l, labels[b, l]] for b, l in [(0, 1), (0, 2), (1, 3), (3, 0)]}
  first = np.mean([ce[0, 1], ce[0, 2], ce[1, 3]])
  expected = (first + ce[3, 0] + 0.0) / 3
  loss, aux = losses.mlm_loss(jnp.asarray(logits), jnp.asarray(labels), groups=3)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert int(aux["mlm_num_masked"]) == 4
  # One group is the batch mean, which differs here.
  whole, _ = losses.mlm_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(whole), np.mean(list(ce.values())), rtol=1e-5)
  assert abs(float(whole) - expected) > 1e-3
  with pytest.raises(ValueError, match="does not split"):
    losses.mlm_loss(jnp.asarray(logits), jnp.asarray(labels), groups=4)
