"""Copies model directories from GCS (or any fsspec URL) to local disk, once per container.

The pipeline loads models from local directories (vLLM and transformers read local files), so a
worker whose image does not bake the models in fetches them at start: the image's entrypoint
(``deploy/dataflow/entrypoint.sh``) runs this with ``RSO_MODELS_GCS``, before the Beam boot
program. The launcher needs the same directories at the same paths (the config is validated and
the models hashed there), so run it there too::

    python deploy/dataflow/fetch_models.py gs://my-bucket/models /models

copies ``gs://my-bucket/models/policy/...`` to ``/models/policy/...`` and so on. A marker file
(``.rso-fetched``) is written last, so a copy cut short is redone, and a complete one is skipped.
Files are copied to a temporary name and renamed, so a half-written file never looks complete.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from rso import storage as rso_io

MARKER = ".rso-fetched"


def fetch(source: str, dest: str) -> int:
    """Copies every file under ``source`` to the same relative path under ``dest``.

    Returns the number of files copied (0 when ``dest`` already holds a complete copy of
    ``source``). Raises FileNotFoundError when ``source`` has no files.
    """
    marker = os.path.join(dest, MARKER)
    source = source.rstrip("/")
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            if f.read().strip() == source:
                return 0
    fs, root = rso_io.filesystem(source)
    root = root.rstrip("/")
    files = [p for p in fs.find(root) if not p.rstrip("/").endswith("/" + MARKER)]
    if not files:
        raise FileNotFoundError(f"no files under {source}")
    if os.path.exists(marker):
        os.unlink(marker)
    for remote in files:
        rel = remote[len(root):].lstrip("/")
        local = os.path.join(dest, *rel.split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = local + ".part"
        fs.get_file(remote, tmp)
        os.replace(tmp, local)
    with open(marker, "w", encoding="utf-8") as f:
        f.write(source + "\n")
    return len(files)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: fetch_models.py SOURCE_URL DEST_DIR", file=sys.stderr)
        return 2
    n = fetch(args[0], args[1])
    print(f"fetch_models: {args[0]} -> {args[1]}: "
          + (f"{n} file(s) copied" if n else "already complete"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
