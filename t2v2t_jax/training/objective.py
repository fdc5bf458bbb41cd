"""The pretraining / fine-tuning objective: VTC + VTM (hard negatives) + MLM (SPEC 4).

Runs inside the jitted train step on the GLOBAL batch: with `jax.jit` and a batch
sharded over the mesh, `sim` is the full [B, B] matrix, so VTC is the global-batch loss
and VTM hard negatives are drawn from the whole batch (a DECISION: VindLU drew them from
the per-GPU batch; the global batch gives harder negatives and makes the step independent
of the device count).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t2v2t_jax import losses
from t2v2t_jax.models.t2v2t import similarity


def select_rows(x, index):
  """`x[index]` along the leading axis, as a one-hot matrix product.

  Why not the gather: its gradient is a scatter-add, and on an H200 the two scatters of
  the VTM negatives took 17 ms of a 191 ms paper-size step (docs/benchmarks.md, the
  kernel profile); the one-hot product's gradient is another small matrix product. The
  result is exact: every output row is 1 x one input row plus zeros (HIGHEST precision, so
  that float32 inputs are not rounded to bfloat16 on TPU).
  """
  onehot = jax.nn.one_hot(index, x.shape[0], dtype=x.dtype)
  rows = jnp.dot(onehot, x.reshape(x.shape[0], -1), precision=jax.lax.Precision.HIGHEST)
  return rows.reshape(index.shape + x.shape[1:])


def compute_losses(model, batch, key, *, loss_weights, special_ids: dict, deterministic=False):
  """Returns (total_loss, metrics) for one batch.

  Args:
    model: a `T2V2T` module (merged inside the jitted step).
    batch: dict with frames uint8 [B,T,H,W,3], input_ids [B,L], attention_mask [B,L],
      video_idx [B].
    key: PRNG key for this step (dropout, negatives, masking).
    loss_weights: mapping with vtc, vtm, mlm weights; a zero weight skips that loss.
    special_ids: cls, pad, mask token ids and vocab_size, for MLM masking.
  """
  k_drop, k_neg, k_mask = jax.random.split(key, 3)
  rngs = None if deterministic else nnx.Rngs(dropout=k_drop)
  ids, mask, video_idx = batch["input_ids"], batch["attention_mask"], batch["video_idx"]

  pooled, video_tokens = model.encode_video(batch["frames"], deterministic=deterministic, rngs=rngs)
  text_hidden, _ = model.encode_text(ids, mask, deterministic=deterministic, rngs=rngs)
  temp = model.clamped_temp()
  sim = similarity(model.video_embedding(pooled), model.text_embedding(text_hidden))

  metrics = {"temp": temp}
  total = jnp.zeros((), jnp.float32)

  if loss_weights["vtc"]:
    vtc, _ = losses.vtc_loss(sim, temp, video_idx)
    metrics["loss_vtc"] = vtc
    total = total + loss_weights["vtc"] * vtc

  if loss_weights["vtm"]:
    neg_video, neg_text = losses.sample_hard_negatives(jax.lax.stop_gradient(sim), temp, video_idx, k_neg)
    # Pairs in order: (v, t) positive, (v_neg, t) negative, (v, t_neg) negative.
    fused_text = jnp.concatenate([text_hidden, text_hidden, select_rows(text_hidden, neg_text)], axis=0)
    fused_mask = jnp.concatenate([mask, mask, mask[neg_text]], axis=0)
    fused_video = jnp.concatenate([video_tokens, select_rows(video_tokens, neg_video), video_tokens],
                                  axis=0)
    fused, _ = model.fuse(fused_text, fused_mask, fused_video, deterministic=deterministic, rngs=rngs)
    vtm, vtm_aux = losses.vtm_loss(model.itm_logits(fused))
    metrics["loss_vtm"] = vtm
    metrics.update(vtm_aux)
    total = total + loss_weights["vtm"] * vtm

  if loss_weights["mlm"]:
    masked_ids, labels = losses.mask_tokens(
        ids, mask, k_mask, vocab_size=special_ids["vocab_size"],
        mask_token_id=special_ids["mask"], cls_token_id=special_ids["cls"],
        pad_token_id=special_ids["pad"])
    masked_hidden, _ = model.encode_text(masked_ids, mask, deterministic=deterministic, rngs=rngs)
    fused_mlm, _ = model.fuse(masked_hidden, mask, video_tokens, deterministic=deterministic, rngs=rngs)
    mlm, mlm_aux = losses.mlm_loss(model.mlm_logits(fused_mlm), labels)
    metrics["loss_mlm"] = mlm
    metrics.update(mlm_aux)
    total = total + loss_weights["mlm"] * mlm

  metrics["loss"] = total
  return total, metrics
