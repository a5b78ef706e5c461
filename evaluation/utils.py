"""Small helpers shared by the evaluation modules: batches from dataloaders and atomic file writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


__all__ = ["batch_tensors", "atomic_write_text", "atomic_write_json", "read_json", "Stage"]


def batch_tensors(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids, attention_mask | None)`` on ``device`` from a dataloader batch (a tensor or a dict)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device), None
    if isinstance(batch, dict) and "input_ids" in batch:
        attention_mask = batch.get("attention_mask")
        input_ids = torch.as_tensor(batch["input_ids"]).to(device)
        return input_ids, None if attention_mask is None else torch.as_tensor(attention_mask).to(device)
    raise TypeError(
        "The dataloader must yield LongTensors [B, L] or dicts with 'input_ids' (and optionally 'attention_mask'), "
        f"got {type(batch).__name__}"
    )


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``: a reader (or a
    resumed run) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def atomic_write_json(path: str | Path, payload) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


class Stage:
    """A resumable stage of a long job (the demo, the known-law benchmark): its folder holds `done.json` once
    everything in it is written, so a re-run skips it."""

    def __init__(self, root: str, name: str):
        self.name, self.path = name, os.path.join(root, name)
        os.makedirs(self.path, exist_ok=True)

    @property
    def done(self) -> bool:
        return os.path.isfile(os.path.join(self.path, "done.json"))

    def finish(self, record: dict) -> dict:
        atomic_write_json(os.path.join(self.path, "done.json"), record)
        return record

    def record(self) -> dict:
        return read_json(os.path.join(self.path, "done.json"))
