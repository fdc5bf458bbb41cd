"""Caption cleaning and BERT tokenization (SPEC 2).

Sequence layout: `[CLS] + tokens` with no `[SEP]` (VindLU), optionally `[SEP]` at the
end; padded with the vocabulary's `[PAD]` (id 0 in BERT's) and truncated to `max_len`;
attention mask 1 on real tokens.

A vocabulary is refused (`errors.Refusal`, naming the file and the token) unless it holds
each of BERT's special tokens: transformers would otherwise append a missing one past the
end of the vocabulary, an id the model's pretrained embedding never trained (or has no
row for), and MLM masking, padding and [CLS] pooling would silently use it.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from t2v2t_jax.errors import Refusal

PAD_ID = 0  # BERT's [PAD]; SPEC 2 pads with id 0 (the encoder uses the vocabulary's own)
# Every one is used: [CLS] starts each text, [PAD] fills it, [MASK] and [PAD] drive MLM
# masking, [UNK] stands for unknown words, [SEP] ends a text with `add_sep`.
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                  "sep_token": "[SEP]", "mask_token": "[MASK]"}

_REMOVED_CHARS = re.compile(r"[,.'!?\"()*#:;~]")
_SPACED_CHARS = re.compile(r"[-/]")
_WHITESPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
  """Lower-case; `<person>` -> `person`; drop ,.'!?"()*#:;~ ; `-` and `/` -> space;
  collapse whitespace."""
  text = text.lower().replace("<person>", "person")
  text = _REMOVED_CHARS.sub("", text)
  text = _SPACED_CHARS.sub(" ", text)
  return _WHITESPACE.sub(" ", text).strip()


def load_tokenizer(name_or_path: str):
  """A lower-casing `BertTokenizer` from a hub name, a local folder or a vocab file.

  A vocab file is loaded with `BertTokenizer(vocab=path)`: in transformers 5,
  `BertTokenizer(vocab_file=path)` silently builds a tokenizer that maps every word to
  [UNK]. Whatever the source, the result is checked: a word of the vocabulary must not
  map to [UNK].
  """
  from transformers import BertTokenizer  # pylint: disable=g-import-not-at-top
  name_or_path = _local_copy(name_or_path)
  if os.path.isfile(name_or_path):
    tokenizer = _from_vocab_file(BertTokenizer, name_or_path)
  elif os.path.isdir(name_or_path):
    vocab = os.path.join(name_or_path, "vocab.txt")
    if os.path.isfile(os.path.join(name_or_path, "tokenizer.json")) or not os.path.isfile(vocab):
      tokenizer = BertTokenizer.from_pretrained(name_or_path, do_lower_case=True)
    else:
      tokenizer = _from_vocab_file(BertTokenizer, vocab)
  else:
    tokenizer = BertTokenizer.from_pretrained(name_or_path, do_lower_case=True)
  check_tokenizer(tokenizer, name_or_path)
  return tokenizer


def _from_vocab_file(tokenizer_class, path: str):
  """A tokenizer of a WordPiece vocab file (one token a line), its bytes checked first:
  the tokenizers library's own error for a bad byte names neither the file nor where."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise Refusal(f"{path}: not valid UTF-8 (byte {e.start}, line {line}: {e.reason}); a "
                  "vocab file is UTF-8 text, one token a line") from None
  try:
    return tokenizer_class(vocab=path, do_lower_case=True)
  except Exception as e:  # noqa: BLE001 (the library raises a bare Exception for bad files)
    raise Refusal(f"{path}: cannot be read as a WordPiece vocab file ({e})") from e


def _local_copy(name_or_path: str) -> str:
  """A `gs://` vocab file or tokenizer folder copied to a local temporary folder
  (transformers opens local files only); anything else is returned as it is."""
  from t2v2t_jax import storage  # noqa: PLC0415
  if not storage.is_remote(name_or_path):
    return name_or_path
  storage.check_path(name_or_path, "data.tokenizer")
  if storage.isfile(name_or_path):
    return storage.copy_to_local(name_or_path)
  import tempfile  # noqa: PLC0415
  local = tempfile.mkdtemp(prefix="t2v2t_tokenizer_")
  for name in storage.listdir(name_or_path):
    if name.endswith((".txt", ".json")):  # vocab.txt, tokenizer*.json, special tokens
      storage.copy_to_local(storage.join(name_or_path, name), local)
  return local


def check_tokenizer(tokenizer, source: str = "tokenizer") -> None:
  """Raises `Refusal` if the tokenizer lost its vocabulary (every word -> [UNK]) or its
  vocabulary lacks one of BERT's special tokens (`SPECIAL_TOKENS`)."""
  # First the special tokens: without [UNK] the word check below means nothing. A token
  # transformers added because the vocabulary lacked it has an id past the vocabulary
  # (`vocab_size` counts the vocabulary's own tokens only).
  base_size = tokenizer.vocab_size
  for attr, expected in SPECIAL_TOKENS.items():
    token = getattr(tokenizer, attr, None)
    token_id = getattr(tokenizer, attr + "_id", None)
    if token is None or token_id is None or not 0 <= token_id < base_size:
      raise Refusal(f"{source}: the vocabulary has no {token or expected} token ({attr}; "
                    f"{base_size} tokens): a BERT vocabulary holds each of "
                    f"{', '.join(SPECIAL_TOKENS.values())}; use the vocab file of the "
                    "pretrained text model")
  vocab = tokenizer.get_vocab()
  specials = set(tokenizer.all_special_tokens)
  word = "the" if "the" in vocab else next(
      (w for w in sorted(vocab, key=vocab.get) if w.isalpha() and w not in specials), None)
  if word is None:
    raise Refusal(f"{source}: the tokenizer has no ordinary words in its vocabulary "
                  f"({len(vocab)} entries): was the vocab file read? Load a vocab file "
                  f"with BertTokenizer(vocab=path), not vocab_file=.")
  ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))
  if ids == [tokenizer.unk_token_id] or tokenizer.unk_token_id in ids:
    raise Refusal(f"{source}: the tokenizer maps the vocabulary word {word!r} to [UNK]: "
                  f"the vocabulary was not loaded.")


def special_token_ids(tokenizer, model_vocab_size: int) -> dict:
  """The ids MLM masking needs, `{cls, pad, mask, vocab_size}`; raises when the tokenizer
  has more tokens than the model's word embedding has rows (an id past the table would
  read out of bounds on the device without an error)."""
  if len(tokenizer) > model_vocab_size:
    raise Refusal(f"model.text.vocab_size={model_vocab_size} is smaller than the tokenizer's "
                  f"{len(tokenizer)} tokens; raise model.text.vocab_size.")
  return {"cls": int(tokenizer.cls_token_id), "pad": int(tokenizer.pad_token_id),
          "mask": int(tokenizer.mask_token_id), "vocab_size": int(model_vocab_size)}


class CaptionEncoder:
  """Cleans and tokenizes captions into fixed-length id and mask arrays (picklable, so
  Grain worker processes can run it)."""

  def __init__(self, tokenizer, max_len: int, add_sep: bool = False):
    if max_len < 2:
      raise Refusal(f"max_len={max_len} leaves no room for a token after [CLS]")
    self.tokenizer = tokenizer
    self.max_len = int(max_len)
    self.add_sep = add_sep
    # The vocabulary's own [PAD] (check_tokenizer saw it in the vocabulary): MLM masking
    # leaves out the ids equal to it, so padding must use the same id.
    self.pad_id = PAD_ID if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)

  def _layout(self, token_ids: Sequence[int]) -> list[int]:
    room = self.max_len - 1 - int(self.add_sep)
    ids = [self.tokenizer.cls_token_id] + list(token_ids[:room])
    if self.add_sep:
      ids.append(self.tokenizer.sep_token_id)
    return ids

  def encode_batch(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """int32 `input_ids [N, max_len]` and `attention_mask [N, max_len]`."""
    cleaned = [clean_caption(c) for c in captions]
    input_ids = np.full((len(cleaned), self.max_len), self.pad_id, np.int32)
    mask = np.zeros((len(cleaned), self.max_len), np.int32)
    if not cleaned:
      return input_ids, mask
    room = self.max_len - 1 - int(self.add_sep)
    tokenized = self.tokenizer(cleaned, add_special_tokens=False, truncation=True,
                               max_length=room)["input_ids"]
    for i, token_ids in enumerate(tokenized):
      ids = self._layout(token_ids)
      input_ids[i, :len(ids)] = ids
      mask[i, :len(ids)] = 1
    return input_ids, mask

  def __call__(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
    """int32 `input_ids [max_len]` and `attention_mask [max_len]` of one caption."""
    input_ids, mask = self.encode_batch([caption])
    return input_ids[0], mask[0]
