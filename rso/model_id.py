"""Model ids written into every record and the manifest: name plus a content hash.

``policy_model``/``reward_model`` (SPEC 5) must say exactly which weights made the data. For a
local Hugging Face directory the hash covers config.json, the tokenizer files and, for each
weight file, its size and the sha256 of its first and last MiB (hashing multi-GB files whole at
every start would cost minutes; size + ends changes with any re-save or fine-tune).
"""
from __future__ import annotations

import hashlib
import os

_SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_CHUNK = 1 << 20


def model_id(path: str) -> str:
    """``<dir name>@sha256:<12 hex>`` for a local directory; the path itself otherwise."""
    if not os.path.isdir(path):
        return path
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name in _SMALL_FILES:
            with open(full, "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
        elif name.endswith(_WEIGHT_SUFFIXES):
            size = os.path.getsize(full)
            h.update(f"{name}\0{size}\0".encode())
            with open(full, "rb") as f:
                h.update(f.read(_CHUNK))
                if size > _CHUNK:
                    f.seek(max(size - _CHUNK, _CHUNK))
                    h.update(f.read(_CHUNK))
    return f"{os.path.basename(os.path.normpath(path))}@sha256:{h.hexdigest()[:12]}"
