"""KAWHI with TRL: one ``KAWHIGRPOTrainer`` step on a tiny random Qwen2.5-VL, fully offline (CPU).

Nothing is downloaded: the tokenizer is a word-level ``tokenizers`` model built here over the tiny
model's 512-token vocabulary (every 4th word ends a paragraph with ".\\n\\n", so sampled answers
have several paragraphs), wrapped in a Qwen2.5-VL processor with a minimal chat template. The
dataset holds two chart-like random images with a question each; TRL samples G completions per
prompt, scores them, and ``KAWHIGRPOTrainer`` hands the loss the [B, T] KAWHI advantages.

With a real model, replace the builders by ``AutoProcessor.from_pretrained(...)`` and
``Qwen2_5_VLForConditionalGeneration.from_pretrained(...)``; the trainer call is the same::

    trainer = KAWHIGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...),
                               train_dataset=dataset, processing_class=processor,
                               kawhi=KAWHI(heads="qwen2.5-vl-7b"))

Run: ``python examples/trl_grpo.py`` (about 15 s, mostly imports).
"""
from __future__ import annotations

import tempfile

import numpy as np

from kawhi_kernels.integrations import tiny_models as tm

SPECIAL_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} w3{% endif %}"
)


def build_tokenizer():
    """Word-level fast tokenizer covering ids 0‥511 of the tiny models (ids as in ``tiny_models``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": tm.PAD_TOKEN_ID, "<bos>": tm.BOS_TOKEN_ID, "<|im_end|>": tm.EOS_TOKEN_ID}
    for i in range(tm.FIRST_TEXT_ID, tm.LAST_TEXT_ID):
        vocab[f"w{i}.\n\n" if i % 4 == 0 else f"w{i}"] = i
    ids = [tm.IMAGE_TOKEN_ID, tm.VIDEO_TOKEN_ID, tm.VISION_START_TOKEN_ID, tm.VISION_END_TOKEN_ID]
    vocab.update(dict(zip(SPECIAL_TOKENS, ids)))
    for i in range(max(ids) + 1, tm.VOCAB_SIZE):
        vocab[f"<extra{i}>"] = i
    backend = Tokenizer(models.WordLevel(vocab, unk_token=f"<extra{tm.VOCAB_SIZE - 1}>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<bos>",
        unk_token=f"<extra{tm.VOCAB_SIZE - 1}>", additional_special_tokens=SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(max_pixels: int = 112 * 168):
    """Qwen2.5-VL processor (image processor + the tokenizer above), without a video processor
    (which would need torchvision)."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.processing_utils import ProcessorMixin

    class TinyQwenVLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    return TinyQwenVLProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                               chat_template=CHAT_TEMPLATE)


def build_dataset(num_prompts: int = 2, size_hw: tuple[int, int] = (112, 168), seed: int = 0):
    """``datasets.Dataset`` of conversational VLM prompts with a blocky random image each."""
    from datasets import Dataset
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_prompts):
        h, w = size_hw
        image = np.full((h, w, 3), 230, dtype=np.uint8)
        for _ in range(4):  # a few solid bars on a flat background: SGUF finds structure at their edges
            x0, y0 = int(rng.integers(0, w - 28)), int(rng.integers(0, h - 28))
            image[y0:y0 + int(rng.integers(14, 56)), x0:x0 + 28] = rng.integers(0, 200, 3, dtype=np.uint8)
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"},
                                                             {"type": "text", "text": f"w{5 + i} w7 w9"}]}],
                     "image": Image.fromarray(image)})
    return Dataset.from_list(rows)


def length_reward(completions, **kwargs):
    """Toy verifiable reward: 1 for completions with an even number of characters."""
    return [float(len(c[0]["content"]) % 2 == 0) for c in completions]


def build_trainer(output_dir: str, *, trainer_cls=None, kawhi=None, num_generations: int = 4,
                  max_completion_length: int = 10, seed: int = 0, **config):
    """A ``KAWHIGRPOTrainer`` (or ``trainer_cls``) on the tiny model, ready for ``.train()``."""
    from trl import GRPOConfig

    from kawhi_kernels import KAWHI
    from kawhi_kernels.integrations.trl import KAWHIGRPOTrainer

    trainer_cls = trainer_cls or KAWHIGRPOTrainer
    model = tm.tiny_qwen2_5_vl(seed=seed).train()
    model.generation_config.pad_token_id = tm.PAD_TOKEN_ID
    model.generation_config.eos_token_id = tm.EOS_TOKEN_ID
    defaults = dict(output_dir=output_dir, per_device_train_batch_size=2 * num_generations,
                    num_generations=num_generations, max_completion_length=max_completion_length, max_steps=1,
                    learning_rate=1e-4, report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
                    loss_type="dapo", beta=0.0, bf16=False, seed=seed, dataloader_num_workers=0, disable_tqdm=True)
    defaults.update(config)
    return trainer_cls(model=model, reward_funcs=length_reward, args=GRPOConfig(**defaults),
                       train_dataset=build_dataset(seed=seed), processing_class=build_processor(),
                       kawhi=kawhi if kawhi is not None else KAWHI(seed=seed))


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(out)
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "kawhi/weight_mean" in entry]
        print({k: v for k, v in logs[-1].items() if k.startswith(("kawhi", "loss", "reward"))})


if __name__ == "__main__":
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit('examples/trl_grpo.py needs TRL: pip install -e ".[trl]"') from None
    main()
