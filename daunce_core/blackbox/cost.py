"""Token and cost estimates of a black-box study, and the guard that stops unapproved spending.

Nothing that costs money is sent before :func:`check_spend` has passed: every model must have a
price, and the estimate must be $0 or allowed by ``blackbox.spend: true`` within
``blackbox.max_spend_usd``; otherwise :class:`SpendNotAllowed` names the estimate and the setting
that would allow it. :class:`SpendMeter` then checks the cap before every paid call. The black-box
steps and ``python -m daunce_core.blackbox estimate`` call it. How tokens are bounded and models
priced: docs/trust.md#the-spending-guard-daunce_coreblackboxcostpy."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ..settings import ConfigError
from .client import BlackboxError
from .config import check_price, check_usd


class SpendNotAllowed(BlackboxError):
    """Starting would spend money that the configuration does not allow."""


@dataclass
class CostItem:
    stage: str
    model: str
    requests: int = 0
    training_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    usd: float | None = 0.0  # None: no price known for the model

    def as_dict(self) -> dict:
        return asdict(self)


def price_key(model: str, prices: dict) -> str | None:
    """The key of ``model``'s price entry (longest matching prefix; ``ft:<base>:...`` -> ``<base>``)."""
    parts = model.split(":")
    lead = next((i for i, p in enumerate(parts) if p != "ft"), len(parts) - 1)
    name = parts[lead] if lead else model  # ft:<base>:... and a fine-tune of one, ft:ft:<base>:...
    best = None
    for key in prices:
        if name == key or name.startswith(key) or model == key:
            if best is None or len(key) > len(best):
                best = key
    return best


def price_of(model: str, prices: dict) -> dict | None:
    """The price entry of ``model`` (see :func:`price_key`), or None."""
    key = price_key(model, prices)
    return None if key is None else prices[key]


class TokenEstimator:
    def __init__(self, chars_per_token: float = 1.0, safety_factor: float = 1.25, message_overhead: int = 16):
        self.cpt, self.safety, self.overhead = chars_per_token, safety_factor, message_overhead

    def text(self, s: str) -> float:
        return len(s.encode("utf-8")) / self.cpt

    def messages(self, msgs: Sequence[dict]) -> int:
        raw = sum(self.text(m.get("content") or "") + self.overhead for m in msgs) + 3
        return int(math.ceil(raw * self.safety))


def priced(item: CostItem, prices: dict) -> CostItem:
    """``item`` with its USD; a price that is not a finite number >= 0, or none for a kind of token
    the item uses, is a ConfigError naming it."""
    name = price_key(item.model, prices)
    if name is None:
        item.usd = None
    else:
        p = check_price(name, prices[name])
        lacking = [k for k, n in (("training", item.training_tokens), ("input", item.input_tokens),
                                  ("output", item.output_tokens)) if n and k not in p]
        if lacking:  # a missing price is unknown, not free: fail closed
            raise ConfigError(f"blackbox.prices.{name} has no {lacking[0]!r} price, but {item.stage!r} uses "
                              f"{lacking[0]} tokens; add it (USD per 1M tokens, 0 for a free endpoint)")
        item.usd = (item.training_tokens * p.get("training", 0.0) + item.input_tokens * p.get("input", 0.0)
                    + item.output_tokens * p.get("output", 0.0)) / 1e6
    return item


def total_usd(items: Sequence[CostItem]) -> float | None:
    if any(i.usd is None for i in items):
        return None
    return float(sum(i.usd for i in items))


def format_estimate(items: Sequence[CostItem]) -> str:
    lines = [f"{'stage':<28} {'model':<40} {'requests':>10} {'train tok':>13} {'input tok':>13} "
             f"{'output tok':>12} {'USD':>10}"]
    for i in items:
        usd = "no price" if i.usd is None else f"{i.usd:,.2f}"
        lines.append(f"{i.stage:<28} {i.model[:40]:<40} {i.requests:>10,} {i.training_tokens:>13,} "
                     f"{i.input_tokens:>13,} {i.output_tokens:>12,} {usd:>10}")
    tot = total_usd(items)
    lines.append(f"{'total':<28} {'':<40} {sum(i.requests for i in items):>10,} "
                 f"{sum(i.training_tokens for i in items):>13,} {sum(i.input_tokens for i in items):>13,} "
                 f"{sum(i.output_tokens for i in items):>12,} "
                 f"{'unknown' if tot is None else format(tot, ',.2f'):>10}")
    return "\n".join(lines)


def ledger_items(ledger: dict, prices: dict, stage: str = "fine-tunes (ledger)") -> list[CostItem]:
    """The spend ledger of a manifest (:meth:`.manifest.Manifest.record_job`) as priced cost items,
    one per base model: billed jobs and their trained tokens (what the endpoint reported)."""
    by_model: dict[str, CostItem] = {}
    for row in ledger.values():
        if row["billed"]:
            item = by_model.setdefault(row["base_model"], CostItem(stage, row["base_model"]))
            item.requests += 1
            item.training_tokens += int(row["trained_tokens"])
    return [priced(i, prices) for i in by_model.values()]


def check_spend(items: Sequence[CostItem], *, spend: bool, max_spend_usd: float, what: str = "this step") -> float:
    """Raise :class:`SpendNotAllowed` unless the estimate may be spent; return the estimate (USD).

    Fails closed: a cap that is not a finite number >= 0, or an item whose counts are negative or
    whose USD is NaN, infinite or negative, is refused -- every comparison with NaN is false, and a
    negative item would lower the total below what is really spent.
    """
    try:
        max_spend_usd = check_usd(max_spend_usd, "blackbox.max_spend_usd")
    except ConfigError as exc:
        raise SpendNotAllowed(f"{what}: {exc}; nothing was sent.") from None
    for i in items:
        counts = {"requests": i.requests, "training_tokens": i.training_tokens, "input_tokens": i.input_tokens,
                  "output_tokens": i.output_tokens}
        bad = [k for k, v in counts.items() if not v >= 0]
        if bad or i.usd is not None and not (math.isfinite(i.usd) and i.usd >= 0):
            what_bad = f"{bad[0]} = {counts[bad[0]]}" if bad else f"USD = {i.usd}"
            raise SpendNotAllowed(f"{what}: the estimate of {i.stage!r} ({i.model}) has {what_bad}, which cannot be "
                                  f"a cost; check blackbox.prices, blackbox.cost and the epochs in the config. "
                                  f"Nothing was sent.")
    table = format_estimate(items)
    unknown = sorted({i.model for i in items if i.usd is None})
    if unknown:
        raise SpendNotAllowed(
            f"{what}: no price known for {', '.join(unknown)}; add it to blackbox.prices (USD per 1M tokens: "
            f"training, input, output; 0 for a free endpoint) so the cost can be estimated. Nothing was "
            f"sent.\n{table}")
    tot = total_usd(items) or 0.0
    if tot <= 0.0:
        return 0.0
    if not spend:
        raise SpendNotAllowed(
            f"{what} would spend an estimated ${tot:,.2f} and blackbox.spend is false, so nothing was sent. "
            f"To allow it, set blackbox.spend: true and blackbox.max_spend_usd: {math.ceil(tot)} (or more) in "
            f"the config, or run snakemake --config 'blackbox={{\"spend\": true, \"max_spend_usd\": "
            f"{math.ceil(tot)}}}'.\n{table}")
    if tot > max_spend_usd:
        raise SpendNotAllowed(
            f"{what} would spend an estimated ${tot:,.2f}, more than blackbox.max_spend_usd = "
            f"${max_spend_usd:,.2f}; nothing was sent. Raise max_spend_usd to allow it.\n{table}")
    return tot


class SpendMeter:
    """The spend recorded so far, checked against the cap before every paid call.

    ``reserve`` prices a bound on the next call and raises :class:`SpendNotAllowed` if the recorded
    spend, the calls still in flight and this one would exceed ``max_spend_usd``; ``settle``
    replaces a reservation by what the endpoint reported (usage, trained tokens).
    """

    def __init__(self, prices: dict, max_spend_usd: float, estimator: TokenEstimator | None = None,
                 spent_usd: float = 0.0):
        self.prices, self.cap = prices, check_usd(max_spend_usd, "blackbox.max_spend_usd")
        self.te = estimator or TokenEstimator()
        self.spent, self.reserved = float(spent_usd), 0.0

    def _usd(self, stage: str, model: str, training: int, input: int, output: int) -> float:
        item = priced(CostItem(stage, model, 1, int(training), int(input), int(output)), self.prices)
        if item.usd is None:
            raise SpendNotAllowed(f"{stage}: no price known for {model}; add it to blackbox.prices. Nothing was sent.")
        return float(item.usd)

    def reserve(self, what: str, model: str, *, training: int = 0, input: int = 0, output: int = 0) -> float:
        usd = self._usd(what, model, training, input, output)
        if usd > 0 and self.spent + self.reserved + usd > self.cap:
            raise SpendNotAllowed(
                f"{what}: the recorded spend ${self.spent:,.2f} (+ ${self.reserved:,.2f} in flight) and this call's "
                f"bound ${usd:,.2f} would exceed blackbox.max_spend_usd = ${self.cap:,.2f}; it was not sent. "
                "Finished work is kept; raise max_spend_usd to go on")
        self.reserved += usd
        return usd

    def settle(self, reserved: float, model: str, *, training: int = 0, input: int = 0, output: int = 0) -> float:
        usd = self._usd("settle", model, training, input, output)
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += usd
        return usd
