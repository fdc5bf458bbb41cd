"""BEiT video encoder: temporal behaviour, resizing helpers, remat and training-mode gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t2v2t_jax.checkpoints.params import assign_into, flatten_params
from t2v2t_jax.models.config import model_config
from t2v2t_jax.models.vision_encoder import (VideoEncoder, linear_resize_matrix,
                                             relative_position_index,
                                             resize_relative_position_table,
                                             resize_temporal_embedding)


def tiny_cfg(**overrides):
  c = model_config("test/16").vision   # width 32, depth 2, heads 2, mlp 64, patch 16
  c.image_size = 32
  c.num_frames = 4
  c.drop_path_rate = 0.0
  c.dropout_rate = 0.0
  c.update(overrides)
  return c


def randomize(encoder, seed=0, *, skip=("temporal.scale", "temporal_pos_embed"), scale=0.3):
  """Non-trivial values for every param (zero-init tables, CLS, ...) except `skip`."""
  rng = np.random.default_rng(seed)
  updates = {}
  for k, v in flatten_params(encoder).items():
    if any(s in k for s in skip):
      continue
    noise = rng.normal(size=v.shape).astype(np.float32) * scale
    is_layer_norm_scale = k.endswith(".scale") and not k.endswith("temporal.scale")
    updates[k] = 1.0 + noise if is_layer_norm_scale else noise
  assign_into(encoder, updates)
  return encoder


def frames(b, t, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, size, size, 3)), jnp.float32)


# Every test runs the model under nnx.jit (eager NNX is several times slower on CPU), and
# models are cloned from one module-scoped instance, so compiled code is shared: the jit
# cache is keyed on the graph structure (including `remat`) and shapes, not on values.

# (The jitted functions take positional arguments only: jit's cache key includes which
# arguments were passed by keyword, so wrappers normalise the calls.)

@nnx.jit(static_argnums=(2,))
def _forward(model, x, deterministic, rngs):
  h, pooled = model(x, deterministic=deterministic, rngs=rngs)
  return h, pooled


def forward(model, x, deterministic=True, rngs=None):
  return _forward(model, x, deterministic, rngs)


def _loss(model, x, deterministic, rngs):
  h, pooled = model(x, deterministic=deterministic, rngs=rngs)
  return jnp.mean(h ** 2) + jnp.mean(jnp.sin(pooled)), (h, pooled)


@nnx.jit(static_argnums=(2,))
def _loss_and_grad(model, x, deterministic, rngs):
  return nnx.value_and_grad(_loss, has_aux=True)(model, x, deterministic, rngs)


def loss_and_grad(model, x, deterministic=True, rngs=None):
  """((loss, (last_hidden, pooled)), grads)."""
  return _loss_and_grad(model, x, deterministic, rngs)


@pytest.fixture(scope="module")
def base_encoder():
  """Random values everywhere except temporal scale and temporal embedding (zero-init)."""
  enc = VideoEncoder(tiny_cfg(drop_path_rate=0.3, dropout_rate=0.1), rngs=nnx.Rngs(0))
  return randomize(enc)


def clone(enc, *, remat=False):
  c = nnx.clone(enc)
  c.remat = remat
  return c


# (b) ------------------------------------------------------------------------------------

def test_video_equals_per_frame_image_encoder_when_temporal_scale_zero(base_encoder):
  enc = clone(base_encoder)
  x = frames(2, 3)
  h, pooled = forward(enc, x)
  assert h.shape == (2, 3, 5, 32) and pooled.shape == (2, 3, 32)
  singles = [forward(enc, x[:, t:t + 1]) for t in range(3)]
  for t, (h1, p1) in enumerate(singles):
    np.testing.assert_allclose(h[:, t], h1[:, 0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(pooled[:, t], p1[:, 0], atol=1e-5, rtol=1e-5)
  # A non-zero temporal scale makes frames interact (the temporal path really runs at T>1)...
  assign_into(enc, {f"layers.{i}.temporal.scale": np.float32(0.5) for i in range(2)})
  h2, _ = forward(enc, x)
  assert float(jnp.abs(h2 - h).max()) > 1e-3
  # ... but not at T == 1, where the temporal blocks are skipped.
  np.testing.assert_array_equal(forward(enc, x[:, :1])[0], singles[0][0])


def test_pooled_is_layernorm_of_patch_mean(base_encoder):
  enc = base_encoder
  x = frames(2, 1, seed=1)
  h, pooled = forward(enc, x)
  m = np.asarray(h[:, :, 1:]).mean(axis=2)
  mu, var = m.mean(-1, keepdims=True), m.var(-1, keepdims=True)
  ref = (m - mu) / np.sqrt(var + 1e-12) * np.asarray(enc.pooler_norm.scale[...]) + np.asarray(enc.pooler_norm.bias[...])
  np.testing.assert_allclose(pooled, ref, atol=1e-4, rtol=1e-4)


def test_temporal_position_embedding_slice_and_interpolate(base_encoder):
  enc = clone(base_encoder)
  emb = np.random.default_rng(0).normal(size=(1, 4, 1, 32)).astype(np.float32)
  x2, x6 = frames(1, 2), frames(1, 6)
  base2 = enc.embeddings(x2, deterministic=True, rngs=None)
  base6 = enc.embeddings(x6, deterministic=True, rngs=None)
  assign_into(enc, {"embeddings.temporal_pos_embed": emb})
  np.testing.assert_allclose(enc.embeddings(x2, deterministic=True, rngs=None) - base2,
                             np.broadcast_to(emb[:, :2], base2.shape), atol=1e-5)
  interp = np.einsum("ts,bsnd->btnd", linear_resize_matrix(4, 6), emb)
  np.testing.assert_allclose(enc.embeddings(x6, deterministic=True, rngs=None) - base6,
                             np.broadcast_to(interp, base6.shape), atol=1e-5)


# (c) ------------------------------------------------------------------------------------

def test_resize_temporal_embedding_hand_computed():
  r = np.array([[1.0, 10.0], [3.0, 30.0], [7.0, 70.0]], np.float32)    # 3 frames, D=2
  emb = r[None, :, None, :]
  # slice (any mode)
  np.testing.assert_array_equal(resize_temporal_embedding(emb, 2, "interpolate"), emb[:, :2])
  np.testing.assert_array_equal(resize_temporal_embedding(emb, 1, "zero_pad"), emb[:, :1])
  np.testing.assert_array_equal(resize_temporal_embedding(emb, 3, "zero_pad"), emb)
  # zero pad 3 -> 5
  zp = resize_temporal_embedding(emb, 5, "zero_pad")
  np.testing.assert_array_equal(zp[0, :, 0], [[1, 10], [3, 30], [7, 70], [0, 0], [0, 0]])
  # interpolate 3 -> 5: src = (i + .5) * 3/5 - .5 = [-.2 -> 0, .4, 1.0, 1.6, 2.2 -> clamp 2]
  want = np.stack([r[0], 0.6 * r[0] + 0.4 * r[1], r[1], 0.4 * r[1] + 0.6 * r[2], r[2]])
  got = resize_temporal_embedding(emb, 5, "interpolate")
  assert got.shape == (1, 5, 1, 2) and got.dtype == np.float32
  np.testing.assert_allclose(got[0, :, 0], want, rtol=1e-6)
  # 2 -> 4: src = [-.25 -> 0, .25, .75, 1.25 -> 1]
  got = resize_temporal_embedding(emb[:, :2], 4, "interpolate")
  np.testing.assert_allclose(got[0, :, 0], [[1, 10], [1.5, 15], [2.5, 25], [3, 30]], rtol=1e-6)
  # jax arrays give the same numbers
  np.testing.assert_allclose(resize_temporal_embedding(jnp.asarray(emb), 5, "interpolate")[0, :, 0],
                             want, rtol=1e-6)
  with pytest.raises(ValueError, match="mode"):
    resize_temporal_embedding(emb, 5, "nearest")


def test_resize_temporal_embedding_matches_torch_linear():
  torch = pytest.importorskip("torch")
  emb = np.random.default_rng(0).normal(size=(1, 4, 1, 8)).astype(np.float32)
  for t1 in (5, 7, 12):
    ref = torch.nn.functional.interpolate(torch.from_numpy(emb[:, :, 0]).permute(0, 2, 1), t1,
                                          mode="linear").permute(0, 2, 1)[:, :, None].numpy()
    np.testing.assert_allclose(resize_temporal_embedding(emb, t1, "interpolate"), ref, atol=1e-6)


# (d) ------------------------------------------------------------------------------------

def test_relative_position_index_2x2_hand_computed():
  want = np.array([
      [11, 9, 9, 9, 9],
      [10, 4, 3, 1, 0],
      [10, 5, 4, 2, 1],
      [10, 7, 6, 4, 3],
      [10, 8, 7, 5, 4],
  ])
  np.testing.assert_array_equal(relative_position_index(2), want)
  np.testing.assert_array_equal(relative_position_index((2, 2)), want)
  idx = relative_position_index((14, 14))
  assert idx.shape == (197, 197) and idx.max() == 731 and idx[0, 0] == 731
  assert idx[0, 1] == 729 and idx[1, 0] == 730 and idx[1, 1] == 13 * 27 + 13


def test_resize_relative_position_table_shape_and_special_slots():
  heads = 3
  table = np.random.default_rng(0).normal(size=((2 * 2 - 1) ** 2 + 3, heads)).astype(np.float32)
  new = resize_relative_position_table(table, 2, 4)
  assert new.shape == ((2 * 4 - 1) ** 2 + 3, heads) and new.dtype == table.dtype
  np.testing.assert_array_equal(new[-3:], table[-3:])
  assert resize_relative_position_table(table, (2, 2), (2, 2)) is table
  # a constant sub-table stays constant
  const = np.concatenate([np.full((9, heads), 0.7, np.float32), table[-3:]])
  np.testing.assert_allclose(resize_relative_position_table(const, 2, 5)[:-3], 0.7, rtol=1e-6)
  # jax input, same numbers
  np.testing.assert_allclose(resize_relative_position_table(jnp.asarray(table), 2, 4), new, atol=1e-6)
  # shrinking works too and keeps the slots
  big = np.random.default_rng(1).normal(size=(7 * 7 + 3, heads)).astype(np.float32)
  small = resize_relative_position_table(big, 4, 3)
  assert small.shape == (5 * 5 + 3, heads)
  np.testing.assert_array_equal(small[-3:], big[-3:])
  with pytest.raises(ValueError, match="does not fit"):
    resize_relative_position_table(table, 3, 4)


def test_resize_relative_position_table_matches_torch_bilinear():
  torch = pytest.importorskip("torch")
  heads = 2
  table = np.random.default_rng(0).normal(size=(7 * 7 + 3, heads)).astype(np.float32)
  for dst in (2, 5, 6):
    sub = torch.from_numpy(table[:-3]).reshape(1, 7, 7, heads).permute(0, 3, 1, 2)
    d = 2 * dst - 1
    ref = torch.nn.functional.interpolate(sub, size=(d, d), mode="bilinear")
    ref = ref.permute(0, 2, 3, 1).reshape(d * d, heads).numpy()
    np.testing.assert_allclose(resize_relative_position_table(table, 4, dst)[:-3], ref, atol=1e-5)


# (f) ------------------------------------------------------------------------------------

def test_remat_same_outputs_and_gradients(base_encoder):
  plain = clone(base_encoder)
  # A non-zero temporal scale, so that temporal-block gradients are non-zero too.
  assign_into(plain, {f"layers.{i}.temporal.scale": np.float32(0.3) for i in range(2)})
  models = [plain, clone(plain, remat=True)]
  x = frames(2, 2)
  # Training mode (dropout and drop path active, same dropout seed): the rematerialised
  # forward must also draw the same random masks. (Compiled once per remat setting, shared
  # with the next test.)
  results = []
  for m in models:
    (loss, outs), g = loss_and_grad(m, x, False, nnx.Rngs(dropout=3))
    results.append((loss, outs, dict(nnx.to_flat_state(g))))
  (l0, o0, g0), (l1, o1, g1) = results
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(o0, o1):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  assert g0.keys() == g1.keys()
  for k in g0:
    np.testing.assert_allclose(g0[k].get_value(), g1[k].get_value(), atol=1e-5, rtol=1e-4,
                               err_msg=str(k))
  assert float(jnp.abs(g0[("layers", 1, "temporal", "scale")].get_value())) > 0


# (g) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("remat", [False, True])
def test_jit_train_mode_gradients_finite(base_encoder, remat):
  enc = clone(base_encoder, remat=remat)
  x = frames(2, 2)
  (loss_a, _), grads = loss_and_grad(enc, x, False, nnx.Rngs(dropout=0))
  (loss_b, _), _ = loss_and_grad(enc, x, False, nnx.Rngs(dropout=1))
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == len(flatten_params(enc))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert np.isfinite(float(loss_a)) and float(loss_a) != float(loss_b)   # randomness is active


def test_bfloat16_compute_and_input_checks():
  enc = VideoEncoder(tiny_cfg(depth=1), dtype="bfloat16", rngs=nnx.Rngs(0))
  h, pooled = forward(enc, frames(1, 2))
  assert h.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(pooled.astype(jnp.float32))))
  assert flatten_params(enc)["layers.0.attention.query.kernel"].dtype == jnp.float32
  with pytest.raises(ValueError, match="multiple of the patch"):
    forward(enc, frames(1, 1, size=40))


def test_temporal_block_matches_per_position_numpy_reference():
  """The temporal block attends over time in place ([B,T,N,D] einsums); a plain numpy
  version of the textbook form (each token position's T frames as one sequence) must
  give the same output."""
  from t2v2t_jax.models.vision_encoder import TemporalAttention  # noqa: PLC0415
  b, t, n, d, heads = 2, 3, 5, 16, 2
  block = TemporalAttention(d, heads, eps=1e-6, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  updates = {k: (rng.normal(size=v.shape) * 0.4).astype(np.float32)
             for k, v in flatten_params(block).items()}
  updates["norm.scale"] = 1.0 + updates["norm.scale"]
  updates["scale"] = np.float32(0.7)
  assign_into(block, updates)
  x = rng.normal(size=(b, t, n, d)).astype(np.float32)
  got = np.asarray(block(jnp.asarray(x), drop_path_rate=0.0, deterministic=True, rngs=None))

  p = {k: np.asarray(v, np.float64) for k, v in flatten_params(block).items()}
  hd = d // heads
  want = np.empty_like(x, dtype=np.float64)
  for bi in range(b):
    for ni in range(n):
      seq = x[bi, :, ni].astype(np.float64)                                # [T, D]
      mu, var = seq.mean(-1, keepdims=True), seq.var(-1, keepdims=True)
      y = (seq - mu) / np.sqrt(var + 1e-6) * p["norm.scale"] + p["norm.bias"]
      proj = {z: y @ p[f"attention.{z}.kernel"] + p[f"attention.{z}.bias"]
              for z in ("query", "key", "value")}
      ctx = np.empty((t, d))
      for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = proj["query"][:, sl] @ proj["key"][:, sl].T / np.sqrt(hd)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        ctx[:, sl] = (w / w.sum(-1, keepdims=True)) @ proj["value"][:, sl]
      out = ctx @ p["out_proj.kernel"] + p["out_proj.bias"]
      want[bi, :, ni] = seq + p["scale"] * out
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
