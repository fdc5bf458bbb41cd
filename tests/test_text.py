"""Caption cleaning and tokenization (SPEC 2): [CLS] + tokens, no [SEP], pad 0, truncate."""

import numpy as np
import pytest
from transformers import BertTokenizer

from input_pipeline.text import CaptionEncoder, check_tokenizer, clean_caption, load_tokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "red", "circle", "moves",
         "left", "person", "rock", "n", "roll", "and", "or", "then", "it", "grows", "##s",
         "cat", "dog", "on", "mat"]
ID = {w: i for i, w in enumerate(VOCAB)}
CLS, SEP, UNK = ID["[CLS]"], ID["[SEP]"], ID["[UNK]"]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "vocab.txt"
  path.write_text("\n".join(VOCAB) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def tokenizer(vocab_file):
  return load_tokenizer(vocab_file)


@pytest.mark.parametrize("raw, clean", [
    ("A Red CIRCLE moves left.", "a red circle moves left"),
    ("<person> rock-n-roll / and:  then;\t(it)", "person rock n roll and then it"),
    ('"the" dog\'s, mat! cat? ~#*', "the dogs mat cat"),
    ("  many   spaces\n\nand\nlines  ", "many spaces and lines"),
    ("a/b-c", "a b c"),
])
def test_clean_caption(raw, clean):
  assert clean_caption(raw) == clean


def test_no_sep_padding_and_mask(tokenizer):
  enc = CaptionEncoder(tokenizer, max_len=8)
  ids, mask = enc("A red circle moves left.")
  expected = [CLS, ID["a"], ID["red"], ID["circle"], ID["moves"], ID["left"], 0, 0]
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  np.testing.assert_array_equal(ids, expected)
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 1, 0, 0])
  assert SEP not in ids.tolist()


def test_truncation_keeps_cls_first(tokenizer):
  enc = CaptionEncoder(tokenizer, max_len=4)
  ids, mask = enc("<person> then the cat grows on the mat")
  np.testing.assert_array_equal(ids, [CLS, ID["person"], ID["then"], ID["the"]])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1])


def test_add_sep_option(tokenizer):
  ids, mask = CaptionEncoder(tokenizer, max_len=6, add_sep=True)("the cat")
  np.testing.assert_array_equal(ids, [CLS, ID["the"], ID["cat"], SEP, 0, 0])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 0, 0])
  # Truncated: [SEP] still closes the sequence.
  ids, _ = CaptionEncoder(tokenizer, max_len=4, add_sep=True)("the cat on the mat")
  np.testing.assert_array_equal(ids, [CLS, ID["the"], ID["cat"], SEP])


def test_wordpiece_and_unknown_words(tokenizer):
  ids, _ = CaptionEncoder(tokenizer, max_len=6)("Cats zebra")
  np.testing.assert_array_equal(ids, [CLS, ID["cat"], ID["##s"], UNK, 0, 0])


def test_batch_encoding_matches_single(tokenizer):
  enc = CaptionEncoder(tokenizer, max_len=5)
  captions = ["a red circle", "", "the dog on the mat moves left"]
  ids, mask = enc.encode_batch(captions)
  assert ids.shape == mask.shape == (3, 5)
  for i, c in enumerate(captions):
    np.testing.assert_array_equal(ids[i], enc(c)[0])
    np.testing.assert_array_equal(mask[i], enc(c)[1])
  np.testing.assert_array_equal(ids[1], [CLS, 0, 0, 0, 0])  # empty caption: [CLS] only


def test_load_from_folder(vocab_file, tmp_path):
  (tmp_path / "vocab.txt").write_text(open(vocab_file).read())
  tok = load_tokenizer(str(tmp_path))
  assert tok.convert_tokens_to_ids(["circle"]) == [ID["circle"]]


def test_vocab_file_trap_is_caught(vocab_file):
  # transformers 5: vocab_file= is silently ignored and every word becomes [UNK].
  broken = BertTokenizer(vocab_file=vocab_file)
  with pytest.raises(ValueError, match="vocab"):
    check_tokenizer(broken, vocab_file)
  check_tokenizer(BertTokenizer(vocab=vocab_file))  # the right way passes


def test_synthetic_vocab_tokenizes_its_captions(tmp_path):
  from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(synthetic.vocabulary()) + "\n")
  tok = load_tokenizer(str(path))
  ids, mask = CaptionEncoder(tok, max_len=32)("First a red circle moves left, then it grows")
  assert ids[0] == tok.cls_token_id and tok.unk_token_id not in ids.tolist()
  assert mask.sum() == 10


@pytest.mark.parametrize("token", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
def test_vocab_missing_a_special_token_is_refused(tmp_path, token):
  """transformers would append the missing token past the vocabulary (an id the pretrained
  embedding never trained) and padding would still write id 0: refused by name."""
  from t2v2t_jax.errors import Refusal  # noqa: PLC0415
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(w for w in VOCAB if w != token) + "\n")
  with pytest.raises(Refusal, match=rf"^{path}: the vocabulary has no \{token[:-1]}\] token"):
    load_tokenizer(str(path))
  with pytest.raises(Refusal, match=rf"^{tmp_path}: the vocabulary has no"):
    load_tokenizer(str(tmp_path))  # the folder holding it: the same check


def test_vocab_not_utf8_names_the_file_line_and_byte(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_bytes("\n".join(VOCAB[:8]).encode() + b"\ncaf\xe9\n")
  offset = len("\n".join(VOCAB[:8])) + 4
  with pytest.raises(ValueError, match=rf"^{path}: not valid UTF-8 \(byte {offset}, line 9: "):
    load_tokenizer(str(path))


def test_padding_uses_the_vocabularys_pad_id(tmp_path):
  """A vocabulary whose [PAD] is not id 0 pads with its own id (MLM masking skips that
  id; id 0 would be an ordinary token here)."""
  moved = VOCAB[1:5] + ["[PAD]"] + VOCAB[5:]
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(moved) + "\n")
  tok = load_tokenizer(str(path))
  assert tok.pad_token_id == 4
  ids, mask = CaptionEncoder(tok, max_len=6)("a cat")
  assert ids.tolist() == [moved.index("[CLS]"), moved.index("a"), moved.index("cat"), 4, 4, 4]
  assert mask.tolist() == [1, 1, 1, 0, 0, 0]
