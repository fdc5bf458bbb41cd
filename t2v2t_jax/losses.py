"""Training objectives: video-text contrastive (VTC), matching (VTM), masked language (MLM).

Pure functions of arrays, jit-friendly (every shape is static). Numbers follow SPEC.md
section 4. Losses return `(loss, aux)`, `aux` a dict of scalars for logging. The scores
they take are the model's (`models.t2v2t.similarity`, the clamped temperature); the
objective that assembles them per batch is `training/objective.py`.

Conventions recorded here (SPEC asks for each to be written down):

- VTC gradient convention: `vtc_loss` is the loss of the GLOBAL batch. Under `jax.jit`
  with the batch sharded over a mesh the arrays are global, so the value and its
  gradient do not depend on how many devices hold the batch. VindLU gathers features
  with an all-gather whose backward returns only the local slice, and DDP then averages
  over devices, so VindLU's effective VTC gradient is 1/world_size of the gradient of
  this loss (on top of the value being the same). The objective's `protocol='vindlu'`
  (training/objective.py) therefore weighs VTC by 1/W, W the poster's GPU count for the
  recipe; `protocol='global'` takes this loss's full gradient.
- VTM hard negatives are drawn from whatever batch `sample_hard_negatives` is given: the
  objective passes the global batch ('global') or row groups of it (VindLU's per-GPU
  batches under 'vindlu'; see training/objective.py).
- MLM: `mlm_loss` averages over the masked positions of the batch, or, with `groups`, over
  each row group's masked positions and then over the groups (VindLU: each GPU's mean,
  then DDP's average).
- MLM random replacement tokens are drawn uniformly from the whole vocabulary, special
  tokens included, as BERT and VindLU do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100  # MLM label of positions that are not predicted (PyTorch convention)


def _positive_mask(video_idx: jax.Array) -> jax.Array:
  """[B, B] bool: pair (i, j) is positive iff the two entries show the same video."""
  return video_idx[:, None] == video_idx[None, :]


def vtc_loss(sim_v2t: jax.Array, temp: jax.Array, video_idx: jax.Array
             ) -> tuple[jax.Array, dict]:
  """Video-text contrastive loss with soft multi-positive targets.

  Args:
    sim_v2t: [B, B] cosine similarity (before temperature); row = video i, column =
      text j; video i and text i come from the same batch entry.
    temp: scalar temperature (already clamped).
    video_idx: [B] int video index of each entry. Entries with equal index are
      positives of each other (a video that appears twice in the batch with two
      captions); the target of a row is uniform over its positives (sums to 1).

  Returns:
    (loss, aux) with loss = (CE_v2t + CE_t2v) / 2, each cross-entropy averaged over the
    batch. The batch is the global one (see the module docstring for the gradient
    convention relative to VindLU). aux: `vtc_v2t`, `vtc_t2v`, `vtc_acc_v2t`,
    `vtc_acc_t2v` (argmax lands on a positive).
  """
  logits = sim_v2t.astype(jnp.float32) / temp
  positive = _positive_mask(video_idx)
  targets = positive.astype(jnp.float32)
  targets = targets / targets.sum(axis=1, keepdims=True)  # symmetric mask: rows = columns
  ce_v2t = -(jax.nn.log_softmax(logits, axis=1) * targets).sum(axis=1).mean()
  ce_t2v = -(jax.nn.log_softmax(logits.T, axis=1) * targets).sum(axis=1).mean()
  loss = (ce_v2t + ce_t2v) / 2
  rows = jnp.arange(logits.shape[0])
  acc_v2t = positive[rows, jnp.argmax(logits, axis=1)].mean()
  acc_t2v = positive[rows, jnp.argmax(logits.T, axis=1)].mean()
  aux = dict(vtc_v2t=ce_v2t, vtc_t2v=ce_t2v, vtc_acc_v2t=acc_v2t, vtc_acc_t2v=acc_t2v)
  return loss, aux


def _sample_negative_per_row(logits: jax.Array, positive: jax.Array, key: jax.Array
                             ) -> tuple[jax.Array, jax.Array]:
  """One index per row, drawn from softmax(logits) restricted to the non-positives.

  Rows with no non-positive fall back to a uniform draw among the other columns (j != i),
  or column i itself when the batch has a single entry.
  """
  batch = logits.shape[0]
  has_negative = jnp.any(~positive, axis=1)
  # Sampling from log-weights: `categorical` normalises, so zeroing the positives and
  # renormalising the softmax is the same as -inf at the positives. No underflow at small
  # temperatures, because the log-softmax never leaves log space.
  hard_logits = jnp.where(positive, -jnp.inf, logits)
  not_self = ~jnp.eye(batch, dtype=bool) if batch > 1 else jnp.ones((1, 1), dtype=bool)
  fallback_logits = jnp.where(not_self, 0.0, -jnp.inf)
  row_logits = jnp.where(has_negative[:, None], hard_logits, fallback_logits)
  return jax.random.categorical(key, row_logits, axis=1), ~has_negative


def sample_hard_negatives(sim_v2t: jax.Array, temp: jax.Array, video_idx: jax.Array,
                          key: jax.Array, *, return_aux: bool = False):
  """Draw one hard negative video per text and one hard negative text per video (VTM).

  Weights are softmax(sim / temp) over a row with the same-video positives zeroed and the
  rest renormalised; one index per row is drawn by categorical sampling. A drawn
  negative is never a positive as long as the row has any negative.

  The pool is whatever batch `sim_v2t` covers: the objective passes the global batch or
  the diagonal blocks of its row groups (VindLU used the per-GPU batch, B/world_size
  candidates; training/objective.py).

  Degenerate rows: if every entry of the batch shows the same video as row i, row i has
  no negative. It then falls back to a uniform draw among the other entries (j != i), which
  are positives: the resulting VTM "negative" pair is label noise. Such rows are counted
  in `aux["vtm_rows_without_negative"]` (when `return_aux=True`); with a shuffled
  multi-video corpus they do not occur unless the global batch is tiny.

  Args:
    sim_v2t: [B, B] cosine similarity (row = video, column = text).
    temp: scalar temperature.
    video_idx: [B] int video index (equal = positive).
    key: PRNG key.
    return_aux: also return a dict with the degenerate-row count.

  Returns:
    (neg_video_for_text [B] int32, neg_text_for_video [B] int32), plus aux when asked.
    `neg_video_for_text[j]` indexes the batch's videos, `neg_text_for_video[i]` its texts.
  """
  sim_v2t = jax.lax.stop_gradient(sim_v2t.astype(jnp.float32))
  logits = sim_v2t / jax.lax.stop_gradient(temp)
  positive = _positive_mask(video_idx)
  key_t2v, key_v2t = jax.random.split(key)
  # `positive` is symmetric, so the same rows are degenerate in both directions.
  neg_video_for_text, degenerate = _sample_negative_per_row(logits.T, positive, key_t2v)
  neg_text_for_video, _ = _sample_negative_per_row(logits, positive, key_v2t)
  outputs = (neg_video_for_text.astype(jnp.int32), neg_text_for_video.astype(jnp.int32))
  if not return_aux:
    return outputs
  aux = dict(vtm_rows_without_negative=degenerate.sum())
  return outputs + (aux,)


def vtm_loss(itm_logits: jax.Array) -> tuple[jax.Array, dict]:
  """Video-text matching loss: 2-way cross-entropy over the 3B fusion batch.

  Args:
    itm_logits: [3B, 2] logits in the order (v, t) positives [B], (v_neg, t) [B],
      (v, t_neg) [B]; labels are 1 for the first B rows and 0 for the rest.

  Returns:
    (mean cross-entropy, aux) with `vtm_acc`, `vtm_acc_pos`, `vtm_acc_neg`.
  """
  num_rows = itm_logits.shape[0]
  if num_rows % 3:
    raise ValueError(f"vtm_loss expects 3B rows (pos, neg video, neg text), got {num_rows}")
  batch = num_rows // 3
  labels = jnp.concatenate([jnp.ones((batch,), jnp.int32), jnp.zeros((2 * batch,), jnp.int32)])
  log_probs = jax.nn.log_softmax(itm_logits.astype(jnp.float32), axis=-1)
  loss = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1).mean()
  correct = (jnp.argmax(itm_logits, axis=-1) == labels).astype(jnp.float32)
  aux = dict(vtm_acc=correct.mean(), vtm_acc_pos=correct[:batch].mean(),
             vtm_acc_neg=correct[batch:].mean())
  return loss, aux


def mask_tokens(input_ids: jax.Array, attention_mask: jax.Array, key: jax.Array, *,
                vocab_size: int, mask_token_id: int, cls_token_id: int, pad_token_id: int,
                mask_prob: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """BERT-style masking for MLM (SPEC 4: p = 0.5, then 80% [MASK] / 10% random / 10% keep).

  A position can be chosen only if it is attended (`attention_mask` != 0) and is neither
  [PAD] nor [CLS]. Each eligible position is chosen with probability `mask_prob`; a
  chosen position becomes [MASK] with probability 0.8, a random token with 0.1, and
  keeps its token with 0.1. Random tokens are uniform over the whole vocabulary
  [0, vocab_size), special tokens included (as BERT and VindLU).

  Returns:
    (masked_ids [B, L] same dtype as input_ids, labels [B, L] int32): labels hold the
    original id at chosen positions and IGNORE_INDEX (-100) elsewhere.
  """
  key_choose, key_how, key_random = jax.random.split(key, 3)
  eligible = ((attention_mask != 0) & (input_ids != pad_token_id)
              & (input_ids != cls_token_id))
  chosen = eligible & jax.random.bernoulli(key_choose, mask_prob, input_ids.shape)
  how = jax.random.uniform(key_how, input_ids.shape)
  to_mask = chosen & (how < 0.8)
  to_random = chosen & (how >= 0.8) & (how < 0.9)
  random_ids = jax.random.randint(key_random, input_ids.shape, 0, vocab_size,
                                  dtype=input_ids.dtype)
  masked_ids = jnp.where(to_mask, jnp.asarray(mask_token_id, input_ids.dtype), input_ids)
  masked_ids = jnp.where(to_random, random_ids, masked_ids)
  labels = jnp.where(chosen, input_ids, IGNORE_INDEX).astype(jnp.int32)
  return masked_ids, labels


def mlm_loss(logits: jax.Array, labels: jax.Array, *, groups: int = 1
             ) -> tuple[jax.Array, dict]:
  """Cross-entropy over the positions with label != -100, averaged over those positions.

  With no such position the loss is 0 (and so is its gradient), not NaN.

  Args:
    logits: [B, L, V] (any float dtype; the loss is computed in float32).
    labels: [B, L] int, IGNORE_INDEX where nothing is predicted.
    groups: 1 averages over all the batch's masked positions. g > 1 splits the rows into
      g contiguous groups, averages within each group and then over the groups: VindLU's
      loss, where each GPU averages over its own masked positions and DDP averages the
      GPUs' gradients (the two differ when the groups mask different numbers of tokens).
      A group with no masked position counts as 0.

  Returns:
    (loss, aux) with `mlm_acc` (over all predicted positions) and `mlm_num_masked`.
  """
  logits = logits.astype(jnp.float32)
  valid = labels != IGNORE_INDEX
  safe_labels = jnp.where(valid, labels, 0)
  target_logit = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
  per_token = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - target_logit, 0.0)
  num_masked = valid.sum()
  denominator = jnp.maximum(num_masked, 1).astype(jnp.float32)
  if groups == 1:
    loss = per_token.sum() / denominator
  else:
    if labels.shape[0] % groups:
      raise ValueError(f"a batch of {labels.shape[0]} rows does not split into {groups} MLM groups")
    group_sums = per_token.reshape(groups, -1).sum(axis=1)
    group_counts = valid.reshape(groups, -1).sum(axis=1)
    loss = (group_sums / jnp.maximum(group_counts, 1).astype(jnp.float32)).mean()
  correct = (jnp.argmax(logits, axis=-1) == labels) & valid
  aux = dict(mlm_acc=correct.sum() / denominator, mlm_num_masked=num_masked)
  return loss, aux
