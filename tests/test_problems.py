"""The offline problem suite: analytic optima against their closed forms, data problems learn,
common random numbers, divergence, and the optimizer registry."""

import inspect
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rmsprop.tools import problems  # noqa: E402
from rmsprop.tools.problems import optimizers as O  # noqa: E402

S2 = math.sqrt(2.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: extra intra-op threads only contend on a shared 2-core CI machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
# Global minimizers and minima from the literature (Jamil & Yang 2013; benchmarks.md section 5),
# not from our code. Himmelblau's three irrational minima are known to 6 decimals.
OPTIMA = {
    "rosenbrock": ([(1.0, 1.0)], 0.0, 1e-12),
    "rosenbrock-noisy": ([(1.0, 1.0)], 0.0, 1e-12),
    "beale": ([(3.0, 0.5)], 0.0, 1e-12),
    "rastrigin": ([(0.0, 0.0)], 0.0, 1e-12),
    "himmelblau": ([(3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186),
                    (3.584428, -1.848126)], 0.0, 1e-4),
    "saddle": ([(0.0, S2), (0.0, -S2)], -1.0, 1e-12),
    "rosenbrock-20d": ([(1.0,) * 20], 0.0, 1e-12),
    "rastrigin-10d": ([(0.0,) * 10], 0.0, 1e-12),
    "quadratic-100d": ([(0.0,) * 100], 0.0, 1e-12),
}


def _grad(prob, x):
    p = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    if isinstance(prob, problems.NoisyQuadratic):
        q = torch.tensor(prob.hessian())
        f = 0.5 * p @ q @ p
    else:
        f = prob.value(p)
    f.backward()
    return float(f.detach()), p.grad.numpy()


def test_every_analytic_problem_is_covered():
    analytic = [n for n in problems.names() if problems.get(n).kind == "analytic"]
    assert sorted(analytic) == sorted(OPTIMA)


@pytest.mark.parametrize("name", sorted(OPTIMA))
def test_known_optimum_value_and_zero_gradient(name):
    prob = problems.get(name)
    points, fmin, tol = OPTIMA[name]
    assert prob.known_min == fmin
    for x in points:
        f, g = _grad(prob, x)
        assert f == pytest.approx(fmin, abs=tol)
        assert np.abs(g).max() < max(tol, 1e-10) * 100
        # and it is a minimum: every small perturbation increases f
        rng = np.random.default_rng(0)
        for _ in range(5):
            y = np.asarray(x) + 1e-3 * rng.standard_normal(len(x))
            assert _grad(prob, y)[0] > f


def test_noisy_quadratic_spectrum_matches_deepobs_recipe():
    q = problems.get("quadratic-100d").hessian()
    assert np.allclose(q, q.T)
    eig = np.sort(np.linalg.eigvalsh(q))
    assert ((eig[:90] > 0) & (eig[:90] < 1)).all()
    assert ((eig[90:] > 30) & (eig[90:] < 60)).all()
    assert np.array_equal(q, problems.get("quadratic-100d").hessian())  # fixed, RandomState(42)


def _adam(lr=1e-2):
    return lambda ps: torch.optim.Adam(ps, lr=lr)


@pytest.mark.parametrize("name", ["logreg-cancer", "mlp-digits", "cnn-digits", "mlp-diabetes",
                                  "lstm-adding",
                                  pytest.param("mlp-mnist1d", marks=pytest.mark.slow)])
def test_data_problem_learns(name):
    prob = problems.get(name)
    if prob.missing():
        pytest.skip(f"needs {prob.missing()}")
    r = prob.run(_adam(), seed=1, steps=40)
    assert not r.diverged
    assert r.eval_loss[-1] < 0.9 * r.eval_loss[0]
    assert r.test_loss is not None and math.isfinite(r.test_loss)
    assert len(r.train_loss) == 40 and r.eval_steps[0] == 0 and r.eval_steps[-1] == 40
    if prob.metric_name == "accuracy":
        assert 0.0 <= r.final_eval_metric <= 1.0 and r.final_eval_metric > 0.2  # chance: 0.1


def test_common_random_numbers():
    prob = problems.get("mlp-digits")
    a = prob.run(_adam(), seed=3, steps=3)
    b = prob.run(lambda ps: torch.optim.SGD(ps, lr=0.1), seed=3, steps=3)
    c = prob.run(_adam(), seed=4, steps=3)
    # same seed: same initial weights and same first minibatch, whatever the optimizer
    assert a.eval_loss[0] == b.eval_loss[0] and a.train_loss[0] == b.train_loss[0]
    assert a.eval_loss[0] != c.eval_loss[0]
    # and the run does not disturb torch's global RNG
    torch.manual_seed(0)
    x = torch.rand(1)
    torch.manual_seed(0)
    prob.run(_adam(), seed=3, steps=2)
    assert torch.rand(1) == x


def test_noisy_problem_evaluates_the_noise_free_function():
    prob = problems.get("rosenbrock-noisy")
    r = prob.run(lambda ps: torch.optim.SGD(ps, lr=0.0), seed=1, steps=5)
    # lr 0: the point stays at the start (-1.5, 2): f = 2.5^2 + 100 * 0.25^2 = 12.5
    assert r.eval_loss == [12.5, 12.5]
    assert len(set(r.train_loss)) > 1  # the training loss is noisy


def test_divergence_stops_the_run():
    prob = problems.get("rosenbrock")
    r = prob.run(lambda ps: torch.optim.SGD(ps, lr=1.0), seed=1)
    assert r.diverged
    assert len(r.steps) < prob.steps
    assert r.final_eval_loss == math.inf or r.final_eval_loss > 10 * r.eval_loss[0]
    d = problems.RunResult.from_dict(r.to_dict())
    assert d.diverged and d.final_eval_loss == r.final_eval_loss


def test_bad_names_and_split():
    with pytest.raises(ValueError, match="valid problems: .*rosenbrock"):
        problems.get("nope")
    with pytest.raises(ValueError, match="valid suites"):
        problems.names("nope")
    for suite in problems.SUITES:
        assert set(problems.names(suite)) <= set(problems.names())
    with pytest.raises(ValueError, match="split"):
        problems.get("saddle").run(_adam(), seed=0, split="train")


# -- optimizer registry --------------------------------------------------------------------------

def test_registry_defaults_are_the_libraries_defaults():
    sig = inspect.signature(torch.optim.RMSprop).parameters
    for name in ("rmsprop", "torch-rmsprop"):
        d = O.OPTIMIZERS[name].defaults
        assert (d["lr"], d["alpha"], d["eps"]) == (sig["lr"].default, sig["alpha"].default,
                                                    sig["eps"].default)
    sig = inspect.signature(torch.optim.Adam).parameters
    d = O.OPTIMIZERS["adam"].defaults
    assert d["lr"] == sig["lr"].default and (d["beta1"], d["beta2"]) == sig["betas"].default
    assert O.OPTIMIZERS["sgd"].defaults["lr"] == inspect.signature(torch.optim.SGD).parameters[
        "lr"].default
    for name in ("rmsprop", "rmsprop-centered", "rmsprop-momentum", "torch-rmsprop", "adam",
                 "sgd", "sgd-momentum"):
        opt = O.OPTIMIZERS[name].make([torch.nn.Parameter(torch.zeros(2))])
        assert isinstance(opt, torch.optim.Optimizer)


def test_rmsprop_entry_is_ours():
    rt = pytest.importorskip("rmsprop.torch")
    if not hasattr(rt, "RMSprop"):
        pytest.skip("rmsprop.torch.RMSprop not available")
    opt = O.OPTIMIZERS["rmsprop-centered"].make([torch.nn.Parameter(torch.zeros(2))])
    assert type(opt) is rt.RMSprop and opt.param_groups[0]["centered"] is True


def test_resolve_import_path_and_errors():
    spec = O.resolve("torch.optim:Adagrad")
    assert spec.defaults["lr"] == inspect.signature(torch.optim.Adagrad).parameters["lr"].default
    assert isinstance(spec.make([torch.nn.Parameter(torch.zeros(1))]), torch.optim.Adagrad)
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer"):
        O.resolve("torch.nn:Linear")
    with pytest.raises(ValueError, match="cannot import"):
        O.resolve("no_such_module_xyz:Opt")
    with pytest.raises(ValueError, match="valid optimizers: rmsprop"):
        O.resolve("rmsprob")


def test_latin_hypercube_covers_every_lr_bin():
    space = {"lr": ("log", 1e-4, 1.0), "alpha": ("log1m", 0.9, 0.9999)}
    cfgs = O.sample(space, 8, seed=3)
    bins = sorted(int((math.log10(c["lr"]) + 4) / 4 * 8) for c in cfgs)
    assert bins == list(range(8))
    assert all(0.9 <= c["alpha"] <= 0.9999 for c in cfgs)
    # log1m: 1 - alpha is log-uniform, so its bins are stratified too
    b2 = sorted(int((math.log10(1 - c["alpha"]) + 1) / -3 * 8) for c in cfgs)
    assert b2 == list(range(8))
    g = O.grid(space["lr"], 5)
    assert g[0] == pytest.approx(1e-4) and g[-1] == pytest.approx(1.0) and g[2] == pytest.approx(
        1e-2)
    assert O.on_edge(space["lr"], 1.1e-4, 8) == "low" and O.on_edge(space["lr"], 1e-2, 8) is None


def test_cosine_schedule_anneals_lr_to_zero():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = O.with_schedule(lambda ps: torch.optim.SGD(ps, lr=0.1), "cosine", 10)([p])
    lrs = []
    for _ in range(10):
        p.grad = torch.ones(1)
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    # closed form 0.1 * (1 + cos(pi t / 10)) / 2 after step t
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 10)) for t in range(1, 11)])
    assert O.with_schedule(len, "constant", 5) is len
    with pytest.raises(ValueError, match="valid schedules"):
        O.with_schedule(len, "step", 5)
