import os

# Tests never touch the network: no hub downloads, no telemetry.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# The tiny pipelines gain nothing from threads, and OpenMP threads spin badly when the machine
# is shared: one thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)
