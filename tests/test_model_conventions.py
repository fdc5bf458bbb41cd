"""The model's own conventions (`models/t2v2t.py`), each against hand-computed values:
frames normalised on the device, the mean-of-frame-cosines score, the temperature clamp."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2v2t_jax.models.t2v2t import clamp_temperature, normalize_frames, similarity


def _normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_normalize_frames_exact():
  values = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16, 1).repeat(3, -1)
  out = np.asarray(normalize_frames(values))
  assert out.dtype == np.float32 and out.shape == values.shape
  expected = (values.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(np.asarray(jax.jit(normalize_frames)(values)), expected)
  assert out.min() == -1.0 and out.max() == 1.0
  assert out.flat[0] == -1.0 and out.flat[3 * 51] == pytest.approx(-0.6, abs=1e-7)
  bf16 = normalize_frames(values, dtype="bfloat16")
  assert str(bf16.dtype) == "bfloat16"
  np.testing.assert_array_equal(np.asarray(bf16.astype("float32")),
                                np.asarray(np.asarray(expected).astype(bf16.dtype).astype(np.float32)))


def test_similarity_is_mean_of_frame_cosines():
  rng = np.random.default_rng(0)
  video = _normalise(rng.normal(size=(3, 4, 8)))
  text = _normalise(rng.normal(size=(5, 8)))
  expected = np.zeros((3, 5))
  for v in range(3):
    for t in range(5):
      expected[v, t] = np.mean([video[v, f] @ text[t] for f in range(4)])
  got = similarity(jnp.asarray(video, jnp.float32), jnp.asarray(text, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)
  # On the host (evaluation, search) numpy in, numpy out, same numbers.
  host = similarity(video.astype(np.float32), text.astype(np.float32))
  assert isinstance(host, np.ndarray) and host.dtype == np.float32
  np.testing.assert_allclose(host, expected, atol=1e-6)
  # Not pooled-then-normalised: that would give a different number.
  pooled = _normalise(video.mean(axis=1)) @ text.T
  assert not np.allclose(pooled, expected, atol=1e-3)


def test_clamp_temperature():
  np.testing.assert_allclose(
      np.asarray(clamp_temperature(jnp.array([1e-5, 0.07, 3.0]), 0.001, 0.5)), [0.001, 0.07, 0.5],
      rtol=1e-6)
