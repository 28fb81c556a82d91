"""The one failure policy, case by case: what fails now, what is retried (counted), what waits (not counted)."""

from __future__ import annotations

import errno

import pytest
from sqlalchemy.exc import OperationalError

from i2v_daemon.errors import (
    ConfigError,
    DatabaseGone,
    GenerationError,
    InputError,
    JobCanceled,
    JobStalled,
    LeaseLost,
    ModelUnavailable,
    OutOfMemory,
    TransientError,
)
from i2v_daemon.work.policy import Action, decide


def verdict(err: BaseException, *, attempts: int = 1, waits: int = 0, where: str = "generating", **kw):
    return decide(err, attempts=attempts, max_attempts=3, backoff_seconds=30, waits=waits, where=where, **kw)


@pytest.mark.parametrize("err", [
    InputError("cat.json: unknown key 'step' — did you mean 'steps'?"),
    GenerationError("cogvideox makes only 720×480 videos"),
    OutOfMemory("out of GPU memory even at 256x256"),
])
def test_what_can_never_succeed_as_asked_fails_at_once_with_its_own_message(err: Exception) -> None:
    v = verdict(err)
    assert v.action is Action.FAIL and v.error == err.as_dict()  # type: ignore[attr-defined]


def test_a_pipelines_value_error_while_generating_is_not_retried_and_says_what_to_ask_for() -> None:
    v = verdict(ValueError("`height` and `width` have to be divisible by 32 but are 360 and 640."))
    assert v.action is Action.FAIL and v.error["type"] == "generation"  # type: ignore[index]
    assert "divisible by 32" in v.error["message"] and "Ask for another size" in v.error["message"]  # type: ignore[index]


def test_a_value_error_outside_the_pipeline_is_an_unknown_error_and_retried() -> None:
    assert verdict(ValueError("odd"), where="encoding").action is Action.RETRY


def test_a_file_name_too_long_for_the_filesystem_is_the_users_to_fix() -> None:
    err = OSError(errno.ENAMETOOLONG, "File name too long", "/data/work/1/" + "x" * 260)
    v = verdict(err, where="encoding")
    assert v.action is Action.FAIL and v.error["type"] == "invalid_input" and "shorter name" in v.error["message"]  # type: ignore[index]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_the_machine_in_the_way_waits_without_using_an_attempt(code: int) -> None:
    err = OSError(code, "nope", "/data/output")
    v = verdict(err, attempts=3, where="publishing")  # even on the last attempt: it is not the job's fault
    assert v.action is Action.WAIT and v.refund is True
    assert v.error["type"] == "environment" and "/data/output" in v.error["message"]  # type: ignore[index]
    assert "without using an attempt" in v.error["message"]  # type: ignore[index]


def test_a_rename_that_is_refused_names_both_ends() -> None:
    err = PermissionError(errno.EACCES, "Permission denied", "/data/work/1", None, "/data/output/cat")
    v = verdict(err, where="publishing")
    assert "(/data/work/1 → /data/output/cat)" in v.error["message"]  # type: ignore[index]


def test_an_environment_problem_wrapped_by_the_encoder_is_still_one() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/work/1/.encode.mp4.part")
        except OSError as inner:
            raise TransientError("could not finish writing cat.mp4") from inner
    except TransientError as err:
        assert verdict(err, where="encoding").action is Action.WAIT


def test_waits_back_off_doubling_up_to_ten_minutes() -> None:
    delays = [verdict(OSError(errno.ENOSPC, "full"), waits=n).delay for n in range(8)]
    assert delays[:3] == [30, 60, 120] and delays[-1] == 600 and delays == sorted(delays)
    assert verdict(OSError(errno.ENOSPC, "full"), waits=2).error["waits"] == 3  # type: ignore[index]


def test_a_database_that_does_not_answer_is_waited_out() -> None:
    err = OperationalError("UPDATE jobs …", {}, Exception("database is locked"))
    assert verdict(err).action is Action.WAIT


def test_a_model_that_cannot_be_fetched_now_waits() -> None:
    v = verdict(ModelUnavailable("model 'org/m' is not cached and the Hub cannot be reached"), where="loading")
    assert v.action is Action.WAIT and "Hub" in v.error["message"]  # type: ignore[index]


def test_unknown_and_transient_errors_are_retried_with_backoff_until_max_attempts() -> None:
    first = verdict(RuntimeError("CUDA error: an illegal memory access"), attempts=1)
    second = verdict(TransientError("ffmpeg was killed by signal 9"), attempts=2)
    last = verdict(RuntimeError("CUDA error again"), attempts=3)
    assert (first.action, first.delay, first.refund) == (Action.RETRY, 30, False)
    assert (second.action, second.delay) == (Action.RETRY, 60)
    assert last.action is Action.FAIL and last.error["type"] == "gave_up"  # type: ignore[index]
    assert "gave up after 3 attempts" in last.error["message"] and "CUDA error again" in last.error["message"]  # type: ignore[index]


def test_a_stalled_job_goes_back_to_the_queue_counted_after_one_backoff_even_on_its_last_attempt() -> None:
    for attempts in (1, 2, 3):  # never failed at once: the call it is stuck in still holds its folder
        v = verdict(JobStalled("no progress for 900 s while loading"), attempts=attempts)
        assert (v.action, v.delay, v.refund) == (Action.RETRY, 30, False)
        assert v.error == {"type": "stalled", "message": "no progress for 900 s while loading"}


def test_a_cancel_a_shutdown_a_lost_lease_and_a_daemon_that_cannot_go_on() -> None:
    assert verdict(JobCanceled("stopped"), cancel_requested=True).action is Action.CANCEL
    assert verdict(JobCanceled("stopped"), stopping=True).action is Action.REQUEUE
    assert verdict(JobCanceled("stopped"), stopping=True).refund is True
    assert verdict(JobCanceled("stopped"), stopping=True, cancel_requested=True).action is Action.CANCEL
    assert verdict(LeaseLost("job 1")).action is Action.DROP
    assert verdict(DatabaseGone("jobs.db was deleted")).action is Action.STOP
    assert verdict(ConfigError("model: folder does not exist")).action is Action.STOP
