"""Jobs defined by one typed function (``@app.job``): the contract is built from its
signature, so validation, JSON Schema and AsyncAPI work as for any ``Job``.

A separate ``Job`` and model stay the way for contracts shared across services (a
publisher then imports no handler code); one decorator suits a single-service app.
"""

from __future__ import annotations

import inspect
import re
import sys
import typing
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Generic, ParamSpec, TypeVar

import pydantic

from amqp_jobs.contract import DEFAULT_TIMEOUT, Job, RetryPolicy
from amqp_jobs.errors import ContractError
from amqp_jobs.outcome import JobContext

P = ParamSpec("P")
R = TypeVar("R")


class JobFunction(Job[pydantic.BaseModel], Generic[P, R]):
    """A ``Job`` contract that is also its handler: enqueue it like any job (args as a
    mapping of the function's parameters), or call it directly, e.g. in a unit test."""

    __slots__ = ("__wrapped__", "ctx_param", "func", "params")

    def __init__(
        self,
        func: Callable[P, R],
        *,
        name: str | None,
        queue: str,
        retry: RetryPolicy | None,
        timeout: float | timedelta | None,
    ) -> None:
        job_name = name if name is not None else default_name(func)
        model, params, ctx_param = args_model(func, job_name)
        super().__init__(job_name, model, queue=queue, retry=retry, timeout=timeout)
        self.func = func
        self.__wrapped__ = func
        self.params = params
        self.ctx_param = ctx_param

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"JobFunction({self.name!r}, queue={self.queue!r})"

    def handler(self) -> Callable[[pydantic.BaseModel, JobContext], Any]:
        """The function as a worker calls handlers: ``(args model, ctx)``."""
        func: Callable[..., Any] = self.func
        params, ctx_param = self.params, self.ctx_param

        def kwargs(args: pydantic.BaseModel, ctx: JobContext) -> dict[str, Any]:
            values = {p: args.__dict__[p] for p in params}
            if ctx_param is not None:
                values[ctx_param] = ctx
            return values

        if inspect.iscoroutinefunction(func):

            async def run_async(args: pydantic.BaseModel, ctx: JobContext) -> Any:
                return await func(**kwargs(args, ctx))

            return run_async

        def run(args: pydantic.BaseModel, ctx: JobContext) -> Any:
            return func(**kwargs(args, ctx))

        return run


_NAME_WORD = re.compile(r"[A-Za-z0-9]+")


def default_name(func: Callable[..., Any]) -> str:
    """``module.qualname``: stable while the function keeps its module and name. A script's
    ``__main__`` has no stable module name (run with ``python -m`` it has), nor has a
    function defined inside another: those need ``name=``."""
    module = getattr(func, "__module__", None) or ""
    qualname = getattr(func, "__qualname__", "")
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = getattr(spec, "name", "") or ""
    if not module or not qualname or "<" in qualname:
        raise ContractError(
            f"@job on {qualname or func!r}: no stable default name (a function defined in a"
            " script run directly, or inside another function); pass name='...'"
        )
    return f"{module}.{qualname}"


def args_model(
    func: Callable[..., Any], job_name: str
) -> tuple[type[pydantic.BaseModel], tuple[str, ...], str | None]:
    """The args model of ``func``'s parameters (every one annotated, keyword-passable; one
    annotated ``JobContext`` receives the context instead), which forbids unknown args."""
    where = f"@job {job_name!r}"
    try:
        signature = inspect.signature(func)
        hints = typing.get_type_hints(func, include_extras=True)
    except (TypeError, ValueError, NameError) as exc:
        raise ContractError(f"{where}: cannot read the function's signature: {exc}") from None
    fields: dict[str, Any] = {}
    ctx_param = None
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ContractError(
                f"{where}: parameter {p.name!r} must be an ordinary named parameter"
                " (jobs carry a JSON object of named args: no *args, **kwargs or /)"
            )
        hint = hints.get(p.name, inspect.Parameter.empty)
        if hint is JobContext:
            ctx_param = p.name
            continue
        if hint is inspect.Parameter.empty:
            raise ContractError(
                f"{where}: parameter {p.name!r} needs a type annotation (it becomes a field"
                " of the job's args, validated and in its JSON Schema)"
            )
        if p.name.startswith("_"):
            raise ContractError(
                f"{where}: parameter {p.name!r} cannot be an arg (pydantic keeps names"
                " starting with '_' out of a model); rename it"
            )
        fields[p.name] = (hint, ... if p.default is p.empty else p.default)
    title = "".join(w.capitalize() for w in _NAME_WORD.findall(func.__name__)) + "Args"
    try:
        model = pydantic.create_model(
            title,
            __config__=pydantic.ConfigDict(extra="forbid"),
            __module__=getattr(func, "__module__", None) or __name__,
            **fields,
        )
    except (pydantic.PydanticUserError, TypeError, ValueError, NameError) as exc:
        raise ContractError(f"{where}: its parameters cannot form an args model: {exc}") from None
    lost = [name for name in fields if name not in model.model_fields]
    if lost:  # names pydantic reserves (model_config) are silently not fields
        raise ContractError(f"{where}: its parameters cannot form an args model: {lost} reserved")
    return model, tuple(fields), ctx_param


__all__ = ["DEFAULT_TIMEOUT", "JobFunction", "args_model", "default_name"]
