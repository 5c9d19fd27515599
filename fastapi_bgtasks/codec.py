"""How a task's call and its result travel as JSON: pydantic models built
from the function's signature. Arguments are checked where the run is
submitted (nothing bad is stored) and checked again in the worker, where
JSON becomes typed values before the call; results go the other way.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import typing
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PydanticSchemaGenerationError,
    PydanticUserError,
    TypeAdapter,
    create_model,
)
from pydantic_core import (
    InitErrorDetails,
    PydanticCustomError,
    PydanticSerializationError,
    ValidationError,
)

from .errors import ConfigurationError, NotSerializable, PayloadTooLarge

__all__ = ["Codec"]

_BY_POSITION = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

# NaN and infinities are not JSON: refused when typed as floats, and kept as
# constants (then refused as NotSerializable) when they hide under `Any`.
_ARG_CONFIG = ConfigDict(
    allow_inf_nan=False, populate_by_name=False, extra="forbid", ser_json_inf_nan="constants"
)


class Codec:
    """The JSON form of one task's calls and results."""

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.name = name
        self.signature = inspect.signature(fn)
        self._args_model = _arguments_model(fn, self.signature, name)
        params = list(self.signature.parameters.values())
        # Every parameter can be passed by position: then a stored call (all
        # by position, see `dump_arguments`) binds by zipping the names.
        self._positional = all(p.kind in _BY_POSITION for p in params)
        self._names = [p.name for p in params]
        self._fields = [f"p{i}" for i in range(len(params))]
        self._required = sum(p.default is inspect.Parameter.empty for p in params)
        try:
            self._result_adapter = _result_adapter(_type_hints(fn).get("return", Any))
        except (PydanticSchemaGenerationError, PydanticUserError) as exc:
            raise ConfigurationError(
                f"Task {name!r}: its return type cannot be carried as JSON ({exc})."
            ) from exc

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short hash of the parameters as they are validated: the same in
        every process that has the same signature. Workers announce it with
        the task's name, and the app warns of a worker whose differs."""
        try:
            text = json.dumps(self._args_model.model_json_schema(), sort_keys=True)
        except Exception:  # a type with no JSON schema: its spelling will do
            text = str(self.signature.replace(return_annotation=inspect.Signature.empty))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def dump_arguments(
        self, args: Sequence[Any], kwargs: dict[str, Any], *, max_bytes: int
    ) -> tuple[list[Any], dict[str, Any]]:
        """Validate a call against the signature and return it as JSON values.

        Raises pydantic's `ValidationError` for a bad call, `NotSerializable`
        for values JSON cannot carry, and `PayloadTooLarge` over `max_bytes`.
        """
        model = self._args_model.model_validate(self._bind(args, kwargs).arguments)
        try:
            data = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
        except PydanticSerializationError as exc:
            raise NotSerializable(
                f"Arguments of task {self.name!r} cannot be carried as JSON: {exc}"
            ) from exc
        # Only the arguments the caller passed are stored (defaults apply in
        # the worker), normalised: whatever can be passed by position is.
        bound = inspect.BoundArguments(self.signature, data)
        json_args, json_kwargs = list(bound.args), dict(bound.kwargs)
        try:
            encoded = json.dumps(
                [json_args, json_kwargs], separators=(",", ":"), allow_nan=False, ensure_ascii=False
            ).encode()
        except UnicodeEncodeError as exc:
            raise NotSerializable(
                f"Arguments of task {self.name!r} hold text that is not valid Unicode "
                "(a lone surrogate), which cannot be stored."
            ) from exc
        except ValueError as exc:
            raise NotSerializable(
                f"Arguments of task {self.name!r} hold NaN or an infinity, which JSON cannot carry."
            ) from exc
        if len(encoded) > max_bytes:
            raise PayloadTooLarge(
                f"Arguments of task {self.name!r} are {len(encoded)} bytes as JSON; "
                f"the limit is {max_bytes} (max_args_bytes)."
            )
        return json_args, json_kwargs

    def load_arguments(
        self, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Stored JSON back to typed values, validated again (the worker side)."""
        if self._positional and not kwargs and self._required <= len(args) <= len(self._names):
            # What `signature.bind` would make of it, without its cost.
            model = self._args_model.model_validate(dict(zip(self._names, args, strict=False)))
            return tuple(getattr(model, field) for field in self._fields[: len(args)]), {}
        bound = self._bind(args, kwargs)
        model = self._args_model.model_validate(bound.arguments)
        values = {
            name: getattr(model, f"p{i}")
            for i, name in enumerate(self.signature.parameters)
            if name in bound.arguments
        }
        rebound = inspect.BoundArguments(self.signature, values)
        return rebound.args, rebound.kwargs

    def dump_result(self, value: Any) -> Any:
        """A return value as JSON; raises NotSerializable naming the type."""
        try:
            result = self._result_adapter.dump_python(value, mode="json")
            if result is not None:
                json.dumps(result, allow_nan=False, ensure_ascii=False).encode()
        except (PydanticSerializationError, ValueError) as exc:  # incl. UnicodeEncodeError
            raise NotSerializable(
                f"Task {self.name!r} returned a {type(value).__name__}, "
                f"which cannot be carried as JSON: {exc}"
            ) from exc
        return result

    def load_result(self, value: Any) -> Any:
        """A stored result back to the declared return type."""
        return self._result_adapter.validate_python(value)

    def _bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> inspect.BoundArguments:
        try:
            return self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            self._binding_error(exc, args, kwargs)

    def _binding_error(
        self, exc: TypeError, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> NoReturn:
        detail: InitErrorDetails = {
            "type": PydanticCustomError("arguments_mismatch", str(exc)),
            "loc": ("arguments",),
            "input": {"args": list(args), "kwargs": kwargs},
        }
        raise ValidationError.from_exception_data(f"{self.name} arguments", [detail]) from None


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:
        # A forward reference that cannot be resolved yet: validate it as Any
        # rather than refuse the task.
        return {}


def _arguments_model(
    fn: Callable[..., Any], signature: inspect.Signature, name: str
) -> type[BaseModel]:
    """A model whose fields are the parameters. Field names are positional
    (`p0`, `p1`...) with the parameter name as alias, so parameters pydantic
    would not take as field names (`_private`, `model_config`) still work."""
    hints = _type_hints(fn)
    fields: dict[str, Any] = {}
    for i, param in enumerate(signature.parameters.values()):
        annotation = hints.get(param.name, Any)
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            annotation = list[annotation]  # type: ignore[valid-type]
            default: Any = ()
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            annotation = dict[str, annotation]  # type: ignore[valid-type]
            default = {}
        else:
            default = ... if param.default is inspect.Parameter.empty else param.default
        fields[f"p{i}"] = (annotation, Field(default, alias=param.name))
    try:
        return create_model(f"{name}_arguments", __config__=_ARG_CONFIG, **fields)
    except (PydanticSchemaGenerationError, TypeError) as exc:
        raise ConfigurationError(
            f"Task {name!r}: a parameter's type cannot be carried as JSON ({exc}). "
            "Annotate parameters with JSON-friendly types or pydantic models."
        ) from exc


def _result_adapter(annotation: Any) -> TypeAdapter[Any]:
    # NaN and infinities kept as themselves (then refused by json.dumps),
    # not silently turned into null. Models carry their own config.
    try:
        return TypeAdapter(annotation, config=ConfigDict(ser_json_inf_nan="constants"))
    except PydanticUserError:
        return TypeAdapter(annotation)
