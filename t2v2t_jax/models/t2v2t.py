"""The whole T2V2T (and VindLU) model: video encoder, text encoder, fusion encoder, heads.

The fusion mode (`config.fusion.mode`) selects VindLU's one-way `v2t` fusion, the paper's
`t2v2t` with bypass cross-attention, the naive T2V2T ablation, or joint self-attention.
Everything else (encoders, projections, heads, temperature) is shared by all modes, so a
VindLU checkpoint loads into any of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from input_pipeline import transforms
from t2v2t_jax.models import layer_stack, layers
from t2v2t_jax.models.config import validate_model_config
from t2v2t_jax.models.fusion import FusionEncoder
from t2v2t_jax.models.text_encoder import TextEncoder
from t2v2t_jax.models.vision_encoder import VideoEncoder


def l2_normalize(x, axis=-1, eps=1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


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
    """uint8 (or already normalised float) frames [B,T,H,W,3] -> (pooled, tokens, aux)."""
    x = transforms.normalize(frames, self.dtype or jnp.float32) if frames.dtype == jnp.uint8 else frames
    last_hidden, pooled, aux = self.vision_encoder(x, deterministic=deterministic, rngs=rngs)
    tokens = self.vision_layernorm(last_hidden)
    return pooled, tokens, aux

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
    return jnp.clip(self.temp[...], self.config.temp_min, self.config.temp_max)


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
