"""Schedules: values at chosen steps, fraction resolution, validation, repr and equality."""

from __future__ import annotations

import math

import pytest

from lightning_dropout import schedules
from lightning_dropout.schedules import (
    Chain,
    Constant,
    Cosine,
    Curriculum,
    EarlyDropout,
    Exponential,
    LateDropout,
    Linear,
    Schedule,
    Step,
)


def values(schedule: Schedule, steps: range | list[int]) -> list[float]:
    return [schedule(t) for t in steps]


def test_constant() -> None:
    assert values(Constant(0.3), [0, 1, 10**9]) == [0.3, 0.3, 0.3]


def test_linear_ramps_then_holds() -> None:
    schedule = Linear(0.1, 0.5, steps=4)
    assert values(schedule, range(7)) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5])
    assert values(Linear(0.5, 0.0, steps=2), range(4)) == [0.5, 0.25, 0.0, 0.0]


def test_cosine_follows_the_half_cosine() -> None:
    schedule = Cosine(0.0, 0.4, steps=8)
    expected = [0.4 * (1 - math.cos(math.pi * t / 8)) / 2 for t in range(9)] + [0.4, 0.4]
    assert values(schedule, range(11)) == pytest.approx(expected, abs=1e-15)
    assert schedule(8) == 0.4 and schedule(0) == 0.0


def test_step_switches_at_milestones() -> None:
    schedule = Step([0.5, 0.2, 0.0], milestones=[3, 5])
    assert values(schedule, range(7)) == [0.5, 0.5, 0.5, 0.2, 0.2, 0.0, 0.0]
    assert values(Step([0.25], milestones=[]), [0, 100]) == [0.25, 0.25]


def test_exponential_and_curriculum() -> None:
    schedule = Exponential(0.5, 0.1, decay=0.2)
    assert values(schedule, [0, 5, 10]) == pytest.approx(
        [0.5, 0.1 + 0.4 * math.exp(-1), 0.1 + 0.4 * math.exp(-2)]
    )
    rising = Exponential(0.0, 0.4, decay=1.0)
    assert rising(0) == 0.0 and rising(10**6) == pytest.approx(0.4)
    curriculum = Curriculum(p_final=0.5, gamma=0.1)
    expected = [0.5 * (1 - math.exp(-0.1 * t)) for t in (0, 1, 10, 100)]
    assert values(curriculum, [0, 1, 10, 100]) == pytest.approx(expected, rel=1e-12)
    assert curriculum(10**6) <= 0.5
    # Curriculum dropout is the exponential approach from 0 to p_final.
    assert values(curriculum, range(50)) == pytest.approx(values(Exponential(0.0, 0.5, 0.1), range(50)))


def test_early_and_late_dropout() -> None:
    assert values(EarlyDropout(0.2, until=3), range(5)) == [0.2, 0.2, 0.2, 0.0, 0.0]
    assert values(LateDropout(0.2, start=3), range(5)) == [0.0, 0.0, 0.0, 0.2, 0.2]


def test_chain_restarts_each_piece_at_its_milestone() -> None:
    schedule = Chain([Constant(0.0), Linear(0.0, 0.2, steps=2), Constant(0.1)], milestones=[2, 4])
    assert values(schedule, range(7)) == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1])
    nested = Chain([schedule, LateDropout(0.3, start=1)], milestones=[10])
    assert values(nested, [9, 10, 11]) == [0.1, 0.0, 0.3]


def test_fractions_resolve_against_the_run_length() -> None:
    schedule = Chain([Linear(0.0, 0.4, steps=0.5), Step([0.4, 0.1], [0.1])], milestones=[0.5])
    assert schedule.is_fractional()
    with pytest.raises(RuntimeError, match="resolve"):
        schedule(0)
    resolved = schedule.resolve(200)
    assert not resolved.is_fractional()
    assert resolved == Chain([Linear(0.0, 0.4, steps=100), Step([0.4, 0.1], [20])], milestones=[100])
    assert values(resolved, [50, 100, 119, 120]) == pytest.approx([0.2, 0.4, 0.4, 0.1])
    # A fraction never resolves to 0 steps; ints are left alone.
    assert EarlyDropout(0.1, until=0.001).resolve(10) == EarlyDropout(0.1, until=1)
    assert Linear(0.0, 0.1, steps=7).resolve(1000) == Linear(0.0, 0.1, steps=7)


def test_resolution_that_collapses_milestones_is_refused() -> None:
    with pytest.raises(ValueError, match="milestones must be strictly increasing"):
        Step([0.1, 0.2, 0.3], milestones=[0.1, 0.12]).resolve(10)


def test_repr_reads_back_as_the_call() -> None:
    schedule = Chain([Cosine(0.1, 0.0, steps=0.5), Step([0.0, 0.1], milestones=[10])], milestones=[0.5])
    text = repr(schedule)
    assert text == (
        "Chain(schedules=[Cosine(start=0.1, end=0.0, steps=0.5), Step(values=[0.0, 0.1], milestones=[10])], "
        "milestones=[0.5])"
    )
    assert eval(text, vars(schedules)) == schedule
    assert hash(eval(text, vars(schedules))) == hash(schedule)
    assert Linear(0.0, 0.1, 5) != Cosine(0.0, 0.1, 5)


@pytest.mark.parametrize(
    ("build", "error", "argument"),
    [
        (lambda: Constant(1.0), ValueError, "p"),
        (lambda: Constant(-0.1), ValueError, "p"),
        (lambda: Constant(float("nan")), ValueError, "p"),
        (lambda: Constant("0.1"), TypeError, "p"),
        (lambda: Linear(0.0, 1.0, 10), ValueError, "end"),
        (lambda: Linear(1.5, 0.0, 10), ValueError, "start"),
        (lambda: Linear(0.0, 0.5, 0), ValueError, "steps"),
        (lambda: Linear(0.0, 0.5, -3), ValueError, "steps"),
        (lambda: Cosine(0.0, 0.5, 0.0), ValueError, "steps"),
        (lambda: Cosine(0.0, 0.5, 1.5), ValueError, "steps"),
        (lambda: Cosine(0.0, 0.5, True), TypeError, "steps"),
        (lambda: Step([0.1, 0.2], [0]), ValueError, r"milestones\[0\]"),
        (lambda: Step([0.1, 0.2], [5, 6]), ValueError, "values must hold one more"),
        (lambda: Step([0.1, 0.2, 0.3], [6, 5]), ValueError, "milestones must be strictly increasing"),
        (lambda: Step([0.1, 1.0], [5]), ValueError, r"values\[1\]"),
        (lambda: Step(0.1, [5]), TypeError, "values"),
        (lambda: Exponential(0.5, 0.1, decay=0.0), ValueError, "decay"),
        (lambda: Exponential(0.5, 0.1, decay=float("inf")), ValueError, "decay"),
        (lambda: Curriculum(1.0, gamma=0.1), ValueError, "p_final"),
        (lambda: Curriculum(0.5, gamma=-1.0), ValueError, "gamma"),
        (lambda: EarlyDropout(0.1, until=0), ValueError, "until"),
        (lambda: LateDropout(0.1, start=-1), ValueError, "start"),
        (lambda: Chain([Constant(0.1), 0.2], [3]), TypeError, r"schedules\[1\]"),
        (lambda: Chain([Constant(0.1)], [3]), ValueError, "schedules must hold one more"),
        (lambda: Chain([Constant(0.1), Constant(0.2)], [0]), ValueError, r"milestones\[0\]"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(build, error, argument) -> None:
    with pytest.raises(error, match=argument):
        build()


def test_bad_steps_and_totals() -> None:
    with pytest.raises(ValueError, match="step must be"):
        Constant(0.1)(-1)
    with pytest.raises(TypeError, match="step must be"):
        Constant(0.1)(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total"):
        Linear(0.0, 0.1, 0.5).resolve(0)


class Halving(Schedule):
    """A user-defined schedule needs only ``value``."""

    def value(self, step: int) -> float:
        return 0.5**step / 2


def test_custom_schedule() -> None:
    assert values(Halving(), [0, 1, 2]) == [0.5, 0.25, 0.125]
    assert repr(Halving()) == "Halving()" and not Halving().is_fractional()
