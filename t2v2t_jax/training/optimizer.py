"""AdamW with VindLU's weight-decay rule and a warmup + cosine learning-rate schedule.

SPEC 7: AdamW (b1 0.9, b2 0.999, eps 1e-8, decoupled weight decay 0.02 multiplied by the
learning rate, as torch.optim.AdamW), no gradient clipping. Two schedules, both warmup then
a half cosine over optimizer updates, both reaching `lr` at the end of the warmup:

- 'vindlu' (protocol 'vindlu', the paper recipes'): the formula of VindLU's
  `utils/scheduler.py`, which its runs stepped once per iteration, with the multiplier
  floor `min_lr_multi` = min_lr / lr, so that the poster's endpoints (1e-4 -> 1e-6,
  1e-5 -> 1e-6) are its floor. Its warmup starts at that floor, not at 0.
- 'warmup_cosine' (protocol 'global', the project's): optax's linear warmup from 1% of the
  peak and a cosine that ends at `min_lr` exactly at the last step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ml_collections import config_dict

from t2v2t_jax.tree_paths import parameter_path

WARMUP_START_FACTOR = 0.01  # 'warmup_cosine': warmup starts at 1% of the peak learning rate
SCHEDULES = ("vindlu", "warmup_cosine")
PROTOCOL_SCHEDULES = {"vindlu": "vindlu", "global": "warmup_cosine"}  # config `protocol`'s


def optimizer_config() -> ml_collections.ConfigDict:
  """Optimizer fields with the pretraining defaults of SPEC 7 (recipes override them)."""
  c = ml_collections.ConfigDict()
  c.lr = 1e-4               # peak learning rate
  c.min_lr = 1e-6           # end of the cosine ('vindlu': its floor, min_lr / lr of the peak)
  c.warmup_epochs = 1.0     # may be fractional (fine-tuning: 0.5)
  c.epochs = 10.0
  c.weight_decay = 0.02
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.grad_accum_steps = 1    # >1: one update every k micro-batches (accumulate_every)
  c.grad_clip_norm = config_dict.placeholder(float)  # None = no clipping (VindLU)
  c.schedule = ""           # '' = the protocol's | 'vindlu' | 'warmup_cosine' (module docstring)
  return c


def learning_rate_schedule(peak_lr: float, min_lr: float, total_steps: int,
                           warmup_steps: int) -> optax.Schedule:
  """Linear warmup from 1% of the peak, then cosine decay from the peak to `min_lr`.

  For step s (counted in optimizer updates, from 0):
    s <  W: lr = peak * (0.01 + 0.99 * s / W)                         (s = 0 gives 0.01 peak)
    s >= W: lr = min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * p)),
            p = min(1, (s - W) / max(1, N - W))
  with W = warmup_steps and N = total_steps; s = W gives the peak, s >= N gives min_lr.
  This is `optax.warmup_cosine_decay_schedule` (whose decay length counts the warmup, so
  it is given max(N, W + 1)); without warmup, its cosine alone (optax warns about a
  zero-length warmup).
  """
  peak_lr, min_lr = float(peak_lr), float(min_lr)
  total_steps, warmup_steps = int(total_steps), int(warmup_steps)
  if warmup_steps < 0 or total_steps < 0:
    raise ValueError(f"steps must be >= 0, got total={total_steps}, warmup={warmup_steps}")
  decay_steps = max(total_steps, warmup_steps + 1)
  if warmup_steps == 0:
    return optax.cosine_decay_schedule(peak_lr, decay_steps,
                                       alpha=min_lr / peak_lr if peak_lr else 0.0)
  return optax.warmup_cosine_decay_schedule(
      init_value=WARMUP_START_FACTOR * peak_lr, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=decay_steps, end_value=min_lr)


def vindlu_schedule(peak_lr: float, min_lr: float, total_steps: int,
                    warmup_steps: float) -> optax.Schedule:
  """VindLU's schedule (`get_cosine_schedule_with_warmup`, num_cycles 0.5) with the floor
  m = min_lr / peak_lr. For step s (optimizer updates from 0; VindLU's LambdaLR gives the
  first iteration lambda(0) and steps once per iteration):

    s <  W: lr = peak * max(m, s / max(1, W))
    s >= W: lr = peak * max(m, 0.5 * (1 + cos(pi * p))),  p = (s - W) / max(1, N - W)

  with W = warmup_steps and N = total_steps. W is not rounded: VindLU computes it as
  steps per epoch x warmup epochs, fractional for 0.5 warmup epochs and an odd epoch.
  The cosine reaches the floor before the end (at p = 0.94 for m = 0.01, p = 0.80 for
  m = 0.1) and stays there. One departure: past s = N (never run) p stays at 1, where
  VindLU's cosine would climb again.
  """
  peak_lr, min_lr = float(peak_lr), float(min_lr)
  total_steps, warmup_steps = int(total_steps), float(warmup_steps)
  if warmup_steps < 0 or total_steps < 0:
    raise ValueError(f"steps must be >= 0, got total={total_steps}, warmup={warmup_steps}")
  floor = min_lr / peak_lr if peak_lr else 0.0

  def schedule(count):
    s = jnp.asarray(count, jnp.float32)
    warm = jnp.maximum(floor, s / max(1.0, warmup_steps))
    progress = jnp.minimum(1.0, (s - warmup_steps) / max(1.0, total_steps - warmup_steps))
    decay = jnp.maximum(floor, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    return peak_lr * jnp.where(s < warmup_steps, warm, decay)

  return schedule


def schedule_name(cfg: ml_collections.ConfigDict, protocol: str = "global") -> str:
  """`cfg.schedule`, or the protocol's schedule when it is ''."""
  name = cfg.get("schedule", "") or PROTOCOL_SCHEDULES.get(protocol)
  if name not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={cfg.get('schedule', '')!r} with protocol={protocol!r}: "
                     f"the schedule is not one of {list(SCHEDULES)}")
  return name


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
  Usable directly as optax's callable `mask`.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: is_decayed(parameter_path(path), _ndim(leaf)), params)


def warmup_and_total_steps(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[int, int]:
  """Warmup length in optimizer steps: total_steps * warmup_epochs / epochs, rounded."""
  warmup = int(round(total_steps * float(cfg.warmup_epochs) / float(cfg.epochs)))
  return min(warmup, total_steps), int(total_steps)


def total_updates(config, steps_per_epoch: int) -> int:
  """Optimizer updates of the run: `config.total_steps` if set, else epochs x steps per
  epoch (with gradient accumulation, one update takes `grad_accum_steps` batches)."""
  accum = int(config.optimizer.grad_accum_steps or 1)
  if config.get("total_steps"):
    return int(config.total_steps)
  return max(1, int(round(config.optimizer.epochs * steps_per_epoch / accum)))


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int,
                  protocol: str = "global") -> optax.Schedule:
  """The schedule `make_optimizer` uses (for logging the learning rate): `cfg.schedule`,
  or the one of config `protocol` when that is ''."""
  if schedule_name(cfg, protocol) == "vindlu":
    warmup = float(total_steps) * float(cfg.warmup_epochs) / float(cfg.epochs)
    return vindlu_schedule(cfg.lr, cfg.min_lr, total_steps, min(warmup, float(total_steps)))
  warmup, total = warmup_and_total_steps(cfg, total_steps)
  return learning_rate_schedule(cfg.lr, cfg.min_lr, total, warmup)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, protocol: str = "global"
                   ) -> optax.GradientTransformation:
  """AdamW + VindLU weight-decay mask + warmup/cosine schedule (+ optional clip, accum).

  Args:
    cfg: `optimizer_config()` fields.
    total_steps: number of OPTIMIZER UPDATES of the run (epochs * steps per epoch). With
      `grad_accum_steps = k` the train loop feeds k * total_steps micro-batches; the
      schedule advances once per update, not per micro-batch.
    protocol: config `protocol`, whose schedule applies when `cfg.schedule` is ''.
  """
  chain = []
  if cfg.get("grad_clip_norm") is not None:
    chain.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
  chain.append(optax.adamw(make_schedule(cfg, total_steps, protocol), b1=cfg.b1, b2=cfg.b2,
                           eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=weight_decay_mask))
  tx = optax.chain(*chain) if len(chain) > 1 else chain[0]
  accum = int(cfg.get("grad_accum_steps", 1) or 1)
  if accum > 1:
    tx = accumulate_every(tx, accum)
  return tx


class AccumulationState(NamedTuple):
  """Gradient accumulation: micro-batches taken since the last update (0 .. k-1), the sum
  of their gradients (float32), and the wrapped optimizer's state."""
  mini_step: jax.Array
  acc_grads: Any
  inner_opt_state: Any


def accumulate_every(tx: optax.GradientTransformation, k: int) -> optax.GradientTransformation:
  """`tx` applied once every `k` calls, to the mean of their k gradients; the calls in
  between return zero updates (the schedule and AdamW's moments advance once an update,
  as with optax.MultiSteps).

  Why not optax.MultiSteps: it computes `tx`'s update on every micro-batch and keeps or
  drops it with selects, so every micro-batch reads and writes the whole optimizer state;
  compiled for a v5e-8 at paper size (8 clips a chip, no remat) that was ~9 GB of each
  chip's ~66 GB a micro-batch (docs/benchmarks.md, issue 26). Here the update is a
  `lax.cond` branch taken once in k: the micro-batches in between only add their
  gradients. `update_applied` tells the train step when to apply the updates.
  """
  k = int(k)
  if k < 1:
    raise ValueError(f"grad_accum_steps={k} must be >= 1")

  def init(params):
    acc = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return AccumulationState(jnp.zeros((), jnp.int32), acc, tx.init(params))

  def update(grads, state, params=None):
    acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), state.acc_grads, grads)

    def emit(acc, inner):
      mean = jax.tree.map(lambda a, g: (a / k).astype(g.dtype), acc, grads)
      updates, inner = tx.update(mean, inner, params)
      return updates, inner, jax.tree.map(jnp.zeros_like, acc)

    def hold(acc, inner):
      return jax.tree.map(jnp.zeros_like, grads), inner, acc

    updates, inner, acc = jax.lax.cond(state.mini_step == k - 1, emit, hold, acc,
                                       state.inner_opt_state)
    return updates, AccumulationState((state.mini_step + 1) % k, acc, inner)

  return optax.GradientTransformation(init, update)


def update_applied(opt_state) -> jax.Array | None:
  """After `tx.update`: whether its updates are to be applied (False on gradient
  accumulation's in-between micro-batches, whose updates are zeros), or None when every
  update is."""
  if isinstance(opt_state, AccumulationState):
    return opt_state.mini_step == 0
  return None


__all__ = ["optimizer_config", "learning_rate_schedule", "vindlu_schedule", "schedule_name",
           "weight_decay_mask", "is_decayed", "make_schedule", "make_optimizer",
           "warmup_and_total_steps", "total_updates", "AccumulationState", "accumulate_every",
           "update_applied"]
