"""Fit planner: compile a recipe's programs for a TPU topology and report its HBM use.

  python main.py --config configs/webvid_pretrain.py --mode compile --config.compile.topology=v5e:2x4
  python main.py --config configs/webvid_pretrain.py --mode compile --config.compile.topology=h100

Runs on any host, without a TPU (libtpu compiles ahead of time; `tpu_topology.py`). It
builds exactly what training builds (the mesh from `config.mesh` over the topology's
chips, the state's shardings, `train_step.make_train_step` + `jit_train_step`) and the
evaluation programs (`RetrievalEvaluator`'s video and text encoders at the recipe's
inference frames and batches, and its rerank scorer at its pair batch), compiles each
and prints one table: per device, parameters, optimizer state, temporaries and total HBM
against the chip's capacity, whether it fits, FLOPs per step and compile time; then each
program's census (`hlo_census`: copies, fusions, reductions, collectives, custom calls and
their bytes, and the roofline time on that chip). A topology may also name one GPU,
`h100` or `h200`, compiled without a GPU through JAX's CUDA plugin (`gpu_topology.py`).
`config.compile.find_max_batch` also finds the largest per-device training batch that
fits: memory is close to linear in the batch, so two compiles give the line and a third
confirms the prediction.

These figures are compiled, not run: they are XLA's own accounting of the program for
that chip, which is what decides whether a run fits, but no step time.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from t2v2t_jax import sharding as sharding_lib
from t2v2t_jax.models import cpu_ops, layer_stack
from t2v2t_jax.models.t2v2t import abstract_params
from t2v2t_jax.training import gpu_topology, hlo_census
from t2v2t_jax.training import optimizer as optimizer_lib
from t2v2t_jax.training import tpu_topology
from t2v2t_jax.training import train_state as state_lib
from t2v2t_jax.training import train_step as step_lib

GIB = 2 ** 30


@dataclasses.dataclass
class ProgramReport:
  """One compiled program's per-device memory (bytes) and cost.

  `compiled` is False when the TPU compiler refused the program for lack of HBM; its
  `temp_bytes` is then the temporaries the compiler named when it gave up, and
  `total_bytes` that plus the state's share. That figure is where the compiler stopped, not
  what the program needs: it is not monotonic in the batch (paper-size pretraining on one
  v5e chip was refused at 96 clips naming 16.87G, on 8 chips at 64 naming 19.84G).
  """
  name: str
  batch_per_device: int
  params_bytes: int
  opt_state_bytes: int
  temp_bytes: int
  total_bytes: int
  flops_per_device: float | None
  compile_s: float
  compiled: bool = True
  census: dict | None = None     # hlo_census.census of the compiled program

  def fits(self, capacity: int | None) -> bool | None:
    if not self.compiled:
      return False
    return None if capacity is None else self.total_bytes <= capacity


def _shard_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` (abstract leaves) under `shardings`."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shape = sharding.shard_shape(leaf.shape) if leaf.shape else ()
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


class OutOfMemory(Exception):
  def __init__(self, needed: int, available: int):
    super().__init__(f"needs {needed / GIB:.2f} GiB of {available / GIB:.2f} GiB")
    self.needed, self.available = needed, available


def _compile(lowered, compiler_options: dict | None = None):
  try:
    return lowered.compile(compiler_options=compiler_options) if compiler_options \
        else lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    parsed = tpu_topology.parse_out_of_memory(str(e)) if "RESOURCE_EXHAUSTED" in str(e) else None
    if parsed is None:
      raise
    raise OutOfMemory(*parsed) from e


def _compiled_report(name, batch, lowered, params_bytes, opt_bytes, t0, *,
                     chip: str | None = None,
                     compiler_options: dict | None = None) -> ProgramReport:
  """Compiles `lowered` and reports it; `chip`: the `hlo_census.CHIPS` key for the roofline."""
  try:
    compiled = _compile(lowered, compiler_options)
  except OutOfMemory as oom:
    # The compiler's figure counts temporaries only; the state's share comes on top.
    params_bytes = params_bytes or 0
    return ProgramReport(name, batch, params_bytes, opt_bytes, oom.needed,
                         oom.needed + params_bytes + opt_bytes, None,
                         time.perf_counter() - t0, compiled=False)
  compile_s = time.perf_counter() - t0
  census = hlo_census.census(compiled, chip=chip)
  mem = compiled.memory_analysis()
  if params_bytes is None:
    params_bytes = int(mem.argument_size_in_bytes)
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost["flops"]) if cost and "flops" in cost else None
  return ProgramReport(name, batch, params_bytes, opt_bytes, int(mem.temp_size_in_bytes),
                       int(total), flops, compile_s, census=census)


def special_ids(vocab_size: int) -> dict:
  """BERT-uncased special tokens ([PAD] 0, [CLS] 101, [MASK] 103); constants of the step,
  so a compile needs no tokenizer file."""
  if vocab_size > 103:
    return {"cls": 101, "pad": 0, "mask": 103, "vocab_size": vocab_size}
  return {"cls": 1, "pad": 0, "mask": 2, "vocab_size": vocab_size}


class Planner:
  """Compiles one recipe's programs on a mesh over `devices`.

  Every program is traced with the portable forms of the model's ops (`cpu_ops`): JAX's
  backend on this host is the CPU, but the programs are for the TPU, and must be the ones
  a TPU run traces.
  """

  @cpu_ops.portable_forms()
  def __init__(self, config, devices):
    self.config = config
    self.devices = devices
    self.mesh = sharding_lib.make_mesh(config.mesh, devices=devices)
    # A program fits when its total is within the usable HBM (the compiler's own check is on
    # the temporaries alone: it accepted a v5e program of 18.05 GiB in all).
    self.capacity = (gpu_memory_bytes(devices[0]) if devices[0].platform == "gpu"
                     else tpu_topology.usable_hbm_bytes(devices[0]))
    self.tx = optimizer_lib.make_optimizer(config.optimizer, total_steps=1000)
    self.abstract = state_lib.abstract_state(config.model, self.tx, config.seed)
    self.shardings = state_lib.state_shardings(self.abstract, self.mesh, config.mesh.fsdp_min_size)
    self.graphdef, _ = abstract_params(config.model)
    self.params_bytes = _shard_bytes(self.abstract["params"], self.shardings["params"])
    self.opt_bytes = _shard_bytes(self.abstract["opt_state"], self.shardings["opt_state"])
    # The census's roofline chip, and the GPU targets' compiler options (gpu_topology).
    self.chip = hlo_census.chip_for_device_kind(devices[0].device_kind)
    self.compiler_options = (gpu_topology.COMPILER_OPTIONS if devices[0].platform == "gpu"
                             else None)

  # -- training ---------------------------------------------------------------------------
  @cpu_ops.portable_forms()
  def train_step(self, batch_per_device: int) -> ProgramReport:
    c = self.config
    b = batch_per_device * self.mesh.size
    # The objective's settings as training takes them (protocol, negative groups), so
    # that the planned program is the one that runs.
    try:
      settings = step_lib.objective_settings(c, b, self.mesh)
    except ValueError:
      if b == c.batch_size:
        raise
      # A candidate of the batch search (find_max_batch) that the recipe's VTM negative
      # groups do not divide: compiled with negatives from the whole batch, which needs at
      # least the memory of per-group ones (every clip's video tokens on every chip), so
      # the search errs on the safe side.
      single = c.copy_and_resolve_references()
      single.protocol, single.vtm_negatives = "global", "global"
      settings = step_lib.objective_settings(single, b, self.mesh)
    step = step_lib.jit_train_step(
        step_lib.make_train_step(
            self.graphdef, self.tx, special_ids=special_ids(c.model.text.vocab_size),
            temp_bounds=(c.model.temp_min, c.model.temp_max), **settings),
        self.shardings, self.mesh)
    size = c.model.vision.image_size
    batch_sh = sharding_lib.batch_sharding(self.mesh)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
    batch = {"frames": sds((b, c.num_frames, size, size, 3), jnp.uint8),
             "input_ids": sds((b, c.data.max_len), jnp.int32),
             "attention_mask": sds((b, c.data.max_len), jnp.int32),
             "video_idx": sds((b,), jnp.int32)}
    t0 = time.perf_counter()
    lowered = step.lower(sharding_lib.with_shardings(self.abstract, self.shardings), batch)
    return _compiled_report(f"train step ({c.num_frames} frames)", batch_per_device, lowered,
                            self.params_bytes, self.opt_bytes, t0, chip=self.chip,
                            compiler_options=self.compiler_options)

  # -- evaluation -------------------------------------------------------------------------
  @cpu_ops.portable_forms()
  def eval_programs(self) -> list[ProgramReport]:
    from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator  # noqa: PLC0415
    c, n = self.config, self.mesh.size
    evaluator = RetrievalEvaluator(self.graphdef, self.mesh, k=c.eval.k,
                                   rerank_batch_size=c.eval.rerank_batch_size,
                                   text_batch_size=c.eval.text_batch_size, progress=False)
    params = sharding_lib.with_shardings(self.abstract["params"], self.shardings["params"])
    batch_sh = sharding_lib.batch_sharding(self.mesh)
    rep = sharding_lib.replicated(self.mesh)
    sds = lambda shape, dtype, sh=batch_sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    size, frames = c.model.vision.image_size, c.eval.num_frames
    tokens_per_frame = 1 + (size // c.model.vision.patch_size) ** 2
    width, dtype = c.model.text.width, jnp.dtype(c.model.dtype)
    video_batch = max(n, (c.eval.video_batch_size // n) * n)
    pairs = evaluator.rerank_batch_size
    slots = pairs // evaluator.texts_per_slot(c.model.fusion.mode)
    # The scorer's largest shape: the most distinct videos a batch sends.
    videos = evaluator.videos_sent(evaluator.videos_per_batch)
    programs = [
        (f"video encoder ({frames} frames)", video_batch // n, evaluator._encode_video,
         (params, sds((video_batch, frames, size, size, 3), jnp.uint8))),
        ("text encoder", evaluator.text_batch_size // n, evaluator._encode_text,
         (params, sds((evaluator.text_batch_size, c.data.max_len), jnp.int32),
          sds((evaluator.text_batch_size, c.data.max_len), jnp.int32))),
        (f"rerank scorer ({pairs} pairs, {videos} videos)", pairs // n, evaluator._score_pairs,
         (params, sds((pairs, c.data.max_len, width), dtype),
          sds((pairs, c.data.max_len), jnp.int32),
          sds((videos, frames, tokens_per_frame, c.model.vision.width), jnp.float16, rep),
          sds((slots,), jnp.int32))),
    ]
    reports = []
    for name, per_device, fn, args in programs:
      t0 = time.perf_counter()
      lowered = fn.lower(*args)
      # jit drops the parameters a program does not use (the video encoder holds no text
      # layers): its own argument bytes stand in the params column.
      reports.append(_compiled_report(name, per_device, lowered, None, 0, t0, chip=self.chip,
                                      compiler_options=self.compiler_options))
    return reports

  # -- the largest batch that fits ----------------------------------------------------------
  def find_max_batch(self, known: dict[int, ProgramReport], *, log=print,
                     max_compiles: int = 8, max_batch: int = 1024) -> int | None:
    """Largest per-device training batch whose step fits the chip (None: not even 1).

    Grows the batch (along the measured memory line, at most 4x a compile) while it fits,
    halves it while nothing fits, then bisects between the largest batch that fits and
    the smallest that does not. A refused compile is quick (the compiler stops when it
    runs out of HBM) and still measures what it needed. At most `max_compiles` compiles
    beyond those in `known` (reports by per-device batch; extended) and no batch above
    `max_batch`.
    """
    if self.capacity is None:
      raise tpu_topology.TopologyError(
          f"HBM capacity of {self.devices[0].device_kind!r} is unknown: cannot search a batch")
    cap = self.capacity

    def at(b):
      if b not in known:
        log(f"  compiling the train step at {b} per device ...")
        known[b] = self.train_step(b)
        r = known[b]
        if r.compiled:
          log(f"  {b} per device: {r.total_bytes / GIB:.2f} GiB, "
              f"{'fits' if r.fits(cap) else 'does not fit'} ({r.compile_s:.0f} s)")
        else:
          log(f"  {b} per device: refused, out of HBM ({r.compile_s:.0f} s)")
      return known[b]

    b0 = min(known) if known else 8
    at(b0)
    for _ in range(max_compiles):
      fit = [b for b, r in known.items() if r.fits(cap)]
      over = [b for b, r in known.items() if not r.fits(cap)]
      lo, hi = max(fit, default=0), min(over, default=None)
      if hi is not None and hi - lo <= 1:
        break
      if lo == 0:
        guess = max(1, hi // 2)   # nothing fits yet: halve
      elif hi is not None:
        # Bisect the bracket. Near the capacity the compiler rematerialises and spills to
        # make a program fit, so memory stops being linear in the batch there (measured:
        # paper-size pretraining on v5e took 15.66 GiB at 40 per chip, 15.59 at 41).
        guess = (lo + hi) // 2
      else:
        if lo >= max_batch:
          break
        # Everything so far fits: follow the line through the two largest compiled
        # batches, growing at most 4x per compile (a far extrapolation can be wildly off
        # and costly to compile, in host memory and time).
        compiled = sorted(b for b, r in known.items() if r.compiled)
        guess = 2 * lo
        if len(compiled) >= 2:
          (b1, m1), (b2, m2) = [(b, known[b].total_bytes) for b in compiled[-2:]]
          slope = (m2 - m1) / (b2 - b1)
          if slope > 0:
            guess = int((cap - (m1 - slope * b1)) // slope)
        guess = min(max(guess, lo + 1), 4 * lo, max_batch)
      if guess in known:
        break
      at(guess)
    return max((b for b, r in known.items() if r.fits(cap)), default=None)


def format_table(reports: list[ProgramReport], capacity: int | None) -> str:
  cap = "unknown" if capacity is None else f"{capacity / GIB:.2f}"
  head = (f"{'program':<40} {'batch/dev':>9} {'params':>7} {'opt st':>7} {'temps':>7} "
          f"{'total':>7} {'fits ' + cap + ' GiB':>15} {'TFLOP/dev':>10} {'compile s':>9}")
  lines = [head, "-" * len(head)]
  for r in reports:
    fits = r.fits(capacity)
    verdict = ("-" if fits is None else "yes" if fits else
               "NO (refused)" if not r.compiled else "NO (total)")
    total = f"{r.total_bytes / GIB:>7.2f}" if r.compiled else f"{'-':>7}"
    params = (f"{'-':>7}" if not r.compiled and not r.params_bytes
              else f"{r.params_bytes / GIB:>7.2f}")   # a refused evaluation program
    flops = "-" if r.flops_per_device is None else f"{r.flops_per_device / 1e12:.2f}"
    lines.append(
        f"{r.name:<40} {r.batch_per_device:>9} {params} "
        f"{r.opt_state_bytes / GIB:>7.2f} {r.temp_bytes / GIB:>7.2f} {total} "
        f"{verdict:>15} {flops:>10} {r.compile_s:>9.0f}")
  lines.append("(GiB per device; params and opt st: the train state's share (evaluation "
               "programs: their arguments, the parameters they use and the batch); temps: "
               "XLA's temporaries; total = arguments + outputs - aliased + temporaries + code; "
               "NO (refused): the compiler ran out of HBM (temps: what it named when it gave up, "
               "not the program's need); NO (total): compiled, but its total exceeds the usable "
               "HBM (the compiler's own check, temporaries alone against it, is looser); "
               "TFLOP/dev: XLA's count, which takes a scanned layer stack's body once, so with "
               "scan_layers on it is a lower bound: benchmarks/flops.py gives the model's count)")
  return "\n".join(lines)


def gpu_memory_bytes(device) -> int | None:
  """Device memory of a compile-only GPU (the target's description)."""
  for spec in gpu_topology.SPECS.values():
    if spec.name == device.device_kind:
      return spec.memory_bytes
  return None


def target_devices(name: str) -> list:
  """The devices of `name`: a TPU topology ('v5e:2x4') or one GPU ('h100', 'h200')."""
  if name in gpu_topology.SPECS:
    return gpu_topology.gpu_devices(name)
  return tpu_topology.topology_devices(name)


def format_censuses(reports: list[ProgramReport]) -> str:
  return "\n\n".join(hlo_census.format_census(r.census, r.name) for r in reports
                     if r.census is not None)


def plan(config, *, log=print) -> dict:
  """Compiles the recipe for `config.compile.topology`; prints and returns the results."""
  c = config
  devices = target_devices(c.compile.topology)
  platform = devices[0].platform
  n = len(devices)
  if c.batch_size % n:
    raise ValueError(f"batch_size={c.batch_size} does not divide over the {n} chips of "
                     f"{c.compile.topology}: set --config.batch_size to a multiple of {n}")
  # 'auto' layer scanning is decided for the target chip, not for this host.
  c.model.scan_layers = "on" if layer_stack.resolve_scan(c.model.get("scan_layers", "auto"),
                                                         platform) else "off"
  planner = Planner(c, devices)
  hosts = len({d.process_index for d in devices})
  capacity = planner.capacity
  log(f"Compiling for {c.compile.topology}: {n} x {devices[0].device_kind} on {hosts} "
      f"host(s), mesh {dict(planner.mesh.shape)}, "
      f"{'unknown' if capacity is None else f'{(tpu_topology.hbm_bytes(devices[0]) or capacity) / GIB:.0f} GiB'} "
      f"HBM per chip ({'unknown' if capacity is None else f'{capacity / GIB:.2f}'} usable); "
      f"model {c.model.vision.variant} + {c.model.text.variant}, {c.model.fusion.mode}, "
      f"{c.model.dtype}, remat {c.model.remat}, scan_layers {c.model.scan_layers}")
  per_device = c.batch_size // n
  log(f"  compiling the train step at {per_device} per device (global batch {c.batch_size}) ...")
  train = planner.train_step(per_device)
  known = {per_device: train}
  reports = [train]
  if c.compile.eval_programs:
    log("  compiling the evaluation programs ...")
    reports += planner.eval_programs()
  max_batch = None
  if c.compile.find_max_batch:
    log("  searching the largest per-device batch that fits ...")
    max_batch = planner.find_max_batch(known, log=log)
    if max_batch is not None and max_batch != per_device:
      reports.append(known[max_batch])
      reports[-1].name = "train step, largest batch that fits"
  log(format_table(reports, capacity))
  log("")
  log(format_censuses(reports))
  if c.compile.find_max_batch:
    if max_batch is None:
      log("Largest per-device batch that fits: none (even 1 clip per chip does not fit)")
    else:
      log(f"Largest per-device batch that fits: {max_batch} (global {max_batch * n})")
  if capacity is not None and not train.fits(capacity):
    log("The recipe's step does not fit: lower the per-device batch and restore the global "
        "batch with --config.optimizer.grad_accum_steps (see find_max_batch).")
  result = {"topology": c.compile.topology, "chips": n, "hosts": hosts,
            "device_kind": devices[0].device_kind,
            "hbm_bytes": tpu_topology.hbm_bytes(devices[0]), "usable_hbm_bytes": capacity,
            "batch_size": c.batch_size, "num_frames": c.num_frames,
            "mode": c.model.fusion.mode, "dtype": c.model.dtype, "remat": c.model.remat,
            "scan_layers": c.model.scan_layers, "mesh": dict(planner.mesh.shape),
            "programs": [dataclasses.asdict(r) for r in reports],
            "max_batch_per_device": max_batch, "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d")}
  if c.compile.get("json_out"):
    with open(c.compile.json_out, "a") as f:
      f.write(json.dumps(result) + "\n")
  return result
