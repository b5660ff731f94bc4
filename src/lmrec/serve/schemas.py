"""The service's request and response bodies (pydantic): strict (unknown keys are refused), with the
bounds a client can read in the OpenAPI schema. Bounds that are options of ``lmrec serve`` (``k``, history
length, requests per batch) are checked by the service and answered 422 naming the field."""

from __future__ import annotations

import unicodedata
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

ItemId = Annotated[StrictStr | StrictInt, Field(description="An item id (numbers are read as their text)")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Strict):
    history: list[ItemId] = Field(..., description="Item ids the user consumed, oldest first (at most the "
                                                   "service's --max-history).")
    k: StrictInt = Field(10, description="How many items to return (1..the service's --max-k).")
    exclude_history: StrictBool = Field(True, description="Never return an item of the history.")


class BatchRequest(_Strict):
    requests: list[RecommendRequest] = Field(..., min_length=1, description="At most the service's "
                                                                             "--max-batch-requests.")


class Recommendation(BaseModel):
    item_id: str
    score: float
    text: dict[str, str]


class RecommendResponse(BaseModel):
    items: list[Recommendation]


class BatchResponse(BaseModel):
    results: list[list[Recommendation]]


def check_item_id(value: str | int) -> str:
    """A new item's id as text: not empty, no leading or trailing whitespace, no control characters."""
    text = str(value)
    if not text:
        raise ValueError("empty item id")
    if text != text.strip():
        raise ValueError(f"item id {text!r} has leading or trailing whitespace")
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")]
    if bad:
        raise ValueError(f"item id {text!r} holds control character {bad[0]!r}")
    return text


class NewItem(_Strict):
    item_id: ItemId = Field(..., description="Not empty, no leading/trailing whitespace, no control characters.")
    text: dict[StrictStr, StrictStr] = Field(..., description="Key/value attributes in order, e.g. title, brand.")

    @field_validator("item_id")
    @classmethod
    def _id(cls, v: str | int) -> str | int:
        check_item_id(v)
        return v


class AddItemsRequest(_Strict):
    items: list[NewItem] = Field(..., min_length=1, max_length=10_000)


class AddItemsResponse(BaseModel):
    added: list[str]
    catalog_size: int
    warning: str | None = None


class Item(BaseModel):
    item_id: str
    text: dict[str, str]


class ErrorDetail(BaseModel):
    field: str
    message: str
    value: str | int | float | bool | None = None


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: one message naming the field (``field``), and for validation errors each
    problem (``detail``)."""

    error: str
    field: str | None = None
    detail: list[ErrorDetail] | None = None


class Health(BaseModel):
    status: str
    error: str | None = None


def errors(*codes: int) -> dict:
    """OpenAPI ``responses`` for these error statuses (all with :class:`ErrorBody`)."""
    why = {401: "missing or wrong API key", 404: "unknown item id", 409: "cannot add (id taken, model cannot)",
           413: "body too large", 415: "not application/json", 422: "invalid request (names the field)",
           503: "not ready, queue full or stopping (Retry-After)", 504: "deadline exceeded"}
    return {c: {"model": ErrorBody, "description": why[c]} for c in codes}
