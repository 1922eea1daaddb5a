"""Search space, search config validation, and the aging evolution."""
import random

import pytest
import torch

from distillery.errors import ConfigError
from distillery.search.config import Constraints, search_config_from_dict, validate_space
from distillery.search.evolution import regularized_evolution
from distillery.search.runner import pareto_front
from distillery.search.space import Candidate, Cost, SearchError, Space

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPACE = {"cnn": {"width": [4, 8, 16], "depth": [1, 2, 3]}, "mlp": {"hidden": [[16], [32, 16]]}, "resnet8": {}}


def _space(families=SPACE, **limits) -> Space:
    return Space(validate_space(families), Constraints(**limits), in_channels=1, num_classes=10, input_size=(8, 8))


# ---- validation


@pytest.mark.parametrize("space, message", [
    ({"cnnn": {}}, "unknown model family 'cnnn'; zoo families: "),
    ({"cnn": {"kernel_size": [3, 5]}}, "cnn: 'kernel_size' is not a keyword of this model; its keywords: width, depth"),
    ({"resnet8": {"depth": [8]}}, "its keywords: none"),
    ({"cnn": {"width": []}}, "cnn.width: the list of choices is empty"),
    ({"cnn": {"width": [8, 8]}}, "cnn.width: duplicate choices"),
    ({}, "the space is empty"),
])
def test_space_errors_name_the_problem(space, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_space(space)


def test_space_accepts_fixed_values_and_lists_of_lists():
    out = validate_space({"cnn": {"width": 8}, "mlp": {"hidden": [[16], [32, 16]]}, "resnet8": None})
    assert out == {"cnn": {"width": [8]}, "mlp": {"hidden": [[16], [32, 16]]}, "resnet8": {}}


def _raw(**search):
    return {"run": {"name": "s", "data": {"name": "digits"}, "teacher": {"run": "runs/t"}, "method": {"name": "kd"}},
            "search": {"space": {"cnn": {"width": [4, 8]}}, **search}}


@pytest.mark.parametrize("change, message", [
    ({"proxy": "zen"}, "search.proxy: unknown proxy 'zen'; proxies: diswot, "),
    ({"population": 2, "sample_size": 3}, "sample_size (3) cannot exceed population (2)"),
    ({"cycles": -1}, "search.cycles: Input should be greater than or equal to 0"),
    ({"space": {"cnn": {"widht": [4]}}}, "search.space: cnn: 'widht' is not a keyword"),
    ({"constraints": {"max_params": 0}}, "search.constraints.max_params: Input should be greater than 0"),
    ({"constraints": {"max_flops": 5}}, "search.constraints.max_flops: unknown key"),
    ({"teacher_init": "pretrained"}, "search.teacher_init: "),
])
def test_search_config_errors_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        search_config_from_dict(_raw(**change))


def test_search_config_checks_the_run_section():
    raw = _raw()
    raw["run"]["data"]["name"] = "mnist"
    with pytest.raises(ConfigError, match=r"invalid `run:` section:\n\s+data.name"):
        search_config_from_dict(raw)
    raw = _raw()
    del raw["run"]["teacher"]
    with pytest.raises(ConfigError, match="teacher"):  # kd needs one, and so does the search
        search_config_from_dict(raw)


# ---- candidates, sampling, mutation, limits


def test_candidate_key_spec_and_hashing():
    c = Candidate.make("mlp", {"hidden": [32, 16]})
    assert c.key == "mlp(hidden=[32, 16])"
    assert c.spec().kwargs == {"hidden": [32, 16]}
    assert c == Candidate.make("mlp", {"hidden": (32, 16)}) and len({c, Candidate.make("mlp", {"hidden": [32, 16]})}) == 1


def test_samples_and_mutations_stay_in_the_space_and_the_limits():
    space = _space(max_params=3000)
    assert len(space) == 9 + 2 + 1
    rng = random.Random(0)
    seen = set()
    for _ in range(40):
        c = space.sample(rng)
        assert c in space and space.cost(c).params <= 3000
        child = space.mutate(c, rng)
        assert child in space and child != c and space.cost(child).params <= 3000
        if child.arch == c.arch:  # a keyword mutation changes exactly one keyword
            assert sum(a != b for a, b in zip(c.kwargs, child.kwargs)) == 1
        seen.add(child)
    assert not any(c.arch == "resnet8" for c in seen)  # 78k params: never handed out
    assert space.check(Candidate.make("resnet8")).startswith("77,")  # ... and the reason says why


def test_macs_and_latency_limits():
    from distillery.data import Split

    space = _space(max_macs=30_000)
    rng = random.Random(1)
    assert all(space.cost(space.sample(rng)).macs <= 30_000 for _ in range(10))
    timing = Split(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    fast = Space(validate_space({"cnn": {"width": [4], "depth": [1]}}), Constraints(max_latency_ms=1e4, latency_budget_s=0.01),
                 in_channels=1, num_classes=10, input_size=(8, 8), latency_inputs=timing)
    cost = fast.cost(fast.sample(rng))
    assert 0 < cost.latency_ms < 1e4
    slow = Space(validate_space({"cnn": {"width": [4], "depth": [1]}}), Constraints(max_latency_ms=1e-6, latency_budget_s=0.01),
                 in_channels=1, num_classes=10, input_size=(8, 8), latency_inputs=timing)
    with pytest.raises(SearchError, match="max_latency_ms"):
        slow.sample(rng, max_tries=3)


def test_an_impossible_limit_is_a_clear_error():
    with pytest.raises(SearchError, match=r"no architecture of the space met the limits .* max_params"):
        _space(max_params=10).sample(random.Random(0), max_tries=20)


def test_invalid_architectures_are_skipped_with_a_reason():
    space = _space({"vit_tiny": {"dim": [12], "heads": [5], "depth": [1], "patch_size": [4]}})
    assert space.check(Candidate.make("vit_tiny", {"dim": 12, "heads": 5, "depth": 1, "patch_size": 4})).startswith("does not build")


def test_build_is_seeded_and_leaves_the_global_rng_alone():
    space = _space()
    c = Candidate.make("cnn", {"width": 4, "depth": 2})
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = space.build(c), space.build(c)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    other = space.build(Candidate.make("cnn", {"width": 4, "depth": 3}))
    assert not torch.equal(a.features[0][0].weight, other.features[0][0].weight)  # each candidate its own draw


# ---- evolution


def _toy(seed, cycles=60, population=8):
    """Integers 0..99, best at 73; mutation moves by 1-3."""
    return regularized_evolution(
        sample=lambda rng: rng.randrange(100),
        mutate=lambda c, rng: min(99, max(0, c + rng.choice([-3, -2, -1, 1, 2, 3]))),
        score=lambda c: -float((c - 73) ** 2),
        population=population, sample_size=3, cycles=cycles, seed=seed)


def test_evolution_is_deterministic_for_a_seed():
    a, b, c = _toy(0), _toy(0), _toy(1)
    assert [s.candidate for s in a.history] == [s.candidate for s in b.history]
    assert [s.candidate for s in a.history] != [s.candidate for s in c.history]


def test_evolution_improves_the_best_score():
    for seed in range(5):
        res = _toy(seed)
        initial_best = max(s.score for s in res.history[:8])
        assert res.best_so_far()[-1] > initial_best or initial_best == 0
        assert res.ranked()[0].score == max(s.score for s in res.history)
        assert len(res.history) == 8 + 60


def test_evolution_scores_each_candidate_once():
    calls = []
    regularized_evolution(sample=lambda rng: rng.randrange(3), mutate=lambda c, rng: (c + 1) % 3,
                          score=lambda c: calls.append(c) or float(c), population=4, sample_size=2, cycles=20)
    assert sorted(calls) == sorted(set(calls))


def test_pareto_front():
    costs = [1, 2, 3, 4, 5]
    scores = [0.1, 0.05, 0.3, 0.2, 0.5]
    assert pareto_front(costs, scores) == [0, 2, 4]
    assert isinstance(Cost(1, 2), Cost)
