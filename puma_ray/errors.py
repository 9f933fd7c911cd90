"""The one exception type a user sees: a one-line message naming the input and the problem."""

import functools
import re


class PumaError(Exception):
    """A user-facing error (bad input, bad config, unreachable storage).

    The CLI prints ``error: <message>`` and exits 2; it never shows a stack trace for these.
    """


def find_user_error(exc: BaseException) -> PumaError | None:
    """The PumaError behind ``exc``, if any: Ray wraps worker/task errors (RayTaskError,
    WorkerGroupError, ActorDiedError) around the original, sometimes only as text."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is PumaError:
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo += list(failures.values())
    m = re.search(r"puma_ray\.errors\.PumaError: (.+)", str(exc))
    return PumaError(m.group(1).strip()) if m else None


def user_errors(fn):
    """Decorator for stage entry functions: a PumaError raised anywhere below (driver, Ray task,
    actor, train worker) reaches the caller as a plain one-line PumaError."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PumaError as exc:
            raise (find_user_error(exc) or exc) from None
        except Exception as exc:
            found = find_user_error(exc)
            if found is None:
                raise
            raise found from None

    return wrapper
