"""Matmul FLOPs (``torch.utils.flop_counter``) of one PPO rollout and one update epoch on vs_trl.py's tiny Llama.

Noise-free where wall time on a shared CPU is not: 16 HH prompts (<= 192 tokens), 32 new tokens, minibatches of 8,
one epoch. The argument is a JSON list of settings, each ``PPOArgs`` fields plus ``"shared": true`` for
``share_value_trunk``. Prints JSON: GFLOP of the rollout (generation included) and of the update, per setting.

    PYTHONPATH=$PWD python benchmarks/ppo_update_flops.py '[{}, {"shared": true}, {"micro_batch_tokens": 1024}]'
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ppo_iteration
import vs_trl

from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.models.factory import ModelArgs
from rlhf_lightning.models.generation import GenerationArgs
from rlhf_lightning.stages.ppo import PPOArgs, PPOModule
from rlhf_lightning.stages.reward import RewardModule
from rlhf_lightning.stages.rewards import RewardArgs
from rlhf_lightning.stages.sft import SFTModule

settings = json.loads(sys.argv[1])
torch.manual_seed(0)
tmp = Path(tempfile.mkdtemp())
folder = vs_trl.make_llama_folder(
    tmp / "llama", argparse.Namespace(vocab_size=4096, hidden=256, layers=4, heads=4, max_length=512, seed=0)
)
model = ModelArgs(hf_path=str(folder), dropout=0.0)
sft = SFTModule(model=model, tokenizer_path=str(folder))
sft.configure_model()
rw = RewardModule(model=model, tokenizer_path=str(folder))
rw.configure_model()
sp, rp = ppo_iteration._save(sft, tmp / "sft.ckpt"), ppo_iteration._save(rw, tmp / "rw.ckpt")
data = PromptDataModule(
    train_path=str(Path(__file__).resolve().parents[1] / "data" / "hh_rlhf" / "prompts_train.jsonl"),
    tokenizer_path=str(folder),
    batch_size=16,
    max_prompt_length=192,
)
data.setup("fit")
batch = next(iter(data.train_dataloader()))
out = {}
for s in settings:
    shared = s.pop("shared", False)
    m = PPOModule(
        policy_from=sp,
        reward_from=rp,
        tokenizer_path=str(folder),
        share_value_trunk=shared,
        ppo=PPOArgs(epochs=1, minibatch_size=8, max_grad_norm=None, **s),
        rewards=RewardArgs(normalize=False, clip=None, missing_eos_score=-1.0),
        generation=GenerationArgs(max_new_tokens=32),
        sample_every_n=0,
    )
    m.configure_model()
    opts = m.configure_optimizers()
    m.optimizers = lambda use_pl_optimizer=True, opts=opts: opts
    m.manual_backward = lambda loss: loss.backward()
    m.generator.manual_seed(0)
    with FlopCounterMode(display=False) as fc:
        rollout, _ = m._rollout(batch)
    roll = fc.get_total_flops()
    m.generator.manual_seed(1)
    with FlopCounterMode(display=False) as fc:
        m._update(rollout, update_policy=True)
    out[json.dumps({**s, "shared": shared})] = {
        "rollout_GFLOP": round(roll / 1e9, 2),
        "update_GFLOP_per_epoch": round(fc.get_total_flops() / 1e9, 2),
    }
print(json.dumps(out, indent=1))
