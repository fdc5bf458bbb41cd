"""Applying a stack of identical layers: unrolled or scanned, with a remat policy.

The video encoder (12 BEiT layers), the text encoder (9 BERT layers) and the fusion
encoder (3 layers) are stacks of layers with the same structure. Unrolled, XLA compiles
every layer's forward and backward pass separately: at paper size that made the train
step take 181 s to compile on an H200 and 21 minutes for a TPU v5e on a 2-core host.
Scanned (`jax.lax.scan` over the layers' parameters stacked on a leading axis), XLA
compiles one layer body per stack, whatever the depth.

DECISION: the parameters stay stored per layer (`layers.{i}.*`, as Hugging Face, VindLU,
the importers, exporters, sharding rules and saved checkpoints expect) and are stacked
inside the jitted step, at each call. The stack is one copy of the stack's parameters per
step (0.34 GB in float32 for the B/16 video encoder: ~0.1 ms of HBM bandwidth on an
H100), and its gradient is sliced back per layer by XLA. Storing them stacked (MaxText's
`scan_layers`) would save that copy but change every parameter path in the project.

Scanning is not free everywhere (`model.scan_layers`, resolved by `resolve_scan`):
  'auto'  scanned on TPU, unrolled on GPU and CPU. On TPU a scanned stack is the standard
          form (MaxText) and what makes the paper's batches fit a 16 GB chip (docs/
          benchmarks.md, TPU). On an H200 the scanned paper-size train step compiled in
          97 s instead of 181 s but stepped 24% slower (191 vs 155 ms; the loop's
          device-to-device copies) and needed 38 instead of 31 GiB. On a 2-core CPU,
          measured in one process, interleaved (2026-11-28): the unrolled step took 14%
          less time than the scanned one at the TARGETS.md small size (0.741 vs 0.866 s,
          compile 32 vs 22 s) and in the CPU demo (0.214 vs 0.250 s, compile 20 vs 22 s),
          and paper-size video embedding 6% less (3.53 vs 3.75 s per 16 frames): the loop
          fills, writes and reads stacked residual buffers every step.
  'on' / 'off'  always / never.

Remat policies (`model.remat`), applied per layer:
  'none'       keep every activation for the backward pass (fastest, most memory);
  'full'       keep only each layer's input, recompute the layer in the backward pass;
  'save_dots'  keep the outputs of matrix products without batch dimensions (the dense
               projections), recompute the rest (LayerNorm, GELU, softmax, dropout
               masks): most of the memory saving of 'full' at a fraction of its recompute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = ("none", "full", "save_dots")


def keys_after(keys, inputs):
  """`keys` (PRNG keys), made available to XLA only once `inputs` are computed.

  Why: a random-bit generator's only operand is its key, so XLA may run it anywhere before
  its use. In the paper-size pretraining step for a v5e chip (64 clips), libtpu ran every
  dropout draw of the T2V block (VTM and MLM passes) before the video encoder and held the
  bits (uint32, 2.9 GB) across it, at the step's peak (the compiled buffer live ranges:
  docs/benchmarks.md, TPU). An optimization barrier over (keys, the layer's inputs) keeps
  each draw after the inputs of the layer that uses it; the values are unchanged.
  """
  keys, _ = jax.lax.optimization_barrier((keys, inputs))
  return keys


def normalize_remat(remat) -> str:
  """`model.remat` as a policy name; the booleans of older configs mean 'full' / 'none'."""
  if remat is True:
    return "full"
  if remat is False or remat is None:
    return "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat={remat!r} is not one of {list(REMAT_POLICIES)} "
                     f"(or a boolean: True = 'full', False = 'none')")
  return remat


SCAN_SETTINGS = ("auto", "on", "off")


def resolve_scan(setting, platform: str | None = None) -> bool:
  """`model.scan_layers` for a platform ('cpu', 'gpu', 'tpu'; default: JAX's backend)."""
  if setting is True or setting == "on":
    return True
  if setting is False or setting == "off":
    return False
  if setting != "auto":
    raise ValueError(f"model.scan_layers={setting!r} is not one of {list(SCAN_SETTINGS)}")
  platform = platform or jax.default_backend()
  return platform == "tpu"


def checkpoint_policy(remat: str):
  """The `jax.checkpoint` policy of a remat name (None: save nothing but the inputs)."""
  if remat == "save_dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return None


def apply_layers(layers: Sequence[nnx.Module], fn: Callable, carry, *, per_layer=(),
                 rngs: nnx.Rngs | None, remat: str = "none", scan: bool = True,
                 outputs: bool = False):
  """`carry = fn(layer, carry, *per_layer[i], rngs)` for every layer, in order.

  Args:
    layers: modules of one structure (the same graph definition; checked when scanning).
    fn: `(layer, carry, *xs, rngs) -> carry`; `carry` is an array or a pytree of arrays.
      Python values `fn` needs for every layer (flags, shapes) belong in its closure.
    per_layer: a tuple of sequences, one value per layer each (e.g. drop-path rates); when
      scanning they are stacked into arrays and `fn` receives traced scalars.
    rngs: the caller's `nnx.Rngs` or None (deterministic). Each layer gets its own
      `nnx.Rngs(dropout=key)`, the keys split from one draw of `rngs.dropout()`.
    remat: a policy of `REMAT_POLICIES`.
    scan: `jax.lax.scan` over the stacked parameters (one compiled body); False unrolls.
    outputs: `fn` returns `(carry, output)`; the outputs of all layers are returned too
      (e.g. every layer's hidden state, or attention weights for inspection).

  Returns:
    carry, or (carry, [output of layer 0, output of layer 1, ...]) with `outputs`.
  """
  layers = list(layers)
  n = len(layers)
  remat = normalize_remat(remat)
  per_layer = tuple(tuple(values) for values in per_layer)
  for values in per_layer:
    if len(values) != n:
      raise ValueError(f"per_layer values: {len(values)} for {n} layers")
  policy = checkpoint_policy(remat)
  keys = None
  if rngs is not None and n:
    keys = jax.random.split(rngs.dropout(), n)

  def layer_rngs(key):
    return None if key is None else nnx.Rngs(dropout=key)

  if not scan or n <= 1:
    def make_call(layer_xs):
      # Per-layer values stay Python constants here: closed over, not arguments (nnx.remat
      # would trace them, and a default argument would be bound as an argument too).
      def call(layer, c, key):
        return fn(layer, c, *layer_xs, layer_rngs(key))
      return call if remat == "none" else nnx.remat(call, policy=policy)

    outs = []
    for i, layer in enumerate(layers):
      call = make_call(tuple(v[i] for v in per_layer))
      key = None if keys is None else keys_after(keys[i], carry)
      result = call(layer, carry, key)
      if outputs:
        carry, out = result
        outs.append(out)
      else:
        carry = result
    return (carry, outs) if outputs else carry

  graphdef, first_state = nnx.split(layers[0])
  states = [first_state]
  for i, layer in enumerate(layers[1:], start=1):
    g, s = nnx.split(layer)
    if g != graphdef:
      raise ValueError(f"layer {i} differs in structure from layer 0: it cannot be scanned "
                       f"(set model.scan_layers=False)")
    states.append(s)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  xs = tuple(jnp.asarray(v) for v in per_layer)

  def body(c, inputs):
    state, key, layer_xs = inputs
    layer = nnx.merge(graphdef, state)
    result = fn(layer, c, *layer_xs, layer_rngs(key))
    return result if outputs else (result, None)

  if remat != "none":
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  if keys is not None:
    keys = keys_after(keys, carry)   # every layer's key, after the stack's input
  carry, stacked_outs = jax.lax.scan(body, carry, (stacked, keys, xs))
  if not outputs:
    return carry
  return carry, [jax.tree.map(lambda o, i=i: o[i], stacked_outs) for i in range(n)]


def apply_layer(layer: nnx.Module, fn: Callable, *args, rngs: nnx.Rngs | None,
                remat: str = "none"):
  """`fn(layer, *args, rngs)` for one layer, under the remat policy (not scanned).

  The layer draws from `nnx.Rngs(dropout=key)`, one key drawn from `rngs` and tied to
  `args` (`keys_after`)."""
  remat = normalize_remat(remat)
  def call(layer, key, *a):
    return fn(layer, *a, None if key is None else nnx.Rngs(dropout=key))
  if remat != "none":
    call = nnx.remat(call, policy=checkpoint_policy(remat))
  key = None if rngs is None else keys_after(rngs.dropout(), args)
  return call(layer, key, *args)
