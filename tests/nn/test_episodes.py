"""Episode sampling from Omniglot-layout folders, on a synthetic set written by the tests."""

import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_hbmeta.nn import episodes

OMNIGLOT = Path("/work/shared/data/omniglot/images_background_small1.zip")


@pytest.fixture(scope="module")
def synthetic_zip(tmp_path_factory):
    path = tmp_path_factory.mktemp("omniglot") / "toy_background.zip"
    return episodes.make_synthetic_omniglot(path, alphabets=2, characters=5, drawers=8, size=35)


@pytest.fixture(scope="module")
def dataset(synthetic_zip):
    return episodes.load_image_folder(synthetic_zip, image_size=(20, 20))


def test_layout_counts_and_ink(dataset):
    assert dataset.images.shape == (10, 8, 20, 20) and dataset.images.dtype == jnp.float32
    assert dataset.num_classes == 40
    assert dataset.characters[0] == "alphabet_0/character01"
    assert set(dataset.alphabets) == {"alphabet_0", "alphabet_1"}
    # black-on-white PNGs come back as ink = 1 on a 0 background
    assert 0.02 < float(dataset.images.mean()) < 0.5
    assert float(dataset.images.min()) == 0.0 and float(dataset.images.max()) > 0.99


def test_zip_directory_and_inner_folder_give_the_same_arrays(synthetic_zip, dataset, tmp_path):
    with zipfile.ZipFile(synthetic_zip) as archive:
        archive.extractall(tmp_path)
    top = tmp_path / "toy_background"
    for root in (tmp_path, top, synthetic_zip / "toy_background"):
        other = episodes.load_image_folder(root, image_size=(20, 20))
        assert other.characters == dataset.characters
        np.testing.assert_array_equal(other.images, dataset.images)


def test_resize_area_is_block_mean_and_preserves_constants():
    image = np.arange(36, dtype=np.float64).reshape(6, 6)
    expected = image.reshape(3, 2, 3, 2).mean((1, 3))
    np.testing.assert_allclose(episodes.resize_area(image, (3, 3)), expected, rtol=1e-6)
    np.testing.assert_allclose(episodes.resize_area(np.ones((2, 105, 105)), (28, 28)), 1.0,
                               rtol=1e-6)
    # 3 → 2: output pixel 0 covers input [0, 1.5): (x0 + x1/2) / 1.5
    np.testing.assert_allclose(episodes.resize_area(np.array([[3.0, 6.0, 9.0]]), (1, 2)),
                               [[4.0, 8.0]], rtol=1e-6)


def test_splits_are_disjoint_and_keep_rotations_together(dataset):
    for by, num_train in (("character", 7), ("alphabet", 1)):
        train, test = episodes.train_test_split(dataset, num_train=num_train, by=by, seed=3)
        assert not set(train.characters) & set(test.characters)
        assert len(train.characters) + len(test.characters) == 10
        train_classes = {train.class_name(c) for c in range(train.num_classes)}
        test_classes = {test.class_name(c) for c in range(test.num_classes)}
        assert not train_classes & test_classes
        assert len(train_classes | test_classes) == 40
        if by == "alphabet":
            assert not set(train.alphabets) & set(test.alphabets)
    again = episodes.train_test_split(dataset, num_train=7, seed=3)
    assert again[0].characters == episodes.train_test_split(dataset, num_train=7, seed=3)[0] \
        .characters
    assert again[0].characters != episodes.train_test_split(dataset, num_train=7, seed=4)[0] \
        .characters


def test_episode_shapes_labels_and_determinism(dataset):
    key = jax.random.PRNGKey(0)
    episode = episodes.sample_episode(key, dataset, n_way=5, k_shot=2, k_query=3)
    assert episode.support_images.shape == (10, 20, 20, 1)
    assert episode.query_images.shape == (15, 20, 20, 1)
    np.testing.assert_array_equal(episode.support_labels, np.repeat(np.arange(5), 2))
    np.testing.assert_array_equal(episode.query_labels, np.repeat(np.arange(5), 3))
    assert len(set(np.asarray(episode.classes).tolist())) == 5
    same = episodes.sample_episode(key, dataset, n_way=5, k_shot=2, k_query=3)
    for a, b in zip(episode, same, strict=True):
        np.testing.assert_array_equal(a, b)
    other = episodes.sample_episode(jax.random.PRNGKey(1), dataset, n_way=5, k_shot=2, k_query=3)
    assert not np.array_equal(other.support_images, episode.support_images)


def test_images_belong_to_their_labelled_rotated_class_without_repeats(dataset):
    episode = episodes.sample_episode(jax.random.PRNGKey(2), dataset, n_way=5, k_shot=2,
                                      k_query=3)
    images = np.concatenate([np.asarray(episode.support_images).reshape(5, 2, 20, 20),
                             np.asarray(episode.query_images).reshape(5, 3, 20, 20)], axis=1)
    for label, label_class in enumerate(np.asarray(episode.classes)):
        character, rotation = divmod(int(label_class), 4)
        candidates = np.rot90(np.asarray(dataset.images[character]), rotation, axes=(1, 2))
        matches = [int(np.flatnonzero((candidates == image).all((1, 2)))[0])
                   for image in images[label]]
        assert len(set(matches)) == 5  # k_shot + k_query distinct drawers


def test_labels_are_a_fresh_permutation_every_episode(dataset):
    """With n_way = all classes, ``classes`` is the label ↦ class map: it must vary."""
    upright = episodes.EpisodeDataset(dataset.images, dataset.characters, num_rotations=1)
    batch = episodes.sample_episodes(jax.random.PRNGKey(3), upright, num_tasks=8, n_way=10,
                                     k_shot=2, k_query=3)
    orders = {tuple(row) for row in np.asarray(batch.classes).tolist()}
    assert all(sorted(order) == list(range(10)) for order in orders)
    assert len(orders) == 8


def test_rotation_classes_exist(dataset):
    names = {dataset.class_name(c) for c in range(dataset.num_classes)}
    assert {f"alphabet_1/character03/rot{d}" for d in (0, 90, 180, 270)} <= names
    batch = episodes.sample_episodes(jax.random.PRNGKey(4), dataset, num_tasks=8, n_way=5,
                                     k_shot=2, k_query=3)
    assert set((np.asarray(batch.classes) % 4).ravel().tolist()) == {0, 1, 2, 3}


def test_batched_episodes_jit_and_vmap(dataset):
    batch = episodes.sample_episodes(jax.random.PRNGKey(5), dataset, num_tasks=8, n_way=5,
                                     k_shot=2, k_query=3)
    assert batch.support_images.shape == (8, 10, 20, 20, 1)
    assert batch.query_labels.shape == (8, 15)
    keys = jax.random.split(jax.random.PRNGKey(5), 8)
    second = episodes.sample_episode(keys[1], dataset, n_way=5, k_shot=2, k_query=3)
    np.testing.assert_array_equal(batch.query_images[1], second.query_images)


def test_clear_errors(dataset, synthetic_zip, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        episodes.load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no PNG files"):
        episodes.load_image_folder(tmp_path)
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(synthetic_zip) as source, zipfile.ZipFile(flat, "w") as target:
        name = next(n for n in source.namelist() if n.endswith(".png"))
        target.writestr("a/b.png", source.read(name))
    with pytest.raises(ValueError, match="alphabet/character"):
        episodes.load_image_folder(flat)
    with pytest.raises(ValueError, match="only 40 classes"):
        episodes.sample_episode(jax.random.PRNGKey(0), dataset, n_way=41, k_shot=1, k_query=1)
    with pytest.raises(ValueError, match="each class has only 8"):
        episodes.sample_episode(jax.random.PRNGKey(0), dataset, n_way=5, k_shot=5, k_query=4)
    with pytest.raises(ValueError, match="square"):
        episodes.load_image_folder(synthetic_zip, image_size=(20, 24))


@pytest.mark.skipif(not OMNIGLOT.exists(), reason=f"real Omniglot subset not found at {OMNIGLOT}")
def test_real_omniglot_small1():
    data = episodes.load_image_folder(OMNIGLOT)
    assert len(data.characters) == 136 and data.num_drawers == 20 and data.num_classes == 544
    assert len(set(data.alphabets)) == 5
    assert 0.02 < float(data.images.mean()) < 0.2  # thin ink strokes


def test_merge_datasets_keeps_each_character_once_and_checks_shapes(dataset):
    first = episodes.EpisodeDataset(dataset.images[:6], dataset.characters[:6])
    second = episodes.EpisodeDataset(dataset.images[4:][::-1], dataset.characters[4:][::-1])
    merged = episodes.merge_datasets([first, second])
    assert merged.characters == dataset.characters  # sorted, characters 4 and 5 once
    np.testing.assert_array_equal(merged.images, dataset.images)
    smaller = episodes.EpisodeDataset(dataset.images[:2, :4], dataset.characters[:2])
    with pytest.raises(ValueError, match="differ in"):
        episodes.merge_datasets([first, smaller])
    with pytest.raises(ValueError, match="no datasets"):
        episodes.merge_datasets([])
