"""Claims that fit the card: what a job needs, what this worker's card offers, and who may take it.

A job's need is the smallest card budget it can run on: its leanest placement at the smallest size
the out-of-memory ladder may step down to, predicted from the model's configs (models/planner.py).
Intake works it out for each drop and refuses a job that no card seen here could ever take; a job
that came without one (an upload through `serve`, which keeps torch out) gets it from the first
worker with a card that claims it. A worker advertises its budget (queue/control.py's cards) and
claims only jobs whose need fits it; one that claimed a job too large for it puts the job back at
once, without using an attempt, saying which card it waits for.

Workers without a card to plan for (the CPU) claim anything, as before; the test seam
I2V_TEST_DEVICE_BUDGET_GIB gives a CPU worker a pretend card (docs/development.md).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from i2v_daemon.errors import CardTooSmall
from i2v_daemon.logs import get_logger
from i2v_daemon.queue.control import CARD_REFRESH_SECONDS
from i2v_daemon.queue.jobs import Job, JobRequest

if TYPE_CHECKING:
    from i2v_daemon.queue.store import Store
    from i2v_daemon.settings import Settings

log = get_logger()
GIB = 1024**3
#: How often an idle worker looks for queued jobs that no live card can take (one small query).
EXPLAIN_SECONDS = 5.0


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


class Cards:
    """This worker's card, and the need of the jobs it sees (worked out once per model, size and weights)."""

    def __init__(self, settings: Settings, store: Store, models: Any, *, worker_id: str, host: str,
                 device: str) -> None:
        self.s = settings
        self.store = store
        self.models = models  # the ModelHolder; None: a process that generates nothing
        self.worker_id = worker_id
        self.host = host
        self.device = device
        self.budget_bytes: int | None = models.card_budget() if models is not None else None
        self._advertised = 0.0  # monotonic time of the last advertisement
        self._explained = 0.0  # … and of the last look for jobs no live card can take
        self._needs: dict[tuple[Any, ...], Any] = {}

    # ---- this worker's card -------------------------------------------------------------------------

    def advertise(self, *, force: bool = False) -> None:
        """Tell the other daemons (and intake) what this card offers; at most every CARD_REFRESH_SECONDS."""
        if self.budget_bytes is None or (not force and time.monotonic() - self._advertised < CARD_REFRESH_SECONDS):
            return
        self._advertised = time.monotonic()
        try:
            self.store.control.advertise_card(self.worker_id, host=self.host, device=self.device,
                                              budget_bytes=self.budget_bytes)
        except Exception as err:  # the database's trouble is met, and judged, by the next claim
            log.debug("card_not_advertised", error=f"{type(err).__name__}: {err}")

    def retire(self) -> None:
        """This worker stops: its card is no longer live (still known: intake counts on it coming back)."""
        if self.budget_bytes is None or not self._advertised:
            return
        try:
            self.store.control.retire_card(self.worker_id)
        except Exception as err:  # the database may be what stopped us; the card then ages out
            log.debug("card_not_retired", error=f"{type(err).__name__}: {err}")

    # ---- what a job needs ---------------------------------------------------------------------------

    def need(self, model: str, params: Any, image: Path) -> Any:
        """`planner.Need` of a job of `model` (a config name) at `params` for the image at `image`; None: unknown."""
        if self.models is None or params is None:
            return None
        try:
            from PIL import Image

            with Image.open(image) as im:
                size = im.size
        except Exception:
            return None  # intake and the load judge the image itself
        key = (model, params.resolution, params.width, params.height, params.num_frames, params.weights,
               size[0] * 1000 // max(size[1], 1))  # the aspect ratio decides the size, not the pixels
        if key not in self._needs:
            try:
                found = self.models.need(model, params, size, list(self.s.resolution_ladder))
            except Exception as err:  # a plan that cannot be made leaves the job to the ladder, never fails it
                log.warning("need_not_planned", model=model, error=f"{type(err).__name__}: {err}")
                return None
            if found is None:
                return None  # not known now (configs not downloaded yet): asked again next time
            self._needs[key] = found
        return self._needs[key]

    def at_intake(self, request: JobRequest, image: Path) -> JobRequest:
        """The request with its need, or refused when no card seen here could ever take it."""
        if request.rejection is not None or request.params is None:
            return request
        found = self.need(request.params.model or "default", request.params, image)
        if found is None:
            return request
        known = self.store.control.cards()
        if known and found.budget_bytes > int(known[0]["budget_bytes"]):
            biggest = known[0]
            message = (
                f"needs a card offering at least {found.describe()}, and the largest card that has worked "
                f"for this queue offers {gib(biggest['budget_bytes'])} ({biggest['worker']}); ask for a lower "
                f"resolution or fewer frames, use fp8 weights (weights = \"fp8\"), or add a larger card"
            )
            return replace(request, params=None, rejection={"type": "needs_larger_card", "message": message})
        return replace(request, need_bytes=found.budget_bytes)

    def fits(self, job: Job) -> bool:
        """Whether this card may take `job` (its need unknown, or within this card's budget)."""
        return self.budget_bytes is None or job.need_bytes is None or job.need_bytes <= self.budget_bytes

    def check_claimed(self, job: Job, image: Path) -> None:
        """Raise CardTooSmall when this worker's card is smaller than the job needs (its need recorded first)."""
        if self.budget_bytes is None or job.params is None:
            return
        need, detail = job.need_bytes, ""
        if need is None:
            found = self.need(job.params.model or "default", job.params, image)
            if found is None:
                return
            need, detail = found.budget_bytes, f" ({found.describe()})"
            self.store.update_running(job.id, self.worker_id, need_bytes=need)
        if need <= self.budget_bytes:
            return
        live = [c for c in self.store.control.cards() if c["live"]]
        larger = [c for c in live if int(c["budget_bytes"]) >= need]
        if larger:
            big = larger[0]
            waits = f"a live worker with a larger card takes it ({big['worker']}, {gib(big['budget_bytes'])})"
        else:
            most = f"{gib(live[0]['budget_bytes'])}, {live[0]['worker']}" if live else "none is live"
            waits = f"it waits for a worker with a larger card (the largest live card: {most})"
        raise CardTooSmall(
            f"needs a card offering at least {gib(need)}{detail}; this worker's card offers {gib(self.budget_bytes)} "
            f"({self.worker_id}): {waits}"
        )

    def explain_waiting(self) -> None:
        """Say on each queued job that no live card can take why it waits (at most every EXPLAIN_SECONDS)."""
        if self.budget_bytes is None or time.monotonic() - self._explained < EXPLAIN_SECONDS:
            return
        self._explained = time.monotonic()
        live = [c for c in self.store.control.cards() if c["live"]]
        most = int(live[0]["budget_bytes"]) if live else 0
        who = f"{gib(most)}, {live[0]['worker']}" if live else "none is live"

        def reason(need: int) -> dict[str, str]:
            message = (f"needs a card offering at least {gib(need)}: it waits for a worker with a larger card "
                       f"(the largest live card: {who})")
            return {"type": CardTooSmall.kind, "message": message}

        said = self.store.explain_needs(most, reason)
        if said:
            log.warning("jobs_wait_for_a_larger_card", job_ids=said, largest_live_card=who)
