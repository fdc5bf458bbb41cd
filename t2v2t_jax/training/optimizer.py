"""AdamW with VindLU's weight-decay rule and warmup + cosine learning-rate schedule.

SPEC 7: AdamW (b1 0.9, b2 0.999, eps 1e-8, decoupled weight decay 0.02 multiplied by the
learning rate, as torch.optim.AdamW), linear warmup from 1% of the peak, cosine decay to
`min_lr`, no gradient clipping.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ml_collections import config_dict

WARMUP_START_FACTOR = 0.01  # warmup starts at 1% of the peak learning rate
# Trailing path entries that name a Variable's storage rather than the parameter itself.
_STORAGE_KEYS = ("value", "raw_value")


def optimizer_config() -> ml_collections.ConfigDict:
  """Optimizer fields with the pretraining defaults of SPEC 7 (recipes override them)."""
  c = ml_collections.ConfigDict()
  c.lr = 1e-4               # peak learning rate
  c.min_lr = 1e-6           # end of the cosine
  c.warmup_epochs = 1.0     # may be fractional (fine-tuning: 0.5)
  c.epochs = 10.0
  c.weight_decay = 0.02
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.grad_accum_steps = 1    # >1: optax.MultiSteps, one update every k micro-batches
  c.grad_clip_norm = config_dict.placeholder(float)  # None = no clipping (VindLU)
  return c


def learning_rate_schedule(peak_lr: float, min_lr: float, total_steps: int,
                           warmup_steps: int) -> optax.Schedule:
  """Linear warmup from 1% of the peak, then cosine decay from the peak to `min_lr`.

  For step s (counted in optimizer updates, from 0):
    s <  W: lr = peak * (0.01 + 0.99 * s / W)                         (s = 0 gives 0.01 peak)
    s >= W: lr = min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * p)),
            p = min(1, (s - W) / max(1, N - W))
  with W = warmup_steps and N = total_steps; s = W gives the peak, s >= N gives min_lr.
  """
  peak_lr, min_lr = float(peak_lr), float(min_lr)
  total_steps, warmup_steps = int(total_steps), int(warmup_steps)
  if warmup_steps < 0 or total_steps < 0:
    raise ValueError(f"steps must be >= 0, got total={total_steps}, warmup={warmup_steps}")
  decay_steps = max(1, total_steps - warmup_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * (WARMUP_START_FACTOR
                      + (1.0 - WARMUP_START_FACTOR) * step / max(1, warmup_steps))
    progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


def _key_name(entry) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def parameter_path(path) -> tuple[str, ...]:
  """A pytree key path as a tuple of names, storage keys (`.value`) dropped.

  Dotted or slashed string keys (flat dicts such as {'a.b.bias': x}) are split, so a
  nested state and its flattened form give the same names.
  """
  names = []
  for entry in path:
    names.extend(part for part in _key_name(entry).replace("/", ".").split(".") if part)
  while len(names) > 1 and names[-1] in _STORAGE_KEYS:
    names.pop()
  return tuple(names)


def is_decayed(path: str | tuple[str, ...], ndim: int) -> bool:
  """VindLU's rule: decay iff the parameter is not 1-D and its name is not `bias`.

  So 0-dim parameters (`temp`, the temporal `scale`, scalar gates), the CLS token, the
  temporal position embedding, relative-position-bias tables, embedding matrices and
  kernels are decayed; LayerNorm scale/bias, layer-scale lambdas and all biases are not.
  """
  names = tuple(path.replace("/", ".").split(".")) if isinstance(path, str) else tuple(path)
  return ndim != 1 and names[-1] != "bias"


def _ndim(leaf) -> int:
  shape = getattr(leaf, "shape", None)
  return len(shape) if shape is not None else int(np.ndim(leaf))


def weight_decay_mask(params):
  """Same-structure bool pytree: True where weight decay applies (`is_decayed`).

  Works on any pytree: nested dicts, `nnx.State` (paths such as
  ('vision_encoder', 'layers', 0, 'attention', 'query', 'kernel', 'value')), and flat
  dicts keyed by dotted paths. Leaves need a shape (arrays, jax.ShapeDtypeStruct).
  A flat dict {dotted path: shape tuple} is also accepted and answered per path.
  Usable directly as optax's callable `mask`.
  """
  if isinstance(params, Mapping) and params and all(
      isinstance(k, str) and isinstance(v, tuple) and all(isinstance(d, int) for d in v)
      for k, v in params.items()):
    # A flat {path: shape} listing (e.g. a checkpoint index): answer per path.
    return {k: is_decayed(parameter_path([k]), len(v)) for k, v in params.items()}
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: is_decayed(parameter_path(path), _ndim(leaf)), params)


def warmup_and_total_steps(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[int, int]:
  """Warmup length in optimizer steps: total_steps * warmup_epochs / epochs, rounded."""
  warmup = int(round(total_steps * float(cfg.warmup_epochs) / float(cfg.epochs)))
  return min(warmup, total_steps), int(total_steps)


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """The schedule `make_optimizer` uses (for logging the learning rate)."""
  warmup, total = warmup_and_total_steps(cfg, total_steps)
  return learning_rate_schedule(cfg.lr, cfg.min_lr, total, warmup)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformation:
  """AdamW + VindLU weight-decay mask + warmup/cosine schedule (+ optional clip, accum).

  Args:
    cfg: `optimizer_config()` fields.
    total_steps: number of OPTIMIZER UPDATES of the run (epochs * steps per epoch). With
      `grad_accum_steps = k` the train loop feeds k * total_steps micro-batches; the
      schedule advances once per update, not per micro-batch.
  """
  chain = []
  if cfg.get("grad_clip_norm") is not None:
    chain.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
  chain.append(optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                           eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=weight_decay_mask))
  tx = optax.chain(*chain) if len(chain) > 1 else chain[0]
  accum = int(cfg.get("grad_accum_steps", 1) or 1)
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
  return tx


__all__ = ["optimizer_config", "learning_rate_schedule", "weight_decay_mask", "is_decayed",
           "parameter_path", "make_schedule", "make_optimizer", "warmup_and_total_steps"]
