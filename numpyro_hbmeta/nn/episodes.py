"""N-way K-shot episodes from an image folder in Omniglot's layout.

Few-shot classification tasks (Vinyals et al. 2016; Finn et al. 2017, §5.2; Grant et al.,
ICLR 2018, on miniImageNet): a task j draws N classes, K support and K' query images per
class, and relabels the classes 0..N−1 in a random order, so that a learner cannot memorise
labels across tasks. Following MAML, each character rotated by 0°, 90°, 180° and 270° is a
class of its own (Santoro et al. 2016), and the train/test split is made on characters (or
alphabets), so that the rotations of one character never straddle the split.

Images are read from ``root/alphabet/character/*.png``, either an unpacked directory or a
``.zip`` read in place (no extraction), optionally under one top folder (as in Omniglot's
``images_background.zip``). PNGs are decoded by ``matplotlib.image.imread``, converted to
float32 grey levels in [0, 1] with ink = 1 (Omniglot draws black on white, so images whose
mean is above 1/2 are inverted unless ``invert`` says otherwise) and resized by area averaging
(:func:`resize_area`).

Sampling is pure JAX (:func:`sample_episode`): deterministic for a key, ``jit``- and
``vmap``-safe; the dataset is a pytree whose only array is the image stack.

Examples:
    >>> import jax, tempfile, pathlib
    >>> path = make_synthetic_omniglot(pathlib.Path(tempfile.mkdtemp()) / "toy.zip")
    >>> data = load_image_folder(path)
    >>> data.num_classes, data.images.shape
    (40, (10, 20, 28, 28))
    >>> episode = sample_episode(jax.random.PRNGKey(0), data, n_way=5, k_shot=1, k_query=15)
    >>> episode.support_images.shape, episode.query_labels.shape
    ((5, 28, 28, 1), (75,))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Episode",
    "EpisodeDataset",
    "load_image_folder",
    "make_synthetic_omniglot",
    "merge_datasets",
    "resize_area",
    "sample_episode",
    "sample_episodes",
    "train_test_split",
]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["images"],
                   meta_fields=["characters", "num_rotations"])
@dataclasses.dataclass(frozen=True)
class EpisodeDataset:
    """Images grouped by character; class c is character c // R rotated by 90°·(c mod R).

    Attributes:
        images: float32 array (characters, drawers, H, W), ink = 1.
        characters: names ``"alphabet/character"``, one per row of ``images``.
        num_rotations: R, 4 (rotations as extra classes, as in MAML) or 1.
    """

    images: jnp.ndarray
    characters: tuple[str, ...]
    num_rotations: int = 4

    @property
    def num_classes(self) -> int:
        """Characters × rotations."""
        return len(self.characters) * self.num_rotations

    @property
    def num_drawers(self) -> int:
        """Images per character."""
        return self.images.shape[1]

    @property
    def alphabets(self) -> tuple[str, ...]:
        """The alphabet of each character."""
        return tuple(name.split("/")[0] for name in self.characters)

    def class_name(self, label: int) -> str:
        """``"alphabet/character/rot<degrees>"`` of class ``label``."""
        character, rotation = divmod(int(label), self.num_rotations)
        return f"{self.characters[character]}/rot{90 * rotation}"


class Episode(NamedTuple):
    """One N-way K-shot task (or a batch of them, with a leading (tasks,) axis).

    Support and query are class-major: entries l·K .. (l+1)·K − 1 have label l.

    Attributes:
        support_images: (n_way·k_shot, H, W, 1) float32.
        support_labels: (n_way·k_shot,) int32.
        query_images: (n_way·k_query, H, W, 1) float32.
        query_labels: (n_way·k_query,) int32.
        classes: (n_way,) int32, the dataset class behind each label.
    """

    support_images: jnp.ndarray
    support_labels: jnp.ndarray
    query_images: jnp.ndarray
    query_labels: jnp.ndarray
    classes: jnp.ndarray


# --------------------------------------------------------------------------- images


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging weights: output pixel i covers [i, i+1)·n_in/n_out."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    pixels = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, pixels + 1) - np.maximum(lo, pixels), 0.0, None)
    return overlap / overlap.sum(1, keepdims=True)


def resize_area(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (..., H, W) images to (..., h, w) by area averaging.

    Output pixel (i, j) is the mean of the input over the rectangle it covers, fractions of
    pixels weighted by their covered area (OpenCV's ``INTER_AREA`` for shrinking); enlarging
    becomes a box filter. Separable: Y = R_h X R_wᵀ.
    """
    height, width = images.shape[-2:]
    rows, cols = _area_weights(height, size[0]), _area_weights(width, size[1])
    return (rows @ np.asarray(images, np.float64) @ cols.T).astype(np.float32)


def _decode_png(file: BinaryIO, invert: bool | None) -> np.ndarray:
    import matplotlib.image  # deferred: only loading needs it

    image = np.asarray(matplotlib.image.imread(file, format="png"))
    if np.issubdtype(image.dtype, np.integer):
        image = image / np.iinfo(image.dtype).max
    if image.ndim == 3:
        image = image[..., :3].mean(-1)  # RGB(A) to grey; alpha ignored
    image = image.astype(np.float32)
    if invert is None:
        invert = bool(image.mean() > 0.5)  # background is the majority of pixels
    return 1.0 - image if invert else image


# --------------------------------------------------------------------------- folders


def _split_zip_path(root: Path) -> tuple[Path, str] | None:
    """(zip file, folder inside it) for ``a.zip`` or ``a.zip/inner/folder``; else None."""
    for candidate in (root, *root.parents):
        if candidate.suffix.lower() == ".zip" and candidate.is_file():
            inner = root.relative_to(candidate).as_posix()
            return candidate, "" if inner == "." else inner
    return None


@contextlib.contextmanager
def _png_sources(root: Path) -> Iterator[dict[tuple[str, ...], Callable[[], BinaryIO]]]:
    """Relative path parts of every file under ``root`` -> a function opening it."""
    zipped = _split_zip_path(root)
    if zipped is None:
        if not root.exists():
            raise FileNotFoundError(f"image folder: {root} does not exist")
        if not root.is_dir():
            raise ValueError(f"image folder: {root} is neither a directory nor a .zip file")
        yield {path.relative_to(root).parts: functools.partial(open, path, "rb")
               for path in root.rglob("*") if path.is_file()}
        return
    prefix = tuple(part for part in zipped[1].split("/") if part)
    with zipfile.ZipFile(zipped[0]) as archive:
        sources = {}
        for name in archive.namelist():
            parts = tuple(part for part in name.split("/") if part)
            if parts[:len(prefix)] == prefix and not name.endswith("/"):
                sources[parts[len(prefix):]] = functools.partial(_read_member, archive, name)
        if not sources:
            raise FileNotFoundError(f"image folder: {zipped[0]} has no folder {zipped[1]!r}")
        yield sources


def _read_member(archive: zipfile.ZipFile, name: str) -> BinaryIO:
    return io.BytesIO(archive.read(name))


def _group_characters(paths: Iterable[tuple[str, ...]], root: Path
                      ) -> dict[str, list[tuple[str, ...]]]:
    """``"alphabet/character"`` -> its PNG paths (as given), sorted by file name.

    One folder common to every PNG above the alphabets is skipped.
    """
    pngs = [p for p in paths if p[-1].lower().endswith(".png")
            and not any(part.startswith((".", "__MACOSX")) for part in p)]
    if not pngs:
        raise ValueError(f"image folder: no PNG files under {root}; expected "
                         "root/alphabet/character/*.png")
    skip = int({len(p) for p in pngs} == {4} and len({p[0] for p in pngs}) == 1)
    wrong = [p for p in pngs if len(p) - skip != 3]
    if wrong:
        raise ValueError(f"image folder: expected root/alphabet/character/*.png (optionally "
                         f"under one top folder) in {root}, found {'/'.join(wrong[0])!r}")
    groups: dict[str, list[tuple[str, ...]]] = {}
    for path in pngs:
        groups.setdefault(f"{path[skip]}/{path[skip + 1]}", []).append(path)
    return {name: sorted(groups[name]) for name in sorted(groups)}


def _equal_counts(groups: dict[str, list[tuple[str, ...]]]) -> int:
    counts = {name: len(paths) for name, paths in groups.items()}
    fewest = min(counts.values())
    if fewest != max(counts.values()):
        warnings.warn(f"image folder: characters have {fewest} to {max(counts.values())} "
                      f"images; every character is truncated to the first {fewest}",
                      stacklevel=3)
    return fewest


def load_image_folder(root: str | os.PathLike, *, image_size: tuple[int, int] = (28, 28),
                      invert: bool | None = None, rotations: bool = True) -> EpisodeDataset:
    """Load every character of ``root/alphabet/character/*.png`` into memory.

    Args:
        root: a directory, a ``.zip`` file, or a folder inside a zip (``data.zip/top``); one
            common top folder above the alphabets is skipped.
        image_size: (H, W) after area resizing (28×28 as in MAML's Omniglot experiments).
        invert: True/False to invert every image; None inverts images whose mean is above
            1/2, so ink (the minority of pixels) becomes 1.
        rotations: each character × {0°, 90°, 180°, 270°} is its own class (requires H = W).

    Returns:
        An :class:`EpisodeDataset`; characters sorted by alphabet then name, images within a
        character sorted by file name (truncated to the smallest count, with a warning).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no PNGs, or not the alphabet/character layout, or rotations of
            non-square images.
    """
    root = Path(root)
    image_size = (int(image_size[0]), int(image_size[1]))
    if rotations and image_size[0] != image_size[1]:
        raise ValueError(f"load_image_folder: rotations need square images, got {image_size}")
    with _png_sources(root) as sources:
        groups = _group_characters(sources, root)
        count = _equal_counts(groups)
        images = np.empty((len(groups), count, *image_size), np.float32)
        for row, paths in enumerate(groups.values()):
            for column, path in enumerate(paths[:count]):
                with sources[path]() as file:
                    images[row, column] = resize_area(_decode_png(file, invert), image_size)
    return EpisodeDataset(jnp.asarray(images), tuple(groups), 4 if rotations else 1)


def merge_datasets(datasets: Iterable[EpisodeDataset]) -> EpisodeDataset:
    """Join datasets by character, keeping a character that appears in several only once.

    Omniglot's two "small" background sets share the Greek and Latin alphabets (identical
    images); the first occurrence of each ``"alphabet/character"`` is kept. Characters are
    sorted by name, as :func:`load_image_folder` does.

    Raises:
        ValueError: no datasets, or they differ in image shape, drawer count or rotations.
    """
    datasets = list(datasets)
    if not datasets:
        raise ValueError("merge_datasets: no datasets given")
    shapes = {tuple(d.images.shape[1:]) for d in datasets}
    rotations = {d.num_rotations for d in datasets}
    if len(shapes) > 1 or len(rotations) > 1:
        raise ValueError(f"merge_datasets: datasets differ in (drawers, H, W) {sorted(shapes)} "
                         f"or rotations {sorted(rotations)}")
    rows: dict[str, jnp.ndarray] = {}
    for data in datasets:
        for name, images in zip(data.characters, data.images, strict=True):
            rows.setdefault(name, images)
    names = tuple(sorted(rows))
    return EpisodeDataset(jnp.stack([rows[n] for n in names]), names, rotations.pop())


def train_test_split(dataset: EpisodeDataset, *, num_train: int | None = None,
                     train_fraction: float = 0.75, by: str = "character", seed: int = 0
                     ) -> tuple[EpisodeDataset, EpisodeDataset]:
    """Deterministic split into disjoint train and test classes.

    Characters (``by="character"``, as MAML's 1200/423 Omniglot split) or whole alphabets
    (``by="alphabet"``, as Omniglot's background/evaluation split) are shuffled with
    ``numpy.random.default_rng(seed)``; the first ``num_train`` (default
    round(train_fraction · count)) go to train. All rotations of a character stay together.

    Returns:
        (train, test) datasets, each keeping the original character order.
    """
    if by not in ("character", "alphabet"):
        raise ValueError(f"train_test_split: by must be 'character' or 'alphabet', got {by!r}")
    units = sorted(set(dataset.characters if by == "character" else dataset.alphabets))
    num_train = round(train_fraction * len(units)) if num_train is None else int(num_train)
    if not 0 < num_train < len(units):
        raise ValueError(f"train_test_split: {num_train} training {by}s out of {len(units)} "
                         "leaves an empty split")
    order = np.random.default_rng(seed).permutation(len(units))
    train_units = {units[i] for i in order[:num_train]}
    keys = dataset.characters if by == "character" else dataset.alphabets
    in_train = np.array([key in train_units for key in keys])

    def subset(mask: np.ndarray) -> EpisodeDataset:
        rows = np.flatnonzero(mask)
        return EpisodeDataset(dataset.images[rows], tuple(dataset.characters[i] for i in rows),
                              dataset.num_rotations)

    return subset(in_train), subset(~in_train)


# --------------------------------------------------------------------------- episodes


def _check_episode(dataset: EpisodeDataset, n_way: int, k_shot: int, k_query: int) -> None:
    if min(n_way, k_shot) < 1 or k_query < 0:
        raise ValueError(f"sample_episode: need n_way, k_shot ≥ 1 and k_query ≥ 0, got "
                         f"n_way={n_way}, k_shot={k_shot}, k_query={k_query}")
    if n_way > dataset.num_classes:
        raise ValueError(f"sample_episode: n_way={n_way} but the dataset has only "
                         f"{dataset.num_classes} classes")
    if k_shot + k_query > dataset.num_drawers:
        raise ValueError(f"sample_episode: k_shot + k_query = {k_shot + k_query} images per "
                         f"class but each class has only {dataset.num_drawers}")
    height, width = dataset.images.shape[-2:]
    if dataset.num_rotations > 1 and height != width:
        raise ValueError(f"sample_episode: rotations need square images, got {(height, width)}")


def _rotation_index(height: int, num_rotations: int) -> np.ndarray:
    """(R, H·H) pixel gathers: flat image[index[r]] = np.rot90(image, r) (counter-clockwise)."""
    grid = np.arange(height * height).reshape(height, height)
    return np.stack([np.rot90(grid, r).reshape(-1) for r in range(num_rotations)])


@functools.partial(jax.jit, static_argnames=("n_way", "k_shot", "k_query"))
def sample_episode(rng_key: jax.Array, dataset: EpisodeDataset, *, n_way: int, k_shot: int,
                   k_query: int) -> Episode:
    """Draw one N-way K-shot episode.

    N classes are drawn without replacement in a uniformly random order, so label l ↔
    ``classes[l]`` is a fresh random relabelling every episode; then k_shot + k_query distinct
    images (drawers) per class, the first k_shot forming the support set.

    Args:
        rng_key: PRNG key; the same key gives the same episode.
        dataset: an :class:`EpisodeDataset`.
        n_way: N, classes per task.
        k_shot: K, support images per class.
        k_query: query images per class.

    Returns:
        An :class:`Episode`.
    """
    _check_episode(dataset, n_way, k_shot, k_query)
    per_class = k_shot + k_query
    num_classes, num_drawers = dataset.num_classes, dataset.num_drawers
    # Sorting iid random words gives a uniformly random order (ties, of probability about
    # C²/2³³, only bias it); one draw for classes and drawers keeps the program small.
    words = jax.random.bits(rng_key, (num_classes + n_way * num_drawers,))
    classes = jnp.argsort(words[:num_classes])[:n_way]
    drawers = jnp.argsort(words[num_classes:].reshape(n_way, num_drawers), axis=-1)
    drawers = drawers[:, :per_class]
    characters, rotations = jnp.divmod(classes, dataset.num_rotations)
    images = dataset.images[characters[:, None], drawers].reshape(n_way, per_class, -1)
    if dataset.num_rotations > 1:
        index = jnp.asarray(_rotation_index(dataset.images.shape[-1], dataset.num_rotations))
        images = jnp.take_along_axis(images, index[rotations][:, None, :], axis=-1)
    images = images.reshape(n_way, per_class, *dataset.images.shape[-2:], 1)
    labels = jnp.arange(n_way, dtype=jnp.int32)
    return Episode(
        support_images=images[:, :k_shot].reshape(n_way * k_shot, *images.shape[2:]),
        support_labels=jnp.repeat(labels, k_shot),
        query_images=images[:, k_shot:].reshape(n_way * k_query, *images.shape[2:]),
        query_labels=jnp.repeat(labels, k_query),
        classes=classes.astype(jnp.int32),
    )


@functools.partial(jax.jit, static_argnames=("num_tasks", "n_way", "k_shot", "k_query"))
def sample_episodes(rng_key: jax.Array, dataset: EpisodeDataset, *, num_tasks: int, n_way: int,
                    k_shot: int, k_query: int) -> Episode:
    """A batch of independent episodes, every field with a leading (tasks,) axis.

    Task j is ``sample_episode(jax.random.split(rng_key, num_tasks)[j], ...)``.
    """
    keys = jax.random.split(rng_key, num_tasks)
    return jax.vmap(lambda key: sample_episode(key, dataset, n_way=n_way, k_shot=k_shot,
                                               k_query=k_query))(keys)


# --------------------------------------------------------------------------- synthetic data


def _draw_strokes(strokes: np.ndarray, size: int, width: float) -> np.ndarray:
    """Ink mask (size, size) of line segments strokes[s] = ((y0, x0), (y1, x1)) in [0, 1]²."""
    centers = (np.arange(size) + 0.5) / size
    points = np.stack(np.meshgrid(centers, centers, indexing="ij"), -1)[:, :, None, :]
    start, end = strokes[:, 0], strokes[:, 1]
    direction = end - start
    t = np.clip(np.sum((points - start) * direction, -1)
                / np.maximum(np.sum(direction**2, -1), 1e-12), 0.0, 1.0)
    distance = np.linalg.norm(points - (start + t[..., None] * direction), axis=-1)
    return np.any(distance < width, axis=-1)


def make_synthetic_omniglot(path: str | os.PathLike, *, alphabets: int = 2, characters: int = 5,
                            drawers: int = 20, size: int = 28, strokes: int = 3,
                            seed: int = 0) -> Path:
    """Write a tiny zip in Omniglot's layout, for tests and examples (nothing is downloaded).

    ``<stem>/alphabet_<a>/character<cc>/<id>_<dd>.png``: each character is a few random
    strokes, and each drawer moves the stroke ends by a few percent of the image; black ink on
    white, saved as RGBA by ``matplotlib.image.imsave``, as Omniglot's are black on white.

    Args:
        path: the zip to write (its stem names the top folder).
        alphabets: number of alphabets.
        characters: characters per alphabet.
        drawers: drawings of each character.
        size: image side in pixels.
        strokes: line segments per character.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    import matplotlib.image  # deferred: only writing needs it

    path = Path(path)
    rng = np.random.default_rng(seed)
    character_id = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for a in range(alphabets):
            for c in range(characters):
                character_id += 1
                glyph = rng.uniform(0.15, 0.85, size=(strokes, 2, 2))
                for d in range(drawers):
                    jittered = glyph + rng.normal(0.0, 0.03, size=glyph.shape)
                    ink = _draw_strokes(jittered, size, width=0.07)
                    buffer = io.BytesIO()
                    matplotlib.image.imsave(buffer, 1.0 - ink.astype(np.float32), cmap="gray",
                                            vmin=0.0, vmax=1.0, format="png")
                    name = (f"{path.stem}/alphabet_{a}/character{c + 1:02d}/"
                            f"{character_id:04d}_{d + 1:02d}.png")
                    archive.writestr(name, buffer.getvalue())
    return path
