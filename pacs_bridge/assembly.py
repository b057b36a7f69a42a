"""Study assembly: deciding when a study has fully arrived.

DICOM has no "end of study" message, so completeness is inferred (IHE and most PACS do the same):

* a study sent on one association is complete when that association ends (release or abort);
* a study seen on more than one association (in parallel, or a later association adding to a
  study already complete) is complete ``idle_timeout`` seconds after its last instance, once no
  open association is carrying it;
* a study idle for ``idle_timeout`` on an association that stays open is complete too;
* a study whose instances carry Number of Study Related Instances (0020,1208) is complete as soon
  as that many distinct instances have arrived.

A study that receives instances after completion reopens, and is analysed again when it
completes again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Study:
    open_on: set[int] = field(default_factory=set)
    seen_on: set[int] = field(default_factory=set)
    last_at: float = 0.0
    complete: bool = False
    instances: set[str] = field(default_factory=set)
    expected: int | None = None


class StudyAssembler:
    """Tracks which association carried which study and calls ``on_complete(study_uid)``."""

    def __init__(
        self,
        idle_timeout_s: float,
        on_complete: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._on_complete = on_complete
        self._clock = clock
        self._lock = threading.Lock()
        self._studies: dict[str, _Study] = {}
        self._by_assoc: dict[int, set[str]] = {}

    def instance_received(
        self, assoc_id: int, study_uid: str, sop_instance_uid: str = "", expected: int | None = None
    ) -> None:
        """Note that ``assoc_id`` delivered an instance of ``study_uid``.

        ``expected`` is the sender's Number of Study Related Instances (0020,1208), when it
        says: the study is complete as soon as that many distinct instances have arrived.
        """
        with self._lock:
            st = self._studies.setdefault(study_uid, _Study())
            if st.complete:  # a late instance reopens the study; it now spans associations
                st.complete = False
                st.seen_on.add(-1)
            st.open_on.add(assoc_id)
            st.seen_on.add(assoc_id)
            st.last_at = self._clock()
            if sop_instance_uid:
                st.instances.add(sop_instance_uid)
            if expected:
                st.expected = expected
            self._by_assoc.setdefault(assoc_id, set()).add(study_uid)
            done = st.expected is not None and len(st.instances) >= st.expected
            if done:
                st.complete = True
        if done:
            self._on_complete(study_uid)

    def association_ended(self, assoc_id: int) -> None:
        """An association was released or aborted: complete the studies only it carried."""
        done = []
        with self._lock:
            for uid in self._by_assoc.pop(assoc_id, set()):
                st = self._studies[uid]
                st.open_on.discard(assoc_id)
                if not st.open_on and len(st.seen_on) == 1 and not st.complete:
                    st.complete = True
                    done.append(uid)
        for uid in done:
            self._on_complete(uid)

    def tick(self) -> None:
        """Complete idle studies and forget long-finished ones; call this periodically."""
        now = self._clock()
        done = []
        with self._lock:
            for uid, st in list(self._studies.items()):
                idle = now - st.last_at
                if not st.complete and idle >= self.idle_timeout_s:
                    st.complete = True
                    done.append(uid)
                elif st.complete and not st.open_on and idle >= 60 * self.idle_timeout_s:
                    del self._studies[uid]
        for uid in done:
            self._on_complete(uid)

    def pending(self) -> int:
        """Studies still receiving."""
        with self._lock:
            return sum(1 for st in self._studies.values() if not st.complete)
