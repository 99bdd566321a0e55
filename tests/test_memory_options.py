"""Memory options of the stages against their plain paths: the chunked LM-head loss of SFT and DPO log-probs (same
values and gradients as the full-logits path, built-in GPT and Hugging Face backbones, tied or not, a LoRA-wrapped
head falling back), and activation checkpointing (same gradients on and off, built-in and Hugging Face)."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.models.factory import LoRAArgs
from rlhf_lightning.models.gpt import create_model
from rlhf_lightning.models.lm_head import linear_head, selected_logprobs
from rlhf_lightning.stages.dpo import sequence_logprobs
from rlhf_lightning.stages.sft import SFTModule
from rlhf_lightning.types import SFTBatch

V = 211


def _hf(tied: bool, lora: LoRAArgs | None = None):
    from hf_folders import tiny_llama

    return tiny_llama(V, max_positions=64, lora=lora, tie_word_embeddings=tied)


def _batch(seed: int = 0) -> SFTBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 14), generator=g)
    lengths = torch.tensor([14, 10, 7])
    attention = torch.arange(14)[None] < lengths[:, None]
    loss_mask = attention & (torch.arange(14)[None] >= torch.tensor([4, 6, 2])[:, None])
    return SFTBatch(input_ids=ids, attention_mask=attention, loss_mask=loss_mask)


def _sft_loss_and_grads(model: torch.nn.Module, chunked: bool):
    module = SFTModule(chunked_loss=chunked)
    module.model = model
    model.zero_grad()
    loss, stats = module.loss(_batch())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), stats, grads


def _assert_same(a, b) -> None:
    (loss_a, stats_a, grads_a), (loss_b, stats_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert float(stats_a["tokens"]) == float(stats_b["tokens"]) > 0
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("tied", [True, False])
def test_sft_chunked_loss_equals_plain_loss_built_in(tied: bool) -> None:
    torch.manual_seed(0)
    model = create_model("tiny", vocab_size=V, n_embd=32, n_head=2, tie_embeddings=tied)
    assert linear_head(model) is model.lm_head
    _assert_same(_sft_loss_and_grads(model, True), _sft_loss_and_grads(model, False))


@pytest.mark.parametrize("tied", [True, False])
def test_sft_chunked_loss_equals_plain_loss_hf(tied: bool) -> None:
    model = _hf(tied)
    head = linear_head(model)
    assert head is not None and (head.weight is model.hf_model.get_input_embeddings().weight) == tied
    _assert_same(_sft_loss_and_grads(model, True), _sft_loss_and_grads(model, False))


def test_lora_wrapped_head_falls_back_to_the_plain_path() -> None:
    model = _hf(False, LoRAArgs(r=4, alpha=8, target_modules=("q_proj", "v_proj", "lm_head")))
    assert (
        linear_head(model) is None
    )  # peft's lora.Linear adds its own path: chunking the base weight would drop it
    _assert_same(_sft_loss_and_grads(model, True), _sft_loss_and_grads(model, False))
    plain = _hf(False, LoRAArgs(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    assert linear_head(plain) is plain.lm_head  # LoRA elsewhere: the (frozen) head still chunks
    hidden, targets = torch.randn(5, 32), torch.randint(0, V, (5,))
    torch.testing.assert_close(
        selected_logprobs(plain, hidden, targets), selected_logprobs(plain, hidden, targets, chunked=False)
    )


def test_dpo_sequence_logprobs_chunked_equal_plain() -> None:
    torch.manual_seed(0)
    model = create_model("tiny", vocab_size=V, n_embd=32, n_head=2)
    batch = _batch(1)
    out = {}
    for chunked in (True, False):
        model.zero_grad()
        logp = sequence_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.loss_mask, chunked=chunked
        )
        (logp * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        out[chunked] = (logp.detach(), model.wte.weight.grad.clone())
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-6)


def _grads_with_checkpointing(model: torch.nn.Module, on: bool) -> dict[str, torch.Tensor]:
    model.train()
    model.gradient_checkpointing = on
    model.zero_grad()
    _sft_loss_and_grads(model, True)  # forward + backward through the SFT loss
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.gradient_checkpointing = False
    return grads


@pytest.mark.parametrize("kind", ["gpt", "hf"])
def test_activation_checkpointing_gives_the_same_gradients(kind: str) -> None:
    if kind == "gpt":
        torch.manual_seed(0)
        model = create_model("tiny", vocab_size=V, n_embd=32, n_head=2)
    else:
        model = _hf(True)
    off, on = _grads_with_checkpointing(model, False), _grads_with_checkpointing(model, True)
    assert off.keys() == on.keys() and off
    for name in off:
        torch.testing.assert_close(on[name], off[name], rtol=1e-5, atol=1e-7, msg=name)


def test_sft_memory_benchmark_worker_runs_one_row(capsys) -> None:
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sft_memory.py"
    spec = importlib.util.spec_from_file_location("sft_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = [
        "--worker",
        "--vocab",
        "64",
        "--preset",
        "tiny",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--steps",
        "1",
    ]
    row = bench.main([*argv, "--chunked", "--ckpt"])
    assert json.loads(capsys.readouterr().out) == row
    assert set(row) == {"peak_step_mib", "step_s", "tokens_per_sec", "loss"} and row["tokens_per_sec"] > 0
    assert {name for name, *_ in bench.ROWS} >= {
        "full_fp32",
        "chunked_fp32",
        "chunked_bf16",
        "chunked_fp32_ckpt",
    }


def test_gradient_checkpointing_setting_applies_to_an_init_from_backbone(monkeypatch) -> None:
    from types import SimpleNamespace

    import rlhf_lightning.stages.sft as sft
    from rlhf_lightning.models.factory import ModelArgs

    loaded = create_model("tiny", vocab_size=V, n_embd=32, n_head=2)
    assert not loaded.gradient_checkpointing  # as a checkpoint rebuilds it
    monkeypatch.setattr(sft, "load_backbone", lambda *a, **k: (loaded, None, None))
    monkeypatch.setattr(sft, "resolve_tokenizer", lambda *a: None)
    monkeypatch.setattr(sft, "reconcile_tokenizers", lambda *a: None)
    module = SFTModule(model=ModelArgs(preset="tiny", gradient_checkpointing=True), init_from="sft.ckpt")
    module._trainer = SimpleNamespace(datamodule=None)
    module.configure_model()
    assert module.model is loaded and loaded.gradient_checkpointing
