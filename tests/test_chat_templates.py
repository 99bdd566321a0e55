"""Rules that must hold for any chat template, checked with the built-in tokenizer, a ChatML folder (text after EOS,
no BOS) and a Qwen-style folder (a default system prompt the template inserts):

* the reward is read at the reply's EOS: the same conversation gets the same score from reward training (a
  ``PreferenceBatch``), ``rlhf-lightning score`` and PPO's scorer on a rollout that ends at EOS;
* left truncation keeps whole rendered turns: what SFT, preference pairs, PPO prompts and scoring keep is exactly the
  template's rendering of the kept messages.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_folders import DEFAULT_SYSTEM_PROMPT, make_gpt2_folder, make_qwen_tokenizer_folder

from rlhf_lightning.data.collate import collate_preference
from rlhf_lightning.data.formats import PreferencePair
from rlhf_lightning.data.preference import encode_pair
from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.data.sft import SFTDataModule, left_truncate, render_conversations

pytest.importorskip("transformers")

SYSTEM = {"role": "system", "content": "Answer in one short sentence."}
TURNS = [
    {"role": "user", "content": "What is the tallest mountain on Earth, and how tall is it?"},
    {"role": "assistant", "content": "Mount Everest, at about 8849 metres above sea level."},
    {"role": "user", "content": "And which one is the second tallest?"},
    {"role": "assistant", "content": "That is K2, in the Karakoram range."},
    {"role": "user", "content": "Is it harder to climb than Everest?"},
    {"role": "assistant", "content": "Yes, K2 is widely considered the harder and more dangerous climb."},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("templates")
    return {"chatml": make_gpt2_folder(root / "chatml"), "qwen": make_qwen_tokenizer_folder(root / "qwen")}


@pytest.fixture(params=["builtin", "chatml", "qwen"])
def tok(request, folders, tiny_tokenizer):
    if request.param == "builtin":
        return tiny_tokenizer
    from rlhf_lightning.tokenization_hf import HFChatTokenizer

    return HFChatTokenizer.from_pretrained(folders[request.param])


def _folder_or_file(tok) -> str:
    return tok.source  # the tokenizer.json file or the HF folder: what tokenizer_path accepts


# ------------------------------------------------------------------------------------------- score position


def test_render_ends_at_the_final_eos(folders):
    from rlhf_lightning.tokenization_hf import HFChatTokenizer

    tok = HFChatTokenizer.from_pretrained(folders["chatml"])
    ids, mask = tok.render(TURNS[:2])
    assert ids[-1] == tok.eos_id and mask[-1]  # ChatML's "\n" after the EOS is not part of the conversation
    reply = tok.encode(TURNS[1]["content"])
    assert ids == tok.render_prompt(TURNS[:1]) + reply + [
        tok.eos_id
    ]  # what a rollout of this reply looks like


def test_same_score_from_reward_training_score_command_and_ppo(folders):
    from rlhf_lightning.models.factory import ModelArgs
    from rlhf_lightning.scoring import score_conversations
    from rlhf_lightning.stages.reward import RewardModule
    from rlhf_lightning.stages.rewards import RewardArgs, SequenceScorer

    folder = str(folders["chatml"])
    torch.manual_seed(0)
    module = RewardModule(model=ModelArgs(hf_path=folder), tokenizer_path=folder)
    module.configure_model()
    module.eval()
    model, tok = module.reward_model, module.tokenizer
    prompts = [TURNS[:1], TURNS[:3]]
    replies = [TURNS[1], TURNS[3]]

    # 1. reward training: a PreferenceBatch of (prompt, reply) pairs, right-padded
    pairs = [
        PreferencePair(p, [r], [{"role": "assistant", "content": "No idea."}])
        for p, r in zip(prompts, replies)
    ]
    batch = collate_preference([(*encode_pair(tok, pair, 256)[:2], 0.0) for pair in pairs], tok.pad_id)
    with torch.no_grad():
        trained = module(batch.input_ids, batch.attention_mask)[:2]

    # 2. rlhf-lightning score's library function
    scored, _ = score_conversations(model, tok, [[*p, r] for p, r in zip(prompts, replies)])

    # 3. PPO: left-padded prompts, then each response as generated (reply tokens, EOS, pad), scored on policy ids
    queries = [tok.render_prompt(p) for p in prompts]
    responses = [[*tok.encode(r["content"]), tok.eos_id] for r in replies]
    width_q, width_r = max(map(len, queries)), max(map(len, responses)) + 2
    sequences = torch.full((2, width_q + width_r), tok.pad_id)
    mask = torch.zeros(2, width_q + width_r, dtype=torch.bool)
    for i, (q, r) in enumerate(zip(queries, responses)):
        sequences[i, width_q - len(q) : width_q] = torch.tensor(q)
        sequences[i, width_q : width_q + len(r)] = torch.tensor(r)
        mask[i, width_q - len(q) : width_q + len(r)] = True
    scorer = SequenceScorer(RewardArgs(normalize=False, clip=None, missing_eos_score=None), model)
    texts = [r["content"] for r in replies]
    ppo = scorer.raw_scores(sequences, mask, prompts, texts, [{}, {}])

    torch.testing.assert_close(scored, trained, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ppo, trained, rtol=1e-4, atol=1e-4)
    # a reward model trained with another tokenizer than the policy's re-renders the rollout: same score again
    other = SequenceScorer(
        RewardArgs(normalize=False, clip=None, missing_eos_score=None), model, reward_tokenizer=tok
    )
    torch.testing.assert_close(
        other.raw_scores(sequences, mask, prompts, texts, [{}, {}]), trained, rtol=1e-4, atol=1e-4
    )


# ------------------------------------------------------------------------------------------------ truncation


def _fits(tok, messages: list[dict], prompt: bool = False) -> int:
    return len(tok.render_prompt(messages) if prompt else tok.render(messages)[0])


@pytest.mark.parametrize("system", [False, True], ids=["no_system", "system"])
def test_left_truncation_keeps_whole_rendered_turns(tok, system):
    lead = [SYSTEM] if system else []
    msgs = [*lead, *TURNS]
    # conversations (SFT, scoring): restart at the latest user turn that fits, the system message kept
    for restart in (2, 4):
        kept = [*lead, *TURNS[restart:]]
        limit = _fits(tok, kept)
        assert limit < _fits(tok, [*lead, *TURNS[restart - 2 :]])
        out_msgs, ids, mask = left_truncate(tok, msgs, limit)
        assert out_msgs == kept and (ids, mask) == tok.render(kept)
    # prompts (PPO, preference): the generation prompt of the kept turns
    prompt = msgs[:-1]
    kept = [*lead, *TURNS[4:5]]
    out_msgs, ids, _ = left_truncate(tok, prompt, _fits(tok, kept, prompt=True), prompt=True)
    assert out_msgs == kept and ids == tok.render_prompt(kept)


def test_left_truncation_cuts_into_the_latest_question_when_no_turn_fits(tok):
    msgs = [SYSTEM, *TURNS]
    whole_last = [SYSTEM, *TURNS[4:]]
    limit = _fits(tok, whole_last) - 3
    kept, ids, mask = left_truncate(tok, msgs, limit)
    assert len(ids) <= limit and (ids, mask) == tok.render(kept)  # still the template's own rendering
    assert kept[0] == SYSTEM and kept[2] == TURNS[5] and kept[1]["role"] == "user"
    question = kept[1]["content"]
    assert question and question != TURNS[4]["content"] and TURNS[4]["content"].endswith(question)


@pytest.mark.parametrize("kind", ["chatml", "qwen"])
def test_hf_truncation_has_no_stray_headers_and_keeps_the_default_system_prompt(folders, kind):
    from rlhf_lightning.tokenization_hf import HFChatTokenizer

    tok = HFChatTokenizer.from_pretrained(folders[kind])
    limit = _fits(tok, TURNS[2:]) + 2  # room for the last two turns, not for three
    _, ids, _ = left_truncate(tok, TURNS, limit)
    text = tok.decode(ids, skip_special_tokens=False)
    start = tok.decode(tok.render(TURNS)[0], skip_special_tokens=False).split("<|im_start|>user")[0]
    assert text.startswith(
        start + "<|im_start|>user\n" + TURNS[2]["content"]
    )  # template preamble, then a turn
    assert (DEFAULT_SYSTEM_PROMPT in text) == (kind == "qwen")


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_data_modules_and_scoring_keep_the_rendering_of_the_kept_messages(tok, tmp_path):
    msgs = [SYSTEM, *TURNS]
    kept = [SYSTEM, *TURNS[2:]]
    limit = _fits(tok, kept)
    path = _write(tmp_path / "sft.jsonl", [{"messages": msgs}])
    sft = SFTDataModule(path, tokenizer_path=_folder_or_file(tok), max_length=limit, val_fraction=0.0)
    sft.setup()
    assert sft.train_dataset[0] == tok.render(kept)
    assert render_conversations(tok, [msgs], limit, what="test") == ([tok.render(kept)[0]], 1)

    prompt_kept = [SYSTEM, *TURNS[4:5]]
    path = _write(tmp_path / "prompts.jsonl", [{"prompt": msgs[:-1]}])
    prompts = PromptDataModule(
        path,
        tokenizer_path=_folder_or_file(tok),
        max_prompt_length=_fits(tok, prompt_kept, prompt=True),
        batch_size=1,
        val_fraction=0.0,
    )
    prompts.setup()
    assert prompts.train_dataset.ids[0] == tok.render_prompt(prompt_kept)

    pair = PreferencePair(msgs[:-1], [TURNS[5]], [{"role": "assistant", "content": "No."}])
    chosen, rejected, status = encode_pair(tok, pair, _fits(tok, [*prompt_kept, TURNS[5]]))
    assert status == "truncated"
    assert (
        chosen == tok.render([*prompt_kept, TURNS[5]])[0]
        and rejected == tok.render([*prompt_kept, *pair.rejected])[0]
    )
