"""The paper's fusion ablation on the synthetic data: v2t, t2v2t_naive, t2v2t and joint.

Trains each fusion mode from scratch with the same data, budget and seeds (the built-in
demo recipe, `configs/demo.py`, by default), evaluates two-stage retrieval on the test
split and on its event-order split, and writes `docs/ablation.md`:

  - R@1/5/10 in both directions, stage 1 (embeddings) and reranked (matching head), as
    mean and spread (sample standard deviation) over seeds;
  - the event-order split (`test_order.json`: video pairs with the same shapes and events
    in swapped order, captions that differ only in event order): retrieval among its
    videos, and the pair accuracy, i.e. how often a caption scores its own video above its
    order-swapped twin (chance 50%), for the stage-1 score and for the matching head;
  - training time (wall clock on this machine) and analytic fusion FLOPs per reranked
    pair and training FLOPs per sample (`benchmarks/flops.py`).

Each run writes `<root>/<mode>_seed<seed>/ablation.json`; a rerun reuses finished runs
(and a run interrupted mid-training resumes from its checkpoint), so the script can be
stopped and restarted; a run trained with another config is refused, not reused. Text
after a `<!-- discussion -->` line in the output file is kept.

  # docs/ablation.md: 4 modes x 3 seeds of the demo recipe, ~100 minutes on a 2-core CPU.
  python benchmarks/fusion_ablation.py --out docs/ablation.md
  # A quick look at fewer steps (in its own --root: the step count is part of the config).
  python benchmarks/fusion_ablation.py --steps 400 --root runs/ablation_400 --out /tmp/a.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# The repository root first: `benchmarks/input_pipeline.py` must not shadow the
# `input_pipeline` package (Python puts this script's folder first on the path).
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT, _HERE] + [p for p in sys.path
                                if os.path.abspath(p or ".") not in (_ROOT, _HERE)]

import numpy as np  # noqa: E402

import flops as flops_lib  # noqa: E402

MODES = ("v2t", "t2v2t_naive", "t2v2t", "joint")
DISCUSSION_MARK = "<!-- discussion -->"
DIRECTIONS = (("t2v", "text->video"), ("v2t", "video->text"))


def run_config(args, mode: str, seed: int):
  from input_pipeline.config import corpus_config  # noqa: PLC0415
  from t2v2t_jax.recipes import load_recipe  # noqa: PLC0415
  arg = ",".join(filter(None, [args.recipe_arg, f"mode={mode}"]))
  config = load_recipe(f"{args.config}:{arg}")
  config.seed = seed
  if args.data_root:
    config.data_root = args.data_root  # the corpora's paths follow (FieldReferences)
  config.synthetic.seed = args.data_seed  # the same data for every run
  if args.steps:
    config.total_steps = args.steps
  if args.batch:
    config.batch_size = args.batch
  config.checkpoint_every = config.total_steps or 10**9
  config.eval_every = 0
  root = config.data_root
  order_cfg = corpus_config("synthetic_test_order", os.path.join(root, "test_order.json"), root)
  config.data.eval_corpora = list(config.data.eval_corpora) + [order_cfg]
  return config


def check_same_config(config, workdir: str) -> None:
  """A finished (or interrupted) run is reused only if it was trained with this config.

  Raises ValueError naming the differing fields otherwise: a result from another recipe,
  step count or learning rate must not enter the table silently.
  """
  from t2v2t_jax.training import workdir as workdir_lib  # noqa: PLC0415
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    diffs = workdir_lib.config_differences(json.load(f), config)
  if diffs:
    raise ValueError(
        f"{workdir} holds a run trained with another config "
        f"({workdir_lib.describe_differences(diffs)}); pass --fresh to retrain it or choose "
        f"another --root")


def order_pair_accuracy(evaluator, params, data, embedded=None) -> dict:
  """How often a caption scores its own video above its order-swapped twin.

  `test_order.json` lists the pairs as consecutive entries (2i, 2i+1), so video v's twin
  is v ^ 1. Ties count one half. `embedded`: the corpus's `evaluator.embed`, if done.
  """
  from t2v2t_jax.models.t2v2t import similarity  # noqa: PLC0415
  video_emb, tokens, text_emb, hidden = embedded or evaluator.embed(params, data)
  own = np.asarray(data.txt2vid, np.int64)
  twin = own ^ 1
  texts = np.arange(len(own))
  stage1 = similarity(video_emb, text_emb)
  pairs = np.concatenate([np.stack([own, texts], 1), np.stack([twin, texts], 1)])
  itm = evaluator.score_candidates(params, pairs, hidden, data.attention_mask, tokens)

  def accuracy(a, b):
    return float(np.mean((a > b) + 0.5 * (a == b)))

  n = len(own)
  return {"pair_acc_emb": 100 * accuracy(stage1[own, texts], stage1[twin, texts]),
          "pair_acc_itm": 100 * accuracy(itm[:n], itm[n:]), "pair_texts": n}


def train_and_measure(args, mode: str, seed: int) -> dict:
  import jax  # noqa: PLC0415
  from input_pipeline import pipeline as pipeline_lib  # noqa: PLC0415
  from input_pipeline import synthetic_autocreate  # noqa: PLC0415
  from input_pipeline import text as text_lib  # noqa: PLC0415
  from t2v2t_jax import sharding as sharding_lib  # noqa: PLC0415
  from t2v2t_jax.checkpoints import restore  # noqa: PLC0415
  from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator  # noqa: PLC0415
  from t2v2t_jax.training import train as train_lib  # noqa: PLC0415

  config = run_config(args, mode, seed)
  workdir = os.path.join(args.root, f"{mode}_seed{seed}")
  out_path = os.path.join(workdir, "ablation.json")
  if not args.fresh:
    check_same_config(config, workdir)
  if os.path.exists(out_path) and not args.fresh:
    with open(out_path) as f:
      result = json.load(f)
    print(f"[ablation] {mode} seed {seed}: reusing {out_path}", flush=True)
    return result

  print(f"\n[ablation] {mode} seed {seed}: training {config.total_steps} steps of batch "
        f"{config.batch_size} in {workdir}", flush=True)
  synthetic_autocreate.create_if_missing(config)
  t0 = time.perf_counter()
  train_lib.train_and_evaluate(config, workdir, evaluate_at_end=False)
  train_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  mesh = sharding_lib.make_mesh(config.mesh)
  params, graphdef, step = restore.load_params(config, workdir, mesh)
  tokenizer = text_lib.load_tokenizer(config.data.tokenizer)
  evaluator = RetrievalEvaluator(graphdef, mesh, k=config.eval.k,
                                 rerank_batch_size=config.eval.rerank_batch_size,
                                 text_batch_size=config.eval.text_batch_size, progress=False)
  result = {"mode": mode, "seed": seed, "step": int(step), "train_s": train_s,
            "batch_size": config.batch_size, "corpora": {}}
  for corpus_cfg in config.data.eval_corpora:
    data = pipeline_lib.make_eval_data(
        corpus_cfg, tokenizer=tokenizer, num_frames=config.eval.num_frames,
        image_size=config.model.vision.image_size, max_len=config.data.max_len,
        add_sep=config.data.add_sep, batch_size=config.eval.video_batch_size, num_workers=0)
    embedded = evaluator.embed(params, data)
    res = {k: float(v) for k, v in evaluator.evaluate(params, data, embedded=embedded).items()}
    if corpus_cfg.name.endswith("order"):
      res.update(order_pair_accuracy(evaluator, params, data, embedded))
    result["corpora"][corpus_cfg.name] = res
  result["eval_s"] = time.perf_counter() - t0

  sizes = flops_lib.Sizes.from_config(config.model, frames=config.eval.num_frames,
                                      text_len=config.data.max_len)
  weights = config.loss_weights
  result["fusion_flops_per_pair"] = flops_lib.rerank_per_pair(sizes, mode)
  result["train_flops_per_sample"] = flops_lib.train_step_per_sample(
      sizes.replace(frames=config.num_frames), vtc=weights.vtc > 0, vtm=weights.vtm > 0,
      mlm=weights.mlm > 0)["train"]
  result["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  os.makedirs(workdir, exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"[ablation] {mode} seed {seed}: " + ", ".join(
      f"{name} t2v R@1 {r['emb_t2v_r1']:.1f} -> {r['t2v_r1']:.1f}"
      for name, r in result["corpora"].items()) + f" ({train_s:.0f} s training)", flush=True)
  return result


def _stat(values) -> str:
  values = [float(v) for v in values]
  if len(values) == 1:
    return f"{values[0]:.1f}"
  return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _retrieval_table(results_by_mode: dict, corpus: str) -> list[str]:
  head = "| mode | stage | " + " | ".join(
      f"{d} R@{k}" for _, d in DIRECTIONS for k in (1, 5, 10)) + " |"
  lines = [head, "|" + "---|" * (2 + 6)]
  for mode, runs in results_by_mode.items():
    for stage, prefix in (("stage 1 (emb)", "emb_"), ("reranked", "")):
      cells = [_stat(r["corpora"][corpus][f"{prefix}{d}_r{k}"] for r in runs)
               for d, _ in DIRECTIONS for k in (1, 5, 10)]
      lines.append(f"| {mode} | {stage} | " + " | ".join(cells) + " |")
  return lines


def render(results_by_mode: dict, args, command: str, corpora: list[str]) -> str:
  any_run = next(iter(results_by_mode.values()))[0]
  seeds = sorted({r["seed"] for runs in results_by_mode.values() for r in runs})
  test, order = corpora[0], corpora[-1]
  t = any_run["corpora"][test]
  o = any_run["corpora"][order]
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, text=True,
                            capture_output=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = "unknown"
  out = [
      "# Fusion ablation on the synthetic data",
      "",
      "The paper's ablation of how text and video are fused, on this project's synthetic",
      "corpus (coloured shapes with motion, appearance changes and two events in order;",
      "`input_pipeline/synthetic.py`), every mode trained from scratch with the same data,",
      "steps, batch and seeds. Generated by `benchmarks/fusion_ablation.py`; figures are the",
      "mean ± sample standard deviation over the seeds.",
      "",
      f"- Command: `{command}`",
      f"- Recipe: `{os.path.relpath(args.config, _ROOT)}` with {any_run['step']} steps of batch "
      f"{any_run['batch_size']}, seeds {', '.join(map(str, seeds))}, data seed {args.data_seed}.",
      f"- Machine: {platform.machine()} CPU with {os.cpu_count()} cores, {any_run['devices']}; "
      f"commit {commit}; {datetime.date.today().isoformat()}.",
      f"- Test split: {int(t['num_videos'])} videos, {int(t['num_texts'])} captions "
      f"(chance R@1 {100 / t['num_videos']:.1f}%), k = {int(t['k'])} for reranking.",
      f"- Event-order split: the test split's {int(o['num_videos'])} videos that come in "
      f"order-swapped pairs, {int(o['num_texts'])} captions that differ from their twin's only "
      "in event order.",
      "",
      "## Test split",
      "",
      *_retrieval_table(results_by_mode, test),
      "",
      "## Event-order split",
      "",
      "Pair accuracy: how often a caption scores its own video above its order-swapped twin",
      "(chance 50%), with the stage-1 score and with the matching head.",
      "",
      "| mode | pair acc. stage 1 | pair acc. matching head | text->video R@1 stage 1 | "
      "text->video R@1 reranked |",
      "|---|---|---|---|---|",
  ]
  for mode, runs in results_by_mode.items():
    c = [r["corpora"][order] for r in runs]
    out.append(f"| {mode} | {_stat(x['pair_acc_emb'] for x in c)} | "
               f"{_stat(x['pair_acc_itm'] for x in c)} | {_stat(x['emb_t2v_r1'] for x in c)} | "
               f"{_stat(x['t2v_r1'] for x in c)} |")
  out += ["", "Full retrieval table on the event-order split:", "",
          *_retrieval_table(results_by_mode, order), "",
          "## Cost", "",
          "| mode | training wall time (s) | fusion GFLOPs per reranked pair | "
          "training GFLOPs per sample |", "|---|---|---|---|"]
  for mode, runs in results_by_mode.items():
    out.append(f"| {mode} | {_stat(r['train_s'] for r in runs)} | "
               f"{runs[0]['fusion_flops_per_pair'] / 1e9:.4f} | "
               f"{runs[0]['train_flops_per_sample'] / 1e9:.3f} |")
  out += ["", "Training time includes compilation and the data pipeline; FLOPs are the analytic "
          "count of `benchmarks/flops.py` at this model size (forward pass for a pair, forward "
          "and backward of every pass the objective makes for a sample).", ""]
  return "\n".join(out)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=os.path.join(_ROOT, "configs", "demo.py"))
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--recipe-arg", default="",
                      help="extra recipe argument, e.g. 'tiny' for a seconds-long smoke run")
  parser.add_argument("--data-root", default="", help="dataset folder (default: the recipe's)")
  parser.add_argument("--data-seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=0, help="train steps (0: the recipe's)")
  parser.add_argument("--batch", type=int, default=0, help="global batch (0: the recipe's)")
  parser.add_argument("--root", default=os.path.join(_ROOT, "runs", "ablation"))
  parser.add_argument("--out", default=os.path.join(_ROOT, "docs", "ablation.md"))
  parser.add_argument("--fresh", action="store_true", help="retrain runs that have results")
  args = parser.parse_args(argv)
  from absl import flags  # noqa: PLC0415
  flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
  modes = [m for m in args.modes.split(",") if m]
  for m in modes:
    if m not in MODES:
      parser.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
  seeds = [int(s) for s in args.seeds.split(",") if s]
  command = "python benchmarks/fusion_ablation.py " + " ".join(
      a for a in (sys.argv[1:] if argv is None else argv))
  results_by_mode = {}
  for seed in seeds:  # seed-major: an interrupted sweep has every mode at some seeds
    for mode in modes:
      results_by_mode.setdefault(mode, []).append(train_and_measure(args, mode, seed))
  results_by_mode = {m: results_by_mode[m] for m in modes}
  corpora = list(next(iter(results_by_mode.values()))[0]["corpora"])
  text = render(results_by_mode, args, command.strip(), corpora)
  discussion = ""
  if os.path.exists(args.out):
    with open(args.out) as f:
      old = f.read()
    if DISCUSSION_MARK in old:
      discussion = old[old.index(DISCUSSION_MARK):]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text + ("\n" + discussion if discussion else ""))
  print(f"[ablation] wrote {args.out}", flush=True)


if __name__ == "__main__":
  main()
