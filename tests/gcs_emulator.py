"""A local Google Cloud Storage for tests: ``gcp-storage-emulator`` on a free loopback port.

:func:`gcs_emulator` starts the emulator in this process (a server thread, in memory, one default
bucket) and sets what clients need to use it without a network:

- ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT``: google-cloud-storage (and so Beam's gcsio)
  and gcsfs (``rso.storage``) send their requests there;
- ``NO_GCE_CHECK=true``, ``GOOGLE_CLOUD_PROJECT=test``;
- ``GOOGLE_APPLICATION_CREDENTIALS``: a throw-away "authorized_user" file whose access token is
  already valid (expiry in 2999), so ``google.auth.default()`` answers at once. Without it Beam
  retries ``google.auth.default()`` with backoff for ~18 s per process before going anonymous.
  The token is a dummy; the emulator ignores it, and nothing is sent anywhere else;
- ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs (2026.x) otherwise asks the bucket's type
  over gRPC, which the emulator does not serve: 60 s timeout per bucket. gcsfs reads it only
  when first imported, so the plain ``gcsfs.core.GCSFileSystem`` is also registered for gs://
  in fsspec while the emulator runs, in case gcsfs was imported earlier.

The previous environment is restored on exit. Beam's subprocess workers inherit it, so
``--direct_running_mode=multi_processing`` works too.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator

import fsspec
import gcsfs.core
from gcp_storage_emulator.server import create_server

BUCKET = "bucket"
_FAKE_CREDENTIALS = {
    "type": "authorized_user", "client_id": "emulator", "client_secret": "emulator",
    "refresh_token": "emulator", "token": "emulator", "expiry": "2999-01-01T00:00:00Z",
}


@contextlib.contextmanager
def gcs_emulator(bucket: str = BUCKET) -> Iterator[str]:
    """Runs the emulator with ``bucket`` created; yields its endpoint ``http://127.0.0.1:PORT``."""
    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
    server.start()  # binds port 0: the OS picks a free port, no race with other test runs
    port = server._api._httpd.server_address[1]  # the library exposes no accessor
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="gcs-emulator-") as tmp:
        cred_path = os.path.join(tmp, "credentials.json")
        with open(cred_path, "w") as f:
            json.dump(_FAKE_CREDENTIALS, f)
        env = {"STORAGE_EMULATOR_HOST": endpoint, "NO_GCE_CHECK": "true",
               "GOOGLE_CLOUD_PROJECT": "test", "GOOGLE_APPLICATION_CREDENTIALS": cred_path,
               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        saved_fs = {proto: fsspec.registry.get(proto) for proto in ("gs", "gcs")}
        for proto in saved_fs:
            fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
        try:
            yield endpoint
        finally:
            for proto, cls in saved_fs.items():
                if cls is not None:
                    fsspec.register_implementation(proto, cls, clobber=True)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            server.stop()
