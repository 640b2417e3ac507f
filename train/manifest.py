"""Custody of a checkpoint: a manifest of every file's sha256, the config and where it came from,
and a seal that covers the manifest itself.

A checkpoint directory holds, besides its data:

    manifest.json   {"format", "files": {path: {"sha256", "bytes"}}, "config", "data", "step",
                     "run_id", "parent_step", ...}
    manifest.seal   {"manifest_sha256", "statement", "signature"?, "signer"?}

The seal is written last, so it is what marks a checkpoint complete, on a local disk and on GCS
alike (GCS has no atomic rename; one object is one upload, visible only whole).

What the seal is worth depends on whether it is signed:

- Unsigned, the seal is an unkeyed sha256: integrity against accidents (a torn write, a damaged
  disk, a stray edit, a step folder copied to the wrong name), not against an attacker, who can
  edit the manifest and compute its digest again with three lines of stdlib. `heft verify` says
  "seal ok (integrity, unsigned)" for it, and nothing more.
- Signed (`checkpoint.signing_key`), the ed25519 signature covers a statement in the manner of
  in-toto / sigstore: a subject (the manifest and its digest) and a predicate binding it to the run
  (`run_id`, fixed at the run's first save and kept across resumes), the step, the config's digest
  and the parent step (the sealed step saved or resumed from before it, None for the first). A
  reader given the public key (`checkpoint.verify_key`, `--verify_key`) refuses a step whose
  statement does not verify or does not fit where it lies: a folder name other than the step (a
  rollback or a rename), a run id other than the workdir's other signed steps (a replay), a config
  digest other than the manifest's. Without a key, a step of a workdir whose other steps are signed
  must be signed too, by the same signer, and its signature must verify with that signer's key (the
  seal records it): an unsigned or re-signed step put among signed ones is refused either way.
  Signed seals from before statements (a signature over the bare digest) are refused with a key.

Only regular files inside the checkpoint are read: names in the manifest stay inside (no `..`, no
absolute names), a symbolic link anywhere below the checkpoint is refused by name, and reads stop at
the size the manifest gives (a larger file fails without being read whole). Nothing is skipped:
hidden files are content like any other, and custody's scratch folder is never left in a sealed step.
Hashing is split across hosts (custody.py); this module holds the format and the checks.
"""

import base64
import functools
import hashlib
import json
import os
import stat
import subprocess

import fsspec
from etils import epath

from heft.data import paths
from heft.train import storage

NAME = "manifest.json"
SEAL = "manifest.seal"
FORMAT = "heft-checkpoint-2"
SCRATCH = "custody"  # per-host partial hashes while sealing; removed before the seal is written
NOT_CONTENT = (NAME, SEAL)
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://heft.dev/checkpoint/v1"
# Bounds on what is read before it is checked (a manifest of a 70B state's files is a few MB).
MAX_MANIFEST_BYTES = 256 << 20
MAX_SEAL_BYTES = 1 << 20
MAX_KEY_BYTES = 64 << 10


class CheckpointError(ValueError):
    """A checkpoint that must not be restored; the message names the file and what to do."""


# Reading files: regular ones, inside the checkpoint, bounded.


def _unsafe_name(rel) -> bool:
    """Whether a manifest's file name could point outside its checkpoint (or nowhere)."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return True
    return any(part in ("", ".", "..") for part in rel.split("/"))


def _not_regular(directory: epath.Path, rel: str) -> str | None:
    """Why `directory/rel` may not be read as checkpoint content (a symbolic link on its way, or not a
    regular file), or None. Local only: GCS objects are always plain objects."""
    if paths.is_remote(directory):
        return None
    here = str(directory)
    for part in rel.split("/"):
        here = os.path.join(here, part)
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            return None  # the caller reports a missing file as such
        if stat.S_ISLNK(mode):
            return (f"{here} is a symbolic link; a checkpoint holds only regular files inside it: "
                    "replace the link by the file itself, or restore an earlier checkpoint")
    if not stat.S_ISREG(mode):
        return f"{here} is not a regular file; a checkpoint holds only regular files: restore an earlier checkpoint"
    return None


def sha256_file(p: epath.Path, limit: int | None = None) -> tuple[str, int]:
    """(hex sha256, size in bytes) of one file, read in 8 MiB blocks; with `limit`, at most limit + 1
    bytes are read (a size over `limit` says the file is larger than that, not by how much)."""
    h, n = hashlib.sha256(), 0
    with p.open("rb") as f:
        while limit is None or n <= limit:
            block = f.read(8 << 20 if limit is None else min(8 << 20, limit + 1 - n))
            if not block:
                break
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def _read_small(p: epath.Path, limit: int, what: str) -> bytes:
    if problem := _not_regular(p.parent, p.name):
        raise CheckpointError(problem)
    with p.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{p} is larger than any {what} heft writes ({limit:,} bytes); it cannot be trusted: "
                              "restore an earlier checkpoint")
    return data


# Listing: everything below the checkpoint, with what may not be in one.


def entries(directory: epath.Path) -> tuple[list[str], list[str]]:
    """(every file below `directory`, hidden ones included, as sorted relative paths; one-line problems
    with what is not a regular file: symbolic links, devices, pipes)."""
    files, odd = [], []
    if paths.is_remote(directory):
        # fsspec directly (as heft.data.paths does, cache off for gs://): its listing leaves hidden names out.
        fs, root = fsspec.core.url_to_fs(os.fspath(directory))
        root = root.rstrip("/")
        for name, info in fs.find(root, detail=True).items():
            if info.get("type") == "file" and name.startswith(root + "/"):
                files.append(name[len(root) + 1:])
        return sorted(files), odd
    base = str(directory)
    for here, dirs, names in os.walk(base, followlinks=False):
        rel_dir = os.path.relpath(here, base)
        for name in sorted(dirs + names):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            try:
                mode = os.lstat(os.path.join(here, name)).st_mode
            except FileNotFoundError:  # gone since the listing: a temporary name renamed into place
                continue
            if stat.S_ISLNK(mode) or (name in names and not stat.S_ISREG(mode)):
                odd.append(_not_regular(directory, rel))
            elif name in names:
                files.append(rel)
    return sorted(files), sorted(odd)


def content_files(directory: epath.Path) -> list[str]:
    """The files a manifest must list: everything but the manifest, its seal and custody's scratch.
    Raises CheckpointError if anything below `directory` is not a regular file."""
    files, odd = entries(directory)
    if odd:
        raise CheckpointError(odd[0])
    return [f for f in files if f not in NOT_CONTENT and f.split("/")[0] != SCRATCH]


@functools.cache
def code_version() -> str:
    """The git commit of the heft source in use (with "-dirty" if it has local edits), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def canonical(manifest) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def digest(manifest: dict) -> str:
    return hashlib.sha256(canonical(manifest)).hexdigest()


def statement(manifest: dict) -> dict:
    """What a seal states (and a signature covers): this manifest, of this run's step, with this config
    and this parent step."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": NAME, "digest": {"sha256": digest(manifest)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {"run_id": manifest.get("run_id"), "step": manifest.get("step"),
                      "config_sha256": hashlib.sha256(canonical(manifest.get("config"))).hexdigest(),
                      "parent_step": manifest.get("parent_step")},
    }


# Signing (optional): `checkpoint.signing_key` signs; `checkpoint.verify_key` or `--verify_key` checks.


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise CheckpointError("signing checkpoints needs the cryptography package: "
                              'pip install "heft[sign]"') from None
    return serialization, ed25519


def _key_bytes(key_path: str, field: str, fix: str) -> bytes:
    try:
        return _read_small(paths.path(key_path), MAX_KEY_BYTES, "key")
    except (OSError, CheckpointError) as e:
        raise CheckpointError(f"{field}={key_path} cannot be read ({e}); {fix}") from None


def _raw(public_key) -> str:
    serialization, _ = _crypto()
    return base64.b64encode(public_key.public_bytes(serialization.Encoding.Raw,
                                                    serialization.PublicFormat.Raw)).decode()


def sign(message: bytes, private_key_path: str) -> tuple[str, str]:
    """(signature, signer: the raw public key, base64) of `message` with `checkpoint.signing_key`."""
    serialization, ed25519 = _crypto()
    fix = "make one with `heft verify --new_key=PATH`"
    try:
        key = serialization.load_pem_private_key(_key_bytes(private_key_path, "checkpoint.signing_key", fix),
                                                 password=None)
    except ValueError as e:
        raise CheckpointError(f"checkpoint.signing_key={private_key_path} is not a readable PEM private key "
                              f"({e}); {fix}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise CheckpointError(f"checkpoint.signing_key={private_key_path} is not an ed25519 key; use one")
    return base64.b64encode(key.sign(message)).decode(), _raw(key.public_key())


def _public_key(public_key_path: str):
    serialization, ed25519 = _crypto()
    fix = "pass the .pub file written with the signing key"
    try:
        key = serialization.load_pem_public_key(_key_bytes(public_key_path, "checkpoint.verify_key", fix))
    except ValueError as e:
        raise CheckpointError(f"checkpoint.verify_key={public_key_path} is not a readable PEM public key "
                              f"({e}); {fix}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise CheckpointError(f"checkpoint.verify_key={public_key_path} is not an ed25519 public key; {fix}")
    return key


def _signature_holds(seal: dict, key) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(base64.b64decode(seal["signature"]), canonical(seal["statement"]))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def check_signature(directory: epath.Path, seal: dict, public_key_path: str) -> None:
    """Checks the seal's signature of its statement with `checkpoint.verify_key` / `--verify_key`."""
    key = _public_key(public_key_path)
    if "signature" not in seal:
        raise CheckpointError(f"{directory / SEAL} is not signed but a verify key is given ({public_key_path}); "
                              "read only signed checkpoints, or leave the key out")
    if "statement" not in seal:
        raise CheckpointError(f"{directory / SEAL} is signed over the bare digest, a seal that predates statements "
                              "(run, step, config, parent): its step and run cannot be checked; re-save it with "
                              "this heft, or leave the key out")
    if not _signature_holds(seal, key):
        raise CheckpointError(f"{directory / SEAL}: the signature does not verify with "
                              f"{public_key_path}: the checkpoint was not signed by its key, or was altered")


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
    seal = {"manifest_sha256": digest(manifest), "statement": statement(manifest)}
    if signing_key:
        seal["signature"], seal["signer"] = sign(canonical(seal["statement"]), signing_key)
    storage.write_json(directory / SEAL, seal)
    return manifest


# Reading and checking.


def is_sealed(directory: epath.Path) -> bool:
    """Whether the checkpoint's save completed (its seal exists); `read` checks the seal holds."""
    return (directory / SEAL).exists()


def _load_json(p: epath.Path, what: str, limit: int):
    try:
        return json.loads(_read_small(p, limit, what))
    except FileNotFoundError:
        raise CheckpointError(f"{p} is missing: the save never completed; use an earlier checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({e}); the {what} cannot be trusted: "
                              "restore an earlier checkpoint") from None


def _check_shape(manifest, p: epath.Path) -> None:
    files = manifest.get("files") if isinstance(manifest, dict) else None
    ok = isinstance(files, dict) and all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
        and v["bytes"] >= 0 for v in files.values())
    if not ok:
        raise CheckpointError(f"{p} is not a heft manifest (it needs a 'files' map of sha256 and bytes); "
                              "the checkpoint cannot be trusted: restore an earlier checkpoint")
    outside = sorted(str(rel) for rel in files if _unsafe_name(rel) or rel in NOT_CONTENT)
    if outside:
        raise CheckpointError(f"{p} names {outside[0]!r}, not a file inside the checkpoint; the manifest was "
                              "tampered with: restore an earlier checkpoint")


def _training_step(directory: epath.Path) -> int | None:
    """The step a workdir's step folder is named for (WORKDIR/checkpoints/STEP), else None."""
    return int(directory.name) if directory.parent.name == "checkpoints" and directory.name.isdigit() else None


def _sibling_seals(directory: epath.Path) -> dict[int, dict]:
    """{step: seal} of the workdir's other sealed steps (seals only: small files, cheap on GCS too)."""
    if _training_step(directory) is None:
        return {}
    out = {}
    for p in directory.parent.iterdir():
        if p.name.isdigit() and p.name != directory.name and (p / SEAL).exists():
            try:
                seal = _load_json(p / SEAL, "seal", MAX_SEAL_BYTES)
            except (CheckpointError, OSError):
                continue  # that step's own read reports it
            if isinstance(seal, dict):
                out[int(p.name)] = seal
    return out


def _check_statement(directory: epath.Path, seal: dict, manifest: dict) -> None:
    """The seal's statement is this manifest's, and its step is the folder's."""
    said = seal["statement"]
    want = statement(manifest)
    if not isinstance(said, dict) or said.get("subject") != want["subject"]:
        raise CheckpointError(f"{directory / SEAL}: its statement is not about this manifest; the checkpoint was "
                              "altered after it was saved: restore an earlier checkpoint")
    predicate = said.get("predicate") if isinstance(said.get("predicate"), dict) else {}
    for field, value in want["predicate"].items():
        if predicate.get(field) != value:
            what = "the manifest's config" if field == "config_sha256" else f"the manifest's {field} {value!r}"
            raise CheckpointError(f"{directory / SEAL}: its statement's {field} {predicate.get(field)!r} does not "
                                  f"match {what}; the checkpoint was altered after it was saved: restore an earlier "
                                  "checkpoint")
    folder, step = _training_step(directory), predicate.get("step")
    if folder is not None and step is not None and folder != step:
        raise CheckpointError(f"{directory} holds step {step}, not step {folder} (its seal's statement says so): a "
                              f"step moved, renamed or rolled back; put it back as checkpoints/{step} or restore "
                              "another step")
    parent = predicate.get("parent_step")
    if parent is not None and step is not None and not (isinstance(parent, int) and parent < step):
        raise CheckpointError(f"{directory / SEAL}: its parent step {parent!r} does not come before step {step}; "
                              "the checkpoint cannot be trusted: restore an earlier checkpoint")


def _check_among_siblings(directory: epath.Path, seal: dict) -> None:
    """A step of a workdir whose other steps are signed: signed by the same signer, of the same run."""
    signed = {s: v for s, v in _sibling_seals(directory).items() if "signature" in v}
    if not signed:
        return
    other, theirs = min(signed.items(), key=lambda kv: abs(kv[0] - (_training_step(directory) or 0)))
    if "signature" not in seal:
        raise CheckpointError(f"{directory / SEAL} is not signed but the other steps of {directory.parent} are "
                              f"(e.g. step {other}): a step put there by hand or saved without checkpoint.signing_key; "
                              "restore a signed step")
    if "statement" not in seal:
        return  # a seal from before statements: only a key can judge it (check_signature refuses it)
    signers = {v.get("signer") for v in signed.values() if v.get("signer")}
    if signers and seal.get("signer") not in signers:
        raise CheckpointError(f"{directory / SEAL} is signed by another key than the other steps of "
                              f"{directory.parent} (e.g. step {other}): re-signed after it was saved; restore "
                              "another step, or check it with --verify_key")
    run = seal["statement"].get("predicate", {}).get("run_id")
    runs = {v["statement"].get("predicate", {}).get("run_id"): s for s, v in signed.items()
            if isinstance(v.get("statement"), dict) and v["statement"].get("predicate", {}).get("run_id")}
    if run is not None and runs and run not in runs:
        seen, step = next(iter(runs.items()))
        raise CheckpointError(f"{directory} belongs to run {run}, not to run {seen} of the workdir's other signed "
                              f"steps (e.g. step {step}): a step of another run put here (a replay); remove it or "
                              "restore another step")


def _check_own_signer(directory: epath.Path, seal: dict) -> None:
    """Without a key given: a signed statement must at least verify with the signer its seal names."""
    if "statement" not in seal or "signer" not in seal:
        return
    _, ed25519 = _crypto()
    try:
        key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(seal["signer"]))
    except (ValueError, TypeError):
        key = None
    if key is None or not _signature_holds(seal, key):
        raise CheckpointError(f"{directory / SEAL}: the signature does not verify: the checkpoint was altered "
                              "after it was signed; restore an earlier checkpoint")


def read(directory: epath.PathLike, verify_key: str | None = None) -> dict:
    """The manifest, after checking that the seal covers it, that its statement fits the folder and the
    workdir's other steps, and its signature (with `verify_key`, or else with the seal's own signer).

    Raises CheckpointError when the checkpoint is unsealed, the manifest is malformed or names a file
    outside, or the manifest or the step's place was changed after sealing.
    """
    directory = paths.path(directory)
    if not (directory / SEAL).exists():
        raise CheckpointError(f"{directory} has no {SEAL}: its save never completed; use an earlier checkpoint")
    seal = _load_json(directory / SEAL, "seal", MAX_SEAL_BYTES)
    manifest = _load_json(directory / NAME, "manifest", MAX_MANIFEST_BYTES)
    _check_shape(manifest, directory / NAME)
    if not isinstance(seal, dict) or seal.get("manifest_sha256") != digest(manifest):
        raise CheckpointError(f"{directory / NAME} does not match its seal ({SEAL}): the manifest was edited "
                              "after the checkpoint was saved; restore an earlier checkpoint")
    if "statement" in seal:
        _check_statement(directory, seal, manifest)
    if verify_key:
        check_signature(directory, seal, verify_key)
    elif "signature" in seal:
        _check_own_signer(directory, seal)
    _check_among_siblings(directory, seal)
    return manifest


def is_signed(directory: epath.Path) -> bool:
    """Whether a sealed checkpoint's seal carries a signature (not whether it verifies: `read` checks that)."""
    try:
        seal = _load_json(paths.path(directory) / SEAL, "seal", MAX_SEAL_BYTES)
    except (CheckpointError, OSError):
        return False
    return isinstance(seal, dict) and "signature" in seal


def seal_kind(directory: epath.Path) -> str:
    """How the seal of a checkpoint that `read` accepted protects it, in words for `heft verify`."""
    seal = _load_json(paths.path(directory) / SEAL, "seal", MAX_SEAL_BYTES)
    if "signature" not in seal:
        return "integrity, unsigned"
    return "signed statement" if "statement" in seal else "signed digest, from before statements"


def check_file(directory: epath.Path, rel: str, want: dict) -> str | None:
    """None if `rel` matches its manifest entry; else a one-line description of what is wrong.
    Never reads more than the entry's bytes (and one more, to tell a larger file)."""
    p = directory / rel
    missing = f"{p} is missing from the checkpoint (listed in its manifest); restore an earlier checkpoint"
    if _unsafe_name(rel):
        return f"{directory / NAME} names {rel!r}, not a file inside the checkpoint; restore an earlier checkpoint"
    if problem := _not_regular(directory, rel):
        return problem
    try:
        if not paths.is_remote(directory) and os.stat(p).st_size > want["bytes"]:
            return (f"{p} is larger than the manifest's {want['bytes']} bytes: altered; restore an earlier "
                    "checkpoint")
        got, size = sha256_file(p, limit=want["bytes"])
    except FileNotFoundError:
        return missing
    except IsADirectoryError:
        return f"{p} is a folder, where the manifest lists a file: altered; restore an earlier checkpoint"
    if size > want["bytes"]:
        return f"{p} is larger than the manifest's {want['bytes']} bytes: altered; restore an earlier checkpoint"
    if size != want["bytes"]:
        return (f"{p} has {size} bytes, the manifest says {want['bytes']}: truncated or altered; "
                "restore an earlier checkpoint")
    if got != want["sha256"]:
        return f"{p} does not match its sha256 in the manifest: altered or corrupt; restore an earlier checkpoint"
    return None


def check_extra(directory: epath.Path, manifest: dict) -> str | None:
    """A problem with what lies in the checkpoint beyond its manifest (a file it does not list, a link,
    custody's scratch), or None."""
    files, odd = entries(directory)
    if odd:
        return odd[0]
    extra = sorted(set(files) - set(manifest["files"]) - set(NOT_CONTENT))
    if any(f.split("/")[0] == SCRATCH for f in extra):
        return (f"{directory / SCRATCH} is sealing scratch left in a sealed checkpoint, outside its manifest; "
                "remove that folder if nothing else was changed, or restore an earlier checkpoint")
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
