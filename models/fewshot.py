r"""Few-shot classification (N-way K-shot Omniglot episodes) as a hierarchical model.

Each episode is a task (Vinyals et al. 2016; Finn et al. 2017, §5.2; Grant et al., ICLR 2018,
§5.2): N classes drawn from the training characters (each rotated by 0/90/180/270° is a class
of its own), their labels permuted at random per episode, K support and ``k_query`` query
images per class (:mod:`numpyro_hbmeta.nn.episodes`). A network classifies the flattened image;
its weights are the task parameters:

    θ ~ N(0, diag(s²))               global weights, s = 1/√fan_in for weights, 1 for biases
    φ_j ~ N(θ, τ² I)                 episode weights, τ = ``TAU`` (fixed)
    y_jn ~ Categorical(softmax f(x_jn; φ_j))

**The network is an MLP on 14×14 images, not MAML's conv4 on 28×28.** Measured on this
2-core CPU (second-order MAML step, 32 episodes of 5-way 1-shot with 5 queries per class):
a 196-64-64-5 MLP took 0.017 s per meta-step, a 784-128-64-5 MLP 0.092 s, and conv4 (32
filters, 28×28) did not finish compiling and 5 steps within 10 minutes. MAML's paper also
reports a fully connected Omniglot learner ("MAML, no conv", Finn et al. 2017, Table 1), the
fair published reference for this model. Every layer is a
:func:`~numpyro_hbmeta.nn.layers.dense_layer`, so ``curvature="kfac"`` (LLAMA) covers every task
parameter. A convolution would need :func:`~numpyro_hbmeta.nn.layers.conv2d_layer` (K-FAC's
convolution factors, Grosse & Martens 2016); one written with plain ``nn.conv2d`` gets a clear
``ValueError`` from ``curvature="kfac"`` ("site ... is not in a declared dense layer"), never
a silent fallback.

Parametrisation: standard (``x @ w + b`` with w ~ N(0, 1/fan_in) at initialisation), so that
MAML's published inner step sizes are comparable. The inner loop descends the *summed* support
negative log-likelihood (the library's convention), so MAML's α on the mean loss over N·K
points is β = α/(N·K) here (0.4/5 = 0.08 for 5-way 1-shot); this MLP adapts better with
β = 2/(N·K) (``FIT_SETTINGS``).

Data: :func:`load_omniglot` reads Omniglot from a path the user gives (argument, or the
environment variable ``HBMETA_OMNIGLOT``; several paths separated by ``os.pathsep``, e.g. both
"small" background zips, whose shared alphabets are kept once). Without a path it generates a
small synthetic stroke-image set (:func:`numpyro_hbmeta.nn.episodes.make_synthetic_omniglot`),
says so with a warning, marks every task label ``"SYNTHETIC ..."`` and sets
:attr:`OmniglotData.synthetic`; nothing is downloaded.

Fixed τ: MAML's and LLAMA's objectives do not involve it (early stopping is the prior);
``LAPLACE_EXACT = False``.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from numpyro_hbmeta.data import TaskData
from numpyro_hbmeta.handlers import tasks
from numpyro_hbmeta.infer.eb import MetaEB
from numpyro_hbmeta.infer.implicit_prior import context_at
from numpyro_hbmeta.infer.posterior import TaskPosterior
from numpyro_hbmeta.infer.precision import as_precision
from numpyro_hbmeta.inner import TruncatedGD
from numpyro_hbmeta.marginal.meta_marginal import meta_marginal
from numpyro_hbmeta.nn import episodes as ep
from numpyro_hbmeta.nn.layers import dense_layer
from numpyro_hbmeta.nn.vec import unvec_mlp
from numpyro_hbmeta.zoo import SMALL_CAPS, FitSettings, ZooModel

SUMMARY = ("N-way K-shot Omniglot episodes (synthetic strokes unless a path / HBMETA_OMNIGLOT "
           "is given); MLP on 14x14 images, K-FAC layers")
GLOBALS = ("theta",)
TASK_SITES = ("phi",)
LAPLACE_EXACT = False

ENV_VAR = "HBMETA_OMNIGLOT"
IMAGE_SIZE = 14
HIDDEN = (128, 64)
TAU = 0.1
N_WAY = 5

# `hbmeta compare fewshot` runs the meta-learners only: NUTS over tens of thousands of weights
# is out of reach and a globals table of 30k rows says nothing. It meta-trains on a fixed batch
# of training episodes and scores fresh test episodes of unseen classes (``compare_report``);
# experiments/omniglot.py meta-trains on fresh episodes per step, as MAML does.
COMPARE_METHODS: tuple[str, ...] = ("maml", "llama")

# Settings for MAML/LLAMA on 5-way 1-shot (``meta_train``), one inner step as MAML's 5-way
# Omniglot runs. MAML's own α = 0.4 on the mean loss of N·K = 5 points is β = 0.08 here;
# measured on real Omniglot (32 episodes per step, 300 steps, 100 test episodes): β = 0.08
# with Adam(1e-3) reached 54% held-out accuracy, β = 0.4 with Adam(1e-3) 60%, β = 0.08 with
# Adam(3e-3) 60%, β = 0.4 with Adam(3e-3) 72%; so β = 2/(N·K) and Adam(3e-3).
# task_draws=False: 33,797 weights per episode and draw are too many to export, and at this
# β the implicit prior needs β·λ < 1 for K-FAC's largest eigenvalue λ: on the synthetic
# --small data 4 of 10 episodes fail after 10 steps (run_eb then reports the task
# posterior as not formed); where draws are asked
# for they come from the K-FAC task posterior (``posterior_curvature``; GGN has no
# Categorical output Fisher).
FIT_SETTINGS = FitSettings(maml_steps=1, maml_step_size=0.4, eb_steps=300,
                           eb_learning_rate=3e-3, llama_curvature="kfac", task_draws=False,
                           posterior_curvature="kfac")


# --------------------------------------------------------------------------- the model


def sizes(n_way: int, *, image_size: int = IMAGE_SIZE,
          hidden: Sequence[int] = HIDDEN) -> tuple[int, ...]:
    """Layer widths (pixels, *hidden, n_way)."""
    return (image_size * image_size, *(int(h) for h in hidden), int(n_way))


def num_params(n_way: int, **kwargs) -> int:
    """Number of weights and biases, e.g. 33,797 for 5-way on 14×14 with 128-64 hidden."""
    return sum((a + 1) * b for a, b in itertools.pairwise(sizes(n_way, **kwargs)))


def prior_scale(layer_sizes: Sequence[int]) -> np.ndarray:
    """s per parameter in :func:`~numpyro_hbmeta.nn.vec.vec_mlp` order: 1/√fan_in, biases 1."""
    return np.concatenate([np.r_[np.full(a * b, 1 / math.sqrt(a)), np.ones(b)]
                           for a, b in itertools.pairwise(layer_sizes)]).astype(np.float32)


def network(phi: jnp.ndarray, x: jnp.ndarray, layer_sizes: Sequence[int]) -> jnp.ndarray:
    """Logits per task: ``phi`` (tasks, d), ``x`` (tasks, points, pixels) -> (tasks, points, N)."""
    params = unvec_mlp(phi, layer_sizes)
    h = x
    num_layers = len(layer_sizes) - 1
    for layer in range(num_layers):
        p = params[f"dense_{layer}"]
        s = dense_layer(f"dense_{layer}", h, p["w"], p["b"])
        h = jax.nn.relu(s) if layer < num_layers - 1 else s
    return h


@functools.cache
def make_model(n_way: int = N_WAY, *, image_size: int = IMAGE_SIZE,
               hidden: tuple[int, ...] = HIDDEN, tau: float = TAU) -> Callable:
    """The hierarchical model for ``n_way``-way episodes (cached: one function per setting).

    The returned ``model(x, y=None)`` takes x: (tasks, points, image_size²) and y: (tasks,
    points) integer labels in 0..n_way−1. It carries ``model.sizes`` and ``model.n_way``.

    Examples:
        >>> model = make_model(5)
        >>> model.sizes, num_params(5)
        ((196, 128, 64, 5), 33797)
    """
    layer_sizes = sizes(n_way, image_size=image_size, hidden=tuple(hidden))
    scale = prior_scale(layer_sizes)

    def model(x, y=None):
        theta = numpyro.sample("theta", dist.Normal(0.0, scale).to_event(1))
        with tasks(x.shape[0], dim=-2):
            phi = numpyro.sample("phi", dist.Normal(theta, tau).to_event(1))  # (tasks, 1, d)
            with numpyro.plate("points", x.shape[1], dim=-1):
                numpyro.sample("y", dist.Categorical(logits=network(phi[:, 0], x, layer_sizes)),
                               obs=y)

    model.sizes = layer_sizes
    model.n_way = int(n_way)
    model.__name__ = f"fewshot_{n_way}way"
    return model


model = make_model(N_WAY)


def init_params(rng_key, n_way: int = N_WAY, **kwargs) -> dict[str, jnp.ndarray]:
    """LeCun initialisation: θ from its prior with zero biases."""
    layer_sizes = sizes(n_way, **kwargs)
    scale = prior_scale(layer_sizes)
    is_bias = np.concatenate([np.r_[np.zeros(a * b), np.ones(b)]
                              for a, b in itertools.pairwise(layer_sizes)]).astype(bool)
    theta = jax.random.normal(rng_key, (scale.size,)) * scale
    return {"theta": jnp.where(is_bias, 0.0, theta)}


# --------------------------------------------------------------------------- data


class OmniglotData(NamedTuple):
    """Train and test classes (disjoint characters) and where they came from.

    Attributes:
        train, test: :class:`~numpyro_hbmeta.nn.episodes.EpisodeDataset`.
        source: the path(s) read, or a sentence saying the images are synthetic.
        synthetic: True when no path was given and generated stroke images are used.
    """

    train: ep.EpisodeDataset
    test: ep.EpisodeDataset
    source: str
    synthetic: bool


SYNTHETIC_WARNING = ("fewshot: no Omniglot path given (argument or ${var}); using SYNTHETIC "
                     "stroke images generated by make_synthetic_omniglot, NOT Omniglot. "
                     "Accuracies on them say nothing about Omniglot.")


def _paths(path: str | os.PathLike | Sequence | None) -> list[Path]:
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    if path is None:
        return []
    if isinstance(path, str | os.PathLike):
        return [Path(p) for p in str(path).split(os.pathsep) if p]
    return [Path(p) for p in path]


def _synthetic(small: bool, image_size: int) -> ep.EpisodeDataset:
    # 40 characters (160 classes with rotations; 80 when small) so that a test split of a
    # quarter of them still holds 20-way episodes.
    alphabets, characters = (2, 10) if small else (4, 10)
    with tempfile.TemporaryDirectory() as folder:
        zip_path = ep.make_synthetic_omniglot(Path(folder) / "synthetic_omniglot.zip",
                                              alphabets=alphabets, characters=characters,
                                              drawers=20, size=28, seed=0)
        return ep.load_image_folder(zip_path, image_size=(image_size, image_size))


def load_omniglot(path: str | os.PathLike | Sequence | None = None, *, small: bool = False,
                  image_size: int = IMAGE_SIZE, train_fraction: float = 0.75,
                  seed: int = 0) -> OmniglotData:
    """Omniglot characters from ``path`` (or ``$HBMETA_OMNIGLOT``), split into train/test.

    Args:
        path: a zip or folder in Omniglot's layout, several of them (a sequence, or a string
            joined by ``os.pathsep``), or None for the environment variable; if that is unset
            too, a synthetic stroke set is generated, with a warning.
        small: use a smaller synthetic set (no effect on real data).
        image_size: side of the area-resized images.
        train_fraction: share of characters used for meta-training (rotations stay together).
        seed: seed of the character split.
    """
    paths = _paths(path)
    if not paths:
        warnings.warn(SYNTHETIC_WARNING.replace("${var}", ENV_VAR), stacklevel=2)
        data = _synthetic(small, image_size)
        source = ("SYNTHETIC stroke images (make_synthetic_omniglot), not Omniglot: "
                  f"{len(data.characters)} characters")
    else:
        data = ep.merge_datasets([ep.load_image_folder(p, image_size=(image_size, image_size))
                                  for p in paths])
        source = " + ".join(str(p) for p in paths)
    train, test = ep.train_test_split(data, train_fraction=train_fraction, seed=seed)
    return OmniglotData(train, test, source, not paths)


def episode_data(episode: ep.Episode) -> tuple[dict[str, jnp.ndarray], dict[str, jnp.ndarray]]:
    """(support, query) keyword-argument dicts of the model from a batch of episodes."""
    def flat(images):
        return images.reshape(*images.shape[:-3], -1)

    return ({"x": flat(episode.support_images), "y": episode.support_labels},
            {"x": flat(episode.query_images), "y": episode.query_labels})


def sample_tasks(rng_key, dataset: ep.EpisodeDataset, *, num_tasks: int, n_way: int,
                 k_shot: int, k_query: int) -> tuple[dict, dict]:
    """``num_tasks`` episodes as (support, query) dicts, x: (tasks, N·K, pixels)."""
    batch = ep.sample_episodes(rng_key, dataset, num_tasks=num_tasks, n_way=n_way,
                               k_shot=k_shot, k_query=k_query)
    return episode_data(batch)


def load_data(rng_key=None, *, small: bool = False, path=None, n_way: int = N_WAY,
              k_shot: int = 1, k_query: int = 5) -> TaskData:
    """A fixed batch of training episodes: 25 (10 when ``small``) ``n_way``-way ``k_shot``.

    Episodes come from the training characters of :func:`load_omniglot` (``path`` or
    ``$HBMETA_OMNIGLOT``; synthetic images otherwise, flagged in the task labels and by a
    warning). Meta-training on fresh episodes is :func:`meta_train`.
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    data = load_omniglot(path, small=small)
    num_tasks = 10 if small else 25
    support, query = sample_tasks(rng_key, data.train, num_tasks=num_tasks, n_way=n_way,
                                  k_shot=k_shot, k_query=k_query)
    prefix = "SYNTHETIC episode" if data.synthetic else "episode"
    return TaskData(support=support, query=query,
                    task_labels=[f"{prefix} {j}" for j in range(num_tasks)], truth=None)


# --------------------------------------------------------------------------- meta-training


class FewShotFit(NamedTuple):
    """Result of :func:`meta_train`.

    Attributes:
        params: constrained globals ``{"theta": (d,)}``.
        losses: (num_steps,) query negative log-likelihood per query point (LLAMA: plus its
            η log det penalty per point), on each step's fresh training episodes.
        eval_steps: steps at which ``eval_tasks`` were scored.
        eval_accuracy: mean query accuracy on ``eval_tasks`` at those steps.
        seconds_per_step: wall time per meta-iteration after compilation.
        compile_seconds: time of the first (compiling) step.
    """

    params: dict[str, jnp.ndarray]
    losses: np.ndarray
    eval_steps: np.ndarray
    eval_accuracy: np.ndarray
    seconds_per_step: float
    compile_seconds: float


def meta_train(driver: MetaEB, rng_key, dataset: ep.EpisodeDataset, num_steps: int, *,
               n_way: int, k_shot: int, k_query: int = 5, tasks_per_batch: int = 32,
               init_params: Mapping[str, Any] | None = None,
               eval_tasks: tuple[dict, dict] | None = None, eval_every: int = 0,
               progress_bar: bool = True) -> FewShotFit:
    """Meta-train ``driver`` (a :class:`~numpyro_hbmeta.MetaEB`) on fresh episodes per step.

    MAML's protocol (Finn et al. 2017, Alg. 2): every meta-iteration draws
    ``tasks_per_batch`` new episodes from ``dataset`` and takes one optimiser step on
    −Σ_j objective_j. This is :meth:`MetaEB.run` with a ``task_source`` (a jitted episode
    sampler), run in segments of ``eval_every`` steps that resume each other
    (``init_state``) so held-out accuracy can be scored between them.

    Args:
        driver: a ``MetaEB`` on a :func:`make_model` model (objective ``maml`` or ``llama``).
        rng_key: PRNG key (initialisation and episodes).
        dataset: training classes.
        num_steps: meta-iterations.
        n_way: classes per episode.
        k_shot: support images per class.
        k_query: query images per class.
        tasks_per_batch: episodes per meta-iteration.
        init_params: constrained start (default :func:`init_params`).
        eval_tasks: optional fixed (support, query) episodes scored every ``eval_every`` steps
            (a learning curve of held-out accuracy).
        eval_every: steps between evaluations (0: never).
        progress_bar: show progress.

    Raises:
        FloatingPointError: a refused step (non-finite objective), with the driver's
            diagnosis.
    """
    model = driver.model
    key_init, key_run = jax.random.split(rng_key)
    if init_params is None:
        init_params = init_params_for(model, key_init)
    source = jax.jit(functools.partial(sample_tasks, dataset=dataset,
                                       num_tasks=tasks_per_batch, n_way=n_way,
                                       k_shot=k_shot, k_query=k_query))
    num_points = tasks_per_batch * n_way * k_query
    evaluator = (Evaluator(model, driver.inner)
                 if eval_tasks is not None and eval_every else None)
    # Segment ends: after step 1 (its time is the compilation), at every evaluation, at the end.
    ends = sorted({1, num_steps, *range(eval_every, num_steps, eval_every or num_steps)}
                  if evaluator is not None else {1, num_steps})
    eval_steps, eval_accuracy, losses = [], [], []
    state, params = None, dict(init_params)
    compile_seconds, elapsed, done = 0.0, 0.0, 0
    for end in ends:
        if evaluator is not None and done % eval_every == 0:
            eval_steps.append(done)
            eval_accuracy.append(float(np.mean(evaluator.accuracy(params, *eval_tasks))))
        start = time.perf_counter()
        fit = driver.run(key_run, end - done, task_source=lambda key, step: source(key),
                         init_params=init_params if state is None else None,
                         init_state=state, progress_bar=progress_bar and end > 1,
                         final_checks=end == num_steps)
        seconds = time.perf_counter() - start
        if state is None:
            compile_seconds = seconds
        else:
            elapsed += seconds
        state, params, done = fit.state, {"theta": fit.params["theta"]}, end
        losses.append(np.asarray(fit.losses) / num_points)
    if evaluator is not None:
        eval_steps.append(num_steps)
        eval_accuracy.append(float(np.mean(evaluator.accuracy(params, *eval_tasks))))
    timed = num_steps - 1
    return FewShotFit(params, np.concatenate(losses), np.asarray(eval_steps),
                      np.asarray(eval_accuracy),
                      elapsed / timed if timed else float("nan"), compile_seconds)


def init_params_for(model: Callable, rng_key) -> dict[str, jnp.ndarray]:
    """:func:`init_params` for a :func:`make_model` model."""
    hidden = tuple(model.sizes[1:-1])
    return init_params(rng_key, model.n_way, image_size=math.isqrt(model.sizes[0]),
                       hidden=hidden)


# --------------------------------------------------------------------------- evaluation


@functools.cache
def _probabilities_fn(model: Callable, inner: TruncatedGD) -> Callable:
    marginal = meta_marginal(model, inner=inner, objective="maml")

    def probabilities(params, support, query, curvature=None, rng_key=None,
                      num_samples: int = 0):
        context = context_at(model, params, support)
        phi_hat, _ = marginal.solve(context, support)
        if curvature is None:
            return jax.nn.softmax(network(phi_hat, query["x"], model.sizes))
        # Laplace predictive: average softmax over φ ~ N(φ̂, Ĥ⁻¹), Ĥ the curvature of the
        # support negative log-likelihood at φ̂ as given (its damping is the prior
        # precision), in its own structure (Kronecker for K-FAC).
        support_nll = marginal.inner_loss(context, support)
        precision = as_precision(curvature(support_nll, phi_hat,
                                           context.observations(model, support)))
        draws = TaskPosterior(phi_hat, precision).sample(rng_key, (num_samples,))
        logits = jax.vmap(lambda phi: network(phi, query["x"], model.sizes))(draws)
        return jnp.mean(jax.nn.softmax(logits), 0)

    return jax.jit(probabilities, static_argnames=("curvature", "num_samples"))


class Evaluator:
    """Adapt to each episode's support set and predict its query set (jit once per shape).

    Args:
        model: a :func:`make_model` model.
        inner: the inner solver used at test time (``TruncatedGD``), MAML's φ̂_j.
    """

    def __init__(self, model: Callable, inner: TruncatedGD) -> None:
        self.model, self.inner = model, inner
        self._probs = _probabilities_fn(model, inner)  # shared: one compile per shape

    def probabilities(self, params, support, query, *, curvature=None, rng_key=None,
                      num_samples: int = 0, chunk: int = 50) -> np.ndarray:
        """Query class probabilities (tasks, points, N), in chunks of ``chunk`` episodes.

        With ``curvature`` (e.g. ``KFAC(damping=δ)``) the Laplace predictive averaged over
        ``num_samples`` draws of φ_j ~ N(φ̂_j, (F_j + δI)⁻¹); otherwise the plug-in softmax at φ̂_j.
        """
        num_tasks = support["x"].shape[0]
        out = []
        rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        for start in range(0, num_tasks, chunk):
            index = np.arange(start, min(start + chunk, num_tasks))
            if index.size < chunk and num_tasks > chunk:  # keep one compiled shape
                index = np.arange(num_tasks - chunk, num_tasks)
            part = [{k: v[index] for k, v in d.items()} for d in (support, query)]
            probs = self._probs(dict(params), *part, curvature=curvature,
                                rng_key=jax.random.fold_in(rng_key, start),
                                num_samples=num_samples)
            keep = slice(start - index[0], None)
            out.append(np.asarray(probs)[keep])
        return np.concatenate(out)[:num_tasks]

    def accuracy(self, params, support, query, **kwargs) -> np.ndarray:
        """Query accuracy per episode, (tasks,)."""
        probs = self.probabilities(params, support, query, **kwargs)
        return np.mean(np.argmax(probs, -1) == np.asarray(query["y"]), -1)


def mean_interval(values: np.ndarray, z: float = 1.959964) -> tuple[float, float]:
    """Mean and half-width of its normal 95% interval over episodes, z·sd/√n (MAML's ±)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(z * values.std(ddof=1) / math.sqrt(values.size))


# --------------------------------------------------------------------------- hbmeta compare


def compare_report(results, data: TaskData, out, *, small: bool = False,
                   num_episodes: int = 100) -> tuple[str, str, list[str]]:
    """``hbmeta compare fewshot``'s table: accuracy on ``num_episodes`` fresh test episodes.

    The test episodes are ``N_WAY``-way with the support and query sizes of ``data``, drawn
    from the *test* characters of :func:`load_omniglot` (the same source and split as
    :func:`load_data` with this ``small``). Each fit is scored after adaptation (its own
    inner solver, MAML's φ̂_j) and, for MAML, at θ̂ without adaptation; the ± is the normal
    95% half-width over episodes (:func:`mean_interval`).

    Returns:
        ``(caption, markdown table, extra report lines)``.
    """
    del out
    from numpyro_hbmeta.output.report import markdown_table  # outputs layer, only needed here

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_data already warned about synthetic images
        omniglot = load_omniglot(small=small)
    num_support, num_query = data.support["y"].shape[1], data.query["y"].shape[1]
    support, query = sample_tasks(jax.random.PRNGKey(20170309), omniglot.test,
                                  num_tasks=num_episodes, n_way=N_WAY,
                                  k_shot=num_support // N_WAY, k_query=num_query // N_WAY)
    header = ["method", "predictive", "test accuracy (95% interval)"]
    rows = []
    for result in results:
        params = {"theta": jnp.asarray(result.samples["theta"])[0, 0]}
        steps = int(result.info.get("inner_num_steps", FIT_SETTINGS.maml_steps))
        beta = float(result.info.get("inner_step_size", FIT_SETTINGS.maml_step_size))
        solvers = [("plug-in at φ̂", TruncatedGD(steps, beta))]
        if result.method == "maml":
            solvers.insert(0, ("at θ̂ (no adaptation)", TruncatedGD(0, beta)))
        for label, inner in solvers:
            accuracy = Evaluator(model, inner).accuracy(params, support, query)
            mean, half = mean_interval(accuracy)
            rows.append([result.method, label, f"{mean:.3f} ± {half:.3f}"])
    kind = "SYNTHETIC stroke images, not Omniglot" if omniglot.synthetic else omniglot.source
    caption = (f"Query accuracy on {num_episodes} fresh {N_WAY}-way test episodes of unseen "
               f"characters ({kind}); chance is {1 / N_WAY:.2f}. The globals are "
               f"{num_params(N_WAY):,} network weights, whose table says nothing.")
    return caption, markdown_table(header, rows), []


ZOO_MODEL = ZooModel(
    name="fewshot", summary=SUMMARY, model=model, load_data=load_data, globals=GLOBALS,
    task_sites=TASK_SITES, laplace_exact=LAPLACE_EXACT,
    default_methods=("maml",), compare_methods=COMPARE_METHODS, fit=FIT_SETTINGS,
    small_fit=FIT_SETTINGS.shortened({**SMALL_CAPS, "eb_steps": 100}),
    init_params=init_params, compare_report=compare_report,
)
