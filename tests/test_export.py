"""Export to Hugging Face folders: reload with transformers and get the same logits / scores / chat rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_folders import make_llama_folder  # tests/ is on sys.path under pytest

from rlhf_lightning.cli import main
from rlhf_lightning.export import ExportError, export_checkpoint
from rlhf_lightning.models.factory import LoRAArgs, model_spec
from rlhf_lightning.models.gpt import create_model
from rlhf_lightning.models.heads import RewardModel
from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY
from rlhf_lightning.stages.tokenizer_link import tokenizer_payload

transformers = pytest.importorskip("transformers")

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there, how are you?"},
    {"role": "assistant", "content": "Fine, thanks!\nAnd you?"},
    {"role": "user", "content": "Good."},
]


def _save_stage(path: Path, stage: str, prefix: str, module: torch.nn.Module, backbone, tokenizer, **extra):
    payload = {
        "stage": stage,
        "backbone_prefix": prefix + ("backbone." if stage == "reward" else ""),
        "model_spec": model_spec(backbone),
        **tokenizer_payload(tokenizer),
        **extra,
    }
    if stage == "reward":
        payload["reward_prefix"] = prefix
    state = {prefix + k: v for k, v in module.state_dict().items()}
    torch.save({"state_dict": state, PAYLOAD_KEY: payload}, path)
    return path


def _batch(tokenizer, conversations):
    rows = [tokenizer.render(c)[0] for c in conversations]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


@pytest.mark.parametrize("tie", [True, False])
def test_builtin_gpt_exports_as_llama_with_same_logits_and_template(tmp_path, tiny_tokenizer, tie):
    torch.manual_seed(0)
    gpt = create_model("tiny", vocab_size=tiny_tokenizer.vocab_size, tie_embeddings=tie, n_layer=2).eval()
    with torch.no_grad():  # RMSNorm weights away from 1 so a misplaced norm would show
        for name, p in gpt.named_parameters():
            if "norm" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    ckpt = _save_stage(tmp_path / "sft.ckpt", "sft", "model.", gpt, gpt, tiny_tokenizer)
    out = export_checkpoint(ckpt, tmp_path / "hf")
    assert (out / "model.safetensors").is_file()

    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    ids, mask = _batch(tiny_tokenizer, [MESSAGES, MESSAGES[:2]])
    with torch.no_grad():
        ours = gpt(ids, mask)
        theirs = model(input_ids=ids, attention_mask=mask.long()).logits
    torch.testing.assert_close(theirs[mask], ours[mask], atol=1e-4, rtol=1e-4)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    rendered = hf_tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=False)
    assert list(rendered) == tiny_tokenizer.render(MESSAGES)[0]
    prompt = hf_tok.apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert list(prompt) == tiny_tokenizer.render_prompt(MESSAGES)
    assert hf_tok.pad_token_id == tiny_tokenizer.pad_id != hf_tok.eos_token_id


def test_builtin_reward_model_exports_as_sequence_classifier(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    reward = RewardModel(create_model("tiny", vocab_size=tiny_tokenizer.vocab_size, n_layer=2)).eval()
    reward.set_score_stats(0.5, 2.0)
    ckpt = _save_stage(
        tmp_path / "rm.ckpt", "reward", "reward_model.", reward, reward.backbone, tiny_tokenizer
    )
    out = export_checkpoint(ckpt, tmp_path / "hf_rm")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    ids, mask = _batch(tiny_tokenizer, [MESSAGES, MESSAGES[:3]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[:, 0], reward(ids, mask), atol=1e-4, rtol=1e-4)
    assert json.loads((out / "config.json").read_text())["rlhf_score_std"] == pytest.approx(2.0)

    # a trained head's (small) bias is dropped: scores shift by it, normalised scores stay the same
    with torch.no_grad():
        reward.head.linear.bias.fill_(0.3)
    ckpt = _save_stage(
        tmp_path / "rm2.ckpt", "reward", "reward_model.", reward, reward.backbone, tiny_tokenizer
    )
    out = export_checkpoint(ckpt, tmp_path / "hf_rm2")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    config = json.loads((out / "config.json").read_text())
    with torch.no_grad():
        exported = model(input_ids=ids).logits[:, 0]
        torch.testing.assert_close(exported, reward(ids, mask) - 0.3, atol=1e-4, rtol=1e-4)
        normalised = (exported - config["rlhf_score_mean"]) / config["rlhf_score_std"]
        torch.testing.assert_close(normalised, reward.normalize(reward(ids, mask)), atol=1e-4, rtol=1e-4)
    assert config["rlhf_score_bias"] == pytest.approx(0.3)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return make_llama_folder(tmp_path_factory.mktemp("llama") / "model")


def _lora_llama(folder: Path):
    from rlhf_lightning.models.hf import HFCausalLM
    from rlhf_lightning.tokenization_hf import HFChatTokenizer

    tok = HFChatTokenizer.from_pretrained(folder)
    model = HFCausalLM.from_pretrained(folder, lora=LoRAArgs(r=4), vocab_size=tok.vocab_size).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter (peft starts lora_B at 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return model, tok


@pytest.mark.parametrize("merge", [True, False])
def test_hf_lora_policy_exports_merged_or_as_adapter(tmp_path, llama_folder, merge):
    model, tok = _lora_llama(llama_folder)
    ckpt = _save_stage(tmp_path / "sft.ckpt", "sft", "model.", model, model, tok)
    ids, mask = _batch(tok, [MESSAGES, MESSAGES[:2]])
    with torch.no_grad():
        ours = model(ids, mask)
    # through the CLI
    main(
        ["export", "--ckpt", str(ckpt), "--output", str(tmp_path / "out"), "--merge_lora", str(merge).lower()]
    )
    out = tmp_path / "out"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    if not merge:
        from peft import PeftModel

        assert (out / "adapter" / "adapter_config.json").is_file()
        loaded = PeftModel.from_pretrained(loaded, out / "adapter").eval()
    with torch.no_grad():
        theirs = loaded(input_ids=ids, attention_mask=mask.long()).logits
    torch.testing.assert_close(theirs[mask], ours[mask], atol=1e-4, rtol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (
        list(hf_tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=False))
        == tok.render(MESSAGES)[0]
    )


def test_hf_reward_model_exports_as_sequence_classifier(tmp_path, llama_folder):
    backbone, tok = _lora_llama(llama_folder)
    reward = RewardModel(backbone).eval()
    ckpt = _save_stage(tmp_path / "rm.ckpt", "reward", "reward_model.", reward, backbone, tok)
    out = export_checkpoint(ckpt, tmp_path / "rm")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    ids, mask = _batch(tok, [MESSAGES, MESSAGES[:3]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[:, 0], reward(ids, mask), atol=1e-4, rtol=1e-4)


def test_export_refuses_to_overwrite(tmp_path, tiny_tokenizer):
    gpt = create_model("tiny", vocab_size=tiny_tokenizer.vocab_size, n_layer=1)
    ckpt = _save_stage(tmp_path / "sft.ckpt", "sft", "model.", gpt, gpt, tiny_tokenizer)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(ckpt, tmp_path / "out")
    assert (tmp_path / "out" / "x").read_text() == "keep"
