"""`model.init_std`: new dense and embedding weights drawn with that std, nothing else
changed (LayerNorms, biases, gates, layer scales keep their initial values)."""

import numpy as np
import jax
from flax import nnx

from t2v2t_jax.models.config import model_config
from t2v2t_jax.models.t2v2t import create_model


def _params(init_std):
  cfg = model_config("test/16", "test", "t2v2t")
  cfg.init_std = init_std
  state = nnx.state(create_model(cfg, seed=3), nnx.Param)
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    out["/".join(map(str, names))] = np.asarray(leaf)
  return out


def test_init_std_scales_kernels_and_embeddings_only():
  base, wide = _params(0.02), _params(0.08)
  assert base.keys() == wide.keys()
  kernels = [k for k in base if k.endswith(("kernel", "embedding"))]
  assert len(kernels) > 20
  for k in kernels:  # same draws, 4x the std
    np.testing.assert_allclose(wide[k], 4.0 * base[k], rtol=1e-6, atol=1e-7, err_msg=k)
  big = max(kernels, key=lambda k: base[k].size)
  assert abs(float(np.std(wide[big])) - 0.08) < 0.004, big
  for k in set(base) - set(kernels):  # LayerNorm scale/bias, biases, gates, layer scale, temp
    np.testing.assert_array_equal(wide[k], base[k], err_msg=k)
  assert any(k.endswith("gate") for k in base) and any("norm" in k and k.endswith("scale") for k in base)
