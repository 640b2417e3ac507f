"""`heft verify DIR`: check a checkpoint's seal and files against its manifest (a workdir checks every step).

    heft verify WORKDIR [--key=PUBLIC.pem]     # every step; exit 1 if any is damaged
    heft verify --new_key=PRIVATE.pem          # an ed25519 key pair for checkpoint.signing_key

For each checkpoint it reports the seal and the files (sha256 of each). An unsigned seal is
reported as what it is, "seal ok (integrity, unsigned)": a digest that catches accidents (a torn
write, a damaged disk, a stray edit), not an attacker. A signed one is a statement of run, step,
config and parent (manifest.py); only with --key is its signer known to be yours. A step whose save never completed (no seal) is reported as
incomplete, not as damaged: the next `heft train` seals or removes it.
"""

import sys

from absl import flags
from etils import epath

from heft.data import paths


def define_flags():
    flags.DEFINE_string("checkpoint", None, "a checkpoint, a checkpoints/ directory or a workdir")
    flags.DEFINE_string("key", None, "an ed25519 public key (PEM): the seals must be signed by its private key")
    flags.DEFINE_string("new_key", None, "write a new ed25519 key pair to this path (and PATH.pub), then exit")


def report(directory: epath.Path, key: str | None = None) -> tuple[bool, str]:
    """(ok, one line) for one checkpoint directory."""
    from heft.train import manifest  # here, not above: `heft verify --help` needs no JAX

    if not manifest.is_sealed(directory):
        return True, f"incomplete {directory}  (its save never completed: not a checkpoint; heft train removes it)"
    try:
        m = manifest.read(directory, key)
    except manifest.CheckpointError as e:
        if not manifest.is_sealed(directory):  # removed by a running job's retention meanwhile
            return True, f"removed  {directory}  (deleted while being checked: a running job's retention)"
        return False, f"FAILED   seal: {e}"
    kind = manifest.seal_kind(directory)
    if key:
        seal = f"seal signed and ok ({kind}, by {key})"
    elif kind.startswith("signed"):
        seal = f"seal ok ({kind}; pass --key to check who signed it)"
    else:
        seal = f"seal ok ({kind})"
    try:
        manifest.verify(directory, key)
    except manifest.CheckpointError as e:
        return False, f"FAILED   {seal}; files: {e}"
    return True, f"ok       {directory}  ({seal}; {len(m['files'])} files match, step {m.get('step', '-')})"


def main(argv):
    f = flags.FLAGS
    from heft.train import checkpoint, manifest

    if f.new_key:
        private = paths.path(f.new_key)
        public = manifest.new_key(private)
        print(f"wrote {private} (keep it secret; set checkpoint.signing_key to it) and {public} "
              "(set checkpoint.verify_key, or pass --key, to check seals)")
        return
    given = argv[1:] + ([f.checkpoint] if f.checkpoint else [])
    if not given:
        sys.exit("usage: heft verify DIR (a checkpoint, or a workdir to check every checkpoint in it)")
    bad = 0
    for path in given:
        directories = checkpoint.checkpoints_in(path)
        if not directories:
            raise manifest.CheckpointError(f"{path} holds no checkpoints")
        for directory in directories:
            ok, line = report(directory, f.key)
            print(line)
            bad += not ok
    sys.exit(1 if bad else 0)
