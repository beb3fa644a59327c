"""The price table: parsed once from the settings, applied per call."""

from __future__ import annotations

import pytest

from streamagent.pricing import ModelPrice, cost_usd, parse_prices


def test_a_priced_model_costs_its_tokens_and_an_unpriced_one_nothing() -> None:
    prices = parse_prices('{"gpt-4o-mini": {"prompt": 0.15, "completion": 0.6}}')
    assert prices == {"gpt-4o-mini": ModelPrice(prompt=0.15, completion=0.6)}
    assert cost_usd(prices, "gpt-4o-mini", 2000, 500) == pytest.approx(0.3 + 0.3)
    assert cost_usd(prices, "local-qwen", 2000, 500) == 0.0
    assert parse_prices("") == {} and parse_prices("  ") == {}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{nope", "not JSON"),
        ("[1]", "must be a JSON object"),
        ('{"m": {"prompt": -1}}', "prompt"),
        ('{"m": {"input": 1}}', "input"),
    ],
)
def test_a_bad_table_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_prices(text)
