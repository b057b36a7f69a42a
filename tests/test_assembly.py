"""When is a study complete? (release of its one association, or idle across several)."""

from nidaan.pacs_bridge.assembly import StudyAssembler


class FakeClock:
    """A manual clock: the timing rules are tested without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _assembler(timeout: float = 5.0):  # type: ignore[no-untyped-def]
    done: list[str] = []
    clock = FakeClock()
    return StudyAssembler(timeout, done.append, clock=clock), done, clock


def test_single_association_completes_on_release() -> None:
    a, done, _ = _assembler()
    a.instance_received(1, "1.2.3")
    a.instance_received(1, "1.2.3")
    a.instance_received(1, "1.2.4")
    assert done == []
    a.association_ended(1)
    assert sorted(done) == ["1.2.3", "1.2.4"]
    a.tick()
    assert sorted(done) == ["1.2.3", "1.2.4"]  # not completed twice


def test_study_over_parallel_associations_waits_for_idle_timeout() -> None:
    a, done, clock = _assembler(5.0)
    a.instance_received(1, "1.2.3")
    a.instance_received(2, "1.2.3")
    a.association_ended(1)
    a.association_ended(2)
    assert done == []  # seen on two associations: more may come on a third
    clock.now = 4.9
    a.tick()
    assert done == []
    clock.now = 5.0
    a.tick()
    assert done == ["1.2.3"]


def test_late_instance_reopens_study_and_then_waits_for_idle() -> None:
    a, done, clock = _assembler(5.0)
    a.instance_received(1, "1.2.3")
    a.association_ended(1)
    assert done == ["1.2.3"]
    clock.now = 1.0
    a.instance_received(2, "1.2.3")
    a.association_ended(2)
    assert done == ["1.2.3"]  # spans associations now: idle rule
    clock.now = 6.0
    a.tick()
    assert done == ["1.2.3", "1.2.3"]


def test_study_idle_on_an_open_association_completes() -> None:
    a, done, clock = _assembler(5.0)
    a.instance_received(1, "1.2.3")
    clock.now = 5.5
    a.tick()
    assert done == ["1.2.3"]
    a.association_ended(1)
    assert done == ["1.2.3"]


def test_expected_instance_count_completes_without_waiting() -> None:
    a, done, _ = _assembler(600.0)
    a.instance_received(1, "1.2.3", "1.2.3.1", expected=3)
    a.instance_received(2, "1.2.3", "1.2.3.2", expected=3)
    a.instance_received(2, "1.2.3", "1.2.3.2", expected=3)  # a re-send does not count twice
    assert done == []
    a.instance_received(3, "1.2.3", "1.2.3.3", expected=3)
    assert done == ["1.2.3"]  # three associations, no idle wait
    a.association_ended(1)
    a.association_ended(2)
    a.association_ended(3)
    assert done == ["1.2.3"]
