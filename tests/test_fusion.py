"""Fusion encoder modes and the T2V bypass cross-attention block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bert_reference import (dense, gelu, jit_apply, jit_value_and_grad, ln, mha, nested, randomize,
                            ref_bert_layer)
from t2v2t_jax.checkpoints.params import assign_into, flatten_params
from t2v2t_jax.models.bypass import BypassCrossAttention
from t2v2t_jax.models.config import model_config
from t2v2t_jax.models.fusion import FusionEncoder

B, L, T, N, D = 2, 6, 3, 5, 32


def fusion_cfg(mode, **fusion):
  cfg = model_config("test/16", "test", mode)   # vision and text width 32
  cfg.fusion.update(fusion)
  return cfg


def set_gates(module, value):
  gates = [k for k in flatten_params(module) if k.split(".")[-1] in ("gate", "ffn_gate")]
  assign_into(module, {k: np.float32(value) for k in gates})
  return gates


def make_inputs(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  text = jax.random.normal(k1, (B, L, D))
  video = jax.random.normal(k2, (B, T, N, D))
  mask = jnp.asarray([[1] * L, [1, 1, 1, 0, 0, 0]], jnp.int32)
  return text, mask, video


VARIANTS = [
    ("v2t", {}),
    ("t2v2t", {}),
    ("t2v2t", {"t2v_placement": "per_layer"}),
    ("t2v2t", {"t2v_residual": "post_ln", "layer_order": "cross_first"}),
    ("t2v2t", {"t2v_ffn": False, "keep_frame_cls": False}),
    ("t2v2t_naive", {}),
    ("t2v2t_naive", {"t2v_placement": "per_layer", "layer_order": "cross_first"}),
    ("joint", {}),
]


def build(mode, seed=0, gates=0.7, **fusion):
  model = FusionEncoder(fusion_cfg(mode, **fusion), rngs=nnx.Rngs(seed))
  randomize(model, seed=seed, scale=0.1)
  set_gates(model, gates)
  return model


# -- a float64 numpy reference of the T2V block, tiling the text per frame -----------------------

def ref_t2v(p, text, mask, video, heads, bypass, ffn=True):
  """Gated T2V block, frame by frame: F_V[i] + g * dense(MHA(LN(F_V[i]), LN(F_T) || LN(F_V[i])))."""
  out = np.empty(video.shape)
  weights = []
  for b in range(video.shape[0]):
    for t in range(video.shape[1]):
      fv, ft = video[b, t], text[b]
      q_in = ln(fv, p["video_norm"])
      kv_in = np.concatenate([ln(ft, p["text_norm"]), q_in]) if bypass else ln(ft, p["text_norm"])
      key_mask = np.concatenate([mask[b], np.ones(len(fv), bool)]) if bypass else mask[b]
      ctx, w = mha(q_in, kv_in, key_mask, p["attention"], heads)
      weights.append(w)
      x = fv + p["gate"] * dense(ctx, p["output"])
      if ffn:
        y = dense(gelu(dense(ln(x, p["ffn_norm"]), p["ffn"]["intermediate"])), p["ffn"]["output"])
        x = x + p["ffn_gate"] * y
      out[b, t] = x
  return out, np.stack(weights).reshape(video.shape[:2] + weights[0].shape)


@pytest.mark.parametrize("bypass", [True, False])
def test_t2v_block_matches_reference_on_both_attention_paths(bypass):
  block = BypassCrossAttention(D, 2, 64, eps=1e-12, dropout_rate=0.1, bypass=bypass, rngs=nnx.Rngs(0))
  randomize(block, seed=3, scale=0.2)
  set_gates(block, 0.8)
  text, mask, video = make_inputs()
  fused_path, none = jit_apply(block, text, mask, video)                  # jax.nn.dot_product_attention
  explicit, weights = jit_apply(block, text, mask, video, return_weights=True)  # einsum path
  assert none is None
  p = nested(flatten_params(block), "")
  want, want_w = ref_t2v(p, np.asarray(text, np.float64), np.asarray(mask).astype(bool),
                         np.asarray(video, np.float64), 2, bypass)
  np.testing.assert_allclose(fused_path, want, atol=2e-5)
  np.testing.assert_allclose(explicit, want, atol=2e-5)
  np.testing.assert_allclose(weights, want_w, atol=1e-5)
  block.attention.attention_impl = "explicit"   # einsums without the weights
  explicit_only, _ = jit_apply(block, text, mask, video)
  np.testing.assert_allclose(explicit_only, want, atol=2e-5)


@pytest.mark.parametrize("bypass", [True, False])
def test_t2v_training_runs_frame_by_frame_with_the_same_result(bypass):
  # Training runs the block one frame at a time (a checkpointed scan over the frames);
  # without dropout its output and gradients are those of all frames at once.
  text, mask, video = make_inputs()

  def run(rate, video, deterministic):
    block = BypassCrossAttention(D, 2, 64, eps=1e-12, dropout_rate=rate, bypass=bypass,
                                 rngs=nnx.Rngs(0))
    randomize(block, seed=3, scale=0.2)
    set_gates(block, 0.8)
    graphdef, state = nnx.split(block)

    def loss(state, video):
      out, _ = nnx.merge(graphdef, state)(text, mask, video, deterministic=deterministic,
                                          rngs=nnx.Rngs(dropout=5))
      return (out ** 2).sum(), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, video)
    return np.asarray(out), grads

  out, grads = run(0.0, video, deterministic=False)
  want, want_grads = run(0.0, video, deterministic=True)
  np.testing.assert_allclose(out, want, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  # With dropout, each frame draws its own mask: identical frames come out different.
  same_frames = jnp.broadcast_to(video[:, :1], video.shape)
  trained, _ = run(0.3, same_frames, deterministic=False)
  frozen, _ = run(0.3, same_frames, deterministic=True)
  np.testing.assert_allclose(frozen[:, 0], frozen[:, 1], atol=1e-6)
  assert not np.allclose(trained[:, 0], trained[:, 1], atol=1e-3)


def test_bypass_keys_include_the_frame_and_naive_only_text():
  text, mask, video = make_inputs()
  out = {}
  for mode in ("t2v2t", "t2v2t_naive"):
    model = build(mode)
    _, aux = jit_apply(model, text, mask, video, return_aux=True)
    (w,) = aux["t2v_attention"]
    out[mode] = w
    assert aux["t2v_text_keys"] == L
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.asarray(w[1, ..., 3:L]) == 0.0)  # text padding gets no attention
  assert out["t2v2t"].shape == (B, T, 2, N, L + N)       # [B, T, H, N, text keys || own tokens]
  assert out["t2v2t_naive"].shape == (B, T, 2, N, L)     # text keys only
  self_mass = np.asarray(out["t2v2t"][..., L:].sum(-1))
  assert (self_mass > 0.05).all() and (self_mass < 0.95).all()


@pytest.mark.parametrize("placement", ["once", "per_layer"])
@pytest.mark.parametrize("order", ["vindlu", "cross_first"])
def test_t2v2t_with_zero_gates_equals_v2t(placement, order):
  t2v2t = build("t2v2t", gates=0.0, t2v_placement=placement, layer_order=order)
  v2t = FusionEncoder(fusion_cfg("v2t", layer_order=order), rngs=nnx.Rngs(5))
  shared = flatten_params(t2v2t)
  v2t_paths = set(flatten_params(v2t))
  assert v2t_paths <= set(shared) and all(p.startswith("layers.") for p in v2t_paths)
  assign_into(v2t, {p: shared[p] for p in v2t_paths})
  text, mask, video = make_inputs()
  a, _ = t2v2t(text, mask, video)
  b, _ = v2t(text, mask, video)
  np.testing.assert_array_equal(a, b)
  set_gates(t2v2t, 0.5)  # and the T2V block does change the output once its gates open
  c, _ = t2v2t(text, mask, video)
  assert np.abs(np.asarray(c) - np.asarray(b)).max() > 1e-3


@pytest.mark.parametrize("mode, fusion", VARIANTS)
def test_appended_text_padding_changes_nothing(mode, fusion):
  model = build(mode, **fusion)
  text, mask, video = make_inputs()
  fused, _ = jit_apply(model, text, mask, video)
  junk = 3.0 * jax.random.normal(jax.random.key(9), (B, 4, D))
  text_pad = jnp.concatenate([text, junk], 1)
  mask_pad = jnp.concatenate([mask, jnp.zeros((B, 4), mask.dtype)], 1)
  fused_pad, _ = jit_apply(model, text_pad, mask_pad, video)
  real = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.asarray(fused_pad[:, :L])[real], np.asarray(fused)[real], atol=1e-5)


@pytest.mark.parametrize("mode, fusion", [v for v in VARIANTS if v[0].startswith("t2v2t")])
def test_t2v_frames_are_independent(mode, fusion):
  model = build(mode, **fusion)
  text, mask, video = make_inputs()
  video2 = video.at[:, 1].add(jax.random.normal(jax.random.key(4), (B, N, D)))
  _, aux1 = jit_apply(model, text, mask, video, return_aux=True)
  _, aux2 = jit_apply(model, text, mask, video2, return_aux=True)
  # The first T2V block sees text that has not met the video yet: frame 1's change stays
  # in frame 1. ('per_layer': later blocks see text that attended to all frames, so there
  # every frame may change, through the text only.)
  f1, f2 = aux1["t2v_video"][0], aux2["t2v_video"][0]
  np.testing.assert_array_equal(f1[:, [0, 2]], f2[:, [0, 2]])
  assert np.abs(np.asarray(f1[:, 1] - f2[:, 1])).max() > 1e-3
  # Same on the fused-kernel path (no weights requested) of the block itself.
  block = model.t2v if fusion.get("t2v_placement", "once") == "once" else model.t2v_blocks[0]
  y1, _ = jit_apply(block, text, mask, video)
  y2, _ = jit_apply(block, text, mask, video2)
  np.testing.assert_allclose(y1[:, [0, 2]], y2[:, [0, 2]], atol=1e-6)


@pytest.mark.parametrize("mode, fusion", VARIANTS)
def test_texts_sharing_a_video_fuse_as_with_copies_of_it(mode, fusion):
  """k texts a video (training's caption, negative caption and masked caption): the same
  outputs and gradients as each text with its own copy of the video, which
  test_fusion_matches_numpy_reference checks against numpy. In 'v2t' the k texts are one
  query sequence against the video's keys and values (computed once)."""
  model = build(mode, **fusion)
  text, mask, video = make_inputs()
  k = 3
  texts = jax.random.normal(jax.random.key(5), (k * B, L, D))
  masks = jnp.repeat(mask, k, axis=0)[::-1]   # the mixed padding rows of make_inputs
  copies = jnp.repeat(video, k, axis=0)
  shared, _ = jit_apply(model, texts, masks, video)
  copied, _ = jit_apply(model, texts, masks, copies)
  assert shared.shape == (k * B, L, D)
  np.testing.assert_allclose(shared, copied, atol=2e-6)

  def grad_of(videos):
    graphdef, state = nnx.split(model)
    def loss(state, videos):
      out, _ = nnx.merge(graphdef, state)(texts, masks, videos)
      return (out * jnp.cos(out)).sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(state, videos)

  (gs_params, gs_video), (gc_params, gc_video) = grad_of(video), grad_of(copies)
  np.testing.assert_allclose(gs_video, gc_video.reshape((B, k) + video.shape[1:]).sum(1),
                             atol=1e-4)
  for a, b in zip(jax.tree.leaves(gs_params), jax.tree.leaves(gc_params)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="do not share 2 videos evenly"):
    model(texts[:5], masks[:5], video)


def test_keep_frame_cls_false_drops_token_zero():
  text, mask, video = make_inputs()
  for mode in ("v2t", "t2v2t", "joint"):
    drop = build(mode, keep_frame_cls=False)
    keep = FusionEncoder(fusion_cfg(mode), rngs=nnx.Rngs(0))
    assign_into(keep, flatten_params(drop))
    a, _ = drop(text, mask, video)
    b, _ = keep(text, mask, video[:, :, 1:])
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["v2t", "t2v2t", "joint"])
def test_fusion_matches_numpy_reference(mode):
  text, mask, video = make_inputs()
  model = build(mode)
  fused, _ = jit_apply(model, text, mask, video)
  p = nested(flatten_params(model), "")
  text64, video64 = np.asarray(text, np.float64), np.asarray(video, np.float64)
  mask_np = np.asarray(mask).astype(bool)
  if mode == "t2v2t":  # the bypass block first, with the encoder's input text state
    video64, _ = ref_t2v(p["t2v"], text64, mask_np, video64, 2, bypass=True)
  for b in range(B):
    x, v, m = text64[b], video64[b].reshape(T * N, D), mask_np[b]
    if mode == "joint":
      x = np.concatenate([x, v])
      m = np.concatenate([m, np.ones(T * N, bool)])
    for i in range(len(model.layers)):
      x = ref_bert_layer(p["layers"][str(i)], x, m, 2, kv=None if mode == "joint" else v)
    np.testing.assert_allclose(fused[b], x[:L], atol=5e-5)


def test_bfloat16_all_modes():
  text, mask, video = make_inputs()
  for mode in ("v2t", "t2v2t", "t2v2t_naive", "joint"):
    model = FusionEncoder(fusion_cfg(mode), dtype="bfloat16", rngs=nnx.Rngs(0))
    set_gates(model, 0.5)
    fused, aux = jit_apply(model, text, mask, video, return_aux=True)
    assert fused.dtype == jnp.bfloat16 and np.isfinite(np.asarray(fused, np.float32)).all(), mode
    assert all(v.dtype == jnp.float32 for v in flatten_params(model).values())
    if mode.startswith("t2v2t"):
      assert aux["t2v_attention"][0].dtype == jnp.float32


def test_structure_per_mode():
  paths = {}
  for mode, fusion in [("v2t", {}), ("t2v2t", {}), ("t2v2t", {"t2v_placement": "per_layer"}),
                       ("t2v2t", {"t2v_residual": "post_ln"}), ("joint", {})]:
    paths[(mode, tuple(fusion.items()))] = set(flatten_params(FusionEncoder(fusion_cfg(mode, **fusion),
                                                                            rngs=nnx.Rngs(0))))
  v2t = paths[("v2t", ())]
  assert "layers.1.crossattention.key.kernel" in v2t and "layers.2.attention.query.kernel" not in v2t
  assert not any("crossattention" in p for p in paths[("joint", ())])
  once = paths[("t2v2t", ())]
  assert {"t2v.gate", "t2v.ffn_gate", "t2v.text_norm.scale", "t2v.video_norm.scale",
          "t2v.attention.query.kernel", "t2v.output.kernel", "t2v.ffn_norm.scale"} <= once
  assert "t2v_blocks.1.gate" in paths[("t2v2t", (("t2v_placement", "per_layer"),))]
  post = paths[("t2v2t", (("t2v_residual", "post_ln"),))]
  assert "t2v.output_norm.scale" in post and not any(p.endswith("gate") for p in post)
  with pytest.raises(ValueError, match="width"):
    cfg = fusion_cfg("t2v2t")
    cfg.vision.width = 48
    FusionEncoder(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mode, fusion", [
    ("v2t", {}), ("t2v2t", {}), ("t2v2t_naive", {"t2v_placement": "per_layer"}), ("joint", {})])
def test_jit_grad_with_dropout_and_remat(mode, fusion):
  text, mask, video = make_inputs()

  def loss_fn(model, rngs):
    fused, _ = model(text, mask, video, deterministic=False, rngs=rngs)
    return jnp.mean(fused ** 2 * jnp.arange(D))

  def run(remat):
    model = FusionEncoder(fusion_cfg(mode, **fusion), remat=remat, rngs=nnx.Rngs(0))
    set_gates(model, 0.5)
    return *jit_value_and_grad(model, loss_fn), set(flatten_params(model))

  loss_a, grads_a, paths = run(False)
  loss_b, grads_b, _ = run(True)
  assert set(grads_a) == set(grads_b) == paths
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  for key in grads_a:
    assert np.isfinite(grads_a[key]).all(), key
    assert np.abs(grads_a[key]).sum() > 0, key
    np.testing.assert_allclose(grads_a[key], grads_b[key], rtol=1e-4, atol=1e-7, err_msg=key)
