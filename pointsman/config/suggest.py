""""Did you mean ...?" for unknown config keys: the closest allowed key of the model at that place.

Pure: walks the pydantic model classes along an error's location, no config data needed, so the
loader can call it for every `extra_forbidden` error, whatever else is wrong with the file.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence

from pydantic import BaseModel

from pointsman.config.model import Config

# difflib's ratio: 0.6 is its default and catches one or two wrong letters in keys this long
# ("intervl", "tokenfile", "protocl") without suggesting unrelated keys.
CUTOFF = 0.6


def did_you_mean(loc: Sequence[str | int], root: type[BaseModel] = Config) -> str:
    """' (did you mean 'interval'?)' for the unknown key at the end of `loc`, or ''."""
    if not loc or not isinstance(loc[-1], str):
        return ""
    model = model_at(loc[:-1], root)
    if model is None:
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=CUTOFF)
    return f" (did you mean {close[0]!r}?)" if close else ""


def model_at(loc: Sequence[str | int], root: type[BaseModel] = Config) -> type[BaseModel] | None:
    """The model class that validates the mapping at `loc` (list indexes are stepped over)."""
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
    return model


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The model class inside `X`, `X | None`, `list[X]`, `Annotated[X, ...]` (not dict values)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is dict:
        return None
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            if (found := _model_in(arg)) is not None:
                return found
    return None
