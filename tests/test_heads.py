"""Head attribution: masking really removes one head in every layer, the attention-mass profile
equals eager attention weights reduced by hand, the ablation results file resumes without
re-scoring, the multiple-choice scorer, presets and the ``kawhi-kernels heads`` CLI."""
import copy
import json
import math

import pytest
import torch

from kawhi_kernels.heads import PRESETS, vision_critical_heads
from kawhi_kernels.heads.ablation import (
    ablate_heads,
    attention_blocks,
    mask_heads,
    model_fingerprint,
    num_query_heads,
)
from kawhi_kernels.heads.cli import run_heads_cli
from kawhi_kernels.heads.profile import HeadProfile, profile_heads, text_after_image_mask
from kawhi_kernels.heads.scoring import MultipleChoiceScorer, encode_item, load_multiple_choice
from kawhi_kernels.integrations import tiny_qwen2_5_vl, tiny_qwen3_vl, tiny_vl_inputs
from kawhi_kernels.integrations.tiny_models import IMAGE_TOKEN_ID


def sharpen(model, factor=50.0):
    """Scale the text q projections so the tiny random model's attention is far from uniform
    (heads then differ clearly in image mass)."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            if layer.self_attn.q_proj.bias is not None:
                layer.self_attn.q_proj.bias.mul_(factor)
    return model


@pytest.fixture(scope="module")
def model():
    return sharpen(tiny_qwen2_5_vl(seed=1))


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_vl_inputs(model, [1, 2], [7, 4], padding_side="right", seed=5)


def o_proj_inputs(model, inputs):
    """Input of every layer's o_proj in one forward: {layer: [B, L, H·D]}."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.language_model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_hook(
            lambda mod, args, out, i=i: seen.__setitem__(i, args[0].detach().clone())))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


# ------------------------------------------------------------------------------------- masking

def test_attention_blocks_are_the_text_decoder_layers(model):
    blocks = attention_blocks(model)
    assert len(blocks) == model.config.text_config.num_hidden_layers
    assert all("language_model" in name for name, _ in blocks)
    assert num_query_heads(model) == 4


@pytest.mark.parametrize("head", [0, 3])
def test_mask_zeroes_the_head_slice_in_every_layer(model, inputs, head):
    d = model.model.language_model.layers[0].self_attn.head_dim
    base, base_logits = o_proj_inputs(model, inputs)
    with mask_heads(model, head) as names:
        masked, masked_logits = o_proj_inputs(model, inputs)
    assert len(names) == 2
    for layer, x in masked.items():
        assert torch.count_nonzero(x[..., head * d:(head + 1) * d]) == 0
        assert torch.count_nonzero(base[layer][..., head * d:(head + 1) * d]) > 0
    # Layer 0 sees the unmasked residual stream: every other head's output is untouched.
    others = [h for h in range(4) if h != head]
    for h in others:
        assert torch.equal(masked[0][..., h * d:(h + 1) * d], base[0][..., h * d:(h + 1) * d])
    assert not torch.allclose(masked_logits, base_logits)
    # Hooks are gone after the context.
    _, after = o_proj_inputs(model, inputs)
    assert torch.equal(after, base_logits)


def test_mask_equals_zeroing_the_heads_o_proj_columns(model, inputs):
    head, d = 2, model.model.language_model.layers[0].self_attn.head_dim
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for layer in pruned.model.language_model.layers:
            layer.self_attn.o_proj.weight[:, head * d:(head + 1) * d] = 0
        expected = pruned(**inputs).logits
        with mask_heads(model, [head]):
            got = model(**inputs).logits
        base = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got - base).abs().max() > 1e-3


def test_mask_heads_rejects_bad_heads(model):
    with pytest.raises(ValueError, match="heads"):
        with mask_heads(model, 4):
            pass
    with pytest.raises(TypeError, match="model"):
        with mask_heads(torch.nn.Linear(2, 2), 0):
            pass


# ------------------------------------------------------------------------------------- profile

def reference_profile(batches, masks):
    """Mass and entropy from eager ``output_attentions`` weights (same weights as the ``model``
    fixture), reduced by hand."""
    eager = sharpen(tiny_qwen2_5_vl(seed=1, attn_implementation="eager"))
    num_layers = len(eager.model.language_model.layers)
    mass = torch.zeros(num_layers, 4, dtype=torch.float64)
    entropy = torch.zeros_like(mass)
    count = 0
    for inputs, mask in zip(batches, masks):
        with torch.no_grad():
            attentions = eager(**inputs, output_attentions=True).attentions     # [B, H, L, L] each
        for b in range(inputs["input_ids"].shape[0]):
            rows = mask[b].nonzero().squeeze(1)
            image = inputs["input_ids"][b] == IMAGE_TOKEN_ID
            if rows.numel() == 0 or not image.any():
                continue
            count += 1
            for layer, weights in enumerate(attentions):
                w = weights[b][:, rows][:, :, image].double()                    # [H, rows, image keys]
                mass[layer] += w.sum(-1).mean(-1)
                p = w.sum(1) / w.sum(1).sum(-1, keepdim=True)
                entropy[layer] += -(p * p.log()).sum(-1)
    return mass / count, entropy / count, count


@pytest.mark.parametrize("rows", ["default", "last3"])
def test_profile_matches_eager_attention_weights(model, rows):
    batches = [tiny_vl_inputs(model, [1, 2], [7, 4], padding_side="right", seed=5),
               tiny_vl_inputs(model, [2, 0, 1], [3, 6, 5], padding_side="left", seed=6)]
    if rows == "default":
        masks = [text_after_image_mask(b["input_ids"], b["attention_mask"], IMAGE_TOKEN_ID) for b in batches]
        given = batches
    else:   # the last 3 tokens of every row, given as a "query_mask" batch entry
        masks = []
        for b in batches:
            valid = b["attention_mask"].bool()
            rank_from_end = valid.flip(1).long().cumsum(1).flip(1)
            masks.append(valid & (rank_from_end <= 3))
        given = [{**b, "query_mask": m} for b, m in zip(batches, masks)]
    profile = profile_heads(model, given, backend="torch", model_name="tiny")
    mass, entropy, count = reference_profile(batches, masks)
    assert profile.num_sequences == count == 4                 # the image-less row is skipped
    assert profile.num_rows == sum(int(m[b].sum()) for m, bt in zip(masks, batches)
                                   for b in range(m.shape[0]) if (bt["input_ids"][b] == IMAGE_TOKEN_ID).any())
    torch.testing.assert_close(profile.mass, mass, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(profile.entropy, entropy, atol=2e-5, rtol=1e-5)
    assert profile.layers == [0, 1]
    head_mass = mass.mean(0)
    assert profile.ranking() == sorted(range(4), key=lambda h: -float(head_mass[h]))
    assert float(head_mass.max() - head_mass.min()) > 0.02      # the sharpened heads really differ


def test_profile_selected_layers_and_exports(model, inputs, tmp_path):
    full = profile_heads(model, inputs, backend="torch")
    last = profile_heads(model, [inputs], layers=[-1], backend="torch")
    assert last.layers == [1] and last.mass.shape == (1, 4)
    torch.testing.assert_close(last.mass[0], full.mass[1])
    paths = full.save(tmp_path / "prof")
    lines = paths["csv"].read_text().splitlines()
    assert lines[0] == "layer,head,mass,entropy" and len(lines) == 1 + 2 * 4
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| rank | head |" in paths["markdown"].read_text()
    loaded = HeadProfile.from_dict(json.loads(paths["json"].read_text()))
    torch.testing.assert_close(loaded.mass, full.mass)
    assert loaded.ranking() == full.ranking()
    assert 0 < full.max_entropy == pytest.approx((math.log(6) + math.log(12)) / 2)


def test_profile_rejects_non_suffix_rows_and_empty_batches(model, inputs):
    prompt_rows = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    prompt_rows[:, :2] = True
    with pytest.raises(ValueError, match="last non-pad tokens"):
        profile_heads(model, inputs, query_mask_fn=lambda batch: prompt_rows, backend="torch")
    no_images = tiny_vl_inputs(model, [0, 0], [4, 5])
    with pytest.raises(ValueError, match="no sequence had both"):
        profile_heads(model, no_images, backend="torch")
    with pytest.raises(ValueError, match="query_mask"):
        profile_heads(model, inputs, query_mask_fn=lambda batch: prompt_rows[:, :3], backend="torch")


# ------------------------------------------------------------------------------------- ablation

def logit_score(inputs):
    """A deterministic score that moves when any head is masked: mean log-prob of the last token."""
    def score(model):
        logits = model(**inputs).logits[:, -1]
        return float(torch.log_softmax(logits, -1).max(-1).values.mean())
    score.fingerprint = "logit-score-v1"
    return score


class Interrupted(Exception):
    """Stands in for Ctrl-C (a real KeyboardInterrupt would also stop pytest on a bug)."""


def test_ablation_resumes_without_rescoring(model, inputs, tmp_path):
    results = tmp_path / "ablation.jsonl"
    inner = logit_score(inputs)
    calls = []

    def interrupted(m):
        calls.append(1)
        if len(calls) == 4:          # baseline, head 0, head 1, then "Ctrl-C" during head 2
            raise Interrupted
        return inner(m)
    interrupted.fingerprint = inner.fingerprint

    with pytest.raises(Interrupted):
        ablate_heads(model, interrupted, results_path=results, progress=False)
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [x["type"] for x in lines] == ["header", "baseline", "head", "head"]
    assert all(len(mask_hooks) == 0 for mask_hooks in
               (b.o_proj._forward_pre_hooks for _, b in attention_blocks(model)))

    calls.clear()
    resumed = ablate_heads(model, interrupted, results_path=results, threshold=0.0, progress=True)
    assert len(calls) == 2                                     # heads 2 and 3 only
    fresh = ablate_heads(model, inner, progress=False)
    assert resumed.baseline == fresh.baseline
    assert resumed.scores == fresh.scores and sorted(resumed.scores) == [0, 1, 2, 3]
    assert resumed.drops == {h: fresh.baseline - s for h, s in fresh.scores.items()}
    assert resumed.selected == sorted(h for h, d in resumed.drops.items() if d > 0)
    assert resumed.select(float("inf")) == []
    assert "| rank | head |" in resumed.to_markdown()

    # A write cut short leaves half a line: tolerated, nothing re-scored.
    with open(results, "a") as f:
        f.write('{"type": "head", "he')
    calls.clear()
    again = ablate_heads(model, interrupted, results_path=results, progress=False)
    assert len(calls) == 0 and again.scores == resumed.scores
    assert len(results.read_text().splitlines()) == 6

    # Another model or another score function must not reuse the file.
    other = sharpen(tiny_qwen2_5_vl(seed=2))
    assert model_fingerprint(other) != model_fingerprint(model)
    with pytest.raises(ValueError, match="different run"):
        ablate_heads(other, interrupted, results_path=results, progress=False)
    with pytest.raises(ValueError, match="score_fn"):
        ablate_heads(model, lambda m: 0.0, results_path=results, progress=False)


def test_ablation_argument_errors(model, tmp_path):
    with pytest.raises(TypeError, match="score_fn"):
        ablate_heads(model, 3, progress=False)
    with pytest.raises(TypeError, match="score_fn"):
        ablate_heads(model, lambda m: "high", progress=False)
    bogus = tmp_path / "bogus.jsonl"
    bogus.write_text('{"type": "baseline", "score": 1}\n')
    with pytest.raises(ValueError, match="not a head-ablation results file"):
        ablate_heads(model, lambda m: 1.0, results_path=bogus, progress=False)


# ------------------------------------------------------------------------------------- scoring

def write_dataset(path, num_items=3):
    gen = torch.Generator().manual_seed(0)
    items = []
    for i in range(num_items):
        prompt = [5 + i, 502] + [IMAGE_TOKEN_ID] * 6 + [503] + torch.randint(3, 500, (4,), generator=gen).tolist()
        choices = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (1, 3, 2)]
        items.append({"prompt_ids": prompt, "choices": choices, "answer": i % 3, "image_grid": [4, 6]})
    path.write_text("\n".join(json.dumps(x) for x in items) + "\n")
    return items


def test_multiple_choice_scorer_matches_manual_loglik(model, tmp_path):
    items = write_dataset(tmp_path / "mc.jsonl", num_items=2)
    scorer = MultipleChoiceScorer(tmp_path / "mc.jsonl")
    item = items[1]
    got = scorer.choice_logprobs(model, 1)
    # One unpadded forward per choice (full logits), log-probs summed by hand.
    for c, choice in enumerate(item["choices"]):
        inputs, prompt_len, lengths = encode_item(model, item, choices=[c], index=1)
        ids = item["prompt_ids"] + choice
        assert inputs["input_ids"][0].tolist() == ids and lengths == [len(choice)]
        with torch.no_grad():
            logp = torch.log_softmax(model(**inputs).logits[0].double(), -1)
        expected = sum(float(logp[prompt_len - 1 + j, ids[prompt_len + j]]) for j in range(len(choice)))
        assert got[c].item() == pytest.approx(expected, abs=1e-4)
    all_scores = [scorer.choice_logprobs(model, i) for i in range(2)]
    accuracy = 100.0 * sum(int(s.argmax()) == it["answer"] for s, it in zip(all_scores, items)) / 2
    assert scorer(model) == pytest.approx(accuracy)
    logprob_metric = MultipleChoiceScorer(tmp_path / "mc.jsonl", metric="answer_logprob")
    expected = sum(float(s[it["answer"]] - torch.logsumexp(s, 0)) for s, it in zip(all_scores, items)) / 2
    assert logprob_metric(model) == pytest.approx(expected, abs=1e-6)
    assert logprob_metric.fingerprint != scorer.fingerprint


class CharTokenizer:
    """A toy tokenizer (one id per character) standing in for a real one in ``text`` items."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [3 + ord(ch) % 400 for ch in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def test_text_items_score_like_their_token_ids(model):
    tok = CharTokenizer()
    text_item = {"text": "Is it red?", "choices": ["yes", "no"], "answer": 1}
    ids_item = {"prompt_ids": tok("Is it red?")["input_ids"], "choices": [tok("yes")["input_ids"], tok("no")["input_ids"]],
                "answer": 1}
    from_text = MultipleChoiceScorer([text_item], processor=tok).choice_logprobs(model, 0)
    from_ids = MultipleChoiceScorer([ids_item]).choice_logprobs(model, 0)
    torch.testing.assert_close(from_text, from_ids)


def test_multiple_choice_dataset_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_ids": [5, 6], "choices": [[7], [8]], "answer": 0}\n'
                   '{"prompt_ids": [5, 6], "choices": [[7], [8]], "answer": 2}\n')
    with pytest.raises(ValueError, match="line 2: 'answer'"):
        load_multiple_choice(bad)
    bad.write_text('{"text": "hi", "choices": ["a", "b"], "answer": 0}\n')
    with pytest.raises(ValueError, match="processor"):
        MultipleChoiceScorer(bad)(tiny_qwen2_5_vl())
    bad.write_text(f'{{"prompt_ids": [5, {IMAGE_TOKEN_ID}], "choices": [[7], [8]], "answer": 0, "image_grid": [4, 6]}}\n')
    with pytest.raises(ValueError, match="image tokens"):
        MultipleChoiceScorer(bad)(tiny_qwen2_5_vl())
    with pytest.raises(ValueError, match="metric"):
        MultipleChoiceScorer(bad, metric="f1")


# ------------------------------------------------------------------------------------- presets + CLI

def test_presets_load():
    assert vision_critical_heads("Qwen/Qwen2.5-VL-7B-Instruct") == [0, 1, 3, 22, 23, 24, 25, 26, 27]
    assert vision_critical_heads("qwen3-vl-4b") == list(PRESETS["qwen3-vl-4b"])
    with pytest.raises(ValueError, match="no vision-critical head preset"):
        vision_critical_heads(tiny_qwen3_vl())


def test_cli_presets(capsys):
    assert run_heads_cli(["presets"]) == 0
    out = capsys.readouterr().out
    for name, heads in PRESETS.items():
        assert name in out and ", ".join(map(str, heads)) in out


def test_cli_profile_and_resumable_ablate(tmp_path, capsys):
    out_dir = tmp_path / "profile"
    assert run_heads_cli(["profile", "--model", "tiny-qwen2.5-vl", "--out", str(out_dir), "--device", "cpu",
                          "--num-batches", "2", "--backend", "torch"]) == 0
    assert {p.name for p in out_dir.iterdir()} == {"profile.csv", "profile.md", "profile.json", "heatmap.png"}
    data = json.loads((out_dir / "profile.json").read_text())
    assert len(data["mass"]) == 2 and len(data["mass"][0]) == 4 and sorted(data["ranking"]) == [0, 1, 2, 3]
    assert "top heads by image mass" in capsys.readouterr().out

    dataset = tmp_path / "mc.jsonl"
    write_dataset(dataset, num_items=2)
    assert run_heads_cli(["profile", "--model", "tiny-qwen3-vl", "--out", str(tmp_path / "p3"), "--device", "cpu",
                          "--dataset", str(dataset), "--no-plot", "--layers", "-1"]) == 0
    assert json.loads((tmp_path / "p3" / "profile.json").read_text())["num_rows"] == 2 + 2  # answer tokens

    results = tmp_path / "abl.jsonl"
    args = ["ablate", "--model", "tiny-qwen2.5-vl", "--device", "cpu", "--dataset", str(dataset),
            "--results", str(results), "--metric", "answer_logprob", "--threshold", "0.0", "--no-progress"]
    assert run_heads_cli(args + ["--heads", "0,1"]) == 0
    assert len(results.read_text().splitlines()) == 2 + 2
    assert run_heads_cli(args + ["--plot", str(tmp_path / "drops.png")]) == 0   # resumes: heads 2, 3 added
    assert (tmp_path / "drops.png").read_bytes()[:4] == b"\x89PNG"
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [x.get("head") for x in lines if x["type"] == "head"] == [0, 1, 2, 3]
    summary = json.loads([x for x in capsys.readouterr().out.splitlines() if x.startswith('{"baseline"')][-1])
    drops = {x["head"]: x["drop"] for x in lines if x["type"] == "head"}
    assert summary["selected"] == sorted(h for h, d in drops.items() if d > 0)
    # Same file, other weights: refused with a clear error and exit code 1.
    assert run_heads_cli(args + ["--seed", "1"]) == 1
    assert "different run" in capsys.readouterr().err
    assert run_heads_cli(["profile", "--model", "no-such-model", "--out", str(tmp_path / "x")]) == 1
    assert run_heads_cli(["bogus"]) == 2
