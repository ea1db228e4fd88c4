"""Token → paragraph assignment for KAWHI paragraph weights (DESIGN.md section 1, step 4).

A response text is split on a delimiter (``"\\n\\n"`` by default) into pieces; pieces that are
empty or whitespace-only are dropped and the remaining ones are the paragraphs 0 … M−1. Tokens are
mapped to paragraphs through the per-token character spans ``(start, end)`` that HF fast
tokenizers return with ``return_offsets_mapping=True``.

Rules, in order:

1. An *anchor* character is a character that lies inside a paragraph (not inside a delimiter or a
   dropped piece) and is not a newline (``"\\n"`` or ``"\\r"``).
2. A token with no offsets — ``None`` or the span ``(0, 0)`` that HF gives to special tokens such as
   EOS added by a post-processor — joins the **last** paragraph.
3. A token whose span holds an anchor belongs to the paragraph of its first anchor. With the
   default delimiter this is DESIGN's "paragraph holding its first non-newline character"; a fused
   token such as ``".\\n\\n"`` stays with the paragraph it ends, ``"\\n\\nThe"`` starts the next one.
4. A token whose span holds no anchor — only newlines, whitespace of a dropped piece, delimiter
   characters, or a zero-width span ``(p, p)`` with p > 0 (e.g. a space token whose offsets a
   ``ByteLevel(trim_offsets=True)`` post-processor trimmed) — joins the **preceding** paragraph:
   the paragraph of the last anchor before the token's start, or paragraph 0 if there is none.
5. If the text has no paragraph at all (empty or whitespace-only, M = 0), every id is −1
   ("no paragraph"); ``paragraph_weights`` gives such tokens weight 1 (plain GRPO).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

_NEWLINE_CODES = (ord("\n"), ord("\r"))


def split_paragraphs(text: str, delimiter: str = "\n\n") -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the paragraphs of ``text`` (see module docstring).

    Args:
        text: the response text.
        delimiter: non-empty paragraph separator.
    Returns:
        list of M (start, end) pairs in text order; whitespace-only pieces are not included.
    """
    _check_text(text)
    _check_delimiter(delimiter)
    spans = []
    start = 0
    for piece in text.split(delimiter):
        end = start + len(piece)
        if piece.strip():
            spans.append((start, end))
        start = end + len(delimiter)
    return spans


def paragraph_ids(text: str, offsets, delimiter: str = "\n\n") -> torch.Tensor:
    """Paragraph index of every token of one response.

    Args:
        text: the decoded response text the offsets point into.
        offsets: per-token character spans, T entries: a list/tuple of ``(start, end)`` pairs or
            ``None`` (token without offsets), or an integer numpy array / CPU-or-GPU tensor of shape
            [T, 2]. Spans must satisfy 0 ≤ start ≤ end ≤ len(text).
        delimiter: non-empty paragraph separator (default ``"\\n\\n"``).
    Returns:
        int32 CPU tensor [T] with values in [0, M) (M = number of paragraphs), or all −1 when the
        text has no paragraph (M = 0).
    Raises:
        TypeError: ``text`` not a str, ``delimiter`` not a str, ``offsets`` of a wrong type/dtype.
        ValueError: ``offsets`` of a wrong shape, with end < start or outside the text; empty
            ``delimiter``.
    """
    _check_text(text)
    spans = split_paragraphs(text, delimiter)
    starts, ends, has_offset = _normalise_offsets(offsets, len(text))
    num_tokens = starts.shape[0]
    if not spans:
        return torch.full((num_tokens,), -1, dtype=torch.int32)
    if num_tokens == 0:
        return torch.zeros(0, dtype=torch.int32)

    n = len(text)
    # Paragraph of every anchor character, -1 for non-anchors.
    char_para = np.full(n, -1, dtype=np.int64)
    for j, (a, b) in enumerate(spans):
        char_para[a:b] = j
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    char_para[np.isin(codes, _NEWLINE_CODES)] = -1
    is_anchor = char_para >= 0
    positions = np.arange(n, dtype=np.int64)

    # next_anchor[c]: first anchor index >= c (n if none), for c in [0, n].
    next_anchor = np.where(is_anchor, positions, n)
    next_anchor = np.minimum.accumulate(next_anchor[::-1])[::-1]
    next_anchor = np.concatenate([next_anchor, [n]])
    # prev_anchor[c]: last anchor index < c (-1 if none), for c in [0, n].
    prev_anchor = np.where(is_anchor, positions, -1)
    prev_anchor = np.concatenate([[-1], np.maximum.accumulate(prev_anchor)])

    first_inside = next_anchor[starts]
    has_inside = first_inside < ends
    before = prev_anchor[starts]
    ids = np.zeros(num_tokens, dtype=np.int64)  # preceding paragraph defaults to 0
    ids[before >= 0] = char_para[before[before >= 0]]
    ids[has_inside] = char_para[first_inside[has_inside]]
    no_offset = ~has_offset | ((starts == 0) & (ends == 0))
    ids[no_offset] = len(spans) - 1
    return torch.from_numpy(ids.astype(np.int32))


def paragraph_ids_batch(
    texts: Sequence[str], offsets_list: Sequence, delimiter: str = "\n\n"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``paragraph_ids`` for B responses, packed.

    Args:
        texts: B response texts.
        offsets_list: B offset sequences (each as accepted by ``paragraph_ids``).
        delimiter: non-empty paragraph separator.
    Returns:
        (ids int32 [sum T_b] with per-response local ids 0 … M_b−1 or −1,
         cu_seqlens int32 [B+1]), both on CPU.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts: expected a sequence of str, got {type(texts).__name__}")
    if isinstance(offsets_list, (str, torch.Tensor, np.ndarray)) or not isinstance(offsets_list, Sequence):
        raise TypeError(f"offsets_list: expected a sequence of per-response offsets, "
                        f"got {type(offsets_list).__name__}")
    if len(texts) != len(offsets_list):
        raise ValueError(f"offsets_list: expected {len(texts)} entries (one per text), got {len(offsets_list)}")
    if len(texts) == 0:
        raise ValueError("texts: expected at least one response, got an empty sequence")
    parts = []
    for b, (text, offsets) in enumerate(zip(texts, offsets_list)):
        if not isinstance(text, str):
            raise TypeError(f"texts[{b}]: expected a str, got {type(text).__name__}")
        try:
            parts.append(paragraph_ids(text, offsets, delimiter))
        except (TypeError, ValueError) as err:
            raise type(err)(f"response {b}: {err}") from err
    lengths = torch.tensor([p.numel() for p in parts], dtype=torch.int64)
    cu_seqlens = torch.zeros(len(parts) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    return torch.cat(parts), cu_seqlens


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")


def _check_delimiter(delimiter) -> None:
    if not isinstance(delimiter, str):
        raise TypeError(f"delimiter: expected a str, got {type(delimiter).__name__}")
    if not delimiter:
        raise ValueError("delimiter: expected a non-empty string")


def _normalise_offsets(offsets, text_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (starts int64 [T], ends int64 [T], has_offset bool [T]); None entries get (0, 0)."""
    if isinstance(offsets, torch.Tensor):
        if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
            raise TypeError(f"offsets: expected an integer tensor, got dtype {offsets.dtype}")
        arr = offsets.detach().to("cpu", torch.int64).numpy()
        has_offset = None
    elif isinstance(offsets, np.ndarray) and offsets.dtype != object:
        if not np.issubdtype(offsets.dtype, np.integer):
            raise TypeError(f"offsets: expected an integer array, got dtype {offsets.dtype}")
        arr = offsets.astype(np.int64)
        has_offset = None
    else:
        if isinstance(offsets, np.ndarray):
            offsets = offsets.tolist()
        if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Sequence):
            raise TypeError(f"offsets: expected a list of (start, end) pairs, an array or a tensor "
                            f"of shape [T, 2], got {type(offsets).__name__}")
        arr = np.zeros((len(offsets), 2), dtype=np.int64)
        has_offset = np.ones(len(offsets), dtype=bool)
        for i, pair in enumerate(offsets):
            if pair is None:
                has_offset[i] = False
                continue
            if isinstance(pair, torch.Tensor):
                pair = pair.tolist()
            if isinstance(pair, (str, bytes)) or not isinstance(pair, (Sequence, np.ndarray)) or len(pair) != 2:
                raise ValueError(f"offsets: entry {i} must be a (start, end) pair or None, got {pair!r}")
            for v in pair:
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                    raise TypeError(f"offsets: entry {i} must hold ints, got {pair!r}")
            arr[i] = (int(pair[0]), int(pair[1]))
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"offsets: expected shape [T, 2], got {tuple(arr.shape)}")
    if has_offset is None:
        has_offset = np.ones(arr.shape[0], dtype=bool)
    starts, ends = arr[:, 0], arr[:, 1]
    if arr.shape[0]:
        bad = (starts < 0) | (ends > text_len)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"offsets: span {i} ({starts[i]}, {ends[i]}) lies outside the text "
                             f"(length {text_len}); expected 0 <= start <= end <= {text_len}")
        bad = ends < starts
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"offsets: span {i} has end < start ({starts[i]}, {ends[i]})")
    return starts.copy(), ends.copy(), has_offset
