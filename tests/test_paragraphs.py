"""Tests for kawhi_kernels.credit.paragraphs (token → paragraph by character offsets)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kawhi_kernels.credit import paragraph_ids, paragraph_ids_batch, split_paragraphs

# Qwen2-style pre-tokenizer regex: punctuation fuses with following newlines (".\n\n").
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
CORPUS = [
    "First step.\n\nSecond step is here.\n\nThe answer is 4.\n\n",
    "Look at the image.\n\nThe red box.\n\n\n\nDone.\n",
    "a b\n\nc d\n\n\n\ne f.\n\n\n\n",
    "\n\nStart.\n\nEnd.",
] * 20


def _build_tokenizer(trim_offsets: bool):
    """Tiny byte-level BPE trained offline, wrapped as an HF fast tokenizer (skip if unavailable)."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    eos_id = tok.token_to_id("<eos>")
    # EOS appended by the post-processor gets the HF "no offsets" span (0, 0).
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=trim_offsets),
        processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", eos_id)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def tokenizer():
    return _build_tokenizer(trim_offsets=False)


def _encode(tokenizer, text):
    enc = tokenizer(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    pieces = [text[a:b] if (a, b) != (0, 0) else "<eos>" for a, b in offsets]
    return offsets, pieces


# ---------------------------------------------------------------------------------------------
# Independent character-level oracle (loops, no str.split, no numpy).

def _oracle(text, offsets, delimiter="\n\n"):
    n = len(text)
    # piece index of every character, -1 inside a delimiter
    piece_of = [-1] * n
    piece_chars = [[]]
    i = 0
    while i < n:
        if text.startswith(delimiter, i):
            i += len(delimiter)
            piece_chars.append([])
            continue
        piece_of[i] = len(piece_chars) - 1
        piece_chars[-1].append(text[i])
        i += 1
    kept = {}
    for k, chars in enumerate(piece_chars):
        if any(not ch.isspace() for ch in chars):
            kept[k] = len(kept)
    m = len(kept)
    para = [kept.get(piece_of[c], -1) if piece_of[c] >= 0 and text[c] not in "\r\n" else -1
            for c in range(n)]
    out = []
    for span in offsets:
        if m == 0:
            out.append(-1)
            continue
        if span is None or tuple(span) == (0, 0):
            out.append(m - 1)
            continue
        s, e = span
        inside = [para[c] for c in range(s, e) if para[c] >= 0]
        if inside:
            out.append(inside[0])
            continue
        before = [para[c] for c in range(0, s) if para[c] >= 0]
        out.append(before[-1] if before else 0)
    return out


# ---------------------------------------------------------------------------------------------
# Hand-written cases with explicit offsets.

def test_explicit_offsets_basic():
    text = "Hi there.\n\nNext one.\n\n\n\nLast"
    #        0123456789 0 1234567890 1 2 3 4567
    offsets = [(0, 2), (2, 8), (8, 11), (11, 15), (15, 20), (20, 22), (22, 24), (24, 28), (0, 0)]
    assert split_paragraphs(text) == [(0, 9), (11, 20), (24, 28)]
    assert paragraph_ids(text, offsets).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_newline_token_before_first_paragraph_goes_to_zero():
    text = "\n\n\nAbc\n\n"
    offsets = [(0, 2), (2, 3), (3, 6), (6, 8), None]
    assert paragraph_ids(text, offsets).tolist() == [0, 0, 0, 0, 0]


def test_fused_token_with_next_paragraph_text_starts_it():
    text = "One.\n\nTwo"
    offsets = [(0, 3), (3, 7), (7, 9)]  # ".\n\nT" holds an anchor of both paragraphs: first wins
    assert paragraph_ids(text, offsets).tolist() == [0, 0, 1]
    offsets = [(0, 4), (4, 7), (7, 9)]  # "\n\nT": first non-newline char is in paragraph 1
    assert paragraph_ids(text, offsets).tolist() == [0, 1, 1]


def test_whitespace_of_dropped_piece_joins_preceding_paragraph():
    text = "A.\n\n   \n\nB."
    #        01 2 3 456 7 8 9 10
    offsets = [(0, 2), (2, 4), (4, 7), (7, 9), (9, 11)]
    assert split_paragraphs(text) == [(0, 2), (9, 11)]
    assert paragraph_ids(text, offsets).tolist() == [0, 0, 0, 0, 1]


def test_zero_width_span_mid_text_joins_preceding_paragraph():
    text = "ab\n\ncd"
    offsets = [(0, 2), (2, 4), (4, 4), (4, 6), (6, 6), (0, 0)]
    assert paragraph_ids(text, offsets).tolist() == [0, 0, 0, 1, 1, 1]


def test_custom_delimiter():
    text = "x ## y ##  ## z"
    offsets = [(0, 2), (2, 4), (4, 7), (7, 10), (10, 13), (13, 15)]
    assert split_paragraphs(text, "##") == [(0, 2), (4, 7), (13, 15)]
    assert paragraph_ids(text, offsets, delimiter="##").tolist() == [0, 0, 1, 1, 1, 2]


def test_no_paragraph_gives_minus_one():
    assert paragraph_ids("", [(0, 0), None]).tolist() == [-1, -1]
    assert paragraph_ids(" \n\n \n", [(0, 2), (2, 5), (0, 0)]).tolist() == [-1, -1, -1]


def test_empty_token_list():
    out = paragraph_ids("abc", [])
    assert out.dtype == torch.int32 and out.shape == (0,)


def test_offset_containers_agree():
    text = "a.\n\nb\n\nc"
    pairs = [(0, 1), (1, 4), (4, 5), (5, 7), (7, 8), (0, 0)]
    expected = [0, 0, 1, 1, 2, 2]
    assert paragraph_ids(text, pairs).tolist() == expected
    assert paragraph_ids(text, [list(p) for p in pairs]).tolist() == expected
    assert paragraph_ids(text, pairs[:-1] + [None]).tolist() == expected
    assert paragraph_ids(text, np.array(pairs, dtype=np.int32)).tolist() == expected
    assert paragraph_ids(text, torch.tensor(pairs, dtype=torch.int64)).tolist() == expected
    assert paragraph_ids(text, torch.tensor(pairs, dtype=torch.int32)).dtype == torch.int32


# ---------------------------------------------------------------------------------------------
# Real HF fast tokenizer offsets.

def test_tokenizer_has_fused_newline_tokens(tokenizer):
    _, pieces = _encode(tokenizer, "Look at the image.\n\nThe red box.\n\n\n\nDone.\n")
    assert ".\n\n" in pieces or ".\n\n\n\n" in pieces
    _, pieces = _encode(tokenizer, "\n\nStart.\n\nEnd.")
    assert pieces[0] == "\n\n" and ".\n\n" in pieces


def test_tokenizer_fused_period_newlines(tokenizer):
    text = "First step.\n\nSecond step is here.\n\nThe answer is 4."
    offsets, pieces = _encode(tokenizer, text)
    ids = paragraph_ids(text, offsets).tolist()
    assert pieces[-1] == "<eos>" and ids[-1] == 2
    boundary = [k for k, p in enumerate(pieces) if p == ".\n\n"]
    assert len(boundary) == 2
    for para, k in enumerate(boundary):  # the fused token closes its paragraph
        assert ids[k] == para and ids[k + 1] == para + 1
    assert ids == sorted(ids) and set(ids) == {0, 1, 2}
    assert ids == _oracle(text, offsets)


def test_tokenizer_leading_and_trailing_blank_lines(tokenizer):
    text = "\n\nStart.\n\nEnd.\n\n"
    offsets, pieces = _encode(tokenizer, text)
    got = list(zip(pieces, paragraph_ids(text, offsets).tolist()))
    first_end = pieces.index("End") if "End" in pieces else pieces.index("End.\n\n")
    assert got[0] == ("\n\n", 0)  # no preceding paragraph -> 0
    assert all(i == 0 for _, i in got[:first_end])
    assert all(i == 1 for _, i in got[first_end:])  # trailing blank lines and EOS -> last
    assert got[-1] == ("<eos>", 1)


def test_tokenizer_drops_empty_paragraph(tokenizer):
    text = "Look at the image.\n\nThe red box.\n\n\n\nDone.\n"
    offsets, pieces = _encode(tokenizer, text)
    assert any(p.endswith("\n\n\n\n") for p in pieces)
    ids = paragraph_ids(text, offsets).tolist()
    assert max(ids) == 2  # "\n\n\n\n" leaves an empty piece that is not a paragraph
    expected = []
    para = 0
    for p in pieces:
        expected.append(para if p != "<eos>" else 2)
        if p.endswith("\n\n"):
            para += 1
    assert ids == expected


def test_tokenizer_single_paragraph(tokenizer):
    text = "The answer is 4.\nDone."
    offsets, pieces = _encode(tokenizer, text)
    assert paragraph_ids(text, offsets).tolist() == [0] * len(pieces)


def test_tokenizer_eos_only_response(tokenizer):
    offsets, pieces = _encode(tokenizer, "")
    assert pieces == ["<eos>"]
    assert paragraph_ids("", offsets).tolist() == [-1]


def test_trimmed_offsets_tokenizer():
    tok = _build_tokenizer(trim_offsets=True)
    text = "a b\n\n   c d"
    offsets, _ = _encode(tok, text)
    zero_width = [k for k, (a, b) in enumerate(offsets) if a == b and a > 0]
    assert zero_width, "expected trimmed space tokens with zero-width spans"
    ids = paragraph_ids(text, offsets).tolist()
    assert ids == _oracle(text, offsets)
    assert ids[0] == 0 and ids[-2] == 1 and ids[-1] == 1


def test_tokenizer_random_texts_vs_oracle(tokenizer):
    rng = random.Random(0)
    atoms = ["a", "b", "The", " ", ".", "\n", "\n\n", "\n\n\n\n", "4", "é", "  "]
    for _ in range(200):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 25)))
        offsets, _ = _encode(tokenizer, text)
        assert paragraph_ids(text, offsets).tolist() == _oracle(text, offsets), repr(text)


def test_random_spans_vs_oracle():
    rng = random.Random(1)
    for _ in range(300):
        delimiter = rng.choice(["\n\n", "\n\n", "##", "\r\n\r\n"])
        atoms = ["x", " ", "\n", "\r", "#", delimiter, delimiter]
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
        n = len(text)
        offsets = []
        for _ in range(rng.randint(0, 12)):
            kind = rng.random()
            if kind < 0.1:
                offsets.append(None)
            elif kind < 0.2:
                offsets.append((0, 0))
            else:
                s = rng.randint(0, n)
                offsets.append((s, rng.randint(s, min(n, s + 6))))
        got = paragraph_ids(text, offsets, delimiter=delimiter).tolist()
        assert got == _oracle(text, offsets, delimiter), (text, offsets, delimiter)


# ---------------------------------------------------------------------------------------------
# Batch packing.

def test_batch_packing(tokenizer):
    texts = ["One.\n\nTwo.", "", "Single", "\n\nA\n\n\n\nB\n\n"]
    offsets_list = [_encode(tokenizer, t)[0] for t in texts]
    ids, cu = paragraph_ids_batch(texts, offsets_list)
    assert ids.dtype == torch.int32 and cu.dtype == torch.int32
    lengths = [len(o) for o in offsets_list]
    assert cu.tolist() == [0] + np.cumsum(lengths).tolist()
    for b, (t, o) in enumerate(zip(texts, offsets_list)):
        assert ids[cu[b]:cu[b + 1]].tolist() == paragraph_ids(t, o).tolist()
    assert ids[cu[1]:cu[2]].tolist() == [-1]


# ---------------------------------------------------------------------------------------------
# Validation: one test per rule.

def test_text_not_str_raises():
    with pytest.raises(TypeError, match="text"):
        paragraph_ids(b"abc", [(0, 1)])


def test_offsets_end_beyond_text_raises():
    with pytest.raises(ValueError, match="offsets"):
        paragraph_ids("abc", [(0, 4)])


def test_offsets_negative_start_raises():
    with pytest.raises(ValueError, match="offsets"):
        paragraph_ids("abc", torch.tensor([[-1, 2]]))


def test_offsets_end_before_start_raises():
    with pytest.raises(ValueError, match="offsets"):
        paragraph_ids("abc", [(2, 1)])


def test_offsets_wrong_shape_tensor_raises():
    with pytest.raises(ValueError, match="offsets"):
        paragraph_ids("abc", torch.zeros(2, 3, dtype=torch.int64))


def test_offsets_wrong_shape_array_raises():
    with pytest.raises(ValueError, match="offsets"):
        paragraph_ids("abc", np.zeros(4, dtype=np.int64))


def test_offsets_bad_pair_raises():
    with pytest.raises(ValueError, match="offsets"):
        paragraph_ids("abc", [(0, 1, 2)])


def test_offsets_float_dtype_raises():
    with pytest.raises(TypeError, match="offsets"):
        paragraph_ids("abc", torch.zeros(1, 2))


def test_offsets_non_int_entries_raise():
    with pytest.raises(TypeError, match="offsets"):
        paragraph_ids("abc", [(0.0, 1.0)])


def test_offsets_not_a_sequence_raises():
    with pytest.raises(TypeError, match="offsets"):
        paragraph_ids("abc", 3)


def test_empty_delimiter_raises():
    with pytest.raises(ValueError, match="delimiter"):
        paragraph_ids("abc", [(0, 1)], delimiter="")


def test_delimiter_not_str_raises():
    with pytest.raises(TypeError, match="delimiter"):
        paragraph_ids("abc", [(0, 1)], delimiter=None)


def test_batch_length_mismatch_raises():
    with pytest.raises(ValueError, match="offsets_list"):
        paragraph_ids_batch(["a", "b"], [[(0, 1)]])


def test_batch_text_not_str_raises():
    with pytest.raises(TypeError, match="texts"):
        paragraph_ids_batch(["a", 3], [[(0, 1)], [(0, 1)]])


def test_batch_empty_raises():
    with pytest.raises(ValueError, match="texts"):
        paragraph_ids_batch([], [])


def test_batch_error_names_response():
    with pytest.raises(ValueError, match="response 1: offsets"):
        paragraph_ids_batch(["a", "b"], [[(0, 1)], [(0, 5)]])
