"""The 'vindlu' protocol (the objective and LR schedule VindLU's code ran on the poster's
GPUs), given VTM negatives and MLM inputs, and the deterministic switch.

The references are independent of the code under test: VindLU's VTC gradient is rebuilt in
PyTorch from its two facts (the all-gather's backward returns the local slice; DDP
averages over the W ranks), its LR formula is written out here from `utils/scheduler.py`
and stepped through torch's LambdaLR as its training loop steps it, and the given-input
losses are recomputed pair by pair in NumPy. The 8-device part runs in a subprocess with 8
simulated CPU devices (the device count is fixed when JAX starts).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import anet_ft, didemo_ft, msrvtt_ft, webvid_cc3m_pretrain, webvid_pretrain
from t2v2t_jax import losses
from t2v2t_jax import sharding
from t2v2t_jax.checkpoints.params import assign_into
from t2v2t_jax.models.t2v2t import create_model
from t2v2t_jax.training import optimizer
from t2v2t_jax.training import train_step as step_lib
from t2v2t_jax.training.objective import compute_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# recipe module -> (the poster's GPU count W, its per-GPU batch)
RECIPES = {webvid_pretrain: (8, 64), webvid_cc3m_pretrain: (8, 64), msrvtt_ft: (4, 32),
           didemo_ft: (1, 32), anet_ft: (1, 32)}


def _mesh(n: int = 1):
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)),
                            devices=jax.devices()[:n])


# ---------------------------------------------------------------- VTC: 1/W of the global gradient


def _vindlu_vtc_grads_torch(xv, xt, wv, wt, idx, temp, world):
  """VindLU's VTC parameter gradient on `world` ranks, simulated in one process: rank r
  holds rows r*n..(r+1)*n; its loss is the gathered batch's VTC loss, and the gather's
  backward keeps only rank r's slice (the other slices enter as constants); DDP then
  averages the ranks' parameter gradients. float64."""
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415
  n = xv.shape[0] // world
  wv_t = torch.tensor(wv, dtype=torch.float64)
  wt_t = torch.tensor(wt, dtype=torch.float64)
  idx_t = torch.tensor(idx)
  grads = [np.zeros_like(wv, dtype=np.float64), np.zeros_like(wt, dtype=np.float64)]
  for rank in range(world):
    pv = wv_t.clone().requires_grad_(True)
    pt = wt_t.clone().requires_grad_(True)
    v_parts, t_parts = [], []
    for r in range(world):
      rows = slice(r * n, (r + 1) * n)
      v = F.normalize(torch.tensor(xv[rows], dtype=torch.float64) @ pv, dim=-1)
      t = F.normalize(torch.tensor(xt[rows], dtype=torch.float64) @ pt, dim=-1)
      v_parts.append(v if r == rank else v.detach())
      t_parts.append(t if r == rank else t.detach())
    sim = torch.cat(v_parts) @ torch.cat(t_parts).T / temp
    targets = (idx_t[:, None] == idx_t[None, :]).double()
    targets = targets / targets.sum(1, keepdim=True)
    loss_v2t = -(F.log_softmax(sim, dim=1) * targets).sum(1).mean()
    loss_t2v = -(F.log_softmax(sim.T, dim=1) * targets).sum(1).mean()
    ((loss_v2t + loss_t2v) / 2).backward()
    grads[0] += pv.grad.numpy() / world
    grads[1] += pt.grad.numpy() / world
  return grads


@pytest.mark.parametrize("recipe", sorted(RECIPES, key=lambda m: m.__name__),
                         ids=lambda m: m.__name__.split(".")[-1])
def test_vtc_gradient_is_vindlus_on_the_recipes_gpu_count(recipe):
  world, gpu_batch = RECIPES[recipe]
  config = recipe.get_config(None)
  assert (config.protocol, config.vindlu_world_size, config.vindlu_gpu_batch) == (
      "vindlu", world, gpu_batch)
  rng = np.random.default_rng(world)
  b, d_in, d = max(4, 2 * world), 6, 5
  xv, xt = rng.normal(size=(b, d_in)), rng.normal(size=(b, d_in))
  wv, wt = rng.normal(size=(d_in, d)), rng.normal(size=(d_in, d))
  idx = np.arange(b)
  idx[1] = idx[0]  # a video with two captions: soft multi-positive targets
  temp = 0.1
  want = _vindlu_vtc_grads_torch(xv, xt, wv, wt, idx, temp, world)

  def vtc(weights, params):
    v = xv @ params[0]
    t = xt @ params[1]
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
    return weights["vtc"] * losses.vtc_loss(v @ t.T, temp, jnp.asarray(idx))[0]

  params = (jnp.asarray(wv, jnp.float32), jnp.asarray(wt, jnp.float32))
  settings = step_lib.objective_settings(config, b, _mesh())
  got = jax.grad(lambda p: vtc(settings["loss_weights"], p))(params)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-4, atol=1e-7)
  # The project's own protocol takes the whole global gradient: W times VindLU's.
  config.protocol = "global"
  full = jax.grad(lambda p: vtc(step_lib.objective_settings(config, b, _mesh())["loss_weights"],
                                p))(params)
  np.testing.assert_allclose(np.asarray(full[0]), world * want[0], rtol=2e-4, atol=1e-7)


# ---------------------------------------------------------------- the whole objective, tiny model

SPECIAL = dict(cls=2, pad=0, mask=4)


def tiny_protocol_config(batch_size: int = 16, gpu_batch: int = 2):
  """webvid_pretrain (W = 8) at test size, float32, dropout off, VindLU's GPUs as groups of
  `gpu_batch` rows: batch 16 is the poster's 8 GPUs at 2 rows each."""
  config = webvid_pretrain.get_config("tiny")
  config.model.dtype = "float32"
  config.model.remat = "none"  # a faster compile (remat changes memory, not numbers)
  config.deterministic = True
  config.batch_size = batch_size
  config.vindlu_gpu_batch = gpu_batch
  return config


def tiny_batch(config, b: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  max_len = 8
  ids = rng.integers(5, 100, (b, max_len)).astype(np.int32)
  ids[:, 0] = SPECIAL["cls"]
  mask = np.ones((b, max_len), np.int32)
  mask[::3, 5:] = 0
  ids[mask == 0] = SPECIAL["pad"]
  size, frames = config.model.vision.image_size, config.num_frames
  video_idx = np.arange(b, dtype=np.int32)
  video_idx[3] = video_idx[2]  # one video twice: a positive that must not be a negative
  return dict(frames=rng.integers(0, 256, (b, frames, size, size, 3)).astype(np.uint8),
              input_ids=ids, attention_mask=mask, video_idx=video_idx)


def protocol_gradients(n_devices: int, b: int = 16):
  """(settings, grads) on the first `n_devices` devices of the tiny webvid_pretrain model
  under the 'vindlu' protocol, from one forward pass at one key: grads = (vindlu: of the
  objective's total, rest: of its VTM + MLM losses, vtc: of the global batch's VTC loss,
  the `loss_vtc` it logs), each flat {path: np.ndarray}."""
  config = tiny_protocol_config(b)
  mesh = _mesh(n_devices)
  settings = step_lib.objective_settings(config, b, mesh)
  special = dict(SPECIAL, vocab_size=config.model.text.vocab_size)
  graphdef, params = nnx.split(create_model(config.model, seed=0))

  def three_losses(params, batch, key):
    total, metrics = compute_losses(nnx.merge(graphdef, params), batch, key,
                                    special_ids=special, **settings)
    return jnp.stack([total, metrics["loss_vtm"] + metrics["loss_mlm"], metrics["loss_vtc"]])

  batch = {k: jax.device_put(v, sharding.batch_sharding(mesh))
           for k, v in tiny_batch(config, b).items()}
  params = jax.device_put(params, sharding.replicated(mesh))
  jac = jax.jit(jax.jacrev(three_losses))(params, batch, jax.random.key(7))
  flat = {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jac)[0]}
  return settings, {name: {k: v[i] for k, v in flat.items()}
                    for i, name in enumerate(("vindlu", "rest", "vtc"))}


def check_one_over_w(settings, grads, world: int = 8):
  """The 'vindlu' objective's gradient less its VTM + MLM part is 1/W of the global VTC
  loss's gradient; returns the largest deviation relative to that gradient's largest entry."""
  assert settings["loss_weights"]["vtc"] == pytest.approx(1.0 / world)
  scale = max(np.abs(g).max() for g in grads["vtc"].values()) / world
  assert scale > 0
  worst = max(np.abs(grads["vindlu"][k] - grads["rest"][k] - grads["vtc"][k] / world).max()
              for k in grads["vtc"])
  assert worst / scale < 1e-4, worst / scale
  # The VTC gradient is not negligible beside the rest (else the check would be empty).
  vtc_norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads["vtc"].values())) / world
  assert vtc_norm > 1e-3 * math.sqrt(sum(float((g ** 2).sum()) for g in grads["rest"].values()))
  return worst / scale


SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
import test_vindlu_protocol as t
assert jax.device_count() == 8, jax.devices()
s1, g1 = t.protocol_gradients(1)
s8, g8 = t.protocol_gradients(8)
# The poster's 8 GPUs of 2 rows: 8 groups of rows of the global batch for the negatives
# and the MLM means, on one device as on eight.
for s in (s1, s8):
  assert (s["negative_groups"], s["mlm_groups"]) == (8, 8), s
print("relative deviation", t.check_one_over_w(s1, g1), t.check_one_over_w(s8, g8))
scale = max(np.abs(g).max() for g in g1["vindlu"].values())
worst = max(np.abs(g1["vindlu"][k] - g8["vindlu"][k]).max() for k in g1["vindlu"])
assert worst / scale < 1e-4, worst / scale
print("OK 8 devices", worst / scale)
"""


def test_vindlu_objective_vtc_gradient_is_one_over_w_on_one_and_eight_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + " --xla_force_host_platform_device_count=8").strip()
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", SCRIPT, os.path.join(REPO, "tests")], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "OK 8 devices" in proc.stdout


def test_row_groups_follow_the_posters_gpus_not_the_mesh():
  config = webvid_pretrain.get_config(None)
  mesh = _mesh()
  settings = step_lib.objective_settings(config, 512, mesh)
  assert (settings["negative_groups"], settings["mlm_groups"]) == (8, 8)
  assert settings["loss_weights"] == dict(vtc=1 / 8, vtm=1.0, mlm=1.0)
  assert settings["deterministic"] is False
  # A batch no larger than one GPU's is one group; one that does not split is refused.
  assert step_lib.vindlu_row_groups(32, 64) == 1
  assert step_lib.vindlu_row_groups(128, 32) == 4
  with pytest.raises(ValueError, match="not a multiple"):
    step_lib.vindlu_row_groups(96, 64)
  with pytest.raises(ValueError, match=">= 2"):
    step_lib.vindlu_row_groups(8, 1)
  # The project's own protocol: weights as set, negatives by `vtm_negatives`.
  config.protocol = "global"
  settings = step_lib.objective_settings(config, 512, mesh)
  assert settings["loss_weights"] == dict(vtc=1.0, vtm=1.0, mlm=1.0)
  assert (settings["negative_groups"], settings["mlm_groups"]) == (1, 1)
  config.protocol = "other"
  with pytest.raises(ValueError, match="protocol"):
    step_lib.objective_settings(config, 512, mesh)


# ---------------------------------------------------------------- the LR schedule


def _vindlu_lr_lambda(step, warmup_steps, training_steps, min_lr_multi):
  """VindLU's `get_cosine_schedule_with_warmup` multiplier (num_cycles 0.5), as its
  utils/scheduler.py states it."""
  if step < warmup_steps:
    return max(min_lr_multi, float(step) / float(max(1, warmup_steps)))
  progress = float(step - warmup_steps) / float(max(1, training_steps - warmup_steps))
  return max(min_lr_multi, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def _vindlu_lrs(peak, min_lr_multi, steps_per_epoch, epochs, warmup_epochs):
  """The learning rate of each iteration of VindLU's loop: LambdaLR over the optimizer,
  `optimizer.step()` then `scheduler.step()` once per iteration, the step count and the
  warmup from steps per epoch x epochs (tasks/pretrain.py, tasks/retrieval.py)."""
  import torch  # noqa: PLC0415
  training = steps_per_epoch * epochs
  warmup = steps_per_epoch * warmup_epochs
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=peak)
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda s: _vindlu_lr_lambda(s, warmup, training, min_lr_multi))
  lrs = []
  for _ in range(training):
    lrs.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
  return np.array(lrs)


@pytest.mark.parametrize("recipe, steps_per_epoch", [
    (webvid_pretrain, 7),   # warmup 1 of 10 epochs: 7 steps
    (msrvtt_ft, 7),         # warmup 0.5 of 5 epochs: 3.5 steps (VindLU does not round)
    (didemo_ft, 9),         # 0.5 of 10: 4.5 steps
])
def test_vindlu_schedule_matches_vindlus_loop(recipe, steps_per_epoch):
  config = recipe.get_config(None)
  cfg = config.optimizer
  total = int(steps_per_epoch * cfg.epochs)
  assert optimizer.total_updates(config, steps_per_epoch) == total
  # The poster's endpoints, as VindLU's formula reads them: the floor is min_lr / lr.
  want = _vindlu_lrs(cfg.lr, cfg.min_lr / cfg.lr, steps_per_epoch, int(cfg.epochs),
                     cfg.warmup_epochs)
  schedule = optimizer.make_schedule(cfg, total, config.protocol)
  got = np.array([float(schedule(s)) for s in range(total)])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Peak lr (reached only near it with a fractional warmup) and the floor min_lr.
  assert 0.99 * cfg.lr < got.max() <= cfg.lr * (1 + 1e-6)
  assert got.min() == pytest.approx(cfg.min_lr)
  # The first step is at the floor (not at 1% of the peak, the project's warmup start).
  assert got[0] == pytest.approx(cfg.min_lr)
  # The project's own schedule is another curve: from 1% of the peak, min_lr at the end.
  own = optimizer.make_schedule(cfg, total, "global")
  assert float(own(0)) == pytest.approx(0.01 * cfg.lr)
  assert not np.allclose([float(own(s)) for s in range(total)], want, rtol=1e-3)
  # Named explicitly, a schedule applies whatever the protocol.
  cfg.schedule = "warmup_cosine"
  assert float(optimizer.make_schedule(cfg, total, "vindlu")(0)) == pytest.approx(0.01 * cfg.lr)
  cfg.schedule = "other"
  with pytest.raises(ValueError, match="schedule"):
    optimizer.make_schedule(cfg, total, "vindlu")


def test_vindlu_schedule_steps_the_optimizer():
  # make_optimizer applies the protocol's schedule: the first AdamW update of a zero-gradient
  # decayed weight is -lr(0) * wd * w, lr(0) the floor min_lr (1e-6), not 1% of the peak.
  cfg = msrvtt_ft.get_config(None).optimizer
  params = {"kernel": jnp.ones((2, 2))}
  tx = optimizer.make_optimizer(cfg, 100, "vindlu")
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["kernel"]), -1e-6 * 0.02, rtol=1e-5)


# ---------------------------------------------------------------- given negatives and MLM inputs

GIVEN_SPECIAL = {"cls": 1, "pad": 0, "mask": 2, "vocab_size": 64}


def _small_model():
  from t2v2t_jax.models.config import model_config  # noqa: PLC0415
  cfg = model_config("test/16", "test", "t2v2t")
  cfg.vision.image_size, cfg.vision.num_frames = 32, 2
  cfg.text.vocab_size = GIVEN_SPECIAL["vocab_size"]
  model = create_model(cfg, seed=0)
  # A matching head whose logits differ from pair to pair (the initial one's barely do).
  rng = np.random.default_rng(0)
  assign_into(model, {"itm_head.kernel": 0.1 * rng.normal(size=(cfg.text.width, 2)),
                      "itm_head.bias": np.zeros(2)})
  return model


def _small_batch(b=4, max_len=8):
  rng = np.random.default_rng(1)
  ids = rng.integers(3, GIVEN_SPECIAL["vocab_size"], (b, max_len)).astype(np.int32)
  mask = np.zeros((b, max_len), np.int32)
  for j, n in enumerate([6, 3, 5, 8][:b]):
    ids[j, 0], ids[j, n:], mask[j, :n] = GIVEN_SPECIAL["cls"], GIVEN_SPECIAL["pad"], 1
  return {"frames": rng.integers(0, 256, (b, 2, 32, 32, 3), dtype=np.uint8),
          "input_ids": ids, "attention_mask": mask, "video_idx": np.arange(b, dtype=np.int32)}


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _vtm_reference(model, batch, neg_video, neg_text):
  """Mean 2-way cross-entropy over the pairs named by hand: (j, j) label 1,
  (neg_video[j], j) and (j, neg_text[j]) label 0, each fused on its own."""
  _, tokens = model.encode_video(jnp.asarray(batch["frames"]))
  mask = jnp.asarray(batch["attention_mask"])
  hidden, _ = model.encode_text(jnp.asarray(batch["input_ids"]), mask)
  b = len(batch["video_idx"])
  pairs = ([(j, j, 1) for j in range(b)] + [(int(neg_video[j]), j, 0) for j in range(b)]
           + [(j, int(neg_text[j]), 0) for j in range(b)])
  out = []
  for video, text, label in pairs:
    fused, _ = model.fuse(hidden[text:text + 1], mask[text:text + 1], tokens[video:video + 1])
    out.append(-_log_softmax(np.asarray(model.itm_logits(fused))[0])[label])
  return float(np.mean(out))


def test_given_negatives_are_used_as_given():
  model, batch = _small_model(), _small_batch()
  jbatch = jax.tree.map(jnp.asarray, batch)
  weights = {"vtc": 0.0, "vtm": 1.0, "mlm": 0.0}
  losses_seen = []
  # The second set repeats two texts as negatives and leaves two out (an untrained model's
  # matching logit depends on the text far more than on the video: a permutation of the
  # texts would barely change the loss).
  for neg_video, neg_text in [([1, 0, 3, 2], [2, 3, 0, 1]), ([2, 2, 0, 0], [1, 0, 1, 0])]:
    want = _vtm_reference(model, batch, neg_video, neg_text)
    for seed, groups in ((0, 1), (1, 2)):  # neither the key nor the groups change them
      _, metrics = compute_losses(
          model, jbatch, jax.random.key(seed), loss_weights=weights, special_ids=GIVEN_SPECIAL,
          deterministic=True, negative_groups=groups,
          negatives=(jnp.asarray(neg_video), jnp.asarray(neg_text)))
      np.testing.assert_allclose(float(metrics["loss_vtm"]), want, rtol=1e-5)
    losses_seen.append(want)
  assert abs(losses_seen[0] - losses_seen[1]) > 1e-4


def _mlm_reference(model, batch, masked_ids, labels, groups=1):
  """Cross-entropy of the MLM head at the labelled positions of each row's own (video,
  masked caption) pair, averaged over those positions (within each group, then over the
  groups)."""
  _, tokens = model.encode_video(jnp.asarray(batch["frames"]))
  mask = jnp.asarray(batch["attention_mask"])
  hidden, _ = model.encode_text(jnp.asarray(masked_ids), mask)
  fused, _ = model.fuse(hidden, mask, tokens)
  log_probs = _log_softmax(np.asarray(model.mlm_logits(fused)))
  per_row = [[-log_probs[i, j, labels[i, j]] for j in range(labels.shape[1]) if labels[i, j] >= 0]
             for i in range(labels.shape[0])]
  n = len(per_row) // groups
  return float(np.mean([np.mean(sum(per_row[g * n:(g + 1) * n], []))
                        for g in range(groups)]))


def test_given_mlm_inputs_are_used_as_given():
  model, batch = _small_model(), _small_batch()
  jbatch = jax.tree.map(jnp.asarray, batch)
  weights = {"vtc": 0.0, "vtm": 0.0, "mlm": 1.0}
  ids = batch["input_ids"]
  # Two maskings by hand: one masks a token in every row, the other masks more in row 0
  # (so the groups' means and the batch mean differ) and replaces a token at random.
  first, labels_first = ids.copy(), np.full(ids.shape, -100, np.int32)
  for i, j in [(0, 1), (1, 2), (2, 3), (3, 4)]:
    labels_first[i, j], first[i, j] = ids[i, j], GIVEN_SPECIAL["mask"]
  second, labels_second = ids.copy(), np.full(ids.shape, -100, np.int32)
  for i, j in [(0, 1), (0, 2), (0, 3), (2, 1), (3, 2)]:
    labels_second[i, j], second[i, j] = ids[i, j], GIVEN_SPECIAL["mask"]
  labels_second[1, 1], second[1, 1] = ids[1, 1], 7
  seen = []
  for masked, labels in ((first, labels_first), (second, labels_second)):
    for groups in (1, 2):
      want = _mlm_reference(model, batch, masked, labels, groups)
      _, metrics = compute_losses(
          model, jbatch, jax.random.key(groups), loss_weights=weights,
          special_ids=GIVEN_SPECIAL, deterministic=True, mlm_groups=groups,
          mlm_inputs=(jnp.asarray(masked), jnp.asarray(labels)))
      np.testing.assert_allclose(float(metrics["loss_mlm"]), want, rtol=1e-5)
      assert int(metrics["mlm_num_masked"]) == int((labels >= 0).sum())
      seen.append(want)
  assert abs(seen[0] - seen[2]) > 1e-4   # another masking, another loss
  assert abs(seen[2] - seen[3]) > 1e-4   # groups of unequal counts: mean of means differs


# ---------------------------------------------------------------- the deterministic switch


def test_deterministic_training_ignores_the_dropout_key():
  # The recipe's dropout rates, `deterministic` set: the train step at two state keys, with
  # the negatives and MLM inputs given in the batch (so that only dropout could tell the two
  # apart), gives the same losses and the same updated parameters.
  from t2v2t_jax.training.train_state import PRNG_IMPL  # noqa: PLC0415
  config = webvid_pretrain.get_config("tiny")
  config.model.dtype = "float32"
  config.deterministic = True
  b = 4
  settings = step_lib.objective_settings(config, b, _mesh())
  assert settings["deterministic"] is True
  special = dict(SPECIAL, vocab_size=config.model.text.vocab_size)
  graphdef, params = nnx.split(create_model(config.model, seed=0), nnx.Param)
  tx = optimizer.make_optimizer(config.optimizer, 10, config.protocol)
  step = jax.jit(step_lib.make_train_step(graphdef, tx, special_ids=special,
                                          temp_bounds=(0.001, 0.5), **settings))
  batch = tiny_batch(config, b)
  labels = np.full(batch["input_ids"].shape, -100, np.int32)
  labels[:, 1] = batch["input_ids"][:, 1]
  masked = batch["input_ids"].copy()
  masked[:, 1] = SPECIAL["mask"]
  batch.update(vtm_neg_video=np.array([1, 0, 0, 0], np.int32),
               vtm_neg_text=np.array([2, 2, 0, 1], np.int32),
               mlm_input_ids=masked, mlm_labels=labels)
  batch = jax.tree.map(jnp.asarray, batch)
  out = []
  for seed in (0, 1):
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(seed, impl=PRNG_IMPL))}
    new_state, metrics = step(state, batch)
    out.append(({k: float(metrics[k]) for k in ("loss", "loss_vtc", "loss_vtm", "loss_mlm")},
                jax.tree.map(np.asarray, new_state["params"])))
  assert out[0][0] == out[1][0]
  jax.tree.map(np.testing.assert_array_equal, out[0][1], out[1][1])

  # The same objective with dropout on (the recipe's rates): two keys, two losses.
  def loss(params, batch, key):
    return compute_losses(
        nnx.merge(graphdef, params), batch, key, loss_weights=settings["loss_weights"],
        special_ids=special, deterministic=False,
        negatives=(batch["vtm_neg_video"], batch["vtm_neg_text"]),
        mlm_inputs=(batch["mlm_input_ids"], batch["mlm_labels"]))[0]
  dropped = jax.jit(loss)
  assert float(dropped(params, batch, jax.random.key(0))) != float(
      dropped(params, batch, jax.random.key(1)))
