"""The settings of provenance, notifications and batches: each mistake is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from i2v_daemon.errors import ConfigError
from i2v_daemon.settings import load_settings

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _load(tmp_path: Path, **values: object):  # type: ignore[no-untyped-def]
    return load_settings(None, data_dir=str(tmp_path), **values)


def test_the_defaults_sign_with_c2pa_and_tell_nobody(tmp_path: Path) -> None:
    s = _load(tmp_path)
    assert (s.provenance, s.c2pa_cert, s.c2pa_key, s.c2pa_tsa_url) == ("c2pa", None, None, None)
    assert (s.notify, s.webhook_secret, s.batch_roots, s.max_batch_rows) == ([], None, [], 10_000)


@pytest.mark.parametrize(("values", "words"), [
    ({"c2pa_cert": "/etc/c.pem"}, "c2pa_key: c2pa_cert is set but c2pa_key is not"),
    ({"c2pa_key": "/etc/k.pem"}, "c2pa_cert: c2pa_key is set but c2pa_cert is not"),
    ({"c2pa_tsa_url": "ftp://tsa.example.org"}, "c2pa_tsa_url / I2V_C2PA_TSA_URL"),
    ({"provenance": "maybe"}, "provenance / I2V_PROVENANCE"),
    ({"webhook_secret": "short"}, "webhook_secret / I2V_WEBHOOK_SECRET: must be 'whsec_'"),
    ({"notify": ["no-scheme"]}, "notify / I2V_NOTIFY: 'no-scheme' is not an Apprise URL"),
    ({"notify": ["bogus://x"]}, "is not a URL Apprise understands"),
    ({"batch_roots": ["relative/photos"]}, "batch_roots: 'relative/photos' is not an absolute path"),
    ({"max_batch_rows": 0}, "max_batch_rows"),
])
def test_a_bad_value_is_a_configuration_error_naming_its_key(tmp_path: Path, values: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)").replace("/", "/")):
        _load(tmp_path, **values)


def test_a_presets_notify_adds_to_the_configs_for_that_presets_jobs_only(tmp_path: Path) -> None:
    s = _load(tmp_path, notify=["ntfy://127.0.0.1/all"], webhook_secret=SECRET,
              presets={"fast": {"notify": ["ntfy://127.0.0.1/fast", "ntfy://127.0.0.1/all"]}})
    assert s.notify_for("fast") == ["ntfy://127.0.0.1/all", "ntfy://127.0.0.1/fast"]
    assert s.notify_for("standard") == s.notify_for(None) == ["ntfy://127.0.0.1/all"]
    assert "notify" not in s.all_presets()["fast"].model_dump()  # never shown with the presets (URLs hold tokens)


def test_a_bad_url_in_a_presets_notify_names_the_preset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"presets\.fast\.notify"):
        _load(tmp_path, presets={"fast": {"notify": ["bogus://x"]}})
