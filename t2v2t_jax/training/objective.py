"""The pretraining / fine-tuning objective: VTC + VTM (hard negatives) + MLM (SPEC 4).

Runs inside the jitted train step on the GLOBAL batch: with `jax.jit` and a batch
sharded over the mesh, `sim` is the full [B, B] matrix, so VTC is the global-batch loss
whatever the device count.

Two protocols (config `protocol`; `train_step.objective_settings` turns one into this
function's arguments):

- 'vindlu', the paper recipes' default: the objective VindLU's code optimised on the
  poster's GPUs, so that the poster's numbers can be reproduced on any mesh. VindLU's
  all-gather passes back only the local slice of the VTC gradient and DDP averages over the
  W GPUs, so its VTC gradient is 1/W of the global loss's: the VTC weight is divided by W
  (`vindlu_world_size`, the poster's GPU count). Its VTM negatives come from each GPU's own
  rows and its MLM loss is each GPU's mean, averaged: here both are taken per row group of
  the poster's per-GPU batch (`vindlu_gpu_batch`), groups of the global batch's rows, not
  of this mesh's devices (the rows of a batch are shuffled, so a block of them is as good
  as one GPU's).
- 'global', the project's own: the full gradient of the global VTC loss, VTM negatives
  from the whole batch (harder negatives, and a step independent of the device count) or,
  with `vtm_negatives='per_device'`, from each device's own rows, and MLM over all masked
  positions. Per-device negatives stay within each device's rows: global negatives
  all-gather the whole batch's video tokens to every device (seen in the 8-device step's
  HLO), per-device ones do not. That alone did not make the paper-size pretraining step fit
  a v5e-8 at 64 clips a chip (docs/benchmarks.md, TPU).

For checks against another implementation step for step, `compute_losses` takes given
VTM negatives and MLM inputs instead of drawing them; `deterministic=True` turns every
dropout and stochastic depth off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t2v2t_jax import losses
from t2v2t_jax.models import cpu_ops
from t2v2t_jax.models.t2v2t import similarity

PROTOCOLS = ("vindlu", "global")  # config `protocol`: see the module docstring


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


def dropout_key(key):
  """The step's dropout stream: a threefry key, except when tracing for the CPU.

  Why: the state's RBG keys (`train_state.PRNG_IMPL`) draw bits with XLA's RngBitGenerator,
  which the SPMD partitioner does not split: on a mesh every device drew the dropout bits
  of the whole global batch and kept its own rows. Compiled for a v5e 2x2 at 64 clips a
  chip, the T2V block's attention dropout alone was one u32[768, 4, 12, 197, 229] draw,
  6.3 GB on each chip, and this growth with the chip count is why 8 chips refused the
  batch that one chip nearly fitted (docs/benchmarks.md, TPU). Threefry bits
  (`jax_threefry_partitionable`, on by default) are a function of each element's index,
  so each device draws only its rows, and XLA can fuse them into their use. On the CPU
  (one device) RBG stays: it compiles faster there (`train_state.PRNG_IMPL`).
  """
  def threefry(k):
    return jax.random.wrap_key_data(jax.random.bits(k, (2,), jnp.uint32), impl="threefry2x32")
  return cpu_ops.per_backend(key, cpu=lambda k: k, default=threefry)


def _hard_negatives(sim, temp, video_idx, key, groups: int):
  """(neg_video, neg_text), each [g, n]: drawn within each of `groups` contiguous row groups
  of the batch, indices local to the group (g = 1: the whole batch's `sim`).

  A group's candidates are its own rows and columns: the group's diagonal block of `sim`.
  """
  if groups == 1:
    return tuple(x[None] for x in losses.sample_hard_negatives(sim, temp, video_idx, key))
  b = video_idx.shape[0]
  if b % groups:
    raise ValueError(f"a batch of {b} does not split into {groups} VTM negative groups")
  n = b // groups
  # [g*n, g*n] -> [g, n, g, n] -> the g diagonal blocks [g, n, n].
  blocks = jnp.einsum("inim->inm", sim.reshape(groups, n, groups, n))
  return jax.vmap(losses.sample_hard_negatives, in_axes=(0, None, 0, 0))(
      blocks, temp, video_idx.reshape(groups, n), jax.random.split(key, groups))


def _select_in_groups(x, index, select=select_rows):
  """Rows of `x` [B, ...] picked by `index` [g, n] within each group -> [B, ...]."""
  g, n = index.shape
  rows = jax.vmap(select)(x.reshape((g, n) + x.shape[1:]), index)
  return rows.reshape(x.shape)


def _pairs_by_row(*blocks):
  """Blocks [B, ...] -> [k*B, ...] holding row i's k pairs at rows k*i .. k*i+k-1.

  Why not `concatenate(blocks)`: the batch is split over the devices by rows, and a
  concatenation puts row i's pairs far from row i, so every device would exchange its
  blocks with the others before fusing (collective permutes of the video tokens). Row by
  row, each device fuses its own rows' pairs where they are.
  """
  stacked = jnp.stack(blocks, axis=1)
  return stacked.reshape((-1,) + stacked.shape[2:])


def compute_losses(model, batch, key, *, loss_weights, special_ids: dict, deterministic=False,
                   negative_groups: int = 1, mlm_groups: int = 1, negatives=None,
                   mlm_inputs=None):
  """Returns (total_loss, metrics) for one batch.

  Args:
    model: a `T2V2T` module (merged inside the jitted step).
    batch: dict with frames uint8 [B,T,H,W,3], input_ids [B,L], attention_mask [B,L],
      video_idx [B].
    key: PRNG key for this step (dropout, negatives, masking).
    loss_weights: mapping with vtc, vtm, mlm weights, as applied (the 'vindlu' protocol's
      1/W is already in `vtc`); a zero weight skips that loss.
    special_ids: cls, pad, mask token ids and vocab_size, for MLM masking.
    deterministic: True turns every dropout and stochastic depth off (`key` then draws only
      the negatives and the masking).
    negative_groups: 1 draws VTM negatives from the whole batch; g > 1 from each of g
      contiguous row groups (VindLU's GPUs under 'vindlu', the devices under
      `vtm_negatives='per_device'`).
    mlm_groups: 1 averages MLM over the batch's masked positions; g > 1 within each of g
      row groups, then over the groups (`losses.mlm_loss`).
    negatives: None draws them; else (neg_video_for_text [B], neg_text_for_video [B]) int,
      indices into the whole batch's rows (for VindLU's per-GPU indices: the GPU's first
      row + its local index), used as given whatever `negative_groups` says.
    mlm_inputs: None masks the captions here; else (masked_ids [B,L], labels [B,L]) as
      `losses.mask_tokens` returns them (labels -100 where nothing is predicted).
  """
  k_drop, k_neg, k_mask = jax.random.split(key, 3)
  rngs = None if deterministic else nnx.Rngs(dropout=dropout_key(k_drop))
  ids, mask, video_idx = batch["input_ids"], batch["attention_mask"], batch["video_idx"]

  pooled, video_tokens = model.encode_video(batch["frames"], deterministic=deterministic, rngs=rngs)
  text_hidden, _ = model.encode_text(ids, mask, deterministic=deterministic, rngs=rngs)
  temp = model.clamped_temp()
  video_emb, text_emb = model.video_embedding(pooled), model.text_embedding(text_hidden)
  sim = similarity(video_emb, text_emb)

  metrics = {"temp": temp}
  total = jnp.zeros((), jnp.float32)

  if loss_weights["vtc"]:
    vtc, _ = losses.vtc_loss(sim, temp, video_idx)
    metrics["loss_vtc"] = vtc
    total = total + loss_weights["vtc"] * vtc

  # The fusion passes. Each row's video fuses with its caption (VTM positive), a hard
  # negative caption (VTM) and its masked caption (MLM) in one call, as k = 3 texts of
  # one video (in 'v2t' the video's cross-attention keys and values are then computed once
  # for the three: fusion.py); the hard negative video fuses with the caption in another.
  # Pairs are laid out row by row (`_pairs_by_row`), so each device fuses its own rows.
  own_text, own_mask, slot = [], [], {}
  if loss_weights["vtm"]:
    if negatives is None:
      neg_video, neg_text = _hard_negatives(sim, temp, video_idx, k_neg, negative_groups)
    else:  # one group: the whole batch, as the given indices are
      neg_video, neg_text = (jnp.asarray(x, jnp.int32)[None] for x in negatives)
    slot["pos"], slot["neg_text"] = 0, 1
    own_text += [text_hidden, _select_in_groups(text_hidden, neg_text)]
    own_mask += [mask, _select_in_groups(mask, neg_text, lambda m, i: m[i])]
  if loss_weights["mlm"]:
    if mlm_inputs is None:
      masked_ids, labels = losses.mask_tokens(
          ids, mask, k_mask, vocab_size=special_ids["vocab_size"],
          mask_token_id=special_ids["mask"], cls_token_id=special_ids["cls"],
          pad_token_id=special_ids["pad"])
    else:
      masked_ids, labels = mlm_inputs
      masked_ids, labels = jnp.asarray(masked_ids, ids.dtype), jnp.asarray(labels, jnp.int32)
    masked_hidden, _ = model.encode_text(masked_ids, mask, deterministic=deterministic, rngs=rngs)
    slot["mlm"] = len(own_text)
    own_text.append(masked_hidden)
    own_mask.append(mask)

  if own_text:
    k = len(own_text)
    fused_own, _ = model.fuse(_pairs_by_row(*own_text), _pairs_by_row(*own_mask), video_tokens,
                              deterministic=deterministic, rngs=rngs)
    fused_own = fused_own.reshape((-1, k) + fused_own.shape[1:])   # [B, k, L, D]

  if loss_weights["vtm"]:
    fused_neg_video, _ = model.fuse(text_hidden, mask,
                                    _select_in_groups(video_tokens, neg_video),
                                    deterministic=deterministic, rngs=rngs)
    # vtm_loss takes the pairs block by block, positives first (its labels: B ones, then
    # 2B zeros).
    vtm, vtm_aux = losses.vtm_loss(jnp.concatenate([
        model.itm_logits(fused_own[:, slot["pos"]]), model.itm_logits(fused_neg_video),
        model.itm_logits(fused_own[:, slot["neg_text"]])]))
    metrics["loss_vtm"] = vtm
    metrics.update(vtm_aux)
    total = total + loss_weights["vtm"] * vtm

  if loss_weights["mlm"]:
    mlm, mlm_aux = losses.mlm_loss(model.mlm_logits(fused_own[:, slot["mlm"]]), labels,
                                   groups=mlm_groups)
    metrics["loss_mlm"] = mlm
    metrics.update(mlm_aux)
    total = total + loss_weights["mlm"] * mlm

  metrics["loss"] = total
  return total, metrics
