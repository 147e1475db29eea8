"""MANIFEST.sig: the signature over a version's manifest and every file, and its check.

A version may be signed with an elliptic-curve key through the OpenSSF model signing library
(`model-signing`): the signature is a Sigstore bundle (JSON) whose signed in-toto statement
lists the sha256 of every file of the version folder, MANIFEST.json included, and it is
stored as `MANIFEST.sig` beside the manifest. The manifest cannot list the signature (it is
signed before the signature exists), so `MANIFEST.sig` is the one file besides the manifest
that `files` never names (bundle/FORMAT.md, MANIFEST.sig). Any model-signing tool verifies a
version folder: `model_signing verify key --signature MANIFEST.sig --public_key PUB.pem DIR`.

The writer signs in the staging folder, after MANIFEST.json is written and before the folder is
renamed onto its version number (`recship.bundle.writer`), so a published signed version is
complete at once. The store verifies the signature after the folder's file list checked out
(paths, kinds, sizes) and before any file is deserialized (`recship.bundle.store`).

Keys are PEM files: a private EC key (P-256, P-384 or P-521, unencrypted) for signing and its
public key for verifying (`generate_key_pair`, or `openssl ecparam -name prime256v1 -genkey
-noout -out key.pem && openssl ec -in key.pem -pubout -out pub.pem`).

The library is imported on first use, so hosts that never sign or verify do not load it.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from recship.base.errors import EnvironmentBroken, InvalidInput, clip, shown
from recship.base.files import FILE_MODE, fsync_directory, read_regular_file
from recship.bundle.checksums import MAX_SIGNATURE_BYTES
from recship.bundle.layout import SIGNATURE_FILENAME
from recship.bundle.manifest import MAX_JSON_DEPTH, json_depth

_MAX_KEY_BYTES = 64 * 1024


def _libraries():  # -> (signing, verifying, hashing) modules of model_signing
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as error:
        raise EnvironmentBroken(
            f"signing bundles needs the model-signing and pyopenssl packages: {error}"
        ) from None
    return signing, verifying, hashing


def _hashing_config():
    """Every file of the folder but the signature itself, sha256 per file, no git exceptions."""
    _, _, hashing = _libraries()
    return (
        hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
        .set_ignored_paths(paths=[SIGNATURE_FILENAME], ignore_git_paths=False)
    )


def _load_key(path: Path, *, private: bool):
    """Parses a PEM EC key (private or public) and returns it; raises InvalidInput if not one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    what = "private" if private else "public"
    try:
        data = read_regular_file(Path(path), _MAX_KEY_BYTES)
    except (OSError, ValueError) as error:
        raise InvalidInput(f"{path}: cannot read the {what} key: {error}") from None
    try:
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError) as error:
        raise InvalidInput(
            f"{path}: not an unencrypted PEM {what} key: {clip(str(error), 120)}"
        ) from None
    wanted = ec.EllipticCurvePrivateKey if private else ec.EllipticCurvePublicKey
    if not isinstance(key, wanted):
        raise InvalidInput(f"{path}: not an elliptic-curve {what} key (use P-256, P-384, P-521)")
    return key


def check_private_key(path: Path) -> None:
    """Raises InvalidInput unless `path` holds a usable private signing key (checked early, so
    that `recship package --sign-key` fails before hours of work rather than at publish)."""
    _load_key(path, private=True)


def check_public_key(path: Path) -> None:
    """Raises InvalidInput unless `path` holds a usable public key (`serve` checks at start)."""
    _load_key(path, private=False)


def sign_version(version_dir: Path, private_key: Path) -> Path:
    """Signs the files of `version_dir` (MANIFEST.json must be written) into MANIFEST.sig.

    Returns:
        The signature file.

    Raises:
        InvalidInput: the key is unusable or the folder cannot be signed.
        EnvironmentBroken: model-signing is not installed.
    """
    check_private_key(private_key)
    signing, _, _ = _libraries()
    version_dir = Path(version_dir)
    target = version_dir / SIGNATURE_FILENAME
    config = signing.Config().use_elliptic_key_signer(private_key=Path(private_key))
    # Written beside the folder, not in it (the signer hashes every file of the folder), then
    # moved in: the folder never holds a partial signature.
    descriptor, name = tempfile.mkstemp(
        prefix=f".{version_dir.name}.", suffix=".sig", dir=version_dir.parent
    )
    os.close(descriptor)
    temp = Path(name)
    try:
        config.set_hashing_config(_hashing_config()).sign(version_dir, temp)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(temp, FILE_MODE)
        os.replace(temp, target)
        fsync_directory(version_dir)
    except (OSError, ValueError) as error:
        raise InvalidInput(f"{version_dir}: cannot sign: {clip(str(error), 200)}") from None
    finally:
        temp.unlink(missing_ok=True)
    return target


def verify_signature(version_dir: Path, public_key: Path) -> None:
    """Checks MANIFEST.sig of `version_dir` against `public_key` and every file of the folder.

    The signature file is bounded in size and nesting before it is parsed; its signature is
    checked before any file is hashed; then every file but MANIFEST.sig is hashed and compared
    with the signed list (a file changed, added or removed fails).

    Call it only on a folder whose file list already checked out (regular files, sizes), so
    that hashing reads no link, FIFO or oversized file.

    Raises:
        InvalidInput: no signature, or one that does not verify (the message says why).
        EnvironmentBroken: model-signing is not installed.
    """
    version_dir = Path(version_dir)
    signature = version_dir / SIGNATURE_FILENAME
    try:
        data = read_regular_file(signature, MAX_SIGNATURE_BYTES)
    except FileNotFoundError:
        raise InvalidInput(f"unsigned: {SIGNATURE_FILENAME} is missing") from None
    except (OSError, ValueError) as error:
        raise InvalidInput(f"{SIGNATURE_FILENAME}: cannot be read: {error}") from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise InvalidInput(f"{SIGNATURE_FILENAME}: nested too deeply to be a signature")
    check_public_key(public_key)
    _, verifying, _ = _libraries()
    config = (
        verifying.Config()
        .use_elliptic_key_verifier(public_key=Path(public_key))
        .set_hashing_config(_hashing_config())
    )
    try:
        config.verify(version_dir, signature)
    except Exception as error:  # the library raises ValueError, cryptography and parse errors
        reason = _mismatch(str(error)) or clip(_first_line(error), 240)
        raise InvalidInput(
            f"{SIGNATURE_FILENAME} does not verify with {Path(public_key).name}: {reason}"
        ) from None


def generate_key_pair(private_path: Path, public_path: Path) -> None:
    """Writes a new P-256 signing key (mode 0600) and its public key as PEM files.

    Raises:
        InvalidInput: a target file exists (keys are never overwritten).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    for path in (private_path, public_path):
        if Path(path).exists():
            raise InvalidInput(f"{path} exists; refusing to overwrite a key")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    Path(public_path).write_bytes(public_pem)


def _mismatch(text: str) -> str:
    """The files a valid signature disagrees with, from model-signing's "Signature mismatch"
    text (which quotes digests as reprs), or "" for any other failure."""
    if not text.startswith("Signature mismatch"):
        return ""
    changed = sorted(set(re.findall(r"Hash mismatch for \\*'([^'\\]+)\\*'", text)))
    parts = (
        [f"changed since signing: {', '.join(shown(name) for name in changed)}"] if changed else []
    )
    if "Extra files found" in text:
        parts.append("files added since signing")
    if "Missing files" in text:
        parts.append("files removed since signing")
    return "; ".join(parts) or "the files differ from what was signed"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
