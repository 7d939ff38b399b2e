"""The spend guard fails closed: a cap or price that is NaN, infinite, negative or not a number is
refused (config, command line and ``check_spend`` itself), and so is any setting that would make
the estimate NaN, negative or too low -- every comparison with NaN is false, so ``estimate > nan``
would otherwise let any estimate through."""
import math

import pytest

from daunce_core.blackbox import __main__ as cli
from daunce_core.blackbox.config import BlackboxConfig, ConfigError
from daunce_core.blackbox.cost import CostItem, SpendNotAllowed, check_spend, priced

PRICES = {"m": {"training": 1.5, "input": 0.2, "output": 0.8}}
ITEMS = [CostItem("t", "m", 1, 2_000_000, 1_000_000, 0, 3.2)]  # $3.20


@pytest.mark.parametrize("cap", [math.nan, math.inf, -1.0, "nan", None, True])
def test_check_spend_refuses_a_cap_that_is_not_a_finite_number_at_least_0(cap):
    with pytest.raises(SpendNotAllowed, match=r"max_spend_usd must be a finite number >= 0"):
        check_spend(ITEMS, spend=True, max_spend_usd=cap)


@pytest.mark.parametrize("usd, counts", [(math.nan, {}), (math.inf, {}), (-3.0, {}),
                                         (0.0, {"training_tokens": -5}), (0.0, {"requests": -1})])
def test_check_spend_refuses_an_item_that_cannot_be_a_cost(usd, counts):
    bad = CostItem("theta0 fine-tune", "m", **{"requests": 1, **counts}, usd=usd)
    with pytest.raises(SpendNotAllowed, match=r"'theta0 fine-tune' \(m\) has .*cannot be a cost.*Nothing was sent"):
        check_spend(ITEMS + [bad], spend=True, max_spend_usd=1e9)


def test_check_spend_still_allows_a_valid_estimate():
    assert check_spend(ITEMS, spend=True, max_spend_usd=4) == pytest.approx(3.2)
    assert check_spend(ITEMS, spend=True, max_spend_usd=4.0) == pytest.approx(3.2)
    assert check_spend([CostItem("t", "m", 1, usd=0.0)], spend=False, max_spend_usd=0) == 0


@pytest.mark.parametrize("cap", ["nan", ".nan", math.nan, "inf", math.inf, -1, "-0.5"])
def test_config_refuses_a_cap_that_is_not_a_finite_number_at_least_0(cap):
    # strings: what snakemake --config 'blackbox={"max_spend_usd": "nan"}' delivers
    with pytest.raises(ConfigError, match=r"^blackbox.max_spend_usd must be a finite number >= 0"):
        BlackboxConfig.from_dict({"spend": True, "max_spend_usd": cap})


@pytest.mark.parametrize("price", [math.nan, math.inf, -25.0, "$25", "nan", None, True, [1]])
def test_config_refuses_a_price_that_is_not_a_finite_number_at_least_0(price):
    prices = {"gpt-x": {"training": price, "input": 0.2, "output": 0.8}}
    with pytest.raises(ConfigError) as err:
        BlackboxConfig.from_dict({"models": ["gpt-x"], "prices": prices})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("blackbox.prices.gpt-x.training must be a finite number >= 0"), msg


def test_valid_prices_and_caps_are_read_as_before():
    cfg = BlackboxConfig.from_dict({"spend": "true", "max_spend_usd": "250", "prices": {
        "a": {"training": 0, "input": 0.2, "output": 1}, "b": {"input": "1e-3"}}})  # PyYAML: 1e-3 is a str
    assert cfg.max_spend_usd == 250.0
    assert priced(CostItem("t", "b-1", 1, 0, 2_000_000), cfg.prices).usd == pytest.approx(0.002)
    assert priced(CostItem("t", "a", 1, 5, 1_000_000, 1_000_000), cfg.prices).usd == pytest.approx(1.2)


def test_priced_names_a_bad_price_instead_of_a_traceback():
    with pytest.raises(ConfigError, match=r"^blackbox.prices.m.training must be a finite number >= 0.*'\$25'"):
        priced(CostItem("t", "ft:m:org::x", 1, 10), {"m": {"training": "$25"}})


@pytest.mark.parametrize("section, key", [
    ({"cost": {"chars_per_token": 0}}, "blackbox.cost.chars_per_token"),
    ({"cost": {"chars_per_token": math.nan}}, "blackbox.cost.chars_per_token"),
    ({"cost": {"safety_factor": -1.25}}, "blackbox.cost.safety_factor"),
    ({"cost": {"safety_factor": "nan"}}, "blackbox.cost.safety_factor"),
    ({"cost": {"message_overhead": -4}}, "blackbox.cost.message_overhead"),
    ({"logprobs": {"extra_tokens": -100}}, "blackbox.logprobs.extra_tokens"),
    ({"bdpl": {"epochs": -20}}, "blackbox.bdpl.epochs"),
    ({"bdpl": {"prompt_length": -50}}, "blackbox.bdpl.prompt_length"),
    ({"theta0": {"hyperparameters": {"n_epochs": -3}}}, "blackbox.theta0.hyperparameters.n_epochs"),
    ({"finetune": {"hyperparameters": {"n_epochs": 0}}}, "blackbox.finetune.hyperparameters.n_epochs"),
    ({"finetune": {"hyperparameters": {"n_epochs": 0.5}}}, "blackbox.finetune.hyperparameters.n_epochs"),
    ({"finetune": {"hyperparameters": {"n_epochs": math.nan}}}, "blackbox.finetune.hyperparameters.n_epochs"),
    ({"finetune": {"hyperparameters": {"n_epochs": "many"}}}, "blackbox.finetune.hyperparameters.n_epochs"),
])
def test_settings_that_would_lower_or_break_the_estimate_are_refused(section, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + " must be"):
        BlackboxConfig.from_dict(section)


@pytest.mark.parametrize("epochs", ["auto", 3, 3.0, "2"])
def test_whole_or_auto_epochs_are_accepted(epochs):
    cfg = BlackboxConfig.from_dict({"theta0": {"hyperparameters": {"n_epochs": epochs}}})
    assert cfg.theta0.hyperparameters["n_epochs"] == epochs


@pytest.mark.parametrize("cap", ["nan", "inf", "-1", "$25"])
def test_cli_refuses_max_spend_usd_that_is_not_a_finite_number_at_least_0(cap, capsys, tmp_path):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("blackbox: {models: [m], prices: {m: {training: 1.5, input: 0.2, output: 0.8}}}\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["check-spend", "--configfile", str(cfgfile), "--nominal", "--spend", "--max-spend-usd", cap])
    out = capsys.readouterr()
    assert exit_.value.code == 2 and "allowed" not in out.out
    assert "argument --max-spend-usd: the value must be a finite number >= 0" in out.err.splitlines()[-1]


def test_a_price_the_item_needs_but_the_entry_lacks_is_refused_not_free():
    prices = {"m": {"training": 2.0}}  # no input or output price
    assert priced(CostItem("fine-tune", "m", 1, 1_000_000), prices).usd == pytest.approx(2.0)
    with pytest.raises(ConfigError, match=r"^blackbox.prices.m has no 'input' price"):
        priced(CostItem("queries", "ft:m:org::x", 10, 0, 1000, 0), prices)


def test_a_safety_factor_below_one_is_refused():
    with pytest.raises(ConfigError, match=r"blackbox.cost.safety_factor must be a finite number >= 1"):
        BlackboxConfig.from_dict({"cost": {"safety_factor": 0.5}})
    assert BlackboxConfig.from_dict({"cost": {"safety_factor": 1.0}}).cost.safety_factor == 1.0


def test_a_missing_n_epochs_is_estimated_as_the_endpoints_auto():
    """A job without n_epochs is sent without it, so the endpoint applies its default ("auto"):
    the estimate charges it as "auto" (theta_0 and the perturbed fine-tunes alike), never as 1 epoch."""
    from daunce_core.blackbox import backdoor as B
    from daunce_core.steps.blackbox import estimate

    prices = {"m": {"training": 25.0, "input": 3.75, "output": 15.0}}
    base = {"models": ["m"], "access": ["api"], "K": 4, "subset_size": 12, "prices": prices,
            "data": {"source": "synthetic", "n_train": 30, "n_query_triggered": 3, "n_query_clean": 3}}

    def training_tokens(hp):
        cfg = BlackboxConfig.from_dict({**base, "theta0": {"hyperparameters": hp},
                                        "finetune": {"hyperparameters": hp}}).validate()
        items = estimate(cfg, "m", *B.make_study_data(cfg.data))
        return [i.training_tokens for i in items if i.training_tokens]

    hp = {"batch_size": 8, "learning_rate_multiplier": 2}
    missing, auto, one = (training_tokens(hp), training_tokens({**hp, "n_epochs": "auto"}),
                          training_tokens({**hp, "n_epochs": 1}))
    assert len(missing) == 2 and missing == auto
    assert [a / b for a, b in zip(missing, one)] == pytest.approx([3.0, 3.0], rel=1e-3)
