"""What an import did, as one report for every importer (BEiT, BERT, VindLU).

SPEC 9: a loader that silently drops keys evaluates a random model, so every importer
accounts for each source key (loaded, dropped with a reason, or a checked duplicate) and
for each of our parameters (loaded or newly initialised), and prints the tally as a
table. Names that differ only in layer indices are shown once (`layers.{0-11}.bias`).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable

import numpy as np


def compact_names(names: Iterable[str]) -> list[str]:
  """Group names that differ only in layer indices: `a.{0-11}.b` (order of first appearance)."""
  groups: dict[str, list] = collections.OrderedDict()
  for name in names:
    nums = re.findall(r"(?<=\.)\d+(?=\.|$)", name)
    if not nums or "{" in name or "}" in name:
      groups.setdefault(name, [])
      continue
    pattern = re.sub(r"(?<=\.)\d+(?=\.|$)", "{}", name)
    groups.setdefault(pattern, []).append(tuple(int(n) for n in nums))

  def span(values):
    values = sorted(set(values))
    if len(values) == 1:
      return str(values[0])
    # Sorted and distinct, so a span iff its length says so: no range() is built (a key
    # naming layer 30,000,000 would make it that long).
    if len(values) == values[-1] - values[0] + 1:
      return f"{{{values[0]}-{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"

  out = []
  for pattern, idx in groups.items():
    if not idx:
      out.append(pattern)
      continue
    slots = list(zip(*idx))
    if len(set(idx)) == int(np.prod([len(set(s)) for s in slots])):  # a full product: compact
      out.append(pattern.format(*(span(s) for s in slots)))
    else:
      out += [pattern.format(*i) for i in idx]
  return out


def format_table(title: str, rows: list[tuple[str, list[str] | int]]) -> str:
  """One row per category: label, count, names (layer indices compacted); an int is a bare count."""
  lines = [title, f"  {'':<20} {'count':>6}  names"]
  for label, names in rows:
    if isinstance(names, int):
      lines.append(f"  {label:<20} {names:>6}")
      continue
    shown = compact_names(names)
    lines.append(f"  {label:<20} {len(names):>6}  " + (shown[0] if shown else "-"))
    lines += [f"  {'':<20} {'':>6}  {n}" for n in shown[1:]]
  return "\n".join(lines)


@dataclasses.dataclass
class ImportReport:
  """Every source key and every parameter of one import, accounted for."""
  kind: str                    # 'BEiT', 'BERT', 'VindLU'
  source: str
  naming: str = ""             # VindLU: 'pretrain' or 'finetune'
  prefix: str = ""             # BEiT: the backbone prefix of the source keys ('beit.' or '')
  loaded: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (source key, ours)
  resized: list[str] = dataclasses.field(default_factory=list)             # descriptions
  new: list[str] = dataclasses.field(default_factory=list)                 # ours, initial values
  dropped: dict[str, str] = dataclasses.field(default_factory=dict)        # source key -> reason
  tied: dict[str, str] = dataclasses.field(default_factory=dict)           # source key -> equal key
  upcast: list[str] = dataclasses.field(default_factory=list)              # fp16/bf16 read as fp32
  warnings: list[str] = dataclasses.field(default_factory=list)

  @property
  def loaded_sources(self) -> list[str]:
    return list(dict.fromkeys(s for s, _ in self.loaded))

  @property
  def loaded_targets(self) -> list[str]:
    return [t for _, t in self.loaded]

  def table(self) -> str:
    title = f"{self.kind} import from {self.source}"
    if self.naming:
      title += f" ({self.naming} naming)"
    if self.prefix:
      title += f" (source prefix {self.prefix!r})"
    rows = [("loaded (source keys)", self.loaded_sources),
            ("  -> our params", len(self.loaded)),
            ("resized", self.resized),
            ("newly initialised", self.new),
            ("dropped", list(self.dropped)),
            ("tied (checked)", [f"{k} == {v}" for k, v in self.tied.items()])]
    if self.upcast:
      rows.append(("upcast to float32", self.upcast))
    reasons = sorted(set(self.dropped.values()))
    return (format_table(title, rows)
            + "".join(f"\n  dropped because: {r}" for r in reasons)
            + "".join(f"\n  warning: {w}" for w in self.warnings))

  __str__ = table
