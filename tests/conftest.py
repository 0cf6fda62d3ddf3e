import os

# No test may touch the network: Hugging Face libraries are told to stay offline, and downloads
# in the examples are tested against local files only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
