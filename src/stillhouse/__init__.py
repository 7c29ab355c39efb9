"""stillhouse: distill a large language model into a small one, entirely on your own servers.

Public API (small on purpose): `load_config`, `Config`, and the stage functions in `stillhouse.stages`,
each `run(cfg) -> manifest dict`.
"""

import os

# Offline guarantee: set before anything can import transformers / huggingface_hub / datasets, so no code
# path reaches a model hub. Forced, not defaulted: a user's environment cannot turn the network back on.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Our progress bars are rich's (stillhouse.ui); the libraries' own tqdm bars and advisories would interleave.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"

from stillhouse.config import Config, load_config  # noqa: E402

__all__ = ["Config", "load_config", "__version__"]
