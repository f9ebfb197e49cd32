import keras
import numpy as np
import pytest

import tfopt
from tfopt.errors import ConfigError


def evaluate(schedule, steps):
    out = [schedule(step) for step in steps]
    return [bool(p) for p, _ in out], [float(s) for _, s in out]


def test_constant_sparsity_prunes_every_frequency_steps_in_range():
    schedule = tfopt.ConstantSparsity(0.5, begin_step=10, end_step=40, frequency=10)
    should, sparsity = evaluate(schedule, range(0, 50))
    assert [s for s, p in zip(range(50), should) if p] == [10, 20, 30, 40]
    assert set(sparsity) == {0.5}


def test_constant_sparsity_open_ended():
    schedule = tfopt.ConstantSparsity(0.3, frequency=5)
    should, _ = evaluate(schedule, [0, 3, 5, 1000, 1003])
    assert should == [True, False, True, True, False]


def test_polynomial_decay_follows_tfmot_formula_and_reaches_final_at_end_step():
    schedule = tfopt.PolynomialDecay(0.1, 0.8, begin_step=0, end_step=25, frequency=10)
    should, sparsity = evaluate(schedule, range(0, 31))
    # Every `frequency` steps, plus end_step itself so the final sparsity is reached.
    assert [s for s, p in zip(range(31), should) if p] == [0, 10, 20, 25]
    for step in (0, 10, 20, 25, 30):
        p = min(step / 25, 1.0)
        expected = 0.8 + (0.1 - 0.8) * (1 - p) ** 3
        assert sparsity[step] == pytest.approx(expected, abs=1e-6)
    assert sparsity[25] == pytest.approx(0.8)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: tfopt.ConstantSparsity(1.0), "target_sparsity must be a number in [0, 1), got 1.0"),
        (lambda: tfopt.ConstantSparsity(-0.1), "got -0.1"),
        (lambda: tfopt.ConstantSparsity("0.5"), "got '0.5'"),
        (lambda: tfopt.ConstantSparsity(0.5, frequency=0), "frequency must be an integer >= 1, got 0"),
        (lambda: tfopt.ConstantSparsity(0.5, begin_step=10, end_step=5), "end_step (5) is before begin_step (10)"),
        (lambda: tfopt.PolynomialDecay(0.0, 1.5, 0, 100), "final_sparsity must be a number in [0, 1), got 1.5"),
        (lambda: tfopt.PolynomialDecay(0.0, 0.5, 100, 50), "end_step (50) must be greater than begin_step (100)"),
        (lambda: tfopt.PolynomialDecay(0.0, 0.5, 0, 100, power=0), "power must be a positive number"),
    ],
)
def test_invalid_schedules_name_the_value_and_the_rule(make, fragment):
    with pytest.raises(ConfigError) as info:
        make()
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "schedule",
    [tfopt.ConstantSparsity(0.5, 3, 90, 7), tfopt.PolynomialDecay(0.1, 0.9, 5, 500, power=2, frequency=50)],
)
def test_schedules_round_trip_through_keras_serialization(schedule):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    assert restored == schedule
    steps = np.arange(0, 600, 13)
    assert evaluate(restored, steps) == evaluate(schedule, steps)
