"""Benchmark of the REAL jitted train step on synthetic device-resident batches.

Builds the step exactly as `t2v2t_jax/training/train.py` does (`make_train_step` +
`jit_train_step` with the state sharded over a mesh of every local device), feeds it
batches generated on the device (uint8 frames, int32 tokens), so the host never limits
it, and reports:
  - compile time; step time (median of --steps blocked steps after --warmup, and the mean
    of --steps pipelined steps); samples/s;
  - model FLOPs per sample: analytic (`benchmarks/flops.py`) and XLA's cost analysis of
    the compiled step divided by the global batch, and their ratio;
  - achieved TFLOP/s and MFU (analytic model FLOPs / peak; `hfu_xla` uses XLA's count);
  - compiled memory per device (temp + argument + output - alias) and, where the backend
    reports it, the allocator's peak;
  - whether anything was compiled after step 2 (there must be nothing).
The last line of stdout is one JSON object (also appended to --json-out if given).

Examples:
  python benchmarks/train_step.py                        # test size, CPU, < 1 minute
  python benchmarks/train_step.py --preset small --mode v2t [--remat]
  python benchmarks/train_step.py --preset paper --batch 32 --remat   # accelerator
  python benchmarks/train_step.py --vision Ti/16 --vision-depth 4 --text tiny --frames 4
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import sys
import time
import traceback

# The repository root first: `benchmarks/input_pipeline.py` must not shadow the
# `input_pipeline` package (Python puts this script's folder first on the path).
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT, _HERE] + [p for p in sys.path
                                if os.path.abspath(p or ".") not in (_ROOT, _HERE)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import flops as flops_lib  # noqa: E402

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# Peak dense bf16 matrix throughput per chip, TFLOP/s (vendor figures).
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100", 989.0),     # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
]

PRESETS = {
    # The tiniest model: seconds on a CPU (smoke tests of the benchmark itself).
    "test": dict(vision="test/16", vision_depth=None, text="test", text_layers=None,
                 fusion_layer=None, image_size=32, frames=2, batch=4, text_len=16, vocab=512,
                 dtype="float32"),
    # TARGETS.md's comparison point with VindLU's PyTorch code on the project CPU:
    # vision width 192, 4 layers, 3 heads, MLP 768, patch 16; text width 192, 6 layers,
    # fusion from layer 4, 3 heads, MLP 768 ('tiny'); batch 4 x 4 frames x 224, fp32.
    "small": dict(vision="Ti/16", vision_depth=4, text="tiny", text_layers=None,
                  fusion_layer=None, image_size=224, frames=4, batch=4, text_len=32,
                  vocab=30522, dtype="float32"),
    # Paper size pretraining (SPEC 7): B/16 + BERT-base, 4 frames, bf16, 32 per device.
    "paper": dict(vision="B/16", vision_depth=None, text="base", text_layers=None,
                  fusion_layer=None, image_size=224, frames=4, batch=32, text_len=32,
                  vocab=30522, dtype="bfloat16"),
}


# ----------------------------------------------------------------------------------------
# Shared helpers (eval_rerank.py imports these).
# ----------------------------------------------------------------------------------------

def add_model_args(parser: argparse.ArgumentParser, default_preset: str = "test"):
  g = parser.add_argument_group("model size (a preset, then explicit overrides)")
  g.add_argument("--preset", choices=sorted(PRESETS), default=default_preset)
  g.add_argument("--vision", help="vision variant, e.g. B/16, Ti/16, test/16")
  g.add_argument("--vision-depth", type=int, help="override the vision depth")
  g.add_argument("--text", help="text variant: base, small, tiny, test")
  g.add_argument("--text-layers", type=int, help="override the number of text layers")
  g.add_argument("--fusion-layer", type=int, help="override the first fusion layer")
  g.add_argument("--mode", default="t2v2t", help="fusion mode: v2t, t2v2t, t2v2t_naive, joint")
  g.add_argument("--t2v-placement", default="once", choices=("once", "per_layer"))
  g.add_argument("--frames", type=int)
  g.add_argument("--image-size", type=int)
  g.add_argument("--text-len", type=int, help="text tokens per caption")
  g.add_argument("--vocab", type=int)
  g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
  g.add_argument("--remat", nargs="?", const="full", default="none",
                 choices=("none", "full", "save_dots"),
                 help="per-layer remat policy (bare --remat: 'full')")
  g.add_argument("--scan", choices=("auto", "on", "off"), default="auto",
                 help="model.scan_layers: scan each stack of identical layers ('auto': on "
                      "TPU only)")
  g.add_argument("--attention-impl", default="auto", choices=("auto", "xla", "cudnn", "explicit"))
  g.add_argument("--batch", type=int, help="per-device batch")
  parser.add_argument("--init", choices=("synthetic", "real"), default="synthetic",
                      help="parameters: 'synthetic' = drawn on the host with numpy (normal "
                           "0.02 matrices, LayerNorm 1/0, zero biases) and placed, no "
                           "per-initialiser kernels; 'real' = the model's own initialisers "
                           "(train_state.create_sharded_state). Step timing is the same.")
  parser.add_argument("--compile-cache",
                      help="persistent XLA compilation cache folder (repeated runs load the "
                           "executable instead of compiling; compile_s then times the load)")


def setup_compile_cache(folder: str | None) -> None:
  if not folder:
    return
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def synthetic_params(abstract_params, seed: int = 0):
  """Host (numpy) values for every parameter leaf of `abstract_params` (shape structs).

  Values only need to keep the computation finite and realistic: matrices and
  embeddings normal(0, 0.02); 1-D LayerNorm scales 1, layer-scale lambdas 0.1, other
  vectors (biases) 0; scalars 0.07 for `temp`, else 0.5 (gates, temporal scale: nonzero,
  so every branch is live). The model's own initialisers run ~600 small kernels, each
  compiled on first use: tens of seconds on a GPU that a benchmark need not spend.
  """
  from t2v2t_jax.tree_paths import parameter_path  # noqa: PLC0415
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    names = parameter_path(path)
    shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    if len(shape) == 0:
      return np.asarray(0.07 if names[-1] == "temp" else 0.5, dtype)
    if len(shape) == 1:
      if names[-1] == "scale":
        return np.ones(shape, dtype)
      if names[-1].startswith("lambda"):
        return np.full(shape, 0.1, dtype)
      return np.zeros(shape, dtype)
    return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

  return jax.tree_util.tree_map_with_path(one, abstract_params)


def resolve_args(args) -> None:
  """Fill every size field left unset from the preset."""
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)


def build_model_config(args, *, no_dropout: bool = False):
  from t2v2t_jax.models.config import model_config, validate_model_config  # noqa: PLC0415
  cfg = model_config(args.vision, args.text, args.mode)
  if args.vision_depth:
    cfg.vision.depth = int(args.vision_depth)
  if args.text_layers:
    cfg.text.num_layers = int(args.text_layers)
  if args.fusion_layer:
    cfg.text.fusion_layer = int(args.fusion_layer)
  cfg.vision.image_size = int(args.image_size)
  cfg.vision.num_frames = int(args.frames)
  cfg.text.vocab_size = int(args.vocab)
  cfg.dtype = args.dtype
  cfg.remat = args.remat
  cfg.scan_layers = args.scan
  cfg.attention_impl = args.attention_impl
  cfg.fusion.t2v_placement = args.t2v_placement
  if no_dropout:
    cfg.text.dropout_rate = 0.0
    cfg.vision.dropout_rate = 0.0
    cfg.vision.drop_path_rate = 0.0
  validate_model_config(cfg)
  return cfg


def describe_config(cfg, args) -> str:
  v, t = cfg.vision, cfg.text
  return (f"vision {args.vision} (width {v.width}, depth {v.depth}, heads {v.num_heads}, "
          f"MLP {v.mlp_dim}, {args.image_size}px), text {args.text} (width {t.width}, "
          f"{t.num_layers} layers, fusion from {t.fusion_layer}, heads {t.num_heads}, "
          f"MLP {t.mlp_dim}, vocab {t.vocab_size}), mode {cfg.fusion.mode}, "
          f"{args.frames} frames, text len {args.text_len}, {cfg.dtype}, remat {cfg.remat}, "
          f"scan {cfg.scan_layers}")


def special_ids_for(vocab: int) -> dict:
  if vocab > 103:  # BERT uncased: [PAD] 0, [CLS] 101, [MASK] 103
    return {"cls": 101, "pad": 0, "mask": 103, "vocab_size": vocab}
  return {"cls": 1, "pad": 0, "mask": 2, "vocab_size": vocab}


def device_summary() -> dict:
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "num_devices": jax.device_count(),
          "local_devices": jax.local_device_count(), "jax": jax.__version__}


def peak_tflops_per_device(dtype: str) -> tuple[float | None, str]:
  """(peak TFLOP/s of one device, where the figure comes from)."""
  d = jax.devices()[0]
  if d.platform == "cpu":
    return measure_cpu_peak(dtype), f"measured {dtype} matmul on this CPU"
  kind = d.device_kind
  for name, peak in PEAK_TFLOPS:
    if name.lower() in kind.lower():
      note = f"{name} bf16 dense {peak:g} TFLOP/s (vendor)"
      if dtype == "float32":
        note += "; the step runs in float32, so this peak is not its ceiling"
      return peak, note
  return None, f"unknown device kind {kind!r}: no peak figure"


@functools.lru_cache(maxsize=None)
def measure_cpu_peak(dtype: str, n: int = 2048, repeats: int = 5) -> float:
  """TFLOP/s of a big jitted matmul in `dtype` (median of `repeats`)."""
  dt = jnp.dtype(dtype)
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), jnp.float32).astype(dt)
  b = jax.random.normal(k2, (n, n), jnp.float32).astype(dt)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times) / 1e12


def cost_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 (backends without a cost model)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  value = cost.get("flops")
  return float(value) if value is not None and value >= 0 else None


def memory_summary(compiled) -> dict:
  """Compiled per-device memory (bytes); None fields where the backend gives nothing."""
  out = {"compiled_temp_bytes": None, "compiled_argument_bytes": None,
         "compiled_output_bytes": None, "compiled_alias_bytes": None,
         "compiled_total_bytes": None}
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    m = None
  if m is None:
    return out
  temp = int(getattr(m, "temp_size_in_bytes", 0) or 0)
  arg = int(getattr(m, "argument_size_in_bytes", 0) or 0)
  outb = int(getattr(m, "output_size_in_bytes", 0) or 0)
  alias = int(getattr(m, "alias_size_in_bytes", 0) or 0)
  out.update(compiled_temp_bytes=temp, compiled_argument_bytes=arg, compiled_output_bytes=outb,
             compiled_alias_bytes=alias, compiled_total_bytes=temp + arg + outb - alias)
  return out


def device_memory_stats() -> dict:
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001
    stats = {}
  return {"device_bytes_limit": stats.get("bytes_limit"),
          "device_peak_bytes_in_use": stats.get("peak_bytes_in_use")}


class CompileCounter:
  """Counts XLA backend compilations (jax.monitoring duration events)."""

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **_):
    if event == BACKEND_COMPILE_EVENT:
      self.count += 1
      self.seconds += float(duration)


def load_str() -> str:
  try:
    return "load average %.2f %.2f %.2f" % os.getloadavg()
  except OSError:
    return "load average n/a"


def gib(x) -> str:
  return "n/a" if x is None else f"{x / 2 ** 30:.2f} GiB"


def emit(result: dict, json_out: str | None, echo: bool = True) -> None:
  line = json.dumps(result, sort_keys=True, default=lambda o: str(o))
  if echo:
    print(line, flush=True)
  if json_out:
    with open(json_out, "a") as f:
      f.write(line + "\n")


# ----------------------------------------------------------------------------------------
# The benchmark.
# ----------------------------------------------------------------------------------------

def synthetic_batch_fn(global_batch, frames, image_size, text_len, special_ids):
  vocab = special_ids["vocab_size"]
  first_word = min(999, vocab // 2)  # BERT's first ordinary word piece is 999

  def make(key):
    k1, k2, k3 = jax.random.split(key, 3)
    fr = jax.random.randint(k1, (global_batch, frames, image_size, image_size, 3), 0, 256,
                            jnp.int32).astype(jnp.uint8)
    lengths = jax.random.randint(k2, (global_batch,), max(2, text_len // 2), text_len + 1)
    mask = (jnp.arange(text_len)[None, :] < lengths[:, None]).astype(jnp.int32)
    ids = jax.random.randint(k3, (global_batch, text_len), first_word, vocab, jnp.int32)
    ids = ids.at[:, 0].set(special_ids["cls"])
    ids = jnp.where(mask.astype(bool), ids, special_ids["pad"])
    # Pairs 2i and 2i+1 share a video index (multi-positive VTC targets, as in real data).
    video_idx = jnp.arange(global_batch, dtype=jnp.int32) // 2
    return {"frames": fr, "input_ids": ids, "attention_mask": mask, "video_idx": video_idx}

  return make


def run(args) -> dict:
  from t2v2t_jax.training import optimizer as optimizer_lib  # noqa: PLC0415
  from t2v2t_jax import sharding as sharding_lib  # noqa: PLC0415
  from t2v2t_jax.models.t2v2t import abstract_params  # noqa: PLC0415
  from t2v2t_jax.training import train_state as state_lib  # noqa: PLC0415
  from t2v2t_jax.training import train_step as step_lib  # noqa: PLC0415

  counter = CompileCounter()
  cfg = build_model_config(args, no_dropout=args.no_dropout)
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
  n_dev = mesh.size
  global_batch = args.batch * n_dev
  special_ids = special_ids_for(cfg.text.vocab_size)
  weights = {"vtc": 1.0, "vtm": 0.0 if args.no_vtm else 1.0, "mlm": 1.0 if args.mlm else 0.0}

  result = {"benchmark": "train_step", **device_summary(), "preset": args.preset,
            "config": describe_config(cfg, args), "mode": cfg.fusion.mode, "vision": args.vision,
            "text": args.text, "frames": args.frames, "image_size": args.image_size,
            "text_len": args.text_len, "dtype": cfg.dtype, "remat": cfg.remat, "scan_layers": cfg.scan_layers,
            "losses": "+".join(k for k, w in weights.items() if w), "no_dropout": args.no_dropout,
            "batch_per_device": args.batch, "global_batch": global_batch,
            "compile_cache": bool(args.compile_cache), "init": args.init,
            "load_before": load_str()}
  print(f"[train_step] {result['config']}", flush=True)
  print(f"[train_step] losses {result['losses']}, batch {args.batch}/device x {n_dev} devices "
        f"({result['device_kind']}, jax {jax.__version__}); {load_str()}", flush=True)

  # Analytic count.
  sizes = flops_lib.Sizes.from_config(cfg, frames=args.frames, text_len=args.text_len)
  analytic = flops_lib.train_step_per_sample(sizes, vtc=True, vtm=bool(weights["vtm"]),
                                             mlm=bool(weights["mlm"]))
  result["analytic_flops_per_sample"] = analytic["train"]

  # State (sharded, as the train loop creates it) and device-resident batches.
  tx = optimizer_lib.make_optimizer(cfg_optimizer(), total_steps=1000)
  schedule = optimizer_lib.make_schedule(cfg_optimizer(), 1000)
  abstract = state_lib.abstract_state(cfg, tx, 0)
  shardings = state_lib.state_shardings(abstract, mesh)
  graphdef, _ = abstract_params(cfg)
  t0 = time.perf_counter()
  if args.init == "real":
    state = state_lib.create_sharded_state(cfg, tx, 0, shardings)
  else:
    params = jax.device_put(synthetic_params(abstract["params"]), shardings["params"])
    state = {
        "params": params,
        "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
        "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
        "rng": jax.device_put(jax.random.key_data(jax.random.key(17, impl=state_lib.PRNG_IMPL)),
                              shardings["rng"]),
    }
  jax.block_until_ready(state)
  result["init_s"] = time.perf_counter() - t0
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  result["params"] = n_params

  make_batch = jax.jit(synthetic_batch_fn(global_batch, args.frames, args.image_size,
                                          args.text_len, special_ids),
                       out_shardings=sharding_lib.batch_sharding(mesh))
  batches = [make_batch(jax.random.key(i)) for i in range(2)]
  jax.block_until_ready(batches)

  step_fn = step_lib.jit_train_step(
      step_lib.make_train_step(graphdef, tx, loss_weights=weights, special_ids=special_ids,
                                temp_bounds=(cfg.temp_min, cfg.temp_max), lr_schedule=schedule),
      shardings, mesh)

  # Compile ahead of time (jit reuses this executable on the first call).
  compiles_before = counter.count
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batches[0])
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  result["lower_s"] = t1 - t0
  result["compile_s"] = t2 - t1
  result["compiles_for_step"] = counter.count - compiles_before
  xla_flops = cost_flops(compiled)
  result["xla_flops_per_sample"] = None if xla_flops is None else xla_flops / args.batch
  # cost_analysis is per device program: the per-device batch is its denominator.
  if xla_flops:
    result["xla_over_analytic"] = (xla_flops / args.batch) / analytic["train"]
  result.update(memory_summary(compiled))
  limit = device_memory_stats()["device_bytes_limit"]
  fits = None
  if limit and result["compiled_total_bytes"]:
    fits = result["compiled_total_bytes"] <= limit
  result["fits_predicted"] = fits
  print(f"[train_step] lower {result['lower_s']:.1f} s, compile {result['compile_s']:.1f} s; "
        f"compiled memory/device {gib(result['compiled_total_bytes'])} "
        f"(temp {gib(result['compiled_temp_bytes'])}, "
        f"args {gib(result['compiled_argument_bytes'])}); "
        f"device limit {gib(limit)}", flush=True)

  if args.json_out and not args.compile_only:
    # A record of the compile alone, in case the run is killed (timeout, OOM) later on.
    emit({**result, "status": "compiled"}, args.json_out, echo=False)

  if args.compile_only or fits is False:
    result["status"] = "compiled_only" if args.compile_only else "does_not_fit"
    return result

  # Run: warmup, then timed (blocked per step), then pipelined.
  del lowered, compiled
  metrics = None
  first_step_s = None
  for i in range(max(args.warmup, 2)):
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batches[i % 2])
    jax.block_until_ready(metrics["loss"])
    if i == 0:
      first_step_s = time.perf_counter() - t0
  compiles_after_2 = counter.count
  times = []
  usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for i in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batches[i % 2])
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  usage1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  cpu_s = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
  # Host CPU seconds per step, and the share of the machine's cores the process got while
  # stepping: on a CPU backend below ~1 means other jobs held the cores.
  result["cpu_s_per_step"] = cpu_s / max(1, args.steps)
  result["cpu_busy"] = cpu_s / ((wall1 - wall0) * (os.cpu_count() or 1))
  t0 = time.perf_counter()
  for i in range(args.steps):
    state, metrics = step_fn(state, batches[i % 2])
  jax.block_until_ready((state, metrics))
  pipelined = (time.perf_counter() - t0) / max(1, args.steps)
  result["recompiles_after_step2"] = counter.count - compiles_after_2
  cache_size = getattr(step_fn, "_cache_size", None)
  result["jit_cache_size"] = cache_size() if callable(cache_size) else None
  loss = float(np.asarray(metrics["loss"]))
  result["loss"] = loss
  result["loss_finite"] = math.isfinite(loss)

  median = statistics.median(times)
  result.update(first_step_s=first_step_s, step_s_median=median, step_s_min=min(times),
                step_s_max=max(times), step_s_pipelined=pipelined,
                samples_per_s=global_batch / median)
  result.update(device_memory_stats())
  peak, peak_note = peak_tflops_per_device(cfg.dtype)
  achieved = analytic["train"] * global_batch / median / n_dev / 1e12
  result["model_tflops_per_device"] = achieved
  result["peak_tflops_per_device"] = peak
  result["peak_source"] = peak_note
  result["mfu"] = achieved / peak if peak else None
  if result["xla_flops_per_sample"]:
    hw = result["xla_flops_per_sample"] * global_batch / median / n_dev / 1e12
    result["xla_tflops_per_device"] = hw
    result["hfu_xla"] = hw / peak if peak else None
  if args.profile:
    # A few more steps under the profiler: where the device time goes, by kernel.
    import tempfile  # noqa: PLC0415
    import kernel_profile  # noqa: PLC0415
    trace_dir = tempfile.mkdtemp(prefix="t2v2t_trace_")
    with jax.profiler.trace(trace_dir):
      for i in range(args.profile):
        state, metrics = step_fn(state, batches[i % 2])
      jax.block_until_ready((state, metrics))
    result["profile"] = kernel_profile.summarize(trace_dir, steps=args.profile)
    print(kernel_profile.format_summary(result["profile"], median * 1e3), flush=True)
  result["load_after"] = load_str()
  result["status"] = "ok" if result["loss_finite"] and result["recompiles_after_step2"] == 0 else (
      "non_finite_loss" if not result["loss_finite"] else "recompiled")
  return result


def cfg_optimizer():
  from t2v2t_jax.training.optimizer import optimizer_config  # noqa: PLC0415
  return optimizer_config()


def report(r: dict) -> None:
  if r.get("status") not in ("ok", "recompiled", "non_finite_loss"):
    return
  a, x = r["analytic_flops_per_sample"], r.get("xla_flops_per_sample")
  print(f"[train_step] step {r['step_s_median'] * 1e3:.1f} ms median "
        f"(min {r['step_s_min'] * 1e3:.1f}, max {r['step_s_max'] * 1e3:.1f}; pipelined "
        f"{r['step_s_pipelined'] * 1e3:.1f} ms; first call {r['first_step_s']:.2f} s), "
        f"{r['samples_per_s']:.1f} samples/s, loss {r['loss']:.4f}; host CPU "
        f"{r['cpu_s_per_step']:.2f} s/step, busy {r['cpu_busy']:.2f} of {os.cpu_count()} cores",
        flush=True)
  xs = "n/a" if x is None else f"{x / 1e9:,.2f}"
  ratio = "n/a" if x is None else f"{x / a:.3f}"
  print(f"[train_step] FLOPs/sample: analytic {a / 1e9:,.2f} G, XLA {xs} G (XLA/analytic "
        f"{ratio})", flush=True)
  mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
  peak = "n/a" if r["peak_tflops_per_device"] is None else f"{r['peak_tflops_per_device']:.3f}"
  print(f"[train_step] {r['model_tflops_per_device']:.3f} model TFLOP/s per device, peak {peak} "
        f"({r['peak_source']}), MFU {mfu}", flush=True)
  print(f"[train_step] memory/device: compiled {gib(r['compiled_total_bytes'])}, allocator peak "
        f"{gib(r['device_peak_bytes_in_use'])}; compiles after step 2: "
        f"{r['recompiles_after_step2']} (jit cache size {r['jit_cache_size']}); {r['load_after']}",
        flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  add_model_args(parser)
  parser.add_argument("--mlm", action=argparse.BooleanOptionalAction, default=True,
                      help="include the MLM loss (pretraining); --no-mlm for fine-tuning")
  parser.add_argument("--no-vtm", action="store_true", help="ablation: drop the VTM loss")
  parser.add_argument("--no-dropout", action="store_true",
                      help="ablation: dropout and stochastic depth rates 0 (no RNG masks, "
                           "fused attention everywhere)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 2)")
  parser.add_argument("--profile", type=int, default=0, metavar="N",
                      help="after timing, trace N more steps and print the device time per "
                           "kernel and kind (benchmarks/kernel_profile.py)")
  parser.add_argument("--compile-only", action="store_true",
                      help="compile and report FLOPs/memory without running")
  parser.add_argument("--json-out", help="append the JSON result line to this file")
  args = parser.parse_args(argv)
  resolve_args(args)
  setup_compile_cache(args.compile_cache)
  try:
    result = run(args)
  except Exception as e:  # noqa: BLE001 (an OOM or a failure is a result too)
    traceback.print_exc()
    msg = str(e)
    status = "oom" if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower() else "error"
    result = {"benchmark": "train_step", "status": status, "error": msg[:2000],
              "preset": args.preset, "mode": args.mode, "vision": args.vision, "text": args.text,
              "frames": args.frames, "batch_per_device": args.batch, "dtype": args.dtype,
              "remat": args.remat, "scan_layers": args.scan, "mlm": args.mlm, **device_summary()}
    emit(result, args.json_out)
    return 1
  report(result)
  emit(result, args.json_out)
  return 0 if result["status"] in ("ok", "compiled_only", "does_not_fit") else 2


if __name__ == "__main__":
  sys.exit(main())
