"""A name a stranger chose never drives the operator's terminal: every command prints it escaped.

Anyone who may drop files names them. A name holding ESC sequences (a window title, a cleared
screen, colours), a bell, a bidi override or a newline must reach the terminal as visible escapes
from every command, and never forge a line of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from i2v_daemon.params import Params
from i2v_daemon.queue.jobs import JobRequest, JobStatus
from i2v_daemon.queue.store import Store
from tests.conftest import ROOT, SUBPROCESS_ENV

HOSTILE = "x\x1b]0;OWNED\x07\x1b[2J\x1b[1;31mALERT\nFAKE\u202e\x9b31m"
PARAMS = Params(preset="fast", resolution=512, num_frames=8, steps=30, guidance_scale=9.0, fps=8)
#: Bidi controls: the embeddings, overrides and isolates, and the marks.
BIDI = {*map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A)), "\u200e", "\u200f", "\u061c"}


def raw_controls(text: str) -> list[str]:
    """Every C0 control but the newline, every C1 control and every bidi control in `text`."""
    return [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 or c in BIDI]


def cli(data: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("I2V_")} | SUBPROCESS_ENV
    return subprocess.run([sys.executable, "-m", "i2v_daemon.cli", args[0], "--data-dir", str(data), *args[1:]],
                          capture_output=True, timeout=120, env=env, cwd=ROOT)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    """A data folder whose jobs all bear the hostile name: queued, failed with a folder, rejected, succeeded."""
    folder = tmp_path / "data"
    store = Store(f"sqlite:///{folder / 'jobs.db'}")
    store.create_schema()

    def job(key: str, **kw: object) -> int:
        made, _ = store.enqueue(JobRequest(name=HOSTILE, inputs=(f"{HOSTILE}.png",), intake_key=key,
                                           params=None if kw.get("rejection") else PARAMS,
                                           prompt=f"prompt {HOSTILE}", **kw))  # type: ignore[arg-type]
        return made.id

    job("queued")
    for key, status in (("failed", JobStatus.FAILED), ("done", JobStatus.SUCCEEDED)):
        jid = job(key)
        store.claim_next("w", lease_seconds=60, job_id=jid)
        final = folder / ("output" if status is JobStatus.SUCCEEDED else "failed") / f"{HOSTILE}-{key}"
        final.mkdir(parents=True)
        store.update_running(jid, "w", final_dir=str(final))
        store.finish(jid, "w", status, error={"type": "x", "message": f"it broke on {HOSTILE}"},
                     output=str(final / f"{HOSTILE}.mp4") if status is JobStatus.SUCCEEDED else None)
    rejected = job("rejected", rejection={"type": "invalid_input", "message": f"{HOSTILE}.json: unknown key"})
    store.claim_next("w", lease_seconds=60, job_id=rejected)
    (folder / "failed" / f"{HOSTILE}-rejected").mkdir(parents=True)
    store.update_running(rejected, "w", final_dir=str(folder / "failed" / f"{HOSTILE}-rejected"))
    store.finish(rejected, "w", JobStatus.FAILED, error={"type": "invalid_input", "message": f"{HOSTILE}: bad"})
    store.close()
    return folder


def test_every_command_prints_a_hostile_name_escaped_and_never_forges_a_line(data: Path, tmp_path: Path) -> None:
    dropped = tmp_path / f"{HOSTILE}.png"
    dropped.write_bytes(b"not an image at all")
    sidecar = tmp_path / f"{HOSTILE}.json"
    sidecar.write_text('{"prompt": "p", "stepz": 3}')
    ids = {"queued": "1", "failed": "2", "done": "3", "rejected": "4"}
    shown = [  # each of these prints the name (or a path holding it) somewhere
        ["status"], ["status", "--json"], ["show", ids["failed"]], ["show", ids["done"], "--json"],
        ["cancel", ids["queued"]], ["retry", ids["rejected"]], ["retry", ids["failed"]],
        ["validate", str(dropped), str(sidecar), str(tmp_path / f"{HOSTILE}.txt")],
        ["inspect", str(dropped)], ["inspect", str(tmp_path / f"{HOSTILE}.mp4")],
        ["retention", "--days", "0.00001", "--action", "archive"],
    ]
    for args in [*shown, ["cancel", ids["done"]], ["pause"], ["resume"]]:
        proc = cli(data, *args)
        for stream, raw in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            text = raw.decode()
            assert "Traceback" not in text, (args, text)
            assert raw_controls(text) == [], (args, stream, text)
            assert not any(line.startswith("FAKE") for line in text.splitlines()), (args, stream, text)
        if "--json" in args:
            json.loads(proc.stdout)  # escaped the JSON way: still JSON, with the name itself inside
        assert b"OWNED" in proc.stdout + proc.stderr or args not in shown, args


def test_the_json_a_command_prints_still_holds_the_name_itself(data: Path) -> None:
    shown = json.loads(cli(data, "show", "1", "--json").stdout)
    assert shown["name"] == HOSTILE
    listed = json.loads(cli(data, "status", "--json").stdout)
    assert {job["name"] for job in listed["jobs"]} == {HOSTILE}
