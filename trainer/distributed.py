"""Process-group and DeepSpeed set-up shared by `DSLTrainingArguments` and the `dsl-finetune` CLI.

`trainer.py` calls these while it resolves its arguments (so command lines and YAML / JSON files are handled
alike), and `finetune.py` re-exports them as part of the CLI's public names. Both import this module; neither
imports the other for them.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"
DEFAULT_TORCH_EXTENSIONS_DIR = Path("~/.cache/dsl-diffusion/torch_extensions").expanduser()

__all__ = [
    "DEEPSPEED_CONFIG_DIR",
    "DEFAULT_TORCH_EXTENSIONS_DIR",
    "configure_torch_extensions_dir",
    "resolve_deepspeed_config",
    "set_single_process_distributed_env",
]


def configure_torch_extensions_dir(path: str | os.PathLike | None = None) -> str:
    """Point DeepSpeed's JIT-compiled C++ ops at a persistent, project-owned cache (unless the user chose one).

    DeepSpeed compiles small ops with ninja/g++ the first time they are needed (~1-2 min each); a fixed folder
    (default ``~/.cache/dsl-diffusion/torch_extensions``) lets later runs and CI jobs on the same machine reuse them.
    """
    directory = os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(path or DEFAULT_TORCH_EXTENSIONS_DIR))
    os.makedirs(directory, exist_ok=True)
    return directory


def resolve_deepspeed_config(value: str | None) -> str | None:
    """``zero2`` / ``zero3`` name the configs shipped in ``trainer/ds_configs``; anything else is returned as is."""
    if value in ("zero2", "zero3"):
        return str(DEEPSPEED_CONFIG_DIR / f"{value}.json")
    return value


def set_single_process_distributed_env() -> None:
    """DeepSpeed needs a process group even for one process: provide the env a launcher would have set."""
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
