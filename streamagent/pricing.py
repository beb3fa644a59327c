"""What a model call costs: a price table from the settings, applied to the tokens of one call.

The table is JSON ``{"model": {"prompt": usd_per_1k_tokens, "completion": usd_per_1k_tokens}}``
(``STREAMAGENT_MODEL_PRICES``). A model missing from the table costs 0: a local model is free, and an
unpriced one is better shown as 0 than guessed.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamagent.jsonobject import json_object


class ModelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: float = Field(0.0, ge=0, description="USD per 1000 prompt tokens")
    completion: float = Field(0.0, ge=0, description="USD per 1000 completion tokens")


Prices = dict[str, ModelPrice]


def parse_prices(text: str) -> Prices:
    """The table in ``text`` (empty: no prices); raises ValueError saying what is wrong."""
    raw = json_object(text, "price table", '{"model": {"prompt": .., "completion": ..}}')
    try:
        return {str(model): ModelPrice.model_validate(price) for model, price in raw.items()}
    except ValidationError as exc:
        raise ValueError(f"price table: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None


def cost_usd(prices: Prices, model: str, prompt_tokens: int, completion_tokens: int) -> float:
    price = prices.get(model)
    if price is None:
        return 0.0
    # Rounded to a micro-dollar: a sum of many calls then prints the same everywhere.
    return round((prompt_tokens * price.prompt + completion_tokens * price.completion) / 1000.0, 6)
