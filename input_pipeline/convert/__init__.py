"""Converters from the official downloads of the fine-tuning corpora to our annotation files.

The recipes read VindLU-format annotation files (`input_pipeline/annotations.py`); the
datasets are distributed in their own layouts. One module per corpus turns the official
layout into the files a recipe names, checks which referenced videos exist, and loads the
result back through the project's own loader, so a file it writes is one a run accepts:

  python -m input_pipeline.convert.msrvtt --src DIR --out DATA/anno   # MSR-VTT 9k / 1k-A
  python -m input_pipeline.convert.didemo --src DIR --out DATA/anno   # DiDeMo paragraphs
  python -m input_pipeline.convert.anet --src DIR --out DATA/anno     # ActivityNet val_1

docs/data.md ("Getting the data") says where each download comes from.
"""
