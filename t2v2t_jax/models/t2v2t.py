"""The whole T2V2T (and VindLU) model: video encoder, text encoder, fusion encoder, heads.

The fusion mode (`config.fusion.mode`) selects VindLU's one-way `v2t` fusion, the paper's
`t2v2t` with bypass cross-attention, the naive T2V2T ablation, or joint self-attention.
Everything else (encoders, projections, heads, temperature) is shared by all modes, so a
VindLU checkpoint loads into any of them.

The model's own conventions live here, for the train step, evaluation and search alike:
frames arrive as uint8 and are normalised on the device (`normalize_frames`), a video and
a text are scored by the mean over frames of their cosines (`similarity`), and the
temperature is kept inside [temp_min, temp_max] (`clamp_temperature`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from t2v2t_jax.models import layer_stack, layers
from t2v2t_jax.models.config import validate_model_config
from t2v2t_jax.models.fusion import FusionEncoder
from t2v2t_jax.models.text_encoder import TextEncoder
from t2v2t_jax.models.vision_encoder import VideoEncoder


MEAN = 0.5  # per channel, the same for R, G, B (SPEC 1)
STD = 0.5

# normalize_frames() of each uint8 value, computed as PyTorch does it (float32 IEEE
# arithmetic: x / 255, then (x - 0.5) / 0.5). XLA's float32 division is not correctly
# rounded on CPU or GPU (126 of the 256 values of x / 255 come out 1 ulp off), so the
# device looks the values up in this table instead of dividing.
NORMALIZE_TABLE = (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(MEAN)) / np.float32(STD)


def normalize_frames(frames, dtype="float32"):
  """Device-side normalisation of uint8 frames: `(x / 255 - 0.5) / 0.5`, in `dtype`.

  uint8 input: a lookup in `NORMALIZE_TABLE` (bit-exact with the float32 formula; under
  jit a fused gather, as cheap as the arithmetic). Other input dtypes: the arithmetic, in
  float32, then cast."""
  x = jnp.asarray(frames)
  if x.dtype == jnp.uint8:
    return jnp.asarray(NORMALIZE_TABLE, dtype=dtype)[x.astype(jnp.int32)]
  x = x.astype(jnp.float32) / 255.0
  return ((x - MEAN) / STD).astype(dtype)


def l2_normalize(x, axis=-1, eps=1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def similarity(video_emb, text_emb):
  """Video-to-text score: the mean over frames of per-frame cosine similarities.

  Args:
    video_emb: [Bv, T, E] per-frame embeddings, each frame L2-normalised
      (`T2V2T.video_embedding`).
    text_emb: [Bt, E] text embeddings, L2-normalised (`T2V2T.text_embedding`).

  Returns:
    [Bv, Bt] float32 (before temperature). This is NOT the cosine of a pooled-then-
    normalised video vector (SPEC 4): the dot product is linear, so the mean of the
    per-frame cosines is the dot product of the text with the mean of the (normalised,
    not renormalised) frame embeddings, which is how it is computed here, without the
    [Bv, T, Bt] intermediate (3 GB for ActivityNet's 4,917 videos at 32 frames). Written
    with array methods only, so it runs as given: on jax arrays inside the train step, on
    numpy arrays on the host in evaluation and search.
  """
  return video_emb.astype(np.float32).mean(axis=1) @ text_emb.astype(np.float32).T


def clamp_temperature(temp, lo: float, hi: float):
  """The contrastive temperature kept inside [lo, hi] (SPEC 4: [0.001, 0.5])."""
  return jnp.clip(temp, lo, hi)


class T2V2T(nnx.Module):
  """Video-text retrieval model.

  Attributes:
    vision_encoder: BEiT video encoder (per-frame pooled features and tokens).
    vision_layernorm: new LayerNorm over the last vision hidden state (fusion input).
    text_encoder: BERT layers 0..fusion_layer-1 and the tied MLM head.
    fusion_encoder: BERT layers fusion_layer.. with cross-attention, T2V blocks per mode.
    vision_proj, text_proj: 256-d projections for the contrastive loss.
    itm_head: 2-way matching head on the fusion [CLS].
    temp: contrastive temperature (clamped to [temp_min, temp_max] every step).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    validate_model_config(config)
    self.config = config
    dtype = layers.as_dtype(config.dtype)
    self.dtype = dtype
    # The scan setting is resolved for the backend the model is built on; the TPU compile
    # planner resolves it for the target chip before building.
    common = dict(dtype=dtype, remat=config.remat,
                  scan_layers=layer_stack.resolve_scan(config.get("scan_layers", "auto")),
                  attention_impl=config.attention_impl)
    self.vision_encoder = VideoEncoder(config.vision, rngs=rngs, **common)
    self.vision_layernorm = layers.layer_norm(config.vision.width, eps=config.vision.layer_norm_eps,
                                              dtype=dtype, rngs=rngs)
    self.text_encoder = TextEncoder(config.text, rngs=rngs, **common)
    self.fusion_encoder = FusionEncoder(config, rngs=rngs, **common)
    self.vision_proj = layers.linear(config.vision.width, config.embed_dim, rngs=rngs)
    self.text_proj = layers.linear(config.text.width, config.embed_dim, rngs=rngs)
    self.itm_head = layers.linear(config.text.width, 2, rngs=rngs)
    self.temp = nnx.Param(jnp.asarray(config.temp_init, jnp.float32))

  # -- encoders ---------------------------------------------------------------------------
  def encode_video(self, frames, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """uint8 (or already normalised float) frames [B,T,H,W,3] -> (pooled [B,T,D], tokens [B,T,N,D])."""
    x = normalize_frames(frames, self.dtype or jnp.float32) if frames.dtype == jnp.uint8 else frames
    last_hidden, pooled = self.vision_encoder(x, deterministic=deterministic, rngs=rngs)
    tokens = self.vision_layernorm(last_hidden)
    return pooled, tokens

  def encode_text(self, input_ids, attention_mask, *, deterministic: bool = True,
                  rngs: nnx.Rngs | None = None):
    return self.text_encoder(input_ids, attention_mask, deterministic=deterministic, rngs=rngs)

  def fuse(self, text_hidden, text_mask, video_tokens, *, deterministic: bool = True,
           rngs: nnx.Rngs | None = None, return_aux: bool = False):
    return self.fusion_encoder(text_hidden, text_mask, video_tokens, deterministic=deterministic,
                               rngs=rngs, return_aux=return_aux)

  # -- heads ------------------------------------------------------------------------------
  def video_embedding(self, pooled):
    """Per-frame projected, L2-normalised features [B,T,E] (VTC uses the mean of cosines)."""
    return l2_normalize(self.vision_proj(pooled))

  def text_embedding(self, text_hidden):
    """Projected, L2-normalised [CLS] feature of the text encoder's last layer [B,E]."""
    return l2_normalize(self.text_proj(text_hidden[:, 0]))

  def itm_logits(self, fused):
    return self.itm_head(fused[:, 0]).astype(jnp.float32)

  def mlm_logits(self, fused):
    return self.text_encoder.mlm_logits(fused).astype(jnp.float32)

  def clamped_temp(self):
    return clamp_temperature(self.temp[...], self.config.temp_min, self.config.temp_max)


def create_model(config: ml_collections.ConfigDict, seed: int = 0) -> T2V2T:
  # RBG keys: initialising ~600 parameters with threefry made XLA's compile of the
  # (jitted, sharded) init take minutes on GPU at paper size; RngBitGenerator is a few ops.
  model = T2V2T(config, rngs=nnx.Rngs(params=jax.random.key(seed, impl="rbg"),
                                      dropout=jax.random.key(seed + 1, impl="rbg")))
  init_std = float(config.get("init_std", INIT_STD))
  if init_std != INIT_STD:
    _rescale_initial_weights(model, init_std / INIT_STD)
  return model


INIT_STD = 0.02  # the std of layers.DEFAULT_INIT (BERT, BEiT, VindLU)


def _rescale_initial_weights(model: T2V2T, factor: float) -> None:
  """Multiplies every weight drawn from `layers.DEFAULT_INIT` (dense and convolution
  kernels, embedding tables) by `factor`, i.e. draws them with std `0.02 * factor`.

  Why: 0.02 suits width 768; in a narrow model trained from scratch (the CPU demo, width
  128) an attention branch then adds ~1% to the residual stream, every caption's [CLS]
  state starts out nearly the same (pairwise cosine 0.9999) and contrastive learning sits
  on a plateau for hundreds of steps. Biases, LayerNorms, layer scales, gates and the
  vision position embeddings keep their own initial values.
  """
  params = nnx.state(model, nnx.Param)

  def scale(path, x):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return x * factor if names and names[-1] in ("kernel", "embedding") else x

  nnx.update(model, jax.tree_util.tree_map_with_path(scale, params))


def abstract_model(config: ml_collections.ConfigDict) -> T2V2T:
  """The model with ShapeDtypeStruct leaves (no memory): for counting and sharding plans."""
  return nnx.eval_shape(lambda: create_model(config))


def abstract_params(config: ml_collections.ConfigDict):
  """`(graphdef, params)` of the model, the params as ShapeDtypeStructs (no memory): what
  a restore needs to place the stored parameters, and what `nnx.merge` takes to run them."""
  return nnx.split(abstract_model(config), nnx.Param)
