"""Padding-free packing: packed batches against padded ones (loss and gradients), documents that never attend to each
other, the packing collate functions, the DataModules with ``packing=True``, the CLI flag and the stages that refuse
packed batches. Tiny built-in GPT and tiny random Hugging Face folders (tests/hf_folders.py), fp32, CPU.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hf_folders import make_gpt2_folder, make_llama_folder  # tests/ is on sys.path under pytest

from rlhf_lightning.data.collate import (
    collate_preference,
    collate_preference_packed,
    collate_sft,
    collate_sft_packed,
    pack_sequences,
)
from rlhf_lightning.data.preference import PreferenceDataModule
from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.functional.attention import (
    PackingUnsupportedError,
    cu_seqlens_from_position_ids,
    document_causal_mask,
    document_ids,
    packed_causal_attention,
    packed_position_ids,
)
from rlhf_lightning.models.gpt import create_model
from rlhf_lightning.models.heads import RewardModel
from rlhf_lightning.stages.reward import RewardModule
from rlhf_lightning.stages.sft import SFTModule

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64


def _examples(seed: int = 0, n: int = 5) -> list[tuple[list[int], list[bool]]]:
    """SFT examples of varied length with a prompt part (mask False) and a reply part (mask True)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt, reply = 2 + i % 3, 3 + (2 * i) % 5
        ids = torch.randint(1, VOCAB, (prompt + reply,), generator=g).tolist()
        out.append((ids, [False] * prompt + [True] * reply))
    return out


def _pairs(seed: int = 0, n: int = 4) -> list[tuple[list[int], list[int], float]]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        prompt = torch.randint(1, VOCAB, (3 + i,), generator=g).tolist()
        chosen = torch.randint(1, VOCAB, (2 + i % 3,), generator=g).tolist()
        rejected = torch.randint(1, VOCAB, (4 - i % 3,), generator=g).tolist()
        pairs.append((prompt + chosen, prompt + rejected, 0.5 * (i % 2)))
    return pairs


# ---------------------------------------------------------------------------------------------------- collate


def test_pack_sequences_layout_and_padding_to_a_multiple():
    ids, mask, pos, cu = pack_sequences([[5, 6, 7], [8], [9, 10]], pad_id=0, pad_to_multiple_of=8)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 10, 0, 0]]
    assert mask.tolist() == [[True] * 6 + [False] * 2]
    assert pos.tolist() == [[0, 1, 2, 0, 0, 1, 0, 1]]  # padding counts as a document of its own
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 6]
    _, mask, pos, cu = pack_sequences([[1, 2]], pad_id=0)
    assert mask.all() and pos.tolist() == [[0, 1]] and cu.tolist() == [0, 2]
    with pytest.raises(ValueError, match="empty"):
        pack_sequences([[1], []], pad_id=0)
    with pytest.raises(ValueError, match="empty batch"):
        pack_sequences([], pad_id=0)


def test_collate_sft_packed_keeps_masks_in_place_and_counts_examples():
    examples = _examples()
    packed = collate_sft_packed(examples, pad_id=0, pad_to_multiple_of=8)
    padded = collate_sft(examples, pad_id=0)
    assert packed.packed and not padded.packed
    assert len(packed) == len(padded) == len(examples)  # len() counts conversations in both layouts
    assert packed.input_ids.shape[0] == 1 and packed.input_ids.shape[1] % 8 == 0
    assert int(packed.attention_mask.sum()) == int(
        padded.attention_mask.sum()
    )  # real tokens, as vs_trl counts
    # the real tokens and their loss masks, in order, are the padded rows' real tokens
    assert (
        packed.input_ids[packed.attention_mask].tolist() == padded.input_ids[padded.attention_mask].tolist()
    )
    assert (
        packed.loss_mask[packed.attention_mask].tolist() == padded.loss_mask[padded.attention_mask].tolist()
    )
    assert (
        packed.sequence_lengths.tolist() == padded.sequence_lengths.tolist() == [len(e[0]) for e in examples]
    )
    moved = packed.to("cpu")
    assert moved.cu_seqlens is not None and moved.position_ids is not None


def test_collate_preference_packed_orders_chosen_then_rejected():
    pairs = _pairs()
    packed = collate_preference_packed(pairs, pad_id=0)
    padded = collate_preference(pairs, pad_id=0)
    assert len(packed) == len(padded) == len(pairs) and packed.num_sequences == 2 * len(pairs)
    cu = packed.cu_seqlens.tolist()
    docs = [packed.input_ids[0, a:b].tolist() for a, b in itertools.pairwise(cu)]
    assert docs == [p[0] for p in pairs] + [p[1] for p in pairs]
    torch.testing.assert_close(packed.margin, padded.margin)


# ------------------------------------------------------------------------------------------------- functional


def test_document_ids_positions_and_mask():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert document_ids(cu, 7).tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert packed_position_ids(cu, 7).tolist() == [0, 1, 0, 1, 2, 0, 1]
    assert cu_seqlens_from_position_ids(torch.tensor([[0, 1, 0, 1, 2, 0, 1]])).tolist() == [0, 2, 5, 7]
    mask = document_causal_mask(cu, 5)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[:2, :2] = torch.tril(torch.ones(2, 2, dtype=torch.bool))
    expected[2:, 2:] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("impl", ["loop", "pad", "mask", "auto"])
def test_packed_attention_equals_causal_attention_per_document(impl):
    torch.manual_seed(0)
    lengths = [3, 1, 6, 4]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    n = int(cu[-1]) + 2  # two padding columns
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(3))
    out = packed_causal_attention(q, k, v, cu, impl=impl)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    bounds = [*cu.tolist(), n]
    refs = [
        F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True)
        for a, b in itertools.pairwise(bounds)
    ]
    torch.testing.assert_close(out, torch.cat(refs, dim=2))
    ref_grads = torch.autograd.grad(sum(r.square().sum() for r in refs), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------ backbones


def _gpt():
    torch.manual_seed(0)
    return create_model("tiny", vocab_size=VOCAB, dropout=0.0)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_packing")
    return {"llama": make_llama_folder(root / "llama"), "gpt2": make_gpt2_folder(root / "gpt2")}


def _hf(folder: Path):
    from rlhf_lightning.models.hf import HFCausalLM

    model = HFCausalLM.from_pretrained(folder)
    model.train()
    for module in model.modules():  # dropout off, so two forwards are comparable
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.fixture(params=["gpt", "llama", "gpt2", "llama-eager"])
def backbone(request, hf_folders):
    if request.param == "gpt":
        return _gpt()
    model = _hf(hf_folders[request.param.split("-")[0]])
    if request.param.endswith("eager"):  # transformers' own packed path: a block mask from the position ids
        model.hf_model.set_attn_implementation("eager")
    return model


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, name=name: f"{name}: {m}")


def test_sft_loss_and_gradients_packed_equal_padded(backbone):
    examples = _examples(n=5)
    results = []
    for batch in (
        collate_sft(examples, pad_id=0),
        collate_sft_packed(examples, pad_id=0, pad_to_multiple_of=8),
    ):
        module = SFTModule()
        module.model = copy.deepcopy(backbone)
        loss, stats = module.loss(batch)
        loss.backward()
        results.append((loss.detach(), int(stats["tokens"]), _grads(module.model)))
    (loss_a, tokens_a, grads_a), (loss_b, tokens_b, grads_b) = results
    assert tokens_a == tokens_b == sum(sum(m) for _, m in examples)
    torch.testing.assert_close(loss_a, loss_b)
    _assert_same_grads(grads_a, grads_b)


def test_reward_scores_loss_and_gradients_packed_equal_padded(backbone):
    pairs = _pairs(n=4)
    results = []
    for batch in (
        collate_preference(pairs, pad_id=0),
        collate_preference_packed(pairs, pad_id=0, pad_to_multiple_of=8),
    ):
        module = RewardModule()
        torch.manual_seed(1)
        module.reward_model = RewardModel(copy.deepcopy(backbone))
        loss, _stats, scores = module._pair_step(batch)
        loss.backward()
        results.append((loss.detach(), scores.detach(), _grads(module.reward_model)))
    (loss_a, scores_a, grads_a), (loss_b, scores_b, grads_b) = results
    assert scores_a.shape == scores_b.shape == (2 * len(pairs),)
    torch.testing.assert_close(scores_a, scores_b)
    torch.testing.assert_close(loss_a, loss_b)
    _assert_same_grads(grads_a, grads_b)


def test_documents_never_attend_across_boundaries(backbone):
    """Changing every token of document 1 leaves the hidden states of documents 0 and 2 exactly as they were."""
    backbone.eval()
    seqs = [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14]]
    ids, mask, pos, cu = pack_sequences(seqs, pad_id=0)
    changed = ids.clone()
    changed[0, 4:7] = torch.tensor([20, 21, 22])
    with torch.no_grad():
        a = backbone.hidden_states(ids, mask, pos, cu_seqlens=cu)[0]
        b = backbone.hidden_states(changed, mask, pos, cu_seqlens=cu)[0]
        alone = backbone.hidden_states(torch.tensor([seqs[2]]), torch.ones(1, 5, dtype=torch.bool))[0]
    torch.testing.assert_close(a[:4], b[:4])
    torch.testing.assert_close(a[7:], b[7:])  # the later document sees nothing of the earlier ones
    assert not torch.allclose(a[4:7], b[4:7])
    torch.testing.assert_close(a[7:], alone)  # and its positions restart at 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_hf_sdpa_model_after_packing_still_runs_padded_batches_and_checkpointing(hf_folders, checkpointing):
    """The switch to the packed attention function is for good: padded batches keep sdpa's results, and gradient
    checkpointing recomputes per-document attention in backward (same gradients as padded)."""
    model = _hf(hf_folders["llama"])
    model.gradient_checkpointing = checkpointing
    examples = _examples(n=3)
    padded = collate_sft(examples, pad_id=0)
    before = model.hidden_states(padded.input_ids, padded.attention_mask).detach()
    grads = []
    for batch in (collate_sft_packed(examples, pad_id=0), padded):
        module = SFTModule()
        module.model = model
        model.zero_grad()
        module.loss(batch)[0].backward()
        grads.append(_grads(model))
    assert model.hf_model.config._attn_implementation == "rlhf_packed"
    torch.testing.assert_close(model.hidden_states(padded.input_ids, padded.attention_mask).detach(), before)
    _assert_same_grads(*grads)


def test_hf_sdpa_packed_rows_use_the_per_document_attention(hf_folders, monkeypatch):
    """Packed rows of an sdpa model run functional.attention (no (N, N) mask), once per layer."""
    from rlhf_lightning.models import hf

    calls = []

    def counting(*args, **kwargs):
        calls.append(args[3])
        return packed_causal_attention(*args, **kwargs)

    monkeypatch.setattr(hf, "packed_causal_attention", counting)
    model = _hf(hf_folders["llama"])
    ids, mask, pos, cu = pack_sequences([[3, 4, 5], [6, 7]], pad_id=0, pad_to_multiple_of=8)
    model.hidden_states(ids, mask, pos, cu_seqlens=cu)
    assert len(calls) == model.hf_model.config.num_hidden_layers
    assert calls[0].tolist() == [0, 3, 5, 8]  # the padding columns are one more document


def test_gpt_default_position_ids_restart_per_document():
    model = _gpt().eval()
    ids, mask, pos, cu = pack_sequences([[3, 4, 5], [6, 7]], pad_id=0, pad_to_multiple_of=8)
    with torch.no_grad():
        torch.testing.assert_close(
            model.hidden_states(ids, mask, cu_seqlens=cu), model.hidden_states(ids, mask, pos, cu_seqlens=cu)
        )


def test_hf_architecture_without_masking_utils_raises_packing_unsupported(hf_folders):
    from rlhf_lightning.models import hf

    class OldDecoder(torch.nn.Module):  # builds its own mask: documents would attend to each other
        def forward(self, input_ids, attention_mask=None, position_ids=None):
            raise AssertionError("never called")

    class NoPositions(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            raise AssertionError("never called")

    model = _hf(hf_folders["llama"])
    config = model.hf_model.config
    assert hf._packing_obstacle(model.decoder, config) is None
    assert "masking_utils" in hf._packing_obstacle(OldDecoder(), config)
    assert "position_ids" in hf._packing_obstacle(NoPositions(), config)
    alibi = copy.deepcopy(config)
    alibi.alibi = True
    assert "ALiBi" in hf._packing_obstacle(model.decoder, alibi)
    original = hf._packing_obstacle
    try:
        hf._packing_obstacle = lambda decoder, config: "it is a test"
        ids, mask, pos, cu = pack_sequences([[3, 4], [5]], pad_id=0)
        with pytest.raises(PackingUnsupportedError, match="it is a test"):
            model.hidden_states(ids, mask, pos, cu_seqlens=cu)
    finally:
        hf._packing_obstacle = original


# ---------------------------------------------------------------------------------------------- data modules


def test_sft_datamodule_packing_yields_every_example_once(tiny_tokenizer):
    dm = SFTDataModule(
        str(REPO / "data" / "hh_rlhf" / "sft_train.jsonl"),
        tokenizer_path=tiny_tokenizer.source,
        max_length=128,
        batch_size=4,
        val_fraction=0.1,
        packing=True,
        pad_to_multiple_of=8,
    )
    dm.setup("fit")
    for loader, dataset in ((dm.train_dataloader(), dm.train_dataset), (dm.val_dataloader(), dm.val_dataset)):
        seen = Counter()
        for batch in loader:
            assert batch.packed and batch.input_ids.shape[0] == 1 and len(batch) <= 4
            cu = batch.cu_seqlens.tolist()
            assert batch.position_ids[0, cu[:-1]].eq(0).all()
            for a, b in itertools.pairwise(cu):
                seen[(tuple(batch.input_ids[0, a:b].tolist()), tuple(batch.loss_mask[0, a:b].tolist()))] += 1
        expected = Counter((tuple(i), tuple(m)) for i, m in zip(dataset.ids, dataset.masks))
        assert seen == expected


def test_preference_datamodule_packing_yields_every_pair_once(tiny_tokenizer):
    dm = PreferenceDataModule(
        str(REPO / "data" / "hh_rlhf" / "preference_train.jsonl"),
        val_path=None,
        tokenizer_path=tiny_tokenizer.source,
        max_length=128,
        batch_size=3,
        packing=True,
    )
    dm.setup("fit")
    seen = Counter()
    for batch in dm.train_dataloader():
        cu, b = batch.cu_seqlens.tolist(), len(batch)
        assert batch.num_sequences == 2 * b and batch.margin.shape == (b,)
        docs = [tuple(batch.input_ids[0, x:y].tolist()) for x, y in itertools.pairwise(cu)]
        for i in range(b):
            seen[(docs[i], docs[b + i], float(batch.margin[i]))] += 1
    assert seen == Counter((tuple(c), tuple(r), float(m)) for c, r, m in dm.train_dataset.items)


def test_packed_fit_runs_for_sft_and_reward(tmp_path, tiny_tokenizer):
    from trainers import quiet_trainer

    from rlhf_lightning.models.factory import ModelArgs

    tiny = ModelArgs(preset="tiny", dropout=0.0)
    sft_data = SFTDataModule(
        str(REPO / "data" / "hh_rlhf" / "sft_train.jsonl"),
        tokenizer_path=tiny_tokenizer.source,
        max_length=96,
        batch_size=4,
        packing=True,
    )
    sft = SFTModule(model=tiny)
    quiet_trainer(
        tmp_path, max_steps=2, limit_val_batches=2, val_check_interval=2, num_sanity_val_steps=0
    ).fit(sft, datamodule=sft_data)
    reward_data = PreferenceDataModule(
        str(REPO / "data" / "hh_rlhf" / "preference_train.jsonl"),
        val_path=None,
        tokenizer_path=tiny_tokenizer.source,
        max_length=96,
        batch_size=2,
        packing=True,
    )
    reward = RewardModule(model=tiny, worst_pairs=2)
    trainer = quiet_trainer(
        tmp_path, max_steps=2, limit_val_batches=2, val_check_interval=2, num_sanity_val_steps=0
    )
    trainer.fit(reward, datamodule=reward_data)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


# ----------------------------------------------------------------------------------------- stages and the CLI


def test_dpo_refuses_packed_batches():
    from rlhf_lightning.stages.dpo import DPOModule

    module = DPOModule(policy_from="unused.ckpt")
    with pytest.raises(PackingUnsupportedError, match="packing=false"):
        module.loss(collate_preference_packed(_pairs(), pad_id=0))


@pytest.mark.parametrize("config", ["sft.yaml", "reward.yaml"])
def test_cli_parses_data_packing(config, capsys):
    from rlhf_lightning.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(REPO / "configs" / config), "--data.packing", "true", "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "packing: true" in printed


def test_readme_mentions_packing():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "packing=True" in text or "packing: true" in text


def test_auto_attention_falls_back_to_the_loop_when_varlen_fails(monkeypatch):
    from rlhf_lightning.functional import attention

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(attention, "_VARLEN_FAILED", False)
    monkeypatch.setattr(attention, "_varlen_available", lambda q, p: not attention._VARLEN_FAILED)
    monkeypatch.setattr(attention, "_varlen", broken)
    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q, k, v = (torch.randn(1, 2, 7, 4) for _ in range(3))
    with pytest.warns(UserWarning, match="no kernel"):
        out = packed_causal_attention(q, k, v, cu)
    torch.testing.assert_close(out, packed_causal_attention(q, k, v, cu, impl="mask"))
    assert attention._VARLEN_FAILED  # tried once, not again
