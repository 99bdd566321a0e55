"""``rlhf-lightning export``: a stage checkpoint as a Hugging Face model folder (safetensors + tokenizer).

What is written:

* **Built-in GPT** -> ``LlamaForCausalLM`` (the built-in model is RMSNorm + RoPE in the rotate-half layout + SwiGLU +
  optional tied embeddings, i.e. a Llama with as many KV heads as query heads). Weight map: ``wte`` ->
  ``embed_tokens``; the fused ``qkv`` rows split in order into ``q_proj``/``k_proj``/``v_proj``; ``proj`` ->
  ``o_proj``; the fused SwiGLU ``up`` rows split into ``gate_proj`` (first half, the SiLU branch) and ``up_proj``;
  ``down`` -> ``down_proj``; the two block norms -> ``input_layernorm``/``post_attention_layernorm``; ``norm`` ->
  ``norm``. The rotary convention (rotate half, ``theta ** (-2i / head_dim)``) and the attention scale are
  Llama's, so logits agree to float rounding (checked by ``tests/test_export.py``). A GELU built-in model has no
  Llama equivalent and is refused. The tokenizer becomes a ``PreTrainedTokenizerFast`` with a chat template that
  renders exactly what ``tokenization.ChatTokenizer.render`` / ``render_prompt`` produce (for text that does not
  spell a special token).
* **Hugging Face backbones** -> their own architecture (``save_pretrained``). LoRA is merged into the weights by
  default (``--merge_lora true``); with ``--merge_lora false`` the folder holds the base weights and the adapter sits
  in ``<output>/adapter`` (peft format, ``base_model_name_or_path`` pointing at ``<output>``).
* **Reward models** -> ``*ForSequenceClassification`` with one label (``score`` = the scalar head's weight), the pad
  id in the config so transformers reads the score at the last non-pad token, as ``RewardModel`` does. The
  classification head has no bias while ``ScalarHead`` has one. The Bradley-Terry loss depends on score differences
  only, so the bias gets zero gradient in exact arithmetic, but Adam turns float rounding noise in that gradient
  into steps of about the learning rate, so a trained bias is small but not 0. It is dropped: exported scores are
  the raw scores minus the bias (a constant shift, which changes no comparison), the dropped value is kept in the
  config as ``rlhf_score_bias``, and the stored normalisation mean is shifted by it (``rlhf_score_mean`` /
  ``rlhf_score_std``), so normalised scores are unchanged. A reward model's LoRA is always merged.

The folder is written to a temporary sibling and renamed into place, so a failed export leaves no half folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_lightning.models.factory import model_from_spec
from rlhf_lightning.models.heads import RewardModel
from rlhf_lightning.stages.checkpoints import PAYLOAD_KEY, CheckpointError, load_checkpoint, submodule_state
from rlhf_lightning.stages.tokenizer_link import tokenizer_from_payload
from rlhf_lightning.tokenization import BOS, EOS, PAD, ROLE_TOKENS

__all__ = [
    "BUILTIN_CHAT_TEMPLATE",
    "ExportError",
    "chat_tokenizer_to_hf",
    "export_checkpoint",
    "gpt_to_llama_config",
    "gpt_to_llama_state",
    "main",
]

BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class ExportError(CheckpointError):
    """A checkpoint that cannot be exported as asked."""


# ------------------------------------------------------------------------------------------ built-in -> Llama
def gpt_to_llama_config(config: Any, tokenizer: Any = None, **extra: Any):
    """A ``LlamaConfig`` for a built-in ``GPTConfig``."""
    from transformers import LlamaConfig

    if config.mlp != "swiglu":
        raise ExportError(
            f"a built-in model with mlp={config.mlp!r} has no Llama equivalent; expected 'swiglu'"
        )
    ids = {}
    if tokenizer is not None:
        ids = {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
        }
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.mlp_hidden,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_head,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=config.tie_embeddings,
        **ids,
        **extra,
    )


def gpt_to_llama_state(gpt: nn.Module, lm_head: bool = True) -> dict[str, torch.Tensor]:
    """The built-in GPT's weights under Llama names (``model.*`` and, with ``lm_head``, ``lm_head.weight``)."""
    c = gpt.config
    d, hidden = c.n_embd, c.mlp_hidden
    out = {"model.embed_tokens.weight": gpt.wte.weight, "model.norm.weight": gpt.norm.weight}
    for i, block in enumerate(gpt.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split(d, dim=0)
        gate, up = block.mlp.up.weight.split(hidden, dim=0)
        out.update(
            {
                p + "input_layernorm.weight": block.attn_norm.weight,
                p + "self_attn.q_proj.weight": q,
                p + "self_attn.k_proj.weight": k,
                p + "self_attn.v_proj.weight": v,
                p + "self_attn.o_proj.weight": block.attn.proj.weight,
                p + "post_attention_layernorm.weight": block.mlp_norm.weight,
                p + "mlp.gate_proj.weight": gate,
                p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": block.mlp.down.weight,
            }
        )
    if lm_head:
        out["lm_head.weight"] = gpt.lm_head.weight
    return {k: t.detach().clone().contiguous() for k, t in out.items()}


def chat_tokenizer_to_hf(tokenizer: Any):
    """The built-in ``ChatTokenizer`` as a ``PreTrainedTokenizerFast`` with the matching chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.tokenizer.to_str())
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS.values()),
    )
    hf.chat_template = BUILTIN_CHAT_TEMPLATE
    return hf


# ---------------------------------------------------------------------------------------------- the command
def _export_builtin(backbone: nn.Module, reward: RewardModel | None, tokenizer: Any, out: Path) -> None:
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    if reward is None:
        model = LlamaForCausalLM(gpt_to_llama_config(backbone.config, tokenizer))
        state = gpt_to_llama_state(backbone)
        if backbone.config.tie_embeddings:
            state.pop("lm_head.weight")
    else:
        model = LlamaForSequenceClassification(gpt_to_llama_config(backbone.config, tokenizer, num_labels=1))
        state = gpt_to_llama_state(backbone, lm_head=False)
        state["score.weight"] = reward.head.linear.weight.detach().clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and backbone.config.tie_embeddings)]
    if missing or unexpected:
        raise ExportError(f"weight map mismatch: missing {missing}, unexpected {unexpected}")
    if backbone.config.tie_embeddings and reward is None:
        model.tie_weights()
    model.save_pretrained(out)
    if tokenizer is not None:
        chat_tokenizer_to_hf(tokenizer).save_pretrained(out)


def _export_hf(
    backbone: nn.Module, reward: RewardModel | None, tokenizer: Any, out: Path, merge: bool
) -> None:
    if backbone.is_lora and (merge or reward is not None):
        causal = backbone.net.merge_and_unload()
    elif backbone.is_lora:
        backbone.net.save_pretrained(out / "adapter")
        causal = (
            backbone.net.unload()
        )  # base weights; base_model_name_or_path is set once the folder is in place
    else:
        causal = backbone.hf_model
    if tokenizer is not None:
        causal.config.pad_token_id = tokenizer.pad_id
    if reward is None:
        causal.save_pretrained(out)
    else:
        from transformers import AutoModelForSequenceClassification

        values = {k: v for k, v in causal.config.to_dict().items() if k not in ("id2label", "label2id")}
        config = causal.config.__class__.from_dict({**values, "num_labels": 1})
        seq = AutoModelForSequenceClassification.from_config(
            config, trust_remote_code=backbone.trust_remote_code
        )
        base = getattr(seq, seq.base_model_prefix)
        base.load_state_dict(getattr(causal, causal.base_model_prefix).state_dict())
        seq.score.weight.data.copy_(reward.head.linear.weight.detach())
        seq.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save(out)


def _make_readable(folder: Path) -> None:
    """Folders 0755 and files 0644 under ``folder`` (itself included): readable by group and others, as checkpoints are."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def export_checkpoint(
    ckpt: str | Path,
    output: str | Path,
    merge_lora: bool = True,
    overwrite: bool = False,
    *,
    trust_remote_code: bool = False,
) -> Path:
    """Write the model of stage checkpoint ``ckpt`` (file or stage folder) as a Hugging Face folder ``output``;
    ``trust_remote_code`` is the user's flag (a value stored in the checkpoint is never honoured)."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ExportError(f"{output}: folder exists and is not empty; pass overwrite=True to replace it")
    checkpoint = load_checkpoint(ckpt)
    payload = checkpoint[PAYLOAD_KEY]
    spec = payload["model_spec"]
    tokenizer = tokenizer_from_payload(payload)
    state = checkpoint["state_dict"]
    reward = None
    if payload["stage"] == "reward":
        reward = RewardModel(model_from_spec(spec, trust_remote_code=trust_remote_code))
        reward.load_state_dict(submodule_state(state, payload["reward_prefix"]))
        backbone = reward.backbone
    else:
        backbone = model_from_spec(spec, trust_remote_code=trust_remote_code)
        backbone.load_state_dict(
            submodule_state(state, payload.get("policy_prefix", payload["backbone_prefix"]))
        )
    backbone.eval()

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        if spec.get("kind") == "hf":
            _export_hf(backbone, reward, tokenizer, tmp, merge_lora)
        else:
            _export_builtin(backbone, reward, tokenizer, tmp)
        if reward is not None:
            config_file = tmp / "config.json"
            config = json.loads(config_file.read_text())
            bias = float(reward.head.linear.bias)
            config.update(
                rlhf_score_bias=bias,
                rlhf_score_mean=float(reward.score_mean) - bias,
                rlhf_score_std=float(reward.score_std),
            )
            config_file.write_text(json.dumps(config, indent=2))
        if (tmp / "adapter").is_dir():
            config_file = tmp / "adapter" / "adapter_config.json"
            adapter_config = json.loads(config_file.read_text())
            adapter_config["base_model_name_or_path"] = str(output.resolve())
            config_file.write_text(json.dumps(adapter_config, indent=2))
        _make_readable(tmp)  # mkdtemp creates 0700: an exported model folder is for sharing
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def main(args: list[str]) -> None:
    """``rlhf-lightning export --ckpt <stage checkpoint or folder> --output <folder> [--merge_lora true]``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="rlhf-lightning export", description="Write a stage checkpoint as a Hugging Face model folder."
    )
    parser.add_argument(
        "--ckpt", required=True, help="stage checkpoint file, or a stage folder (its best one)"
    )
    parser.add_argument("--output", required=True, help="folder to write (config, safetensors, tokenizer)")
    parser.add_argument("--merge_lora", type=bool, default=True, help="merge a LoRA adapter into the weights")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace a non-empty output folder")
    parser.add_argument(
        "--trust_remote_code",
        type=bool,
        default=False,
        help="allow a Hugging Face backbone's own modelling code (only for folders you trust)",
    )
    cfg = parser.parse_args(list(args))
    out = export_checkpoint(
        cfg.ckpt, cfg.output, cfg.merge_lora, cfg.overwrite, trust_remote_code=cfg.trust_remote_code
    )
    print(f"wrote {out}")
