import os

# No test may touch the network: Hugging Face libraries are told to stay offline, and downloads
# in the examples are tested against local files only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# On NVIDIA GPUs MLX runs float32 matmuls as TF32 by default (about 1e-3 relative error), which
# would hide real mistakes behind the parity tolerances. The tests compare full float32. This must
# be set before mlx is imported, and it reaches the scripts run in subprocesses too.
os.environ["MLX_ENABLE_TF32"] = "0"
