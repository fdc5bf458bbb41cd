"""`--mode search --explain`: a picture per shown result of how its frames' T2V attention
split between the query and their own tokens.

The model's T2V blocks are run on the query and the cached video tokens with their
attention weights returned (`text_shares`); `explain.py` turns the weights into one text
share per frame and draws the frames with a bar under each. The pictures are
`workdir/search/<rank>_<video name>.png` (those of an earlier search are removed first).
Only the modes with a T2V block (t2v2t, t2v2t_naive) have such weights.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t2v2t_jax import sharding as sharding_lib
from t2v2t_jax.evaluation import explain as explain_lib
from t2v2t_jax.evaluation.search_videos import read_frames
from t2v2t_jax.models.fusion import T2V_MODES

# Frames in the pictures are enlarged (nearest neighbour, by a whole factor) to at least
# this height, so that 32 or 64 px model inputs stay visible.
PICTURE_MIN_FRAME_SIZE = 128
_PICTURE_NAME = re.compile(r"^\d+_.*\.png$")


def explain_unavailable(config) -> str | None:
  """Why --explain cannot draw this model's T2V attention, or None when it can."""
  mode = config.model.fusion.mode
  if mode in T2V_MODES:
    return None
  return (f"fusion mode {mode!r} has no T2V block, so there is no text/own-token attention "
          f"split to draw (only {' and '.join(T2V_MODES)} have one)")


def attention_fn(graphdef):
  """jitted `(params, text_hidden, text_mask, video_tokens) -> (T2V attention weights of
  every T2V block, ITM logit)` of the model given as `graphdef`."""
  @jax.jit
  def attention(params, hidden, mask, tokens):
    m = nnx.merge(graphdef, params)
    fused, aux = m.fuse(hidden, mask, tokens.astype(m.dtype or jnp.float32), return_aux=True)
    return aux["t2v_attention"], m.itm_logits(fused)[:, 1]
  return attention


def text_shares(attention, params, mesh, text_hidden, text_mask, video_tokens
                ) -> tuple[np.ndarray, np.ndarray]:
  """Text share per frame [B, T] (the mean over the T2V blocks of
  `explain.attention_shares`) and the ITM logit [B] of one query (`text_hidden` [1, L, D],
  `text_mask` [1, L]) with each of `video_tokens` [B, T, N, D]; `attention` is an
  `attention_fn`."""
  b = video_tokens.shape[0]
  hidden = np.repeat(np.asarray(text_hidden), b, axis=0)
  mask = np.repeat(np.asarray(text_mask), b, axis=0)
  replicated = sharding_lib.replicated(mesh)
  weights, itm = attention(params, *(jax.device_put(np.asarray(a), replicated)
                                     for a in (hidden, mask, video_tokens)))
  num_text_keys = hidden.shape[1]
  shares = np.mean([explain_lib.attention_shares(np.asarray(w), num_text_keys) for w in weights],
                   axis=0)
  return shares, np.asarray(itm)


def _display_frames(frames: np.ndarray) -> np.ndarray:
  h = frames.shape[1]
  factor = max(1, -(-PICTURE_MIN_FRAME_SIZE // h))
  if factor == 1:
    return frames
  return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def write_pictures(results, shares, query: str, out_dir: str, *, num_frames: int,
                   image_size: int, kind: str = "video", max_seconds: float | None = None
                   ) -> None:
  """One PNG per result (`results[i].picture` is set to its path), frames read again as
  the model saw them; an unreadable file (scored as a black clip) is drawn black."""
  os.makedirs(out_dir, exist_ok=True)
  for name in os.listdir(out_dir):  # the pictures of an earlier search
    if _PICTURE_NAME.match(name):
      os.remove(os.path.join(out_dir, name))
  for r, share in zip(results, shares):
    try:
      frames = read_frames(r.path, num_frames, image_size, kind=kind, max_seconds=max_seconds)
    except Exception:  # pylint: disable=broad-except (it was scored as a black clip)
      frames = np.zeros((num_frames, image_size, image_size, 3), np.uint8)
    stem = os.path.splitext(os.path.basename(r.path))[0]
    path = os.path.join(out_dir, f"{r.rank}_{stem}.png")
    rerank = f"{r.rerank:.3f}" if r.rerank is not None else "-"
    subtitle = f"#{r.rank} {os.path.basename(r.path)}  stage-1 {r.stage1:.3f}  rerank {rerank}"
    explain_lib.draw_explanation(_display_frames(frames), share, query, path, subtitle=subtitle)
    r.picture = path
