"""Lazy, read-only access to a Hugging Face checkpoint directory (config.json + safetensors shards)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from edge_moe.errors import CheckpointError

FLOAT_DTYPES = {"BF16", "F16", "F32"}


class HFCheckpoint:
    """Tensor names, shapes and dtypes from shard headers; tensors read one at a time on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} has no config.json: is it a Hugging Face checkpoint dir?")
        self.config = json.loads((self.path / "config.json").read_text())
        self._handles: dict[str, object] = {}
        self._lock = threading.Lock()  # converter threads share the shard handles
        self.meta = self._read_headers()  # name -> (file, shape, dtype)

    def _shard_files(self) -> list[str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path} holds no *.safetensors files")
        return files

    def _read_headers(self) -> dict:
        meta = {}
        for name in self._shard_files():
            if not (self.path / name).is_file():
                raise CheckpointError(f"{self.path}: shard {name} named in the index is missing")
            try:
                with safe_open(self.path / name, framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        meta[key] = (name, tuple(sl.get_shape()), sl.get_dtype())
            except (SafetensorError, OSError) as e:  # truncated, corrupt or unreadable
                raise CheckpointError(f"{self.path / name} cannot be read as safetensors ({e}); is the file "
                                      "complete?") from None
        return meta

    def has(self, name: str) -> bool:
        return name in self.meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][1]

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise a CheckpointError naming the tensor if it is missing, misshapen or not float."""
        if name not in self.meta:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        _, got, dtype = self.meta[name]
        if tuple(got) != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor {name} has shape {list(got)}, expected {list(shape)}")
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has dtype {dtype}; edge-moe converts "
                                  f"unquantized checkpoints ({', '.join(sorted(FLOAT_DTYPES))})")

    def _handle(self, name: str):
        file = self.meta[name][0]
        with self._lock:
            if file not in self._handles:
                self._handles[file] = safe_open(self.path / file, framework="pt")
            return self._handles[file]

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """One tensor (or one slice along dim 0 of a fused 3-D tensor)."""
        h = self._handle(name)
        return h.get_tensor(name) if index is None else h.get_slice(name)[index]

    def release(self) -> None:
        """Close shard handles so their mapped pages leave this process's RSS."""
        self._handles.clear()
