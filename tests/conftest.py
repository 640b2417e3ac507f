"""Every test sees 8 fake CPU devices, so sharding runs as it would over 8 chips.

The `gcs` fixture gives a test its own `gs://` folder on a local GCS API server (tests/gcs.py);
the server starts once per session, on first use.
"""

import os
import sys
import uuid

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# model.remat=auto would compile and time three policies for every new shape the tests train; they
# run save_matmuls instead (tests/test_remat.py measures for real, with this unset).
os.environ.setdefault("HEFT_REMAT_AUTO", "save_matmuls")

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def gcs_server():
    import gcs

    server = gcs.Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # before any client in this process reads them
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def gcs(gcs_server):
    """A fresh `gs://BUCKET/PREFIX` for one test (as a string); subprocesses inherit the server's env."""
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    return f"gs://{gcs_server.bucket}/{uuid.uuid4().hex[:12]}"
