"""BEiT video encoder: BEiT-B/16 frames with a temporal attention block after every layer.

Input `x` is float `[B, T, H, W, 3]`, already normalised. Every frame goes through the
BEiT image transformer (pre-LN, relative position bias per layer, layer scale, no absolute
position embedding); after the FFN of every layer a temporal block lets each of the
N = 1 + (H/p)(W/p) token positions attend over the T frames. With T == 1 (images) the
temporal blocks are skipped (shapes are static, so this is a Python `if`), and since a
fresh temporal block has `scale == 0` a newly initialised video encoder equals the image
encoder frame by frame.

Parameter structure (dotted paths as used by `t2v2t_jax.checkpoints.params`; D = width,
M = mlp_dim, H = heads, p = patch, g = image_size / p, F = num_frames):

```
embeddings.patch_embed.kernel            [p, p, 3, D]   nnx.Conv (PyTorch [D, 3, p, p] -> transpose(2, 3, 1, 0))
embeddings.patch_embed.bias              [D]
embeddings.cls_token                     [1, 1, D]
embeddings.temporal_pos_embed            [1, F, 1, D]   zero-init
layers.{i}.layernorm_before.{scale,bias} [D]
layers.{i}.attention.query.{kernel,bias} [D, D], [D]    layers.MultiHeadAttention
layers.{i}.attention.key.kernel          [D, D]         (BEiT: no key bias)
layers.{i}.attention.value.{kernel,bias} [D, D], [D]
layers.{i}.relative_position_bias.table  [(2g-1)^2 + 3, H]
layers.{i}.attention_output.{kernel,bias}[D, D], [D]
layers.{i}.lambda_1                      [D]            layer scale, init layer_scale_init
layers.{i}.layernorm_after.{scale,bias}  [D]
layers.{i}.ffn.intermediate.{kernel,bias}[D, M], [M]    layers.FeedForward (exact GELU)
layers.{i}.ffn.output.{kernel,bias}      [M, D], [D]
layers.{i}.lambda_2                      [D]
layers.{i}.temporal.norm.{scale,bias}    [D]
layers.{i}.temporal.attention.{query,key,value}.{kernel,bias}  [D, D], [D]
layers.{i}.temporal.out_proj.{kernel,bias}                     [D, D], [D]
layers.{i}.temporal.scale                []             zero-init
pooler_norm.{scale,bias}                 [D]            BEiT `pooler.layernorm`
```

One layer, on tokens h of one frame (drop_path = stochastic depth of that layer, rates
`linspace(0, drop_path_rate, depth)`; dropout = `dropout_rate`, BEiT's hidden dropout):

```
h = h + drop_path(lambda_1 * dropout(attention_output(MHA(layernorm_before(h), bias=rel_pos_bias))))
h = h + drop_path(lambda_2 * dropout(ffn(layernorm_after(h))))
x = x + scale * drop_path(out_proj(MHA_time(norm(x))))     # x = [B, T, N, D], only if T > 1
```

DECISIONS recorded here:
- The temporal branch uses its layer's drop-path rate and drops per video (leading axis B
  of `[B, T, N, D]`); the spatial branches drop per frame (leading axis B*T), as in BEiT
  applied to flattened frames.
- Relative position bias for an input grid other than the table's: the table is resized
  on the fly with `resize_relative_position_table` (bilinear, as Hugging Face BEiT does).
- Temporal position embedding: `T <= F` adds the first T rows; `T > F` adds the stored
  rows linearly interpolated to T (`resize_temporal_embedding(..., "interpolate")`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from t2v2t_jax.models import layer_stack
from t2v2t_jax.models import layers as L

IN_CHANNELS = 3


# ----------------------------------------------------------------------------------------
# Pure helpers: interpolation, relative position index, table and embedding resizing.
# ----------------------------------------------------------------------------------------

def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float64 matrix of 1-D linear interpolation, `align_corners=False`.

  Same sampling as `torch.nn.functional.interpolate(mode='linear' / 'bilinear',
  align_corners=False)` with an explicit output size: output sample i reads the input at
  `src = (i + 0.5) * n_in / n_out - 0.5`, clamped below at 0; it mixes input samples
  `floor(src)` and `floor(src) + 1` (the latter clamped to `n_in - 1`) with weights
  `1 - frac(src)` and `frac(src)`. Sample centres are aligned, not the end points, so
  positions beyond the ends repeat the edge value. No antialiasing when shrinking.
  """
  if n_in < 1 or n_out < 1:
    raise ValueError(f"linear_resize_matrix needs positive sizes, got {n_in} -> {n_out}")
  m = np.zeros((n_out, n_in), dtype=np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    src = max((i + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(np.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    frac = src - i0
    m[i, i0] += 1.0 - frac
    m[i, i1] += frac
  return m


def _as_grid(grid: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(grid, (int, np.integer)):
    return int(grid), int(grid)
  gh, gw = grid
  return int(gh), int(gw)


def num_relative_distance(grid: int | Sequence[int]) -> int:
  """Rows of a BEiT relative position table for a patch grid: (2h-1)(2w-1) + 3."""
  gh, gw = _as_grid(grid)
  return (2 * gh - 1) * (2 * gw - 1) + 3


@functools.lru_cache(maxsize=32)
def _relative_position_index(gh: int, gw: int) -> np.ndarray:
  coords = np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]               # [2, P, P], query minus key
  patch_index = (rel[0] + gh - 1) * (2 * gw - 1) + (rel[1] + gw - 1)
  n = (2 * gh - 1) * (2 * gw - 1)
  p = gh * gw
  index = np.zeros((p + 1, p + 1), dtype=np.int32)
  index[1:, 1:] = patch_index
  index[0, :] = n          # cls (query) -> token
  index[:, 0] = n + 1      # token (query) -> cls
  index[0, 0] = n + 2      # cls -> cls
  index.setflags(write=False)
  return index


def relative_position_index(grid: int | Sequence[int]) -> np.ndarray:
  """BEiT relative position index `[N, N]` int32 for a patch grid, N = h*w + 1.

  Token i (row-major patch (y_i, x_i), offset by 1 for the CLS token at 0) attending to
  token j reads table row `(y_i - y_j + h - 1) * (2w - 1) + (x_i - x_j + w - 1)`.
  The three extra rows: CLS->token `(2h-1)(2w-1)`, token->CLS `+1`, CLS->CLS `+2`.
  """
  gh, gw = _as_grid(grid)
  return _relative_position_index(gh, gw)


def _is_jax(x) -> bool:
  return isinstance(x, jax.Array)  # tracers are jax.Array instances too


def resize_relative_position_table(table, src_grid: int | Sequence[int],
                                   dst_grid: int | Sequence[int]):
  """Resize a BEiT relative position table trained on `src_grid` for `dst_grid`.

  `table` is `[(2h0-1)(2w0-1) + 3, heads]` (numpy or jax). The first rows, viewed as a
  `[2h0-1, 2w0-1, heads]` image of relative offsets, are bilinearly resized to
  `[2h1-1, 2w1-1]` (`linear_resize_matrix` along each axis, i.e. torch `bilinear`,
  `align_corners=False`, as Hugging Face BEiT does at run time); the 3 CLS rows are kept
  unchanged at the end. Returns the same array type and dtype as `table`.
  """
  src, dst = _as_grid(src_grid), _as_grid(dst_grid)
  n_src = (2 * src[0] - 1) * (2 * src[1] - 1)
  if table.ndim != 2 or table.shape[0] != n_src + 3:
    raise ValueError(f"relative position table of shape {tuple(table.shape)} does not fit "
                     f"grid {src}: expected [{n_src + 3}, heads]")
  if src == dst:
    return table
  sh, sw = 2 * src[0] - 1, 2 * src[1] - 1
  dh, dw = 2 * dst[0] - 1, 2 * dst[1] - 1
  mh, mw = linear_resize_matrix(sh, dh), linear_resize_matrix(sw, dw)
  heads = table.shape[1]
  if _is_jax(table):
    sub = table[:n_src].reshape(sh, sw, heads).astype(jnp.float32)
    new = jnp.einsum("ih,jw,hwc->ijc", jnp.asarray(mh, jnp.float32), jnp.asarray(mw, jnp.float32),
                     sub, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([new.reshape(dh * dw, heads).astype(table.dtype), table[n_src:]], axis=0)
  table = np.asarray(table)
  sub = table[:n_src].reshape(sh, sw, heads).astype(np.float64)
  new = np.einsum("ih,jw,hwc->ijc", mh, mw, sub).reshape(dh * dw, heads).astype(table.dtype)
  return np.concatenate([new, table[n_src:]], axis=0)


TEMPORAL_RESIZE_MODES = ("interpolate", "zero_pad")


def resize_temporal_embedding(emb, num_frames: int, mode: str = "interpolate"):
  """Resize a temporal position embedding `[1, T0, 1, D]` to `[1, num_frames, 1, D]`.

  - `num_frames == T0`: unchanged.
  - `num_frames < T0`: the first `num_frames` rows (whatever the mode).
  - `num_frames > T0`, mode `'interpolate'`: linear interpolation along time with
    `align_corners=False` sampling, exactly `torch.nn.functional.interpolate(e, size=T1,
    mode='linear')` on `e = [1, D, T0]` (see `linear_resize_matrix`): row t reads the
    stored rows at `src = (t + 0.5) * T0 / T1 - 0.5`, clamped to `[0, T0 - 1]`. The
    result does not contain the stored rows verbatim in general.
  - `num_frames > T0`, mode `'zero_pad'`: the T0 stored rows, then zeros (VindLU's choice
    when a T=4 checkpoint initialises a T=12 model).
  Works on numpy and jax arrays; returns the input's array type and dtype.
  """
  if mode not in TEMPORAL_RESIZE_MODES:
    raise ValueError(f"unknown temporal embedding resize mode {mode!r}; expected one of "
                     f"{TEMPORAL_RESIZE_MODES}")
  if emb.ndim != 4 or emb.shape[0] != 1 or emb.shape[2] != 1:
    raise ValueError(f"temporal embedding must be [1, T, 1, D], got {tuple(emb.shape)}")
  t0 = emb.shape[1]
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  if num_frames <= t0:
    return emb[:, :num_frames]
  xp = jnp if _is_jax(emb) else np
  if mode == "zero_pad":
    pad = xp.zeros((1, num_frames - t0) + tuple(emb.shape[2:]), dtype=emb.dtype)
    return xp.concatenate([emb, pad], axis=1)
  m = linear_resize_matrix(t0, num_frames)
  if xp is jnp:
    out = jnp.einsum("ts,bsnd->btnd", jnp.asarray(m, jnp.float32), emb.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(emb.dtype)
  return np.einsum("ts,bsnd->btnd", m, np.asarray(emb, np.float64)).astype(emb.dtype)


# ----------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------

class VideoEmbeddings(nnx.Module):
  """Patch embedding (conv p x p, stride p), CLS token, temporal position embedding."""

  def __init__(self, width: int, patch_size: int, num_frames: int, dropout_rate: float, *,
               rngs: nnx.Rngs, dtype=None):
    self.patch_size = patch_size
    self.dropout_rate = float(dropout_rate)
    self.dtype = dtype
    self.patch_embed = nnx.Conv(IN_CHANNELS, width, kernel_size=(patch_size, patch_size),
                                strides=(patch_size, patch_size), padding="VALID", dtype=dtype,
                                param_dtype=jnp.float32, kernel_init=L.DEFAULT_INIT, rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, width), jnp.float32))
    self.temporal_pos_embed = nnx.Param(jnp.zeros((1, num_frames, 1, width), jnp.float32))

  def __call__(self, x, *, deterministic: bool, rngs: nnx.Rngs | None):
    """x [B, T, H, W, 3] -> tokens [B, T, 1 + (H/p)(W/p), D]."""
    b, t, h, w, c = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"frame size {h}x{w} is not a multiple of the patch size {p}")
    if c != IN_CHANNELS:
      raise ValueError(f"expected {IN_CHANNELS} channels (RGB, channels last), got {c}")
    patches = self.patch_embed(x.reshape(b * t, h, w, c))           # [B*T, h/p, w/p, D]
    d = patches.shape[-1]
    patches = patches.reshape(b * t, -1, d)
    cls = jnp.broadcast_to(self.cls_token[...].astype(patches.dtype), (b * t, 1, d))
    tokens = jnp.concatenate([cls, patches], axis=1).reshape(b, t, -1, d)
    temporal = resize_temporal_embedding(self.temporal_pos_embed[...], t, "interpolate")
    tokens = tokens + temporal.astype(tokens.dtype)
    return L.dropout(tokens, self.dropout_rate, deterministic=deterministic, rngs=rngs)


class RelativePositionBias(nnx.Module):
  """One layer's relative position bias table `[(2h-1)(2w-1) + 3, heads]` (zero-init)."""

  def __init__(self, grid: tuple[int, int], num_heads: int):
    self.grid = _as_grid(grid)
    self.table = nnx.Param(jnp.zeros((num_relative_distance(self.grid), num_heads), jnp.float32))

  def __call__(self, grid: tuple[int, int]):
    """Bias `[1, heads, N, N]` for an input patch grid (table resized if it differs)."""
    grid = _as_grid(grid)
    table = resize_relative_position_table(self.table[...], self.grid, grid)
    index = relative_position_index(grid)
    bias = jnp.take(table, jnp.asarray(index.reshape(-1)), axis=0)
    n = index.shape[0]
    return bias.reshape(n, n, -1).transpose(2, 0, 1)[None]


class TemporalAttention(nnx.Module):
  """`x + scale * drop_path(out_proj(MHA_time(norm(x))))` over the time axis of [B,T,N,D]."""

  def __init__(self, width: int, num_heads: int, *, eps: float, rngs: nnx.Rngs, dtype=None):
    self.norm = L.layer_norm(width, eps=eps, dtype=dtype, rngs=rngs)
    # Only its q/k/v projections are used (the attention over T <= 32 frames is computed
    # in place in `__call__`), so no `attention_impl` applies here.
    self.attention = L.MultiHeadAttention(width, width, num_heads, qkv_bias=(True, True, True),
                                          dtype=dtype, rngs=rngs)
    self.out_proj = L.linear(width, width, dtype=dtype, rngs=rngs)
    self.scale = nnx.Param(jnp.zeros((), jnp.float32))

  def __call__(self, x, *, drop_path_rate, deterministic: bool, rngs: nnx.Rngs | None):
    # Attention over the time axis in place: LayerNorm and the projections are per token,
    # so they run on [B, T, N, D] as it is, and only the [T, T] scores contract over time.
    # The textbook form (transpose to [B*N, T, D], attend, transpose back) moved every
    # layer's activations twice more; on XLA:CPU those copies cost more than the attention.
    attn = self.attention
    y = self.norm(x)
    heads, hd = attn.num_heads, attn.head_dim
    split = lambda z: rearrange(z, "b t n (h d) -> b t n h d", h=heads)
    q, k, v = split(attn.query(y)), split(attn.key(y)), split(attn.value(y))
    logits = jnp.einsum("btnhd,bsnhd->bnhts", q, k).astype(jnp.float32) * hd ** -0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = rearrange(jnp.einsum("bnhts,bsnhd->btnhd", weights, v), "b t n h d -> b t n (h d)")
    y = self.out_proj(y)
    y = L.drop_path(y, drop_path_rate, deterministic=deterministic, rngs=rngs)
    return x + self.scale[...].astype(y.dtype) * y


class BeitLayer(nnx.Module):
  """A BEiT layer applied to every frame, followed by the temporal block.

  The layer's stochastic-depth rate is an argument of the call, not an attribute, so that
  all layers of the encoder have one structure and can be scanned.
  """

  def __init__(self, cfg, *, grid: tuple[int, int], rngs: nnx.Rngs, dtype=None,
               attention_impl: str = "auto"):
    d, heads, eps = cfg.width, cfg.num_heads, cfg.layer_norm_eps
    self.dropout_rate = float(cfg.dropout_rate)
    self.layernorm_before = L.layer_norm(d, eps=eps, dtype=dtype, rngs=rngs)
    self.attention = L.MultiHeadAttention(d, d, heads, qkv_bias=(True, False, True), dtype=dtype,
                                          attention_impl=attention_impl, rngs=rngs)
    self.relative_position_bias = RelativePositionBias(grid, heads)
    self.attention_output = L.linear(d, d, dtype=dtype, rngs=rngs)
    self.lambda_1 = nnx.Param(jnp.full((d,), cfg.layer_scale_init, jnp.float32))
    self.layernorm_after = L.layer_norm(d, eps=eps, dtype=dtype, rngs=rngs)
    self.ffn = L.FeedForward(d, cfg.mlp_dim, dtype=dtype, rngs=rngs)
    self.lambda_2 = nnx.Param(jnp.full((d,), cfg.layer_scale_init, jnp.float32))
    self.temporal = TemporalAttention(d, heads, eps=eps, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, grid: tuple[int, int], drop_path_rate, deterministic: bool,
               rngs: nnx.Rngs | None):
    t = x.shape[1]
    h = rearrange(x, "b t n d -> (b t) n d")   # the BEiT layer sees each frame as an image
    bias = self.relative_position_bias(grid)
    y = self.layernorm_before(h)
    y = self.attention(y, y, bias=bias, deterministic=deterministic, rngs=rngs)
    y = self.attention_output(y)
    y = L.dropout(y, self.dropout_rate, deterministic=deterministic, rngs=rngs)
    h = h + L.drop_path(self.lambda_1[...].astype(y.dtype) * y, drop_path_rate,
                        deterministic=deterministic, rngs=rngs)
    y = self.ffn(self.layernorm_after(h))
    y = L.dropout(y, self.dropout_rate, deterministic=deterministic, rngs=rngs)
    h = h + L.drop_path(self.lambda_2[...].astype(y.dtype) * y, drop_path_rate,
                        deterministic=deterministic, rngs=rngs)
    x = rearrange(h, "(b t) n d -> b t n d", t=t)
    if t > 1:
      x = self.temporal(x, drop_path_rate=drop_path_rate, deterministic=deterministic, rngs=rngs)
    return x


class VideoEncoder(nnx.Module):
  """BEiT video encoder (see the module docstring for structure and formulas).

  Args:
    cfg_vision: `model.vision` config (width, depth, num_heads, mlp_dim, patch_size,
      image_size, num_frames, drop_path_rate, layer_scale_init, layer_norm_eps,
      dropout_rate).
    dtype: compute dtype (parameters stay float32).
    remat: remat policy per layer (`layer_stack.REMAT_POLICIES`; booleans: 'full'/'none').
    scan_layers: scan the layers (one compiled layer body) instead of unrolling them.
    attention_impl: passed to `layers.MultiHeadAttention`.
  """

  def __init__(self, cfg_vision, *, dtype=None, remat="none", scan_layers: bool = False,
               attention_impl: str = "auto", rngs: nnx.Rngs):
    cfg = cfg_vision
    if cfg.image_size % cfg.patch_size:
      raise ValueError(f"vision.image_size={cfg.image_size} is not a multiple of "
                       f"patch_size={cfg.patch_size}")
    dtype = L.as_dtype(dtype)
    self.dtype = dtype
    self.remat = layer_stack.normalize_remat(remat)
    self.scan_layers = bool(scan_layers)
    # Plain numbers kept for importers' config checks (a ConfigDict is not a static attr).
    self.width, self.depth = int(cfg.width), int(cfg.depth)
    self.num_heads, self.mlp_dim = int(cfg.num_heads), int(cfg.mlp_dim)
    self.layer_norm_eps = float(cfg.layer_norm_eps)
    self.num_frames = int(cfg.num_frames)
    self.patch_size = int(cfg.patch_size)
    self.grid = (cfg.image_size // cfg.patch_size,) * 2
    self.embeddings = VideoEmbeddings(cfg.width, cfg.patch_size, cfg.num_frames, cfg.dropout_rate,
                                      dtype=dtype, rngs=rngs)
    self.drop_path_rates = tuple(float(r) for r in np.linspace(0.0, cfg.drop_path_rate, cfg.depth))
    self.layers = nnx.List([
        BeitLayer(cfg, grid=self.grid, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        for _ in range(cfg.depth)])
    self.pooler_norm = L.layer_norm(cfg.width, eps=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """x float `[B, T, H, W, 3]` (normalised) -> `(last_hidden [B,T,N,D], pooled [B,T,D])`.

    `pooled` = `pooler_norm(mean of the patch tokens)` per frame (CLS excluded).
    """
    if x.ndim != 5:
      raise ValueError(f"VideoEncoder expects [B, T, H, W, 3], got shape {tuple(x.shape)}")
    if self.dtype is not None:
      x = x.astype(self.dtype)
    grid = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
    hidden = self.embeddings(x, deterministic=deterministic, rngs=rngs)

    def call_layer(layer, h, rate, rngs):
      return layer(h, grid=grid, drop_path_rate=rate, deterministic=deterministic, rngs=rngs)

    hidden = layer_stack.apply_layers(
        self.layers, call_layer, hidden, per_layer=(self.drop_path_rates,), rngs=rngs,
        remat=self.remat, scan=self.scan_layers)

    patch_mean = hidden[:, :, 1:].astype(jnp.float32).mean(axis=2).astype(hidden.dtype)
    pooled = self.pooler_norm(patch_mean)
    return hidden, pooled
