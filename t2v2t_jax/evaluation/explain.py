"""A picture of the T2V bypass: how much of each frame's T2V attention went to the text.

In the paper's T2V block (`models/bypass.py`) the tokens of frame i attend to the text
tokens AND to the frame's own tokens, so a frame that the sentence does not describe can
attend to itself instead of to the text. `attention_shares` turns the block's attention
weights into one number per frame (the text share), and `draw_explanation` draws the
sampled frames in a row with a stacked bar under each: text share | own share (the
bypass). In the naive T2V block (`t2v2t_naive`) the keys are the text alone, so the text
share is 1 for every frame.

Pure numpy and PIL (no plotting library).

Picture layout (all sizes in pixels; T frames of H x W):

  width  = T * W + (T + 1) * MARGIN
  height = MARGIN + HEADER_LINES * LINE_HEIGHT + MARGIN        header: query (2 lines),
                                                                 subtitle, legend
           + H + GAP + BAR_HEIGHT + GAP + LABEL_LINES * LINE_HEIGHT + MARGIN

Frame t sits at x = MARGIN + t * (W + MARGIN). Its bar (same x, width W) starts at
y = `bar_top(H)`; its first `round(text_share * W)` columns are TEXT_COLOR and the rest
OWN_COLOR, so the two parts always add up to the frame width.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MARGIN = 8
GAP = 4
LINE_HEIGHT = 16
HEADER_LINES = 4   # the query (up to 2 lines), the subtitle, the legend
QUERY_LINES = 2
LABEL_LINES = 2
BAR_HEIGHT = 12
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
TEXT_COLOR = (230, 126, 34)   # attention on the text tokens
OWN_COLOR = (52, 120, 219)    # attention on the frame's own tokens (the bypass)


def attention_shares(t2v_attention, num_text_keys: int) -> np.ndarray:
  """Share of each frame's T2V attention that went to the text.

  Args:
    t2v_attention: attention probabilities [B, T, H, N, K] of one T2V block (`aux
      ["t2v_attention"][i]` of `FusionEncoder`): frame t's N query tokens over K keys,
      the first `num_text_keys` (L) the text tokens (padding included; padded keys get
      weight 0), then, with the bypass, the frame's own tokens (naive: K = L).
    num_text_keys: L.

  Returns:
    float64 [B, T]: for each frame, the mean over heads and over the frame's N query
    tokens of the attention mass on the first L keys, clipped to [0, 1] (rounding). The
    own-token share is `1 - text share`.
  """
  w = np.asarray(t2v_attention, dtype=np.float64)
  if w.ndim != 5:
    raise ValueError(f"expected attention weights [B, T, H, N, K], got shape {w.shape}")
  num_text_keys = int(num_text_keys)
  if not 0 < num_text_keys <= w.shape[-1]:
    raise ValueError(f"num_text_keys={num_text_keys} not in [1, K={w.shape[-1]}]")
  on_text = w[..., :num_text_keys].sum(axis=-1)  # [B, T, H, N]
  return np.clip(on_text.mean(axis=(2, 3)), 0.0, 1.0)


def picture_size(num_frames: int, frame_height: int, frame_width: int) -> tuple[int, int]:
  """(width, height) of the picture `draw_explanation` draws (module docstring)."""
  width = num_frames * frame_width + (num_frames + 1) * MARGIN
  height = (_frames_top() + frame_height + GAP + BAR_HEIGHT + GAP
            + LABEL_LINES * LINE_HEIGHT + MARGIN)
  return width, height


def _frames_top() -> int:
  return MARGIN + HEADER_LINES * LINE_HEIGHT + MARGIN


def frame_left(t: int, frame_width: int) -> int:
  """x of the left edge of frame t (and of its bar)."""
  return MARGIN + t * (frame_width + MARGIN)


def bar_top(frame_height: int) -> int:
  """y of the top row of the bars."""
  return _frames_top() + frame_height + GAP


def text_pixels(text_share: float, frame_width: int) -> int:
  """Columns of a bar given to the text part (the rest go to the own-token part)."""
  return int(round(float(np.clip(text_share, 0.0, 1.0)) * frame_width))


FONT_SIZE = 12


def _font():
  return ImageFont.load_default(size=FONT_SIZE)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
  """`text`, shortened with an ellipsis until it fits in `width` pixels."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "...", font=font) > width:
    text = text[:-1]
  return text + "..." if text else ""


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
  """`text` broken at spaces into at most `max_lines` lines of `width` pixels (the last
  one shortened with an ellipsis if the text does not fit)."""
  lines: list[str] = []
  words = text.split(" ")
  while words and len(lines) < max_lines:
    line = words.pop(0)
    while words and draw.textlength(line + " " + words[0], font=font) <= width:
      line += " " + words.pop(0)
    lines.append(line)
  if words:
    lines[-1] = lines[-1] + " " + " ".join(words)
  return [_fit(draw, line, font, width) for line in lines]


def _label_lines(draw, font, text_share: float, width: int) -> list[str]:
  """Percentages under a bar: the longest wording that fits in the frame's width."""
  text_pct = int(round(100 * text_share))
  own_pct = 100 - text_pct
  for lines in ([f"text {text_pct}%", f"own {own_pct}%"], [f"T {text_pct}%", f"O {own_pct}%"],
                [f"{text_pct}%", f"{own_pct}%"]):
    if all(draw.textlength(line, font=font) <= width for line in lines):
      return lines
  return [f"{text_pct}", f"{own_pct}"]


def draw_explanation(frames, text_share, query: str, path: str | None,
                     subtitle: str = "") -> Image.Image:
  """Draws the sampled frames in a row, each with its text/own attention bar, to `path`.

  Args:
    frames: uint8 [T, H, W, 3], the frames the model saw (in order).
    text_share: [T] floats in [0, 1], the text share of each frame (`attention_shares`).
    query: the query text (first header line).
    path: where to write the PNG (folders are created); None: do not write.
    subtitle: second header line (e.g. the video and its scores).

  Returns:
    The PIL image (size `picture_size(T, H, W)`).
  """
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
  shares = np.asarray(text_share, dtype=np.float64).reshape(-1)
  num, h, w, _ = frames.shape
  if shares.shape[0] != num:
    raise ValueError(f"{shares.shape[0]} text shares for {num} frames")
  if not np.all(np.isfinite(shares)):
    raise ValueError(f"text shares must be finite, got {shares}")
  shares = np.clip(shares, 0.0, 1.0)

  size = picture_size(num, h, w)
  image = Image.new("RGB", size, BACKGROUND)
  draw = ImageDraw.Draw(image)
  font = _font()
  inner = size[0] - 2 * MARGIN

  # Header: the query, the subtitle, the legend.
  y = MARGIN
  for i, line in enumerate(_wrap(draw, f'query: "{query}"', font, inner, QUERY_LINES)):
    draw.text((MARGIN, y + i * LINE_HEIGHT), line, fill=INK, font=font)
  y += QUERY_LINES * LINE_HEIGHT
  if subtitle:
    draw.text((MARGIN, y), _fit(draw, subtitle, font, inner), fill=INK, font=font)
  y += LINE_HEIGHT
  swatch = LINE_HEIGHT - 6
  legends = [("attention to the text", "to the frame's own tokens (bypass)"),
             ("text", "own tokens (bypass)"), ("text", "own")]
  for legend in legends:
    needed = sum(swatch + 3 + draw.textlength(label, font=font) + 10 for label in legend) - 10
    if needed <= inner or legend is legends[-1]:
      break
  x = MARGIN
  for color, label in zip((TEXT_COLOR, OWN_COLOR), legend):
    if x + swatch > size[0] - MARGIN:
      break
    draw.rectangle([x, y + 4, x + swatch - 1, y + 4 + swatch - 1], fill=color)
    x += swatch + 3
    label = _fit(draw, label, font, size[0] - MARGIN - x)
    draw.text((x, y), label, fill=INK, font=font)
    x += int(draw.textlength(label, font=font)) + 10

  # Frames, bars, percentages.
  top = _frames_top()
  y_bar = bar_top(h)
  for t in range(num):
    left = frame_left(t, w)
    image.paste(Image.fromarray(np.ascontiguousarray(frames[t])), (left, top))
    split = text_pixels(shares[t], w)
    if split > 0:
      draw.rectangle([left, y_bar, left + split - 1, y_bar + BAR_HEIGHT - 1], fill=TEXT_COLOR)
    if split < w:
      draw.rectangle([left + split, y_bar, left + w - 1, y_bar + BAR_HEIGHT - 1], fill=OWN_COLOR)
    for i, line in enumerate(_label_lines(draw, font, shares[t], w)):
      draw.text((left, y_bar + BAR_HEIGHT + GAP + i * LINE_HEIGHT), line, fill=INK, font=font)

  if path is not None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    image.save(path, format="PNG")
  return image
