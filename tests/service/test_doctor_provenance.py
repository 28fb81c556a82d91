"""doctor on provenance and notifications: the c2pa bindings, the certificate (self-made and untrusted, expiring,
expired, a key that is not its own), the key's mode, and the Apprise URLs' syntax."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from i2v_daemon.service.doctor import check_notify, check_provenance
from i2v_daemon.settings import load_settings
from i2v_daemon.work import provenance


def _settings(tmp_path: Path, **extra: Any) -> Any:
    return load_settings(None, data_dir=str(tmp_path / "data"), **extra)


def _levels(checks: list[Any]) -> dict[str, str]:
    return {c.name: c.level for c in checks}


def test_before_the_first_start_doctor_says_a_self_made_untrusted_certificate_will_be_made(tmp_path: Path) -> None:
    checks = check_provenance(_settings(tmp_path))
    assert _levels(checks) == {"c2pa": "ok", "c2pa_cert": "ok"}  # a working default, said plainly
    cert = next(c for c in checks if c.name == "c2pa_cert")
    assert "untrusted" in cert.message and "c2pa_cert and c2pa_key" in cert.fix
    assert not (tmp_path / "data" / "c2pa").exists()  # doctor only looks


def test_with_the_self_made_certificate_doctor_says_it_is_untrusted_and_how_long_it_lasts(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    provenance.signer_files(settings)
    cert = next(c for c in check_provenance(settings) if c.name == "c2pa_cert")
    assert cert.level == "ok" and "self-made" in cert.message and "untrusted" in cert.message
    assert "days left); the key matches" in cert.message


def test_an_operators_certificate_with_its_own_key_is_ok_and_a_foreign_key_fails(tmp_path: Path) -> None:
    mine = provenance.signer_files(_settings(tmp_path / "a"))
    other = provenance.signer_files(_settings(tmp_path / "b"))
    good = check_provenance(_settings(tmp_path, c2pa_cert=str(mine.chain), c2pa_key=str(mine.key)))
    assert _levels(good)["c2pa_cert"] == "ok"
    bad = check_provenance(_settings(tmp_path, c2pa_cert=str(mine.chain), c2pa_key=str(other.key)))
    failing = next(c for c in bad if c.name == "c2pa_cert")
    assert failing.level == "fail" and "does not belong to the first certificate" in failing.message


def test_an_expired_certificate_fails_and_one_expiring_soon_warns(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old signer")])
    now = dt.datetime.now(dt.UTC)
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (tmp_path / "key.pem").write_bytes(pem_key)
    (tmp_path / "key.pem").chmod(0o600)
    for days, level in ((-3, "fail"), (10, "warn")):
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(now - dt.timedelta(days=400))
                .not_valid_after(now + dt.timedelta(days=days)).sign(key, hashes.SHA256()))
        (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        checks = check_provenance(_settings(tmp_path, c2pa_cert=str(tmp_path / "cert.pem"),
                                            c2pa_key=str(tmp_path / "key.pem")))
        assert _levels(checks)["c2pa_cert"] == level


def test_a_signing_key_others_can_read_is_a_warning(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    files = provenance.signer_files(settings)
    files.key.chmod(0o644)
    key = next(c for c in check_provenance(settings) if c.name == "c2pa_key")
    assert key.level == "warn" and f"chmod 600 {files.key}" in key.fix


def test_provenance_off_is_a_warning_that_says_what_is_missing(tmp_path: Path) -> None:
    [check] = check_provenance(_settings(tmp_path, provenance="off"))
    assert check.level == "warn" and "without a C2PA manifest" in check.message


def test_doctor_checks_the_notify_urls_syntax_and_unsigned_webhooks(tmp_path: Path) -> None:
    settings = _settings(tmp_path, notify=["ntfy://127.0.0.1:9/videos"], webhooks=["http://127.0.0.1:9/h"])
    checks = check_notify(settings)
    assert _levels(checks) == {"notify": "ok", "webhook_secret": "warn"}
    settings.notify.append("bogus://nothing")  # as a config written before this check existed might hold
    failing = [c for c in check_notify(settings) if c.level == "fail"]
    assert len(failing) == 1 and "bogus" in failing[0].message
