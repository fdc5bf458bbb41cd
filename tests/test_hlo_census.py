"""hlo_census: the census of optimized HLO text, the roofline, and the GPU target config."""

import os

import jax
import jax.numpy as jnp
import pytest

from t2v2t_jax.training import gpu_topology, hlo_census

# A hand-written optimized module in XLA's text format (as `compiled.as_text()` prints it):
# a loop of 12 iterations whose body slices one layer's weight out of a stacked buffer,
# runs a cuBLAS GEMM, a transposing copy fusion and a reduction fusion, and an all-reduce;
# outside the loop an unfused copy and a cuDNN custom call.
MODULE = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[12,64,32]{2,1,0}, f32[16,64]{1,0})->f32[16,32]{1,0}}

%slice_fusion (param_0: f32[12,64,32], param_1: s32[]) -> f32[64,32] {
  %param_0 = f32[12,64,32]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  %ds = f32[1,64,32]{2,1,0} dynamic-slice(%param_0, %param_1, %c0, %c0), dynamic_slice_sizes={1,64,32}
  ROOT %bc = f32[64,32]{1,0} bitcast(%ds)
}

%transpose_fusion (param_0.1: f32[16,32]) -> f32[32,16] {
  %param_0.1 = f32[16,32]{1,0} parameter(0)
  ROOT %t = f32[32,16]{1,0} transpose(%param_0.1), dimensions={1,0}
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%reduce_fusion (param_0.2: f32[32,16]) -> f32[32] {
  %param_0.2 = f32[32,16]{1,0} parameter(0)
  %z = f32[] constant(0)
  ROOT %r = f32[32]{0} reduce(%param_0.2, %z), dimensions={1}, to_apply=%add
}

%body (arg: (s32[], f32[16,64], f32[12,64,32], f32[16,32])) -> (s32[], f32[16,64], f32[12,64,32], f32[16,32]) {
  %arg = (s32[], f32[16,64]{1,0}, /*index=2*/f32[12,64,32]{2,1,0}, f32[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = f32[16,64]{1,0} get-tuple-element(%arg), index=1
  %w = f32[12,64,32]{2,1,0} get-tuple-element(%arg), index=2
  %wi = f32[64,32]{1,0} fusion(%w, %i), kind=kLoop, calls=%slice_fusion
  %gemm = (f32[16,32]{1,0}, s8[4194304]{0}) custom-call(%x, %wi), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %y = f32[16,32]{1,0} get-tuple-element(%gemm), index=0
  %yt = f32[32,16]{1,0} fusion(%y), kind=kLoop, calls=%transpose_fusion
  %red = f32[32]{0} fusion(%yt), kind=kInput, calls=%reduce_fusion
  %ar = f32[16,32]{1,0} all-reduce(%y), replica_groups={}, to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[16,64]{1,0}, f32[12,64,32]{2,1,0}, f32[16,32]{1,0}) tuple(%next, %x, %w, %ar)
}

%cond (arg.1: (s32[], f32[16,64], f32[12,64,32], f32[16,32])) -> pred[] {
  %arg.1 = (s32[], f32[16,64]{1,0}, f32[12,64,32]{2,1,0}, f32[16,32]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%arg.1), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (w.1: f32[12,64,32], x.1: f32[16,64]) -> f32[16,32] {
  %w.1 = f32[12,64,32]{2,1,0} parameter(0)
  %x.1 = f32[16,64]{1,0} parameter(1)
  %xc = f32[16,64]{0,1} copy(%x.1)
  %zero = s32[] constant(0)
  %init = f32[16,32]{1,0} constant({...})
  %t0 = (s32[], f32[16,64]{1,0}, f32[12,64,32]{2,1,0}, f32[16,32]{1,0}) tuple(%zero, %xc, %w.1, %init)
  %loop = (s32[], f32[16,64]{1,0}, f32[12,64,32]{2,1,0}, f32[16,32]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"},"known_init_step":{"init":"0","step":"1"}}
  %res = f32[16,32]{1,0} get-tuple-element(%loop), index=3
  %fmha = (f32[16,32]{1,0}, u8[0]{0}) custom-call(%res), custom_call_target="__cudnn$fmhaSoftmax"
  ROOT %o = f32[16,32]{1,0} get-tuple-element(%fmha), index=0
}
"""

F32 = 4


def test_census_counts_every_loop_iteration_and_each_kind():
  c = hlo_census.census_from_text(MODULE)
  assert c["loops"] == 1 and c["loops_without_trip_count"] == 0
  cats = c["categories"]
  # The GEMM runs 12 times: 2 x 16 x 32 x 64 FLOPs each.
  assert c["matmul_flops"] == 12 * 2 * 16 * 32 * 64
  gemm_bytes = (16 * 64 + 64 * 32 + 16 * 32) * F32   # operands and product, not the workspace
  assert cats["matmul"] == {"count": 12, "bytes": 12 * gemm_bytes}
  assert c["custom_calls"]["__cublas$gemm"]["count"] == 12
  assert c["custom_calls"]["__cudnn$fmhaSoftmax"] == {"count": 1, "bytes": 2 * 16 * 32 * F32}
  # The transpose fusion only moves data; the reduction fusion reads 32 x 16, writes 32.
  assert cats["layout_fusion"] == {"count": 12, "bytes": 12 * 2 * 16 * 32 * F32}
  assert cats["reduction"] == {"count": 12, "bytes": 12 * (32 * 16 + 32) * F32}
  assert cats["copy"] == {"count": 1, "bytes": 2 * 16 * 64 * F32}
  # The slicing fusion reads one layer's weight, not the stacked buffer.
  assert cats["elementwise_fusion"] == {"count": 12, "bytes": 12 * (2 * 64 * 32 * F32 + 4)}
  assert c["fusions_by_kind"]["loop"]["count"] == 24
  assert c["fusions_by_kind"]["input"]["count"] == 12
  assert c["collectives"]["all-reduce"] == {"count": 12, "bytes": 12 * 16 * 32 * F32}
  # The loop counter's add, 12 times; the condition's compare, 13 times.
  assert c["other_ops"]["add"]["count"] == 12 and c["other_ops"]["compare"]["count"] == 13
  assert c["kernels"] == 12 * 6 + 13 + 2


def test_trip_count_from_the_condition_else_counted_once_and_said():
  # Without XLA's annotation (XLA:TPU writes none) the condition `i < 12` gives it.
  text = MODULE.replace('"known_trip_count":{"n":"12"},', "")
  c = hlo_census.census_from_text(text)
  assert c["loops_without_trip_count"] == 0 and c["matmul_flops"] == 12 * 2 * 16 * 32 * 64
  # A counter starting at 2 runs 10 times.
  started = text.replace("%zero = s32[] constant(0)", "%zero = s32[] constant(2)")
  assert hlo_census.census_from_text(started)["matmul_flops"] == 10 * 2 * 16 * 32 * 64
  # A condition it cannot read: the body counted once, and said.
  unread = text.replace("direction=LT", "direction=NE")
  c = hlo_census.census_from_text(unread)
  assert c["loops_without_trip_count"] == 1 and c["matmul_flops"] == 2 * 16 * 32 * 64


def test_convolution_flops_skip_the_padding():
  # A patch embedding (16x16 stride 16 over 224 px) and XLA:TPU's batched product written
  # as a convolution over a padded window of 12 (input size 1 there): 12 x fewer products
  # than the window's size.
  types = {"x": "bf16[2,224,224,3]{3,2,1,0}", "k": "bf16[16,16,3,8]{3,2,1,0}",
           "a": "bf16[5,7,64,1]{3,2,1,0}", "w": "bf16[12,64,64,1]{3,2,1,0}"}
  patch = hlo_census.Instr("c", "bf16[2,14,14,8]{3,2,1,0}", "convolution", ["x", "k"],
                           ", window={size=16x16 stride=16x16}, dim_labels=b01f_01io->b01f")
  assert hlo_census._matmul_flops(patch, types) == 2 * (2 * 14 * 14 * 8) * (16 * 16 * 3)
  batched = hlo_census.Instr("c", "bf16[5,7,12,64]{3,2,1,0}", "convolution", ["a", "w"],
                             ", window={size=1x12 pad=0_0x11_11 rhs_reversal=0x1}, "
                             "dim_labels=0bf1_1oi0->0b1f")
  assert hlo_census._matmul_flops(batched, types) == 2 * (5 * 7 * 12 * 64) * 64


def test_shapes_and_bytes():
  assert hlo_census.shape_bytes("bf16[8,128]{1,0:T(8,128)(2,1)}") == 8 * 128 * 2
  assert hlo_census.shape_bytes("(f32[2,3]{1,0}, /*index=1*/s8[10]{0}, pred[])") == 24 + 10 + 1
  assert hlo_census.shape_bytes("s4[16]{0}") == 8
  assert hlo_census.shape_bytes("f8e4m3fn[4,4]{1,0}") == 16


def test_a_compiled_scan_counts_each_layer_where_xla_counts_one():
  layers, n, d = 3, 8, 64

  def loss(w, x):
    y, _ = jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)
    return jnp.sum(y)

  compiled = jax.jit(jax.grad(loss)).lower(jnp.ones((layers, d, d)), jnp.ones((n, d))).compile()
  c = hlo_census.census(compiled, chip="v5e", model_flops=1e6)
  # Forward and two backward products per layer, each 2 n d^2.
  expected = 3 * layers * 2 * n * d * d
  assert c["hlo"]["matmul_flops"] == expected
  assert c["xla_cost"]["flops"] < expected    # XLA's cost analysis takes the body once
  assert c["memory"]["argument_bytes"] == (layers * d * d + n * d) * 4
  r = c["roofline"]
  assert r["roofline_s"] == max(r["compute_s"], r["memory_s"]) > 0
  text = hlo_census.format_census(c, "scan")
  assert "compiled" in text and "every iteration counted" in text and "MFU bound" in text


def test_roofline_and_mfu_bound():
  chip = hlo_census.CHIPS["h100"]
  r = hlo_census.roofline(989e12, 1.0, chip, model_flops=0.5 * 989e12)
  assert r["bound"] == "compute" and r["roofline_s"] == pytest.approx(1.0)
  assert r["mfu_bound"] == pytest.approx(0.5)
  r = hlo_census.roofline(1.0, 3.35e12 * 2, chip, model_flops=989e12)
  assert r["bound"] == "memory" and r["roofline_s"] == pytest.approx(2.0)
  assert r["mfu_bound"] == pytest.approx(0.5)


@pytest.mark.parametrize("kind,chip", [("TPU v5 lite", "v5e"), ("TPU v4", "v4"),
                                       ("TPU v5p", "v5p"), ("TPU v6 lite", "v6e"),
                                       ("NVIDIA H100 80GB HBM3", "h100"),
                                       ("NVIDIA H200", "h200"), ("NVIDIA H100 PCIe", None),
                                       ("cpu", None)])
def test_chip_for_device_kind(kind, chip):
  assert hlo_census.chip_for_device_kind(kind) == chip


def test_gpu_target_config_states_the_card():
  text = gpu_topology.target_config(gpu_topology.SPECS["h100"])
  assert "core_count: 132" in text and "major: 9 minor: 0" in text
  assert "memory_bandwidth: 3352320000000" in text and 'platform_name: "CUDA"' in text
  assert text.count("{") == text.count("}")
  assert "memory_bandwidth: 4800000000000" in gpu_topology.target_config(
      gpu_topology.SPECS["h200"])


def test_gpu_target_without_the_plugin_names_the_install(monkeypatch, tmp_path):
  from jax._src import xla_bridge
  xla_bridge._discover_and_register_pjrt_plugins()
  if "cuda" in xla_bridge._topology_factories:
    pytest.skip("JAX's CUDA plugin is installed here")
  monkeypatch.setenv("T2V2T_CUDA_PLUGIN_DIR", str(tmp_path))
  with pytest.raises(gpu_topology.GpuTopologyError) as e:
    gpu_topology.gpu_devices("h100")
  assert f"jax-cuda12-plugin=={jax.__version__}" in str(e.value) and str(tmp_path) in str(e.value)
  with pytest.raises(gpu_topology.GpuTopologyError, match="unknown GPU target"):
    gpu_topology.gpu_devices("a100")


@pytest.mark.skipif(not os.path.isdir(os.path.join(gpu_topology.plugin_dir(), "jax_plugins")),
                    reason="JAX's CUDA plugin is not in T2V2T_CUDA_PLUGIN_DIR (see gpu_topology)")
def test_a_gpu_program_compiles_without_a_gpu():
  device = gpu_topology.gpu_devices("h100")[0]
  x = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16,
                           sharding=jax.sharding.SingleDeviceSharding(device))
  compiled = jax.jit(lambda a, b: jax.nn.gelu(a @ b).sum(0)).lower(x, x).compile()
  c = hlo_census.census(compiled, chip="h100")
  assert c["hlo"]["matmul_flops"] == 2 * 512 ** 3
  assert c["memory"]["argument_bytes"] == 2 * 512 * 512 * 2
  assert jax.default_backend() == "cpu"   # the CPU stays this process's backend


def test_in_place_updates_count_the_update_not_the_buffer():
  # A multi-output fusion writes one layer's gradient into a stacked [12,64,32] buffer in
  # place and returns a small elementwise result beside it.
  text = """\
HloModule m

%f (p0: f32[12,64,32], p1: f32[64,32], p2: s32[]) -> (f32[12,64,32], f32[64,32]) {
  %p0 = f32[12,64,32]{2,1,0} parameter(0)
  %p1 = f32[64,32]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c = s32[] constant(0)
  %u = f32[1,64,32]{2,1,0} bitcast(%p1)
  %dus = f32[12,64,32]{2,1,0} dynamic-update-slice(%p0, %u, %p2, %c, %c)
  %neg = f32[64,32]{1,0} negate(%p1)
  ROOT %t = (f32[12,64,32]{2,1,0}, f32[64,32]{1,0}) tuple(%dus, %neg)
}

ENTRY %main (a: f32[12,64,32], b: f32[64,32], i: s32[]) -> (f32[12,64,32], f32[64,32]) {
  %a = f32[12,64,32]{2,1,0} parameter(0)
  %b = f32[64,32]{1,0} parameter(1)
  %i = s32[] parameter(2)
  ROOT %r = (f32[12,64,32]{2,1,0}, f32[64,32]{1,0}) fusion(%a, %b, %i), kind=kLoop, calls=%f
}
"""
  c = hlo_census.census_from_text(text)
  layer = 64 * 32 * F32
  # Reads the layer and the index; writes the update and the negation; the buffer is not read.
  assert c["kernel_bytes"] == layer + 4 + 2 * layer
  assert c["categories"]["elementwise_fusion"]["count"] == 1


def _product(a, b):
  return a @ b   # the source line the census must name for this product


def test_largest_sources_name_the_line_and_the_pass():
  """A compiled program's kernels are grouped by the project line that made them (from
  the stack-frame tables of the HLO text) and by pass: the product of `_product` in the
  forward pass and its two gradient products in the backward pass."""
  line = _product.__code__.co_firstlineno + 1
  loss = lambda a, b: jnp.tanh(_product(a, b)).sum()
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
      jnp.ones((64, 128)), jnp.ones((128, 96))).compile()
  text = compiled.as_text()
  frames = hlo_census.stack_frame_sources(text)
  assert any(f"test_hlo_census.py:{line} _product" == v for v in frames.values()), frames
  rows = hlo_census.census_from_text(text)["largest_sources"]
  products = [r for r in rows if r["kind"] == "matmul"]
  where = f"test_hlo_census.py:{line} _product"
  forward = [r for r in products if r["source"].startswith(where) and "[forward]" in r["source"]]
  backward = [r for r in products if r["source"].startswith(where) and "[backward]" in r["source"]]
  assert sum(r["count"] for r in forward) == 1 and sum(r["count"] for r in backward) == 2, rows
  assert rows == sorted(rows, key=lambda r: -r["bytes"])
  assert "largest groups by bytes" in hlo_census.format_census(
      {"hlo": hlo_census.census_from_text(text), "figures": "compiled"})


def test_kernels_xla_added_are_named_by_shape():
  c = hlo_census.census_from_text(MODULE)   # hand-written: no metadata, no stack frames
  copy = [r for r in c["largest_sources"] if r["kind"] == "copy"]
  assert copy == [{"kind": "copy", "source": "(added by XLA) copy -> f32[16,64]", "count": 1,
                   "bytes": 2 * 16 * 64 * F32}]


def test_conditional_branches_are_counted_once_and_said():
  """Both branches of a conditional are counted (which one runs is not known here), and
  `branch_bytes` says how much of the total they are: gradient accumulation's update runs
  in one call of k."""
  def step(flag, x, w):
    return jax.lax.cond(flag, lambda x: x @ w, lambda x: x * 2.0, x)

  compiled = jax.jit(step).lower(True, jnp.ones((64, 256)), jnp.ones((256, 256))).compile()
  c = hlo_census.census_from_text(compiled.as_text())
  product = (64 * 256 + 256 * 256 + 64 * 256) * F32
  assert c["matmul_flops"] == 2 * 64 * 256 * 256
  assert product <= c["branch_bytes"] <= c["kernel_bytes"]
  plain = jax.jit(lambda x, w: x @ w).lower(jnp.ones((64, 256)), jnp.ones((256, 256)))
  no_branch = hlo_census.census_from_text(plain.compile().as_text())
  assert no_branch["branch_bytes"] == 0


def test_per_update_figures_of_gradient_accumulation():
  import sys  # noqa: PLC0415
  bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
  if bench not in sys.path:
    sys.path.append(bench)
  import compiled_census  # noqa: PLC0415

  result = {"hlo": {"kernel_bytes": 1000, "branch_bytes": 100, "matmul_flops": 5e9,
                    "kernels": 7, "categories": {"matmul": {"count": 2, "bytes": 600}}},
            "model_flops": 4e9, "accum": 4}
  u = compiled_census.per_update(result, 4, "v5e")
  # Four calls of the step; the update branch once, not four times.
  assert u["kernel_bytes"] == 4 * 900 + 100 and u["matmul_flops"] == 2e10
  assert u["roofline"]["roofline_s"] == max(2e10 / 197e12, 3700 / 0.819e12)
  result["per_update"] = u
  view = compiled_census._per_update_view(result)
  assert view["kernel_bytes"] == 3700 and view["kernels"] == 28
  assert view["categories"]["matmul"] == {"count": 8, "bytes": 2400}


def test_buffers_a_fusion_hands_on_untouched_are_not_counted():
  """XLA:TPU's asynchronous collective fusions return their in-flight buffers as tuple
  elements that are just their parameters: neither read nor written by the kernel."""
  text = """\
HloModule m, is_scheduled=true

%carry_fusion (p0: f32[1024], p1: f32[16]) -> (f32[16], f32[1024]) {
  %p0 = f32[1024]{0} parameter(0)
  %p1 = f32[16]{0} parameter(1)
  %m = f32[16]{0} multiply(%p1, %p1)
  ROOT %t = (f32[16]{0}, f32[1024]{0}) tuple(%m, %p0)
}

ENTRY %main (a: f32[1024], b: f32[16]) -> (f32[16], f32[1024]) {
  %a = f32[1024]{0} parameter(0)
  %b = f32[16]{0} parameter(1)
  ROOT %f = (f32[16]{0}, f32[1024]{0}) fusion(%a, %b), kind=kLoop, calls=%carry_fusion
}
"""
  c = hlo_census.census_from_text(text)
  assert c["kernel_bytes"] == 2 * 16 * F32     # reads b, writes the product; `a` untouched


def test_on_chip_memory_is_not_hbm_traffic():
  """A TPU prefetch (copy-start into memory space S(1)) reads HBM and writes on-chip
  memory; the kernel that then reads the prefetched buffer reads it on-chip."""
  text = """\
HloModule m, is_scheduled=true

ENTRY %main (a: f32[256]) -> f32[256] {
  %a = f32[256]{0} parameter(0)
  %cs = (f32[256]{0:T(256)S(1)}, f32[256]{0:T(256)}, u32[]{:S(2)}) copy-start(%a)
  %cd = f32[256]{0:T(256)S(1)} copy-done(%cs)
  ROOT %n = f32[256]{0:T(256)} negate(%cd)
}
"""
  hbm = hlo_census.census_from_text(text)
  assert hbm["categories"]["copy"] == {"count": 1, "bytes": 256 * F32}   # the HBM read
  assert hbm["kernel_bytes"] == 2 * 256 * F32                             # + negate's write
  every = hlo_census.census_from_text(text, on_chip=True)
  assert every["kernel_bytes"] == 4 * 256 * F32
