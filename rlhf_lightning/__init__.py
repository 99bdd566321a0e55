from rlhf_lightning.onednn import bound_onednn_caches

version = "0.1.0"

# before any stage runs: bf16 matmuls on CPU would otherwise keep ~2 x 1024 oneDNN primitives, one set per distinct
# shape (PPO's trimmed forwards: RSS grew ~100 MB per iteration); see rlhf_lightning/onednn.py
bound_onednn_caches()
