import keras
import numpy as np
import pytest

import tfopt
from tfopt.errors import ConfigError
from tfopt.examples import compile_classifier, digits_cnn

from conftest import small_data


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


def test_update_steps_are_the_steps_should_prune_names():
    schedule = tfopt.PolynomialDecay(0.0, 0.7, begin_step=10, end_step=305, frequency=100)
    steps = schedule.update_steps(0, 500)
    assert steps == [10, 110, 210, 305]
    assert steps == [s for s in range(501) if bool(schedule.should_prune(s))]
    assert schedule.update_steps(150, 250) == [210]


def test_a_gradual_schedule_with_too_few_updates_is_named_with_its_numbers():
    from tfopt.pruning._schedules import fit_plan_problem

    # The case: 42 steps an epoch, 3 epochs, tfmot's default frequency of 100.
    coarse = tfopt.PolynomialDecay(0.0, 0.7, 0, end_step=42 * 3)
    problem = fit_plan_problem(coarse, 0, 42 * 3)
    assert "updates the masks 3 time(s)" in problem and "[0, 100, 126]" in problem
    assert "frequency=12" in problem
    assert fit_plan_problem(tfopt.PolynomialDecay(0.0, 0.7, 0, 126, frequency=10), 0, 126) is None
    short = fit_plan_problem(tfopt.PolynomialDecay(0.0, 0.7, 0, 1000, frequency=10), 0, 66)
    assert "step 1000" in short and "steps 0-65" in short
    assert fit_plan_problem(tfopt.ConstantSparsity(0.5), 0, 66) is None  # one cut by design


def test_pruning_step_warns_about_a_schedule_this_fit_runs_badly():
    x, y = small_data(64)
    pruned = tfopt.prune(digits_cnn(), tfopt.PolynomialDecay(0.0, 0.5, 0, 3))
    compile_classifier(pruned)
    with pytest.warns(UserWarning, match=r"updates the masks 2 time\(s\)"):
        pruned.fit(x, y, batch_size=32, epochs=2, verbose=0,
                   callbacks=[tfopt.callbacks.PruningStep()])


def test_a_schedule_in_epochs_sets_its_steps_and_about_ten_updates():
    schedule = tfopt.PolynomialDecay.over_epochs(0.0, 0.8, steps_per_epoch=42, end_epoch=3,
                                                 begin_epoch=0.5)
    assert (schedule.begin_step, schedule.end_step, schedule.frequency) == (21, 126, 10)
    assert len(schedule.update_steps(0, 200)) == 12  # every 10 steps from 21, and 126
    with pytest.raises(ConfigError, match="end_epoch"):
        tfopt.PolynomialDecay.over_epochs(0.0, 0.8, steps_per_epoch=42, end_epoch=0)
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        tfopt.PolynomialDecay.over_epochs(0.0, 0.8, steps_per_epoch=0, end_epoch=2)


def test_a_schedule_that_begins_after_the_fit_says_nothing_will_be_pruned():
    from tfopt.pruning._schedules import fit_plan_problem

    late = tfopt.PolynomialDecay(0.0, 0.7, 50, 80, frequency=10)
    problem = fit_plan_problem(late, 0, 32)
    assert "begins at step 50" in problem and "no weight is pruned" in problem
    assert "begins at step" in fit_plan_problem(tfopt.ConstantSparsity(0.5, begin_step=40), 0, 32)
