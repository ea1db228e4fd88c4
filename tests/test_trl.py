"""KAWHIGRPOTrainer: one real TRL training step on a tiny random Qwen2.5-VL, fully offline.

The advantages TRL's loss consumes are checked against an independent computation (a separate
forward of the initial weights, cosines by einsum, paragraphs counted from the tokens), and the
returned loss against −Σ Â / N (DAPO aggregation, ratio 1 on the first pass).
"""
import copy
import importlib.util
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from kawhi_kernels import KAWHI, select_key_regions
from kawhi_kernels.integrations import capture_qk
from kawhi_kernels.integrations import tiny_models as tm
from kawhi_kernels.integrations.rl import response_query_mask
from kawhi_kernels.integrations.trl import KAWHIGRPOTrainer, check_kawhi_grpo_args

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_grpo.py"
TAU, LAM, W_MIN, W_MAX = 0.05, 0.1, 0.1, 1.0


def _load_example():
    spec = importlib.util.spec_from_file_location("kawhi_trl_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordingTrainer(KAWHIGRPOTrainer):
    """Records what each loss pass received and returned, and every final-layer capture."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.captures, self.old_logps_seen = [], 0, []

    def _kawhi_on_layer(self, layer, record):
        self.captures += 1
        super()._kawhi_on_layer(layer, record)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._kawhi_loss_inputs is not None:
            old = self._kawhi_loss_inputs.get("old_per_token_logps")
            self.old_logps_seen.append((result[0].detach().clone(), None if old is None else old.clone()))
        return result

    def _compute_loss(self, model, inputs):
        before = {k: (v.clone() if isinstance(v, torch.Tensor) else copy.copy(v)) for k, v in inputs.items()}
        loss = super()._compute_loss(model, inputs)
        self.calls.append(dict(before=before, advantages=inputs["advantages"].detach().clone(),
                               weights=inputs["kawhi_token_weights"].clone(), loss=loss.detach().clone(),
                               captures=self.captures))
        return loss


@pytest.fixture(scope="module")
def example():
    return _load_example()


@pytest.fixture(scope="module")
def dapo_run(example, tmp_path_factory):
    trainer = example.build_trainer(str(tmp_path_factory.mktemp("dapo")), trainer_cls=RecordingTrainer,
                                    kawhi=KAWHI(seed=0, tau=TAU, lam=LAM))
    # TRL patches the model's forward with a closure over the module, so a deepcopy would still run
    # the trained weights: rebuild the tiny model and load the pre-training state instead.
    initial = tm.tiny_qwen2_5_vl(seed=0)
    initial.load_state_dict({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    trainer.train()
    return trainer, initial


def _expected_advantages(model, call, tokenizer):
    """Independent KAWHI advantages for one recorded loss input."""
    inp = call["before"]
    input_ids = torch.cat([inp["prompt_ids"], inp["completion_ids"]], dim=1)
    attention_mask = torch.cat([inp["prompt_mask"], inp["completion_mask"]], dim=1)
    completion_mask = inp["completion_mask"].bool()
    query_mask = response_query_mask(completion_mask, input_ids.shape[1])
    with torch.no_grad(), capture_qk(model, [-1], query_mask=query_mask) as cap:
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=inp["pixel_values"],
              image_grid_thw=inp["image_grid_thw"], mm_token_type_ids=inp["mm_token_type_ids"])
    record = cap.records[model.config.text_config.num_hidden_layers - 1]
    hq, hk = record.q.shape[1], record.k.shape[1]
    expected = torch.zeros(completion_mask.shape, dtype=torch.float64)
    cu_q, cu_k = record.cu_seqlens_q.tolist(), record.cu_seqlens_k.tolist()
    for b in range(input_ids.shape[0]):
        q = record.q[cu_q[b]:cu_q[b + 1]].double()
        k_pos = record.k_pos[cu_k[b]:cu_k[b + 1]]
        k = record.k[cu_k[b]:cu_k[b + 1]].double()[inp["kawhi_key_mask"][b, k_pos]]
        assert k.shape[0] > 0
        k = k.repeat_interleave(hq // hk, dim=1)                       # GQA: head h reads kv head h // g
        cos = torch.einsum("thd,vhd->thv", q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True))
        alpha = cos.mean(dim=(1, 2))                                   # [T_b]
        tokens = tokenizer.convert_ids_to_tokens(inp["completion_ids"][b][completion_mask[b]].tolist())
        para, current = [], 0
        for token in tokens:                                           # a token ending in "\n\n" closes its paragraph
            para.append(current)
            current += token.endswith("\n\n")
        para = torch.tensor(para)
        means = torch.stack([alpha[para == j].mean() for j in range(int(para.max()) + 1)])
        soft = torch.softmax(means / TAU, dim=0)
        weights = W_MIN + (W_MAX - W_MIN) * ((1 - LAM) * soft + LAM / means.numel())
        expected[b, :para.numel()] = float(inp["advantages"][b]) * weights[para]
    return expected


def test_loss_receives_expected_per_token_advantages(dapo_run, example):
    trainer, initial = dapo_run
    assert len(trainer.calls) == 1
    call = trainer.calls[0]
    assert call["before"]["advantages"].dim() == 1                      # TRL's own [B] advantages came in
    expected = _expected_advantages(initial, call, trainer._tokenizer)
    advantages = call["advantages"]
    assert advantages.shape == call["before"]["completion_mask"].shape
    torch.testing.assert_close(advantages.double(), expected, atol=2e-5, rtol=1e-4)
    mask = call["before"]["completion_mask"].bool()
    assert float(call["weights"][mask].std()) > 1e-3                    # weights really vary per token
    # The loss TRL returned used them: DAPO, ratio 1 on the first pass → loss = −Σ Â·mask / N.
    n_items = float(call["before"]["num_items_in_batch"])
    assert math.isclose(float(call["loss"]), -float((expected * mask).sum()) / n_items, rel_tol=1e-4, abs_tol=1e-6)
    plain = -float((call["before"]["advantages"][:, None] * mask).sum()) / n_items
    assert not math.isclose(float(call["loss"]), plain, rel_tol=1e-3, abs_tol=1e-5)


def test_capture_once_per_forward_with_gradient_checkpointing(dapo_run):
    trainer, _ = dapo_run
    assert trainer.args.gradient_checkpointing and trainer.model.is_gradient_checkpointing
    assert trainer.captures == 1                                        # one loss forward, one final-layer record
    logged = [e for e in trainer.state.log_history if "kawhi/weight_mean" in e]
    assert logged and 0.1 <= logged[0]["kawhi/weight_mean"] <= 1.0


def test_key_mask_shares_sguf_selection_per_prompt(dapo_run, example):
    trainer, _ = dapo_run
    inp = trainer.calls[0]["before"]
    key_mask, prompt_ids = inp["kawhi_key_mask"], inp["prompt_ids"]
    image_tokens = torch.cat([prompt_ids, inp["completion_ids"]], 1) == tm.IMAGE_TOKEN_ID
    assert not bool((key_mask & ~image_tokens).any())
    dataset = example.build_dataset(seed=0)
    for i in range(2):
        rows = [b for b in range(prompt_ids.shape[0]) if (prompt_ids[b] == 5 + i).any()]   # prompt i has "w{5+i}"
        assert len(rows) == trainer.args.num_generations
        for b in rows[1:]:
            assert torch.equal(key_mask[b], key_mask[rows[0]])
        image = torch.from_numpy(np.asarray(dataset[i]["image"].convert("RGB")))
        regions = select_key_regions(image, (4, 6))
        selected = key_mask[rows[0]][image_tokens[rows[0]]]
        assert bool(selected[regions.key_token_mask].all())            # every key-region token is selected


def test_gspo_token_and_weight_reuse_across_iterations(example, tmp_path):
    trainer = example.build_trainer(str(tmp_path), trainer_cls=RecordingTrainer, num_generations=2,
                                    max_completion_length=6, importance_sampling_level="sequence_token",
                                    num_iterations=2, max_steps=2, epsilon=3e-4, epsilon_high=4e-4)
    assert trainer.kawhi_gspo_token and trainer.importance_sampling_level == "token"
    trainer.train()
    first, second = trainer.calls
    assert second["captures"] == 1                                      # weights computed once per generation batch
    torch.testing.assert_close(second["weights"], first["weights"])
    torch.testing.assert_close(second["advantages"], first["advantages"])
    assert second["before"]["advantages"].dim() == 2
    # GSPO-token: the ratio TRL forms, exp(logp − old'), is the sequence ratio s_g on every token.
    mask = second["before"]["completion_mask"].bool()
    logp, old_used = trainer.old_logps_seen[-1]
    old_true = second["before"]["old_per_token_logps"]
    log_s = ((logp - old_true) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    ratio_log = logp - old_used
    for b in range(mask.shape[0]):
        torch.testing.assert_close(ratio_log[b][mask[b]], log_s[b].expand(int(mask[b].sum())), atol=1e-6, rtol=0)
    assert "old_per_token_logps" in trainer._buffered_inputs[0]         # original old logps restored
    torch.testing.assert_close(trainer._buffered_inputs[0]["old_per_token_logps"], old_true)


def test_refuses_sequence_level_ratio_and_liger():
    with pytest.raises(ValueError, match="sequence_token"):
        check_kawhi_grpo_args(types.SimpleNamespace(importance_sampling_level="sequence", use_liger_kernel=False))
    with pytest.raises(ValueError, match="use_liger_kernel"):
        check_kawhi_grpo_args(types.SimpleNamespace(importance_sampling_level="token", use_liger_kernel=True))
    check_kawhi_grpo_args(types.SimpleNamespace(importance_sampling_level="token", use_liger_kernel=False))


def test_trainer_constructor_refuses_before_building(tmp_path):
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path), importance_sampling_level="sequence", report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="collapse to their mean"):
        KAWHIGRPOTrainer(model=None, reward_funcs=None, args=args)
    with pytest.raises(TypeError, match="kawhi"):
        KAWHIGRPOTrainer(model=None, reward_funcs=None, args=GRPOConfig(output_dir=str(tmp_path), report_to="none",
                                                                       use_cpu=True), kawhi="yes")
