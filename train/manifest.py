"""Custody of a checkpoint: a manifest of every file's sha256, the config and where it came from,
and a seal that covers the manifest itself.

A checkpoint directory holds, besides its data:

    manifest.json   {"format", "files": {path: {"sha256", "bytes"}}, "config", "data", "step", ...}
    manifest.seal   {"manifest_sha256": digest of the manifest's canonical JSON, "signature"?}

The seal is written last, so it is what marks a checkpoint complete, on a local disk and on GCS
alike (GCS has no atomic rename; one object is one upload, visible only whole). A checkpoint is
trusted only when the seal's digest matches the manifest (an edit of the manifest, such as its
config, is caught), the files match the manifest (a damaged or replaced file is caught, by name),
and, when a public key is configured, the seal's ed25519 signature over the digest verifies.
Hashing is split across hosts (custody.py); this module holds the format and the checks.
"""

import base64
import functools
import hashlib
import json
import subprocess

from etils import epath

from heft.data import paths
from heft.train import storage

NAME = "manifest.json"
SEAL = "manifest.seal"
FORMAT = "heft-checkpoint-2"
SCRATCH = "custody"  # per-host partial hashes while sealing; never part of the checkpoint
NOT_CONTENT = (NAME, SEAL)


class CheckpointError(ValueError):
    """A checkpoint that must not be restored; the message names the file and what to do."""


def sha256_file(p: epath.Path) -> tuple[str, int]:
    """(hex sha256, size in bytes) of one file, read in 8 MiB blocks."""
    h, n = hashlib.sha256(), 0
    with p.open("rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def content_files(directory: epath.Path) -> list[str]:
    """The files a manifest must list: everything but the manifest, its seal and custody's scratch."""
    return [f for f in storage.files_under(directory, skip=(SCRATCH,)) if f not in NOT_CONTENT]


@functools.cache
def code_version() -> str:
    """The git commit of the heft source in use (with "-dirty" if it has local edits), if any."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def canonical(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def digest(manifest: dict) -> str:
    return hashlib.sha256(canonical(manifest)).hexdigest()


# Signing (optional): `checkpoint.signing_key` signs, `checkpoint.verify_key` is checked on restore.


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise CheckpointError("signing checkpoints needs the cryptography package: "
                              'pip install "heft[sign]"') from None
    return serialization, ed25519


def sign(digest_hex: str, private_key_path: str) -> str:
    """The signature of a digest with `checkpoint.signing_key` (the config field's value)."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(paths.path(private_key_path).read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint.signing_key={private_key_path} is not a readable PEM private key "
                              f"({e}); make one with `heft verify --new_key=PATH`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise CheckpointError(f"checkpoint.signing_key={private_key_path} is not an ed25519 key; use one")
    return base64.b64encode(key.sign(digest_hex.encode())).decode()


def check_signature(directory: epath.Path, seal: dict, public_key_path: str) -> None:
    """Checks the seal's signature with `checkpoint.verify_key` (the config field's value)."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(paths.path(public_key_path).read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint.verify_key={public_key_path} is not a readable PEM public key "
                              f"({e}); pass the .pub file written with the signing key") from None
    if "signature" not in seal:
        raise CheckpointError(f"{directory / SEAL} is not signed but checkpoint.verify_key is "
                              "set; restore only signed checkpoints, or unset verify_key")
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(base64.b64decode(seal["signature"]), seal["manifest_sha256"].encode())
    except (InvalidSignature, ValueError):
        raise CheckpointError(f"{directory / SEAL}: the signature does not verify with "
                              f"{public_key_path}: the checkpoint was not signed by its key, or was altered") from None


def new_key(private_key_path: epath.PathLike) -> str:
    """Writes a new ed25519 key pair (PRIVATE and PRIVATE.pub, PEM); returns the public key's path
    (what `checkpoint.verify_key` is set to)."""
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private = paths.path(private_key_path)
    paths.write_bytes(private, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public = private.with_name(private.name + ".pub")
    paths.write_bytes(public, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(public)


# Writing.


def write(directory: epath.Path, files: dict, facts: dict, signing_key: str | None = None) -> dict:
    """Writes manifest.json, then the seal that completes the checkpoint. Returns the manifest."""
    manifest = {"format": FORMAT, "files": files, **facts}
    paths.write_bytes(directory / NAME, json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")
    seal = {"manifest_sha256": digest(manifest)}
    if signing_key:
        seal["signature"] = sign(seal["manifest_sha256"], signing_key)
    storage.write_json(directory / SEAL, seal)
    return manifest


# Reading and checking.


def is_sealed(directory: epath.Path) -> bool:
    """Whether the checkpoint's save completed (its seal exists); `read` checks the seal holds."""
    return (directory / SEAL).exists()


def _load_json(p: epath.Path, what: str):
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p} is missing: the save never completed; use an earlier checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({e}); the {what} cannot be trusted: "
                              "restore an earlier checkpoint") from None


def _check_shape(manifest, p: epath.Path) -> None:
    files = manifest.get("files") if isinstance(manifest, dict) else None
    ok = isinstance(files, dict) and all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
        for v in files.values())
    if not ok:
        raise CheckpointError(f"{p} is not a heft manifest (it needs a 'files' map of sha256 and bytes); "
                              "the checkpoint cannot be trusted: restore an earlier checkpoint")


def read(directory: epath.PathLike, verify_key: str | None = None) -> dict:
    """The manifest, after checking that the seal covers it (and its signature, given a key).

    Raises CheckpointError when the checkpoint is unsealed, the manifest is malformed, or the
    manifest was edited after sealing.
    """
    directory = paths.path(directory)
    if not (directory / SEAL).exists():
        raise CheckpointError(f"{directory} has no {SEAL}: its save never completed; use an earlier checkpoint")
    seal = _load_json(directory / SEAL, "seal")
    manifest = _load_json(directory / NAME, "manifest")
    _check_shape(manifest, directory / NAME)
    if not isinstance(seal, dict) or seal.get("manifest_sha256") != digest(manifest):
        raise CheckpointError(f"{directory / NAME} does not match its seal ({SEAL}): the manifest was edited "
                              "after the checkpoint was saved; restore an earlier checkpoint")
    if verify_key:
        check_signature(directory, seal, verify_key)
    return manifest


def check_file(directory: epath.Path, rel: str, want: dict) -> str | None:
    """None if `rel` matches its manifest entry; else a one-line description of what is wrong."""
    p = directory / rel
    missing = f"{p} is missing from the checkpoint (listed in its manifest); restore an earlier checkpoint"
    try:
        got, size = sha256_file(p)
    except FileNotFoundError:
        return missing
    if size != want["bytes"]:
        return (f"{p} has {size} bytes, the manifest says {want['bytes']}: truncated or altered; "
                "restore an earlier checkpoint")
    if got != want["sha256"]:
        return f"{p} does not match its sha256 in the manifest: altered or corrupt; restore an earlier checkpoint"
    return None


def check_extra(directory: epath.Path, manifest: dict) -> str | None:
    extra = sorted(set(content_files(directory)) - set(manifest["files"]))
    if extra:
        return (f"{directory / extra[0]} is not in the manifest: the checkpoint was altered "
                "after it was saved")
    return None


def verify(directory: epath.PathLike, verify_key: str | None = None) -> dict:
    """Checks the seal and every file in this process; raises CheckpointError naming the first problem.
    (Training verifies across hosts in parallel: custody.verify.)"""
    directory = paths.path(directory)
    manifest = read(directory, verify_key)
    for rel, want in sorted(manifest["files"].items()):
        if problem := check_file(directory, rel, want):
            raise CheckpointError(problem)
    if problem := check_extra(directory, manifest):
        raise CheckpointError(problem)
    return manifest
