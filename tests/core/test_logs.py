"""Everything the process writes to stderr goes through the one structlog pipeline: the daemon's own events,
the libraries' loggers (huggingface_hub, transformers, diffusers), `warnings.warn` and uncaught exceptions,
each line once, JSON when stderr is not a terminal (`<N>{json}` when it is the journal)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from i2v_daemon.logs import SYSLOG_PRIORITY
from tests.conftest import SUBPROCESS_ENV, Env
from tests.service.test_doctor import HUB_MODEL, hub_env, refused_endpoint

#: The one plain line the CLI prints by contract (INTERFACE.md §1): a configuration error, then exit 78.
CONFIG_ERROR = "i2v-daemon: "


def run_python(code: str, tmp_path: Path, *args: str, journal: bool = False,
               extra_env: dict[str, str] | None = None) -> str:
    """Run `code` in a fresh interpreter with stderr in a file (not a terminal); what it wrote there."""
    err = tmp_path / "stderr.log"
    with err.open("w") as fh:
        env = {**os.environ, **SUBPROCESS_ENV, **(extra_env or {})}
        for key in ("I2V_LOG_FORMAT", "JOURNAL_STREAM", "HF_HUB_DISABLE_PROGRESS_BARS"):
            env.pop(key, None)  # the defaults: the format follows the stream, bars follow the terminal
        if journal:  # stderr "is" the journal: lines get their <N> priority
            st = os.fstat(fh.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=fh,
                              env=env, timeout=120)
    text = err.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def parse(stderr: str, *, journal: bool = False, allow_last: str | None = None) -> list[dict[str, Any]]:
    """Every line as JSON (after its `<N>` when `journal`); fails on any other line, but `allow_last` may end it."""
    lines = stderr.splitlines()
    if allow_last is not None and lines and lines[-1].startswith(allow_last):
        lines = lines[:-1]
    events = []
    for line in lines:
        prio = None
        if journal:
            assert line[:1] == "<" and line[2:3] == ">", f"no <N> priority: {line!r}"
            prio, line = int(line[1]), line[3:]
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\n--- stderr:\n{stderr[-3000:]}") from None
        if prio is not None:
            event["_prio"] = prio
        events.append(event)
    return events


def assert_nothing_twice(events: list[dict[str, Any]]) -> None:
    """The double printing wrote each message twice in a row; a real repeat has other lines between."""
    keys = [(e.get("event"), e.get("logger"), e.get("level")) for e in events]
    twice = [k for a, k in itertools.pairwise(keys) if a == k]
    assert not twice, twice


# ---- libraries and warnings, in a bare interpreter ------------------------------------------------

LIBRARIES = """
import sys
if sys.argv[1] == "before":  # the libraries set up their loggers (and handlers) before we configure
    import huggingface_hub.utils, transformers.utils.logging
from i2v_daemon import logs
logs.configure("info", "auto")
from huggingface_hub.utils import http_backoff
from transformers.utils import logging as transformers_logging
try:  # huggingface_hub's own retry warnings, shortened: one retry, 10 ms apart
    http_backoff("HEAD", sys.argv[2] + "/x", max_retries=1, base_wait_time=0.01, max_wait_time=0.01, timeout=5)
except Exception as err:
    logs.get_logger().info("probe_failed", error=type(err).__name__)
transformers_logging.get_logger("transformers.models.test").warning("a warning through transformers")
import numpy
numpy.mean([])  # numpy's own RuntimeWarning, through warnings.warn
"""


@pytest.mark.parametrize("journal", [False, True], ids=["json", "journal"])
@pytest.mark.parametrize("imported", ["before", "after"])
def test_library_log_lines_and_python_warnings_are_written_once_each_as_json(
    tmp_path: Path, imported: str, journal: bool,
):
    online = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}  # offline, the client would not even try
    stderr = run_python(LIBRARIES, tmp_path, imported, refused_endpoint(), journal=journal, extra_env=online)
    events = parse(stderr, journal=journal)
    assert_nothing_twice(events)
    hub = [e for e in events if e.get("logger") == "huggingface_hub.utils._http"]
    # Two tries (each refused), one retry between them: three lines, not six.
    assert [("thrown while requesting HEAD" in e["event"], e["event"].startswith("Retrying in")) for e in hub] == [
        (True, False), (False, True), (True, False)], hub
    assert all(e["level"] == "warning" for e in hub)
    transformers = [e for e in events if e["event"] == "a warning through transformers"]
    assert [(e["level"], e["logger"]) for e in transformers] == [("warning", "transformers.models.test")]
    empty = [e for e in events if e["event"] == "Mean of empty slice"]
    assert [(e["level"], e["logger"], e["category"]) for e in empty] == [("warning", "py.warnings", "RuntimeWarning")]
    assert empty[0]["source"].split(":")[0].endswith(".py")  # where numpy warned from
    assert [e["event"] for e in events if e.get("level") == "info"] == ["probe_failed"]
    if journal:
        assert {e["_prio"] for e in hub + transformers + empty} == {4}
        assert {e["_prio"] for e in events if e["event"] == "probe_failed"} == {6}


LEVELS = """
import sys, logging
from i2v_daemon import logs
logs.configure(sys.argv[1], "json")
import huggingface_hub  # sets its logger to WARNING at import, and would add its own handler
logging.getLogger("huggingface_hub.file_download").debug("library internals")
logging.getLogger("huggingface_hub.file_download").info("library chatter")
logging.getLogger("huggingface_hub.file_download").warning("library warning")
logs.get_logger().info("our info")
logs.get_logger().debug("our debug")
"""


@pytest.mark.parametrize(("level", "expected"), [
    ("info", [("library warning", "warning"), ("our info", "info")]),
    ("debug", [("library chatter", "debug"), ("library warning", "warning"), ("our info", "info"),
               ("our debug", "debug")]),
    ("error", []),
])
def test_a_librarys_info_is_debug_noise_shown_only_at_log_level_debug_and_its_debug_never(
    tmp_path: Path, level: str, expected: list[tuple[str, str]],
):
    events = parse(run_python(LEVELS, tmp_path, level))
    assert [(e["event"], e["level"]) for e in events] == expected


CRASH = """
import sys, threading
from i2v_daemon import logs
logs.configure("info", "auto")
t = threading.Thread(target=lambda: 1 / 0, name="worker-thread")
t.start()
t.join()
raise RuntimeError("boom")
"""


def test_an_uncaught_exception_in_a_thread_or_at_the_top_is_one_critical_json_line(tmp_path: Path):
    err = tmp_path / "stderr.log"
    with err.open("w") as fh:
        env = {**os.environ, **SUBPROCESS_ENV}
        env.pop("I2V_LOG_FORMAT", None)
        proc = subprocess.run([sys.executable, "-c", CRASH], stderr=fh, env=env, timeout=120)
    assert proc.returncode == 1
    events = parse(err.read_text())
    assert [(e["event"], e["level"]) for e in events] == [("uncaught_exception", "critical")] * 2
    assert events[0]["thread"] == "worker-thread" and "ZeroDivisionError" in events[0]["exception"]
    assert "RuntimeError: boom" in events[1]["exception"]


BARS = """
from i2v_daemon import logs
logs.configure("info", "auto")
from huggingface_hub.utils import are_progress_bars_disabled, tqdm
for _ in tqdm(range(3), desc="downloading"):
    pass
assert are_progress_bars_disabled()
"""


def test_progress_bars_are_off_when_stderr_is_not_a_terminal(tmp_path: Path):
    assert run_python(BARS, tmp_path) == ""


# ---- the real CLI ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_once_with_the_hub_unreachable_says_so_once_as_json_and_exits_78(
    env: Env, drop: Callable[..., list[Path]], tmp_path: Path,
):
    drop("cat", (".txt", "a cat"))
    # HF_HUB_OFFLINE unset and no network: the operator's "offline by accident".
    proc = env.cli("run", "--once", timeout=240, env={
        "I2V_MODEL": HUB_MODEL, "I2V_LOG_FORMAT": "auto", **hub_env(tmp_path / "hf", refused_endpoint(), offline=False),
    })
    assert proc.returncode == 78, proc.stderr[-3000:]
    events = parse(proc.stderr)
    assert_nothing_twice(events)
    hub = [e for e in events if str(e.get("logger", "")).startswith("huggingface_hub")]
    assert all(e["level"] in ("warning", "debug") for e in hub), hub  # one bounded question: no retry storm
    [why] = [e for e in events if e["event"] == "model_unavailable"]
    assert why["level"] == "error" and "the Hub did not answer" in why["error"] and "hf download" in why["error"]
    assert any(e["event"] == "received" for e in events)  # the drop was taken in (it waits, queued)


@pytest.mark.slow
def test_run_once_under_the_journal_gives_every_line_its_priority_library_warnings_included(
    env: Env, drop: Callable[..., list[Path]], tmp_path: Path,
):
    drop("cat", (".txt", "a cat"))
    err = tmp_path / "stderr.log"
    with err.open("w") as fh:
        st = os.fstat(fh.fileno())
        full_env = {**os.environ, **SUBPROCESS_ENV, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        full_env.pop("I2V_CONFIG", None)
        proc = subprocess.run(
            [sys.executable, "-m", "i2v_daemon.cli", "run", "--once", "--config", str(env.config),
             "--log-level", "debug"],
            stdout=subprocess.DEVNULL, stderr=fh, env=full_env, timeout=300,
        )
    assert proc.returncode == 0, err.read_text()[-3000:]
    events = parse(err.read_text(), journal=True)
    assert_nothing_twice(events)
    by_event = {e["event"]: e for e in events}
    assert by_event["succeeded"]["_prio"] == 6 and by_event["received"]["_prio"] == 6
    # Loading the pipeline makes diffusers say I2VGen-XL is deprecated: the library's chatter, priority 7.
    library = [e for e in events if str(e.get("logger", "")).startswith(("diffusers", "transformers"))]
    assert library and all(e["_prio"] == SYSLOG_PRIORITY[e["level"]] for e in library), library
    assert any("has been deprecated" in e["event"] and e["_prio"] == 7 for e in library), library


@pytest.mark.slow
def test_a_canceled_job_is_logged_at_info_not_as_an_error(env: Env, drop: Callable[..., list[Path]]):
    env.cli("migrate", check=True)
    env.cli("pause", check=True)
    drop("cat", (".txt", "a cat"))
    env.cli("run", "--once", check=True)  # paused: taken in, left queued
    [job] = env.status()["jobs"]
    env.cli("cancel", str(job["id"]), check=True)
    env.cli("resume", check=True)
    proc = env.cli("run", "--once", check=True)
    events = parse(proc.stderr)
    assert [(e["level"], e["job_id"]) for e in events if e["event"] == "canceled"] == [("info", job["id"])]
    assert not [e for e in events if e["level"] in ("error", "critical")], events


def test_the_command_lines_writer_lets_no_control_character_through_whatever_a_command_forgets() -> None:
    import io

    from i2v_daemon.logs import TerminalWriter, terminal_json

    raw = io.StringIO()
    out = TerminalWriter(raw)
    print("job 3: x\x1b]0;OWNED\x07\x1b[2J \x9b1m\u202eevil", "second", file=out)  # forgot terminal_safe
    out.control("\x1b[H\x1b[2J")  # a sequence the program itself means goes through as it is
    assert raw.getvalue() == "job 3: x\\x1b]0;OWNED\\x07\\x1b[2J \\x9b1m\\u202eevil second\n\x1b[H\x1b[2J"
    text = terminal_json({"name": "x\x1b\x9b\u202e\U000e0041é"}, indent=2)
    assert text.isascii() is False and "é" in text  # readable names stay readable
    assert all(c.isprintable() or c in " \n" for c in text)
    assert json.loads(text) == {"name": "x\x1b\x9b\u202e\U000e0041é"}


def test_the_log_pipeline_under_the_command_lines_writer_writes_its_own_lines_to_the_real_stream(
    tmp_path: Path,
) -> None:
    code = (
        "import sys\n"
        "from i2v_daemon import logs\n"
        "with logs.terminal_writers():\n"
        "    logs.configure('info', 'json')\n"
        "    assert logs.logging.getLogger().handlers[-1].stream is sys.__stderr__\n"
        "    logs.get_logger().info('hello', name='x\\x1b[2J')\n"
    )
    line = json.loads(run_python(code, tmp_path).strip().splitlines()[-1])
    assert line["event"] == "hello" and line["name"] == "x\x1b[2J"


CHATTER = """
import sys, logging, warnings
from i2v_daemon import logs
logs.configure(sys.argv[1], "json")
logging.getLogger("diffusers.pipelines.pipeline_utils").warning(
    "The I2VGenXLPipeline has been deprecated and will not receive bug fixes or feature updates after Diffusers "
    "version 0.33.1. ")
logging.getLogger("transformers.utils.import_utils").warning(
    "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for backward "
    "compatibility. Install torchvision to use the default backend, or import `CLIPImageProcessorPil` directly to "
    "silence this warning.")
warnings.warn("`resume_download` is deprecated", FutureWarning)
logging.getLogger("diffusers.models.modeling_utils").warning(
    "There are modules in AutoencoderKLHunyuanVideo15 that should be kept in float32: []. Casting directly with "
    "`to()` can lead to inconsistent results; set `torch_dtype` in `from_pretrained()` instead to keep these "
    "modules in float32.")
logging.getLogger("diffusers.models.modeling_utils").warning(
    "There are modules in AutoencoderKLWan that should be kept in float32: ['norm']. Casting directly with `to()`")
logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
"""


@pytest.mark.parametrize(("level", "expected"), [
    ("info", [("There are modules in AutoencoderKLWan", "warning"), ("Retrying in 1s [Retry 1/5].", "warning")]),
    ("debug", [("The I2VGenXLPipeline", "debug"), ("`CLIPImageProcessor` requires", "debug"),
               ("`resume_download` is", "debug"), ("There are modules in AutoencoderKLHunyuanVideo15", "debug"),
               ("There are modules in AutoencoderKLWan", "warning"), ("Retrying in 1s [Retry 1/5].", "warning")]),
])
def test_a_librarys_deprecation_notices_and_fallbacks_it_is_fine_with_are_its_chatter_not_warnings(
    tmp_path: Path, level: str, expected: list[tuple[str, str]],
) -> None:
    events = parse(run_python(CHATTER, tmp_path, level))
    assert [(e["event"][: len(start)], e["level"]) for e, (start, _) in zip(events, expected, strict=False)] == expected
    assert len(events) == len(expected)
