"""TaskData.from_points: the support/query split of task-major arrays."""

import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_hbmeta.data import TaskData


def test_from_points_splits_every_array_along_the_points_axis():
    x = jnp.arange(3 * 5 * 2.0).reshape(3, 5, 2)
    y = jnp.arange(15.0).reshape(3, 5)
    data = TaskData.from_points({"x": x, "y": y}, 2, truth={"tau": 1.0})
    np.testing.assert_array_equal(data.support["x"], x[:, :2])
    np.testing.assert_array_equal(data.query["y"], y[:, 2:])
    np.testing.assert_array_equal(data.all_data()["x"], x)
    assert data.task_labels == ["task0", "task1", "task2"] and data.truth == {"tau": 1.0}
    assert TaskData.from_points({"y": y}, 5).query is None


@pytest.mark.parametrize("num_support", [0, 6])
def test_from_points_rejects_a_split_outside_the_points(num_support):
    with pytest.raises(ValueError, match=r"num_support must be in \[1, 5\].*got " +
                       str(num_support)):
        TaskData.from_points({"y": jnp.zeros((3, 5))}, num_support)


def test_task_data_converts_lists_and_numpy_and_passes_scalars():
    import jax

    from numpyro_hbmeta.validate import task_data

    out = task_data({"x": [[1, 2], [3, 4]], "y": np.ones((2, 3)), "z": (1.0, 2.0),
                     "n": 3, "flag": True, "none": None, "w": jnp.zeros((2, 1))}, "support")
    assert isinstance(out["x"], jax.Array) and out["x"].shape == (2, 2)
    assert isinstance(out["y"], jax.Array) and out["y"].shape == (2, 3)
    assert isinstance(out["z"], jax.Array) and out["z"].shape == (2,)
    assert out["n"] == 3 and out["flag"] is True and out["none"] is None
    np.testing.assert_array_equal(out["x"], [[1, 2], [3, 4]])
