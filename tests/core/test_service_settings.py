"""The service settings (metrics, webhooks, retention) and the pause switch in the store."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from i2v_daemon.errors import ConfigError
from i2v_daemon.queue.store import Store
from i2v_daemon.settings import Settings, load_settings

CONFIG_TOML = Path(__file__).resolve().parents[2] / "config" / "config.toml"


def test_service_features_are_off_by_default(tmp_path: Path):
    s = load_settings(None, data_dir=str(tmp_path))
    assert (s.metrics, s.webhooks, s.retention_days) == ("off", [], 0)
    assert (s.metrics_address, s.metrics_port) == ("127.0.0.1", 9464)
    assert s.metrics_textfile == tmp_path / "metrics" / "i2v-daemon.prom"
    assert (s.webhook_timeout_seconds, s.webhook_retries, s.retention_action) == (10.0, 3, "forget")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("metrics", "prometheus", "metrics"),
    ("metrics_port", 0, "metrics_port"),
    ("metrics_address", "example.com", "must be an IP address"),
    ("metrics_textfile", "/tmp/i2v.txt", "must end in .prom"),
    ("webhooks", ["ftp://example.com/x"], "not an http:// or https:// URL"),
    ("webhooks", ["http:///no-host"], "not an http:// or https:// URL"),
    ("webhook_timeout_seconds", 0, "webhook_timeout_seconds"),
    ("webhook_retries", -1, "webhook_retries"),
    ("retention_days", -1, "retention_days"),
    ("retention_action", "delete", "retention_action"),
])
def test_a_bad_service_setting_is_one_line_naming_the_key(tmp_path: Path, key: str, value: object, message: str):
    with pytest.raises(ConfigError) as err:
        load_settings(None, data_dir=str(tmp_path), **{key: value})
    text = str(err.value)
    assert key in text and message in text and "\n" not in text


def test_every_setting_is_documented_in_the_example_config():
    text = CONFIG_TOML.read_text()
    missing = [f for f in Settings.model_fields if not re.search(rf"^#\s*{f}\s*=", text, re.M) and f != "presets"]
    assert missing == []


def test_pause_is_one_row_every_process_sees_and_flipping_it_twice_is_harmless(store: Store, database_url: str):
    assert store.pause_state() == {"paused": False, "since": None, "by": None}
    other = Store(database_url)  # another process: the CLI
    try:
        other.set_paused(True, by="alice@host")
        other.set_paused(True, by="alice@host")
        state = store.pause_state()
        assert state["paused"] is True and state["by"] == "alice@host" and state["since"] is not None
        other.set_paused(False)
        assert store.is_paused() is False
    finally:
        other.close()


def test_two_processes_pausing_at_once_leave_one_consistent_row(store: Store, database_url: str):
    stores = [Store(database_url) for _ in range(4)]
    try:
        threads = [threading.Thread(target=s.set_paused, args=(True,), kwargs={"by": f"p{i}"})
                   for i, s in enumerate(stores)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.is_paused() is True
    finally:
        for s in stores:
            s.close()
