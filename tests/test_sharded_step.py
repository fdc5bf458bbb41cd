"""One train step and the rerank pass give the same numbers on 1 and on 8 devices.

Runs in a subprocess with 8 simulated CPU devices (the device count is fixed when JAX
starts, so it cannot be changed inside this pytest process).
"""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(r"""
    import jax, jax.numpy as jnp, numpy as np
    from configs import common
    from configs import webvid_pretrain
    from t2v2t_jax import sharding
    from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator
    from flax import nnx
    from t2v2t_jax.models.t2v2t import abstract_params, create_model
    from t2v2t_jax.training import optimizer, train_state as S, train_step as T

    assert jax.device_count() == 8, jax.devices()
    config = webvid_pretrain.get_config("tiny")   # VTC + VTM + MLM, dropout on, remat
    config.model.dtype = "float32"  # the 1e-5 bounds below are float32 arithmetic's
    mc = config.model
    tx = optimizer.make_optimizer(config.optimizer, 10)
    graphdef, _ = abstract_params(mc)
    rng = np.random.default_rng(0)
    B, L = 8, 8
    ids = rng.integers(5, 100, (B, L)).astype(np.int32)
    ids[:, 0] = 2
    mask = np.ones((B, L), np.int32)
    mask[::3, 5:] = 0
    ids[mask == 0] = 0
    batch = dict(frames=rng.integers(0, 256, (B, 2, 32, 32, 3)).astype(np.uint8),
                 input_ids=ids, attention_mask=mask,
                 video_idx=np.array([0, 1, 1, 2, 3, 4, 4, 5], np.int32))
    special = dict(cls=2, pad=0, mask=4, vocab_size=mc.text.vocab_size)

    def one_step(n, negative_groups=1):
      # (mesh, new state, metrics) of one train step on the first n devices.
      mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, devices=jax.devices()[:n])
      abstract = S.abstract_state(mc, tx, 0)
      shardings = S.state_shardings(abstract, mesh)
      state = S.create_sharded_state(mc, tx, 0, shardings)
      step = T.jit_train_step(T.make_train_step(
          graphdef, tx, loss_weights=dict(vtc=1.0, vtm=1.0, mlm=1.0), special_ids=special,
          temp_bounds=(0.001, 0.5), negative_groups=negative_groups), shardings, mesh)
      gbatch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
      return (mesh,) + step(state, gbatch)

    def max_diff(a, b):
      return max(jax.tree.leaves(jax.tree.map(
          lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))

    results = {}
    for n in (1, 8):
      mesh, new_state, metrics = one_step(n)
      params = jax.tree.map(np.asarray, new_state["params"])
      evaluator = RetrievalEvaluator(graphdef, mesh, k=4, rerank_batch_size=8, progress=False)
      pairs = np.array([[v, t] for v in range(5) for t in range(3)], np.int64)
      hidden = rng.standard_normal((3, L, mc.text.width)).astype(np.float32) if n == 1 else hidden
      tokens = rng.standard_normal((5, 2, 5, mc.vision.width)).astype(np.float16) if n == 1 else tokens
      scores = evaluator.score_candidates(new_state["params"], pairs, hidden, mask[:3], tokens)
      results[n] = (float(metrics["loss"]), params, scores, {k: float(v) for k, v in metrics.items()})

    (l1, p1, s1, m1), (l8, p8, s8, m8) = results[1], results[8]
    print("loss", l1, l8, m1, m8)
    assert abs(l1 - l8) < 1e-5, (l1, l8)
    assert max_diff(p1, p8) < 1e-5, max_diff(p1, p8)
    np.testing.assert_allclose(s1, s8, atol=1e-5)
    print("OK max param diff", max_diff(p1, p8))

    # vtm_negatives='per_device' on 4 devices (2 rows each) is the same step as its four
    # row groups on one device.
    mesh4 = sharding.make_mesh({"data": -1, "fsdp": 1}, devices=jax.devices()[:4])
    _, s4, m4 = one_step(4, T.negative_groups("per_device", B, mesh4))
    _, s1g, m1g = one_step(1, 4)
    assert abs(float(m4["loss"]) - float(m1g["loss"])) < 1e-5, (m4["loss"], m1g["loss"])
    assert max_diff(s4["params"], s1g["params"]) < 1e-5, max_diff(s4["params"], s1g["params"])
    print("OK per-device negatives", float(m4["loss"]))

    # The v2t scorer on 1 device fuses a batch's 8 texts in one slot of their video (keys
    # and values once); on 8 devices (one text a device) a slot holds one text.
    v2t_cfg = mc.copy_and_resolve_references()
    v2t_cfg.fusion.mode = "v2t"
    v2t_graphdef, v2t_params = nnx.split(create_model(v2t_cfg, seed=1), nnx.Param)
    v2t_scores = [
        RetrievalEvaluator(v2t_graphdef, sharding.make_mesh({"data": -1, "fsdp": 1},
                                                            devices=jax.devices()[:n]),
                           k=4, rerank_batch_size=8, progress=False).score_candidates(
                               v2t_params, pairs, hidden, mask[:3], tokens)
        for n in (1, 8)]
    assert np.ptp(v2t_scores[0]) > 1e-4, v2t_scores[0]
    np.testing.assert_allclose(v2t_scores[0], v2t_scores[1], atol=1e-5)
    print("OK v2t rerank")
""")


def test_train_step_and_rerank_match_on_1_and_8_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "OK max param diff" in proc.stdout and "OK per-device negatives" in proc.stdout
  assert "OK v2t rerank" in proc.stdout
