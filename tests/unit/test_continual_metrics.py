"""Continual metrics on hand-made loss matrices."""

import numpy as np
import pytest

from cluster.continual_metrics import adaptation, final_average_loss, forgetting, summary

L = [
    [2.0, 5.0, 6.0],
    [2.5, 3.0, 5.5],
    [3.0, 3.2, 4.0],
]


def test_adaptation_is_the_diagonal():
    np.testing.assert_array_equal(adaptation(L), [2.0, 3.0, 4.0])


def test_forgetting_against_best_so_far():
    f = forgetting(L)
    assert f[1, 0] == pytest.approx(0.5)  # 2.5 - 2.0
    assert f[2, 0] == pytest.approx(1.0)  # 3.0 - min(2.0, 2.5)
    assert f[2, 1] == pytest.approx(0.2)  # 3.2 - 3.0
    assert np.isnan(f[0, 0]) and np.isnan(f[1, 2])


def test_forgetting_uses_minimum_not_last():
    m = [[3.0, 9.0], [1.0, 2.0]]  # task 0 improved while training task 1: negative forgetting
    assert forgetting(m)[1, 0] == pytest.approx(-2.0)


def test_summary_values():
    s = summary(L)
    assert s["final_avg_loss"] == pytest.approx((3.0 + 3.2 + 4.0) / 3)
    assert s["mean_adaptation"] == pytest.approx(3.0)
    assert s["mean_forgetting"] == pytest.approx((1.0 + 0.2) / 2)
    assert final_average_loss([[1.5]]) == 1.5 and summary([[1.5]])["mean_forgetting"] == 0.0


def test_bad_shape():
    with pytest.raises(ValueError, match="square"):
        summary([[1.0, 2.0]])
