"""C2PA signing: the published files validate with c2pa-python's Reader, say they are AI-made, name the input
image by its hash, and stop validating when a byte changes; the self-made certificate and its checks."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import c2pa
import numpy as np
import pytest
from PIL import Image

from i2v_daemon.errors import ConfigError
from i2v_daemon.work import provenance, recipe
from i2v_daemon.work.postprocess import write_poster
from i2v_daemon.work.provenance import Provenance, ProvenanceError
from i2v_daemon.work.video import write_mp4

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def _settings(data: Path, **extra: Any) -> SimpleNamespace:
    values = {"data_dir": data, "provenance": "c2pa", "c2pa_cert": None, "c2pa_key": None, "c2pa_tsa_url": None}
    return SimpleNamespace(**{**values, **extra})


@pytest.fixture()
def job_dir(tmp_path: Path) -> Path:
    """A work/<id>/ as the worker leaves it before finishing: input image, video with its recipe, poster."""
    jdir = tmp_path / "work" / "7"
    (jdir / "input").mkdir(parents=True)
    image = jdir / "input" / "cat.png"
    Image.new("RGB", (64, 96), (200, 80, 40)).save(image)
    frames = np.random.default_rng(0).integers(0, 256, (4, 96, 64, 3), dtype=np.uint8)
    made = recipe.build("cat", "a cat", "", {"seed": 1, "width": 64, "height": 96, "num_frames": 4, "steps": 2,
                                             "guidance_scale": 2.0, "fps": 4, "output_fps": 4, "model": "default",
                                             "family": "i2vgen-xl", "scheduler": "ddim"},
                        model_id="/models/tiny", input_file=image)
    write_mp4(frames, jdir / "cat.mp4", 4, recipe=made)
    write_poster(frames, jdir / "poster.jpg")
    return jdir


def _read(path: Path, anchors: str | None = None) -> c2pa.Reader:
    settings = {"trust": {"trust_anchors": anchors}, "verify": {"verify_trust": True}} if anchors else {}
    mime = "video/mp4" if path.suffix == ".mp4" else "image/jpeg"
    with open(path, "rb") as fh:
        return c2pa.Reader(mime, fh, None, c2pa.Context.from_dict(settings))


def test_a_signed_video_validates_says_it_is_ai_made_and_names_the_input_image_by_its_hash(
    job_dir: Path, tmp_path: Path,
) -> None:
    settings = _settings(tmp_path / "data")
    entry = Provenance(settings).sign_job(job_dir, job_dir / "input" / "cat.png")
    assert entry["method"] == "c2pa" and entry["signed"] == ["cat.mp4", "poster.jpg"] and entry["self_signed"]
    root = (tmp_path / "data" / "c2pa" / "root.pem").read_text()
    want = hashlib.sha256((job_dir / "input" / "cat.png").read_bytes()).hexdigest()
    for name in ("cat.mp4", "poster.jpg"):
        reader = _read(job_dir / name, anchors=root)
        assert reader.get_validation_state() == "Trusted"  # the signature is valid for the test certificate
        manifest = reader.get_active_manifest()
        action = next(a for x in manifest["assertions"] if x["label"] == "c2pa.actions.v2"
                      for a in x["data"]["actions"])
        assert action["action"] == "c2pa.created" and action["digitalSourceType"] == TRAINED
        assert action["softwareAgent"]["name"] == "i2v-daemon"
        assert action["parameters"]["org.i2v-daemon.model"] == {"id": "/models/tiny", "family": "i2vgen-xl",
                                                                "name": "default"}
        [ingredient] = manifest["ingredients"]
        assert ingredient["title"] == "cat.png" and ingredient["metadata"]["org.i2v-daemon.sha256"] == want
        made = next(x["data"] for x in manifest["assertions"] if x["label"] == provenance.RECIPE_LABEL)
        assert made["prompt"] == "a cat" and made["seed"] == 1 and made["input"]["sha256"] == want
    # Without the root on a trust list, the signature is still valid; the signer is untrusted.
    assert _read(job_dir / "cat.mp4").get_validation_state() == "Valid"
    assert recipe.read(job_dir / "cat.mp4")[1] == "xmp"  # signing kept the encoder's XMP
    assert not [p for p in job_dir.iterdir() if p.name.startswith(".")]


def test_a_byte_changed_in_the_video_makes_validation_fail(job_dir: Path, tmp_path: Path) -> None:
    Provenance(_settings(tmp_path / "data")).sign_job(job_dir, job_dir / "input" / "cat.png")
    data = bytearray((job_dir / "cat.mp4").read_bytes())
    data[data.rfind(b"mdat") + 100] ^= 0x01
    tampered = tmp_path / "tampered.mp4"
    tampered.write_bytes(bytes(data))
    reader = _read(tampered)
    assert reader.get_validation_state() == "Invalid"
    failures = [f["code"] for f in reader.get_validation_results()["activeManifest"]["failure"]]
    assert "assertion.bmffHash.mismatch" in failures
    described = provenance.describe(tampered)
    assert described["valid"] is False and any("bmffHash.mismatch" in e for e in described["errors"])


def test_the_self_made_certificate_is_made_once_with_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "data")
    files = provenance.signer_files(settings)
    assert stat.S_IMODE(os.stat(files.key).st_mode) == 0o600
    first = files.key.read_bytes()
    assert provenance.make_self_signed(files.key.parent) is False  # a second start keeps the first pair
    assert provenance.signer_files(settings).key.read_bytes() == first
    report = provenance.check_certificate(files)
    assert report["self_signed"] and report["days_left"] > 365 and report["algorithm"] == "es256"


def test_a_key_that_is_not_the_certificates_is_a_configuration_error_naming_both_files(tmp_path: Path) -> None:
    one = provenance.signer_files(_settings(tmp_path / "a"))
    other = provenance.signer_files(_settings(tmp_path / "b"))
    files = provenance.SignerFiles(one.chain, other.key, False, None)
    with pytest.raises(ConfigError, match="does not belong to the first certificate"):
        provenance.check_certificate(files)


def test_the_operators_own_certificate_signs_and_is_named_in_the_manifest(job_dir: Path, tmp_path: Path) -> None:
    mine = provenance.signer_files(_settings(tmp_path / "operator"))  # any chain: here one made elsewhere
    settings = _settings(tmp_path / "data", c2pa_cert=mine.chain, c2pa_key=mine.key)
    entry = Provenance(settings).sign_job(job_dir, job_dir / "input" / "cat.png")
    assert entry["self_signed"] is False and entry["certificate"] == str(mine.chain)
    assert not (tmp_path / "data" / "c2pa").exists()  # no self-made pair when the operator gave one


def test_a_signing_failure_is_an_environment_problem_and_leaves_the_unsigned_video_in_place(
    job_dir: Path, tmp_path: Path,
) -> None:
    settings = _settings(tmp_path / "data", c2pa_cert=tmp_path / "missing.pem", c2pa_key=tmp_path / "missing.key")
    before = (job_dir / "cat.mp4").read_bytes()
    with pytest.raises(ProvenanceError, match=r"missing\.pem.*the job waits") as caught:
        Provenance(settings).sign_job(job_dir, job_dir / "input" / "cat.png")
    assert caught.value.kind == "provenance"
    assert (job_dir / "cat.mp4").read_bytes() == before
    assert not [p for p in job_dir.iterdir() if p.name.startswith(".")]


def test_an_unreachable_timestamp_authority_fails_signing_rather_than_publishing_unsigned(
    job_dir: Path, tmp_path: Path,
) -> None:
    settings = _settings(tmp_path / "data", c2pa_tsa_url="http://127.0.0.1:9/tsa")
    with pytest.raises(ProvenanceError, match=r"could not sign cat\.mp4"):
        Provenance(settings).sign_job(job_dir, job_dir / "input" / "cat.png")
    with open(job_dir / "cat.mp4", "rb") as fh:
        assert c2pa.Reader.try_create("video/mp4", fh) is None


def test_provenance_off_signs_nothing_and_says_so(job_dir: Path, tmp_path: Path) -> None:
    before = (job_dir / "cat.mp4").read_bytes()
    entry = Provenance(_settings(tmp_path / "data", provenance="off")).sign_job(job_dir, None)
    assert entry["method"] == "off" and "operator's choice" in entry["note"]
    assert (job_dir / "cat.mp4").read_bytes() == before


def test_describe_reports_signer_trust_label_ingredient_and_recipe(job_dir: Path, tmp_path: Path) -> None:
    Provenance(_settings(tmp_path / "data")).sign_job(job_dir, job_dir / "input" / "cat.png")
    seen = provenance.describe(job_dir / "cat.mp4")
    assert seen["present"] and seen["valid"] and not seen["trusted"] and seen["errors"] == []
    assert seen["signer"]["common_name"] == "i2v-daemon signer"
    assert seen["digital_source_type"] == TRAINED and seen["actions"] == ["c2pa.created"]
    assert seen["ingredients"][0]["sha256"] == hashlib.sha256((job_dir / "input" / "cat.png").read_bytes()).hexdigest()
    assert seen["recipe"] == recipe.read(job_dir / "cat.mp4")[0]
    root = (tmp_path / "data" / "c2pa" / "root.pem").read_text()
    assert provenance.describe(job_dir / "cat.mp4", trust_anchors=root)["trusted"] is True
    assert json.dumps(seen)  # plain JSON for inspect --json
    assert provenance.describe(job_dir / "input" / "cat.png")["present"] is False


@pytest.mark.parametrize("kind", ["jpeg named png", "16-bit png", "not an image c2pa reads"])
def test_an_unusual_input_image_is_still_the_ingredient_and_never_stops_signing(
    job_dir: Path, tmp_path: Path, kind: str,
) -> None:
    image = job_dir / "input" / "cat.png"
    if kind == "jpeg named png":
        Image.new("RGB", (64, 96), (10, 20, 30)).save(image, "JPEG")  # intake takes it, noted
    elif kind == "16-bit png":
        Image.new("I;16", (64, 96)).save(image, "PNG")
    else:
        image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature and nothing c2pa can parse
    Provenance(_settings(tmp_path / "data")).sign_job(job_dir, image)
    reader = _read(job_dir / "cat.mp4")
    assert reader.get_validation_state() == "Valid"
    [ingredient] = reader.get_active_manifest()["ingredients"]
    assert ingredient["metadata"]["org.i2v-daemon.sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    if kind == "jpeg named png":
        assert ingredient["format"] == "image/jpeg"
