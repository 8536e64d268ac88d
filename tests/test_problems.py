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
    # tiny models: extra intra-op threads cost more in synchronisation than they save
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
# Global minimizers and minima from the literature (Jamil & Yang 2013), not from our code.
# Himmelblau's three irrational minima are known to 6 decimals.
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


@pytest.mark.parametrize("name", ["mlp-digits", "a2c-cartpole", "charlm-stdlib-small"])
def test_common_random_numbers(name):
    prob = problems.get(name)
    if prob.missing():
        pytest.skip(f"needs {prob.missing()}")
    a = prob.run(_adam(), seed=3, steps=3)
    b = prob.run(lambda ps: torch.optim.SGD(ps, lr=0.1), seed=3, steps=3)
    c = prob.run(_adam(), seed=4, steps=3)
    # same seed: same initial weights and same first minibatch (rollout), whatever the optimizer
    assert a.eval_loss[0] == b.eval_loss[0] and a.train_loss[0] == b.train_loss[0]
    assert a.train_loss[0] != c.train_loss[0]
    # the same run twice is the same run
    assert prob.run(_adam(), seed=3, steps=3).train_loss == a.train_loss
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


# -- reinforcement learning: A2C on CartPole -----------------------------------------------------

def _needs_gymnasium():
    if problems.get("a2c-cartpole").missing():
        pytest.skip("needs gymnasium")
    import gymnasium

    return gymnasium


class _Controller(torch.nn.Module):
    """A fixed linear controller as a 2-logit policy: push right when k . obs > 0."""

    def __init__(self, k):
        super().__init__()
        self.k = torch.tensor(k)

    def forward(self, obs):
        u = (obs * self.k).sum(-1)
        return torch.stack([-u, u], -1)


def test_cartpole_greedy_returns_match_gymnasiums_single_env():
    """Oracle: Gymnasium's own (non-vector) CartPole-v1 with its TimeLimit, started from the same
    initial states and played with the same policy, counts the same returns."""
    gymnasium = _needs_gymnasium()
    from rmsprop.tools.problems.rl import greedy_returns

    n, seed = 6, 11
    policy = _Controller([0.0, 0.0, 0.0, 1.0])  # balances for a while, then falls or drifts
    vec = gymnasium.make_vec("CartPole-v1", num_envs=n, vectorization_mode="vector_entry_point")
    vec.reset(seed=seed)
    starts = np.array(vec.unwrapped.state).T.copy()  # float64 (4, n) -> (n, 4)
    expected = []
    for x0 in starts:
        env = gymnasium.make("CartPole-v1")
        env.reset(seed=0)
        env.unwrapped.state = x0.copy()
        obs, total, done = x0.astype(np.float32), 0.0, False
        while not done:
            a = int(policy(torch.from_numpy(np.asarray(obs, np.float32))).argmax())
            obs, r, term, trunc, _ = env.step(a)
            total += r
            done = term or trunc
        expected.append(total)
    got = greedy_returns(policy, n, seed)
    assert got == expected
    assert len(set(got)) > 1 and max(got) < 500  # the check is not vacuous
    # a balancing controller reaches the 500-step time limit in every episode
    assert greedy_returns(_Controller([0.0, 0.0, 1.0, 0.5]), n, seed) == [500.0] * n


def test_n_step_returns_closed_form():
    """Discounted sums written out by hand: an uncut rollout bootstraps once at its end, a
    terminated episode stops, a truncated one bootstraps from the critic at its last state."""
    from rmsprop.tools.problems.rl import n_step_returns

    g = 0.5
    rew = torch.tensor([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0], [4.0, 1.0, 1.0]])  # (T=3, 3 envs)
    no = torch.zeros(3, 3, dtype=torch.bool)
    term, trunc = no.clone(), no.clone()
    term[1, 1] = True   # env 1 ends at t=1 (t=2 is the autoreset step)
    trunc[0, 2] = True  # env 2 is cut by the time limit at t=0
    v = torch.tensor([[10.0, 20.0, 30.0], [11.0, 21.0, 31.0], [12.0, 22.0, 32.0]])
    r = n_step_returns(rew, term, trunc, v, g)
    # env 0: 1 + g*2 + g^2*4 + g^3*V(s_3)
    assert r[0, 0] == 1 + g * 2 + g**2 * 4 + g**3 * 12 and r[2, 0] == 4 + g * 12
    # env 1: terminated at t=1, so R_1 = r_1 and R_0 = r_0 + g r_1
    assert r[1, 1] == 1.0 and r[0, 1] == 1 + g * 1
    # env 2: truncated at t=0: R_0 = r_0 + g V(s_1)
    assert r[0, 2] == 1 + g * 30


def test_a2c_cartpole_learns_and_scores_the_shortfall():
    _needs_gymnasium()
    from rmsprop.tools.problems.rl import MAX_RETURN

    prob = problems.get("a2c-cartpole")
    r = prob.run(_adam(3e-3), seed=2, steps=100)
    assert not r.diverged and len(r.train_loss) == 100
    # loss = 500 - mean greedy return, the metric the mean return
    for loss, ret in zip(r.eval_loss, r.eval_metric):
        assert loss == pytest.approx(MAX_RETURN - ret) and 0 < ret <= MAX_RETURN
    assert max(r.eval_metric) > 3 * r.eval_metric[0]  # the initial greedy policy returns ~10
    assert r.test_metric is not None and 0 < r.test_metric <= MAX_RETURN
    assert prob.env_steps_per_update == prob.n_envs * prob.n_steps
    assert prob.target_loss == MAX_RETURN - 475  # CartPole-v1's "solved" return
    assert "a2c-cartpole" in problems.names("standard")


# -- language model: characters of the standard library ------------------------------------------

def test_charlm_vocabulary_and_corpus():
    """The fixed vocabulary (newline, printable ASCII, one index for the rest) and the split by
    file, read here independently from the standard-library directory."""
    import sysconfig

    from rmsprop.tools.problems import lm

    assert lm.encode("a\n\t~ \u00e9").tolist() == [ord("a") - 30, 1, 0, ord("~") - 30, 2, 0]
    assert lm.VOCAB_SIZE == 2 + (126 - 32 + 1)
    root = sysconfig.get_paths()["stdlib"]
    seen = set()
    for split, files in lm.SPLIT_FILES.items():
        assert not seen & set(files)  # no module in two splits
        seen |= set(files)
        texts = []
        for f in files:
            with open(f"{root}/{f}", encoding="utf-8") as fh:
                texts.append(fh.read())
        assert lm.corpus(split) == "\n".join(texts)
    assert len(lm.corpus("train")) > 5 * len(lm.corpus("valid")) > 0
    assert len(lm.corpus_digest()) == 16


def test_charlm_missing_sources_fail_naming_the_file(monkeypatch, tmp_path):
    from rmsprop.tools.problems import lm

    for f in lm.SPLIT_FILES["valid"][1:]:
        (tmp_path / f).write_text("x = 1\n")
    monkeypatch.setattr(lm, "stdlib_dir", lambda: str(tmp_path))
    lm.corpus.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=lm.SPLIT_FILES["valid"][0]):
            lm.corpus("valid")
        with pytest.raises(FileNotFoundError, match="standard-library sources"):
            problems.get("charlm-stdlib-small").run(_adam(), seed=1, steps=1)
    finally:
        lm.corpus.cache_clear()


def test_charlm_model_is_causal():
    """Changing a character never changes the predictions for the positions before it."""
    from rmsprop.tools.problems import lm

    torch.manual_seed(0)
    net = lm._gpt(lm.VOCAB_SIZE, 16, 32, 2, 4)
    x = torch.randint(0, lm.VOCAB_SIZE, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % lm.VOCAB_SIZE
    with torch.no_grad():
        a, b = net(x), net(y)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("name", ["charlm-stdlib-small", "charlm-stdlib"])
def test_charlm_beats_the_unigram_model(name):
    """Validation loss in nats per character starts near ln(97) (uniform) and, after 60 Adam
    steps, is below the cross-entropy of the training text's character frequencies on the
    validation text (computed here with NumPy): the model uses the context."""
    from rmsprop.tools.problems import lm

    counts = np.bincount(lm.encode(lm.corpus("train")), minlength=lm.VOCAB_SIZE) + 1.0
    valid = lm.encode(lm.corpus("valid"))
    unigram = float(-np.log(counts / counts.sum())[valid].mean())
    assert 2.5 < unigram < math.log(lm.VOCAB_SIZE)
    r = problems.get(name).run(_adam(3e-3), seed=1, steps=60)
    assert abs(r.eval_loss[0] - math.log(lm.VOCAB_SIZE)) < 0.8
    assert r.eval_loss[-1] < unigram and r.test_loss < unigram
    assert not r.diverged


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
    from rmsprop.torch import RMSprop

    assert O.ours_available()
    for name in ("rmsprop", "rmsprop-centered", "rmsprop-momentum"):
        opt = O.resolve(name).make([torch.nn.Parameter(torch.zeros(2))])
        assert type(opt) is RMSprop and O.OPTIMIZERS[name].ours
    assert O.OPTIMIZERS["rmsprop-centered"].make(
        [torch.nn.Parameter(torch.zeros(2))]).param_groups[0]["centered"] is True
    assert type(O.resolve("torch-rmsprop").make([torch.nn.Parameter(torch.zeros(2))])) is (
        torch.optim.RMSprop)


@pytest.mark.parametrize("name, state_dtype", [("rmsprop-8bit", "8bit"), ("rmsprop-4bit", "4bit")])
def test_quantized_state_entries_are_ours_with_that_state(name, state_dtype):
    from rmsprop.torch import RMSprop

    spec = O.resolve(name)
    assert spec.ours and spec.defaults == {**O.OPTIMIZERS["rmsprop"].defaults,
                                           "state_dtype": state_dtype}
    p = torch.nn.Parameter(torch.ones(8192))
    opt = spec.make([p])
    assert type(opt) is RMSprop and opt.param_groups[0]["state_dtype"] == state_dtype
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    # a constant gradient g on v0 = 0: v = (1 - alpha) g^2, step lr g / (sqrt(v) + eps)
    expected = 1 - 1e-2 * 0.5 / (math.sqrt(0.01 * 0.25) + 1e-8)
    torch.testing.assert_close(p.detach(), torch.full_like(p, expected), rtol=0, atol=1e-3)


def test_no_torch_rmsprop_under_our_name_when_ours_does_not_import(monkeypatch):
    """A broken install must not turn 'rmsprop' into torch.optim.RMSprop: resolving fails with
    the reason, building fails, and torch's own entry still works."""
    import sys

    monkeypatch.setitem(sys.modules, "rmsprop.torch", None)  # makes the import raise
    assert not O.ours_available()
    with pytest.raises(ValueError, match="'rmsprop-momentum' is rmsprop.torch.RMSprop, which "
                                         "does not import.*never run in its place"):
        O.resolve("rmsprop-momentum")
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(O.OursUnavailableError, match="does not import"):
        O.OPTIMIZERS["rmsprop"].make([p])
    assert type(O.resolve("torch-rmsprop").make([p])) is torch.optim.RMSprop
    monkeypatch.undo()
    assert O.ours_available()


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


def test_readme_problem_table_is_the_registry():
    """The README's problem table lists exactly the registered problems, each with the suites
    that really contain it."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    lines = text[text.index("<!-- problem-table"):].splitlines()[3:]
    rows = {}
    for line in lines:
        if not line.startswith("| `"):
            break
        name, _, suites = (c.strip() for c in line.strip("|").split("|"))
        rows[name.strip("`")] = suites.split(", ")
    assert list(rows) == problems.names()
    for name, suites in rows.items():
        assert suites == [s for s in problems.SUITES if name in problems.SUITES[s]], name
