"""C2PA provenance: every published video (and poster) signed, and labelled as made by a trained model.

Each file gets a C2PA manifest (c2pa-python) whose `c2pa.created` action says
digitalSourceType = trainedAlgorithmicMedia, made by i2v-daemon (its version, the model's id and
family); the input image is its ingredient (with its SHA-256 in the ingredient's metadata), and the
job's recipe (`recipe.py`) is a custom assertion. Signing happens in work/<id>/ before the job's
folder is published: each file is signed into a temporary name, synced, and renamed over the
unsigned one, so a signed file is never half-written and a crash leaves an unsigned file that the
job's next attempt encodes and signs again.

The certificate: the operator's (`c2pa_cert`, `c2pa_key`), or else a chain this module makes in
`<data_dir>/c2pa/` on first use: a local root and a signing certificate under it. Verifiers accept
its signature but show the signer as untrusted (it is on no trust list); see docs/provenance-and-batches.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from i2v_daemon import __version__
from i2v_daemon.errors import ConfigError, EnvironmentProblem
from i2v_daemon.files import fsync_dir
from i2v_daemon.logs import get_logger
from i2v_daemon.work import recipe as recipes

if TYPE_CHECKING:
    from i2v_daemon.settings import Settings

log = get_logger()

#: The custom assertion that carries the recipe.
RECIPE_LABEL = "org.i2v-daemon.recipe"
#: The self-signed chain's folder under data_dir, and its files.
SELF_SIGNED = "c2pa"
CHAIN, KEY, ROOT = "chain.pem", "key.pem", "root.pem"
#: How long the self-made certificates last.
LEAF_DAYS, ROOT_DAYS = 5 * 365, 10 * 365
#: Media types we sign, by suffix; the input image's type names its ingredient.
MEDIA_TYPES = {".mp4": "video/mp4", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
               ".webp": "image/webp"}
#: Validation codes that say only that the signer is not on a trust list (not that anything is wrong).
UNTRUSTED = "signingCredential.untrusted"


class ProvenanceError(EnvironmentProblem):
    """Signing failed: the certificate, the key, the timestamp authority or the disk is in the way."""

    kind = "provenance"


@dataclass(frozen=True)
class SignerFiles:
    chain: Path  # PEM: the signing certificate first, then its issuers
    key: Path  # PEM private key
    self_signed: bool  # made by i2v-daemon in data_dir (verifiers show it as untrusted)
    root: Path | None  # the self-made root, to add to a verifier's trust list


def signer_files(settings: Settings, *, create: bool = True) -> SignerFiles:
    """The certificate chain and key to sign with: the configured ones, or the self-made pair (made if missing)."""
    if settings.c2pa_cert is not None and settings.c2pa_key is not None:
        return SignerFiles(Path(settings.c2pa_cert), Path(settings.c2pa_key), False, None)
    folder = Path(settings.data_dir) / SELF_SIGNED
    if create and not (folder / KEY).exists():
        make_self_signed(folder)
    return SignerFiles(folder / CHAIN, folder / KEY, True, folder / ROOT)


def make_self_signed(folder: Path) -> bool:
    """Make a root and a signing certificate in `folder` (key 0600), atomically; False if one was there."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.parent.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "i2v-daemon (self-signed, untrusted)")
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "i2v-daemon local root"), org])
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
                 encipher_only=False, decipher_only=False)
    root = (
        x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name).public_key(root_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=ROOT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True, **usage),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "i2v-daemon signer"), org])
    leaf = (
        x509.CertificateBuilder().subject_name(name).issuer_name(root_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    temp = folder.with_name(f".{folder.name}-{os.getpid()}-{secrets.token_hex(4)}")
    temp.mkdir(mode=0o700)
    try:
        fd = os.open(temp / KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (temp / CHAIN).write_bytes(leaf.public_bytes(pem) + root.public_bytes(pem))
        (temp / ROOT).write_bytes(root.public_bytes(pem))
        for made in (temp / KEY, temp / CHAIN, temp / ROOT):
            with open(made, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(temp, folder)  # atomic: two daemons starting together keep one pair
        except OSError:
            if (folder / KEY).exists():
                return False
            raise
        fsync_dir(folder.parent)
        log.warning("c2pa_self_signed_certificate_made", folder=str(folder),
                    note="verifiers show this signer as untrusted; set c2pa_cert and c2pa_key to your own "
                         "certificate (docs/provenance-and-batches.md)")
        return True
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def signing_algorithm(key_pem: bytes) -> str:
    """The C2PA algorithm name for a PEM private key (ES256/384/512, PS256, Ed25519)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    key = serialization.load_pem_private_key(key_pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}.get(key.curve.name, "es256")
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise ValueError(f"a {type(key).__name__} cannot sign C2PA manifests; use an EC (P-256), RSA or Ed25519 key")


def check_certificate(files: SignerFiles, now: dt.datetime | None = None) -> dict[str, Any]:
    """What doctor says of the signing certificate: subject, expiry, whether the key belongs to it.

    Raises ConfigError naming the setting when a file cannot be read or the key does not match.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    where = "the self-made certificate" if files.self_signed else "c2pa_cert / c2pa_key"
    try:
        certs = x509.load_pem_x509_certificates(files.chain.read_bytes())
        key_pem = files.key.read_bytes()
        key = serialization.load_pem_private_key(key_pem, password=None)
    except OSError as err:
        raise ConfigError(f"{where}: cannot read {err.filename}: {err.strerror}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: not a PEM certificate chain and unencrypted PEM key ({err})") from None
    leaf = certs[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ConfigError(f"{where}: the key in {files.key} does not belong to the first certificate in "
                          f"{files.chain}; give the signing certificate first and its own key")
    now = now or dt.datetime.now(dt.UTC)
    expires = leaf.not_valid_after_utc
    return {
        "subject": leaf.subject.rfc4514_string(), "issuer": leaf.issuer.rfc4514_string(),
        "expires": expires.isoformat(), "days_left": (expires - now).days, "chain_length": len(certs),
        "algorithm": signing_algorithm(key_pem), "self_signed": files.self_signed,
    }


class Provenance:
    """Signs a job's files before they are published; one per Finisher, its certificate read on first use."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._files: SignerFiles | None = None

    @property
    def enabled(self) -> bool:
        return str(getattr(self.s, "provenance", "c2pa")) == "c2pa"

    def files(self) -> SignerFiles:
        if self._files is None:
            self._files = signer_files(self.s)
        return self._files

    def sign_job(self, job_dir: Path, image: Path | None) -> dict[str, Any]:
        """Sign every video and the poster in `job_dir`; the manifest's `provenance` entry. Raises ProvenanceError."""
        if not self.enabled:
            return {"method": "off", "note": "provenance = \"off\" in the config (the operator's choice): the video "
                                             "carries its recipe but no signed C2PA manifest"}
        targets = sorted(p for p in job_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                         and (p.suffix == ".mp4" or p.name == "poster.jpg"))
        videos = [p for p in targets if p.suffix == ".mp4"]
        main = next((p for p in videos if not p.name.endswith(".generated.mp4")), videos[0] if videos else None)
        made = recipes.read(main)[0] if main is not None else None
        try:
            files = self.files()
            chain, key = files.chain.read_bytes(), files.key.read_bytes()
            alg = signing_algorithm(key)
        except (OSError, ValueError) as err:
            raise ProvenanceError(_why(err, self._files)) from err
        for path in targets:
            self.sign_file(path, chain, key, alg, image, made)
        return {
            "method": "c2pa", "signed": [p.name for p in targets], "certificate": str(files.chain),
            "self_signed": files.self_signed, "timestamp_authority": self.s.c2pa_tsa_url,
            "digital_source_type": recipes.TRAINED_ALGORITHMIC_MEDIA,
        }

    def sign_file(self, path: Path, chain: bytes, key: bytes, alg: str, image: Path | None,
                  made: dict[str, Any] | None) -> None:
        """Sign `path` in place: into a temporary name, synced, renamed over it."""
        import c2pa

        mime = MEDIA_TYPES[path.suffix.lower()]
        temp = path.with_name(f".sign-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}.part")
        try:
            signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg, chain, key, self.s.c2pa_tsa_url or None))
            try:
                builder = _builder(manifest_definition(path.name, mime, made), image)
                with open(path, "rb") as src, open(temp, "w+b") as dst:
                    builder.sign(signer, mime, src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
            finally:
                signer.close()
            os.replace(temp, path)
            fsync_dir(path.parent)
        except (c2pa.C2paError, OSError, ValueError) as err:
            raise ProvenanceError(_why(err, self._files, path)) from err
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()


def manifest_definition(title: str, mime: str, made: dict[str, Any] | None) -> dict[str, Any]:
    """The C2PA manifest of one file: created by i2v-daemon with a trained model, from its ingredient."""
    made = made or {}
    model = {"id": made.get("model_id"), "family": made.get("family"), "name": made.get("model")}
    agent = {"name": "i2v-daemon", "version": __version__}
    action: dict[str, Any] = {
        "action": "c2pa.created",
        "digitalSourceType": recipes.TRAINED_ALGORITHMIC_MEDIA,
        "softwareAgent": agent,
        "description": f"image-to-video generation with {model['family'] or 'a diffusion'} model "
                       f"{model['id'] or model['name'] or ''}".strip(),
        "parameters": {"ingredientIds": ["input-image"], "org.i2v-daemon.model": model},
    }
    assertions: list[dict[str, Any]] = [{"label": "c2pa.actions.v2", "data": {"actions": [action]}}]
    if made:
        assertions.append({"label": RECIPE_LABEL, "data": made})
    return {"claim_generator_info": [agent], "title": title, "format": mime, "assertions": assertions}


def ingredient_definition(image: Path) -> dict[str, Any]:
    return {"title": image.name, "relationship": "inputTo", "label": "input-image",
            "metadata": {"org.i2v-daemon.sha256": recipes.sha256_file(image)}}


def _builder(definition: dict[str, Any], image: Path | None) -> Any:
    """A Builder with the input image as its ingredient, read from the file (with a thumbnail) where c2pa can
    parse it; else the ingredient as a record only (name, type, hash), so an odd but valid input never stops a
    job from being signed."""
    import c2pa

    if image is None:
        return c2pa.Builder(definition, _context())
    builder = c2pa.Builder(definition, _context())
    try:
        with open(image, "rb") as fh:
            builder.add_ingredient(ingredient_definition(image), _media_type(image), fh)
        return builder
    except c2pa.C2paError as err:
        builder.close()
        log.info("c2pa_ingredient_recorded", image=image.name, reason=str(err).strip()[:200],
                 note="named with its hash, without a thumbnail")
    record = {**ingredient_definition(image), "format": _media_type(image)}
    return c2pa.Builder({**definition, "ingredients": [record]}, _context())


def _media_type(image: Path) -> str:
    """The image's real type from its first bytes (a JPEG named .png is taken, as intake takes it)."""
    try:
        with open(image, "rb") as fh:
            head = fh.read(12)
    except OSError:
        head = b""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return MEDIA_TYPES.get(image.suffix.lower(), "image/png")


def _context() -> Any:
    import c2pa

    # A small thumbnail of the input image in the manifest (the default 1024 px adds hundreds of kB).
    return c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": True, "long_edge": 512}}})


def _why(err: BaseException, files: SignerFiles | None, path: Path | None = None) -> str:
    what = f"could not sign {path.name}" if path is not None else "could not load the C2PA signing certificate"
    cert = f" with {files.chain}" if files is not None else ""
    return (f"{what}{cert}: {str(err).strip()[:300] or type(err).__name__}; the video is kept unsigned in work/ and "
            "the job waits — fix c2pa_cert / c2pa_key / c2pa_tsa_url (i2v-daemon doctor checks them), or set "
            "provenance = \"off\" to publish without a C2PA manifest")


# ---- reading: what `inspect` shows ------------------------------------------------------------------


def describe(path: Path, trust_anchors: str | None = None) -> dict[str, Any]:
    """The C2PA provenance of any file: signer, trust, validation state and errors, label, ingredients."""
    try:
        import c2pa
    except ImportError as err:  # pragma: no cover - a dependency
        return {"present": False, "error": f"the c2pa bindings do not load: {err}"}
    mime = MEDIA_TYPES.get(path.suffix.lower())
    if mime is None:
        return {"present": False, "error": f"{path.suffix or 'a file without a suffix'}: not a kind of file read for "
                                           "C2PA here (.mp4, .jpg, .jpeg, .png, .webp)"}
    settings: dict[str, Any] = {}
    if trust_anchors:
        settings = {"trust": {"trust_anchors": trust_anchors}, "verify": {"verify_trust": True}}
    try:
        with open(path, "rb") as fh:
            reader = c2pa.Reader.try_create(mime, fh, None, c2pa.Context.from_dict(settings))
            if reader is None:
                return {"present": False, "error": None}
            with reader:
                store = json.loads(reader.json())
                state = reader.get_validation_state()
                results = reader.get_validation_results() or {}
    except c2pa.C2paError as err:  # not a readable file of its kind: nothing to validate
        return {"present": False, "error": f"the file could not be read as {mime}: {str(err).strip()[:200]}"}
    active = (store.get("manifests") or {}).get(store.get("active_manifest") or "", {})
    codes = (results.get("activeManifest") or {}).get("failure") or []
    errors = [f"{c.get('code')}: {c.get('explanation', '')}".strip() for c in codes if c.get("code") != UNTRUSTED]
    actions = [a for x in active.get("assertions", []) if x.get("label", "").startswith("c2pa.actions")
               for a in x.get("data", {}).get("actions", [])]
    made = next((x.get("data") for x in active.get("assertions", []) if x.get("label") == RECIPE_LABEL), None)
    sig = active.get("signature_info") or {}
    trusted = state == "Trusted"
    return {
        "present": True,
        "state": state,
        "valid": state in ("Valid", "Trusted") and not errors,
        "trusted": trusted,
        "trust": "trusted" if trusted else (
            "untrusted: the signer is on no trust list this check knows (a self-made certificate is never on one)"),
        "signer": {"common_name": sig.get("common_name"), "issuer": sig.get("issuer"), "alg": sig.get("alg"),
                   "time": sig.get("time")},
        "generator": [g.get("name") + (f" {g['version']}" if g.get("version") else "")
                      for g in active.get("claim_generator_info", []) if g.get("name")],
        "digital_source_type": next((a.get("digitalSourceType") for a in actions if a.get("digitalSourceType")),
                                    None),
        "actions": [a.get("action") for a in actions],
        "ingredients": [{"title": i.get("title"), "relationship": i.get("relationship"),
                         "sha256": (i.get("metadata") or {}).get("org.i2v-daemon.sha256")}
                        for i in active.get("ingredients", [])],
        "recipe": made,
        "errors": errors,
    }


def bindings() -> str:
    """The c2pa bindings' version and the native library's, or raise ImportError/OSError when they do not load."""
    import c2pa

    return f"c2pa-python {c2pa.__version__} (c2pa-rs {c2pa.sdk_version()})"


def prepare(settings: Settings) -> SignerFiles | None:
    """At the daemon's start: the self-made chain made if none is configured; the configured one checked.

    A configured certificate that cannot be read, or whose key is not its own, is a configuration
    error (exit 78); an expired one is logged (its jobs would wait), so the operator hears of it now.
    """
    if str(getattr(settings, "provenance", "c2pa")) != "c2pa":
        log.warning("provenance_off", note="videos are published without a C2PA manifest (provenance = \"off\")")
        return None
    files = signer_files(settings)
    info = check_certificate(files)
    if info["days_left"] < 0:
        log.error("c2pa_certificate_expired", certificate=str(files.chain), expired=info["expires"],
                  fix="renew it (or remove the self-made folder so a new one is made); until then finished jobs wait")
    elif files.self_signed:
        log.info("c2pa_signer", certificate=str(files.chain), trust="self-made: verifiers show it as untrusted; set "
                 "c2pa_cert and c2pa_key to your own certificate to be trusted")
    return files
