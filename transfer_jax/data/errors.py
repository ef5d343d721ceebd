"""Errors raised for bad input data: each names the case, the file and what was expected."""
from __future__ import annotations


class DataError(ValueError):
    """A problem with one case or with the manifest; the message is meant for the user, verbatim."""

    def __init__(self, message: str, *, case_id: str | None = None, path: str | None = None):
        self.case_id = case_id
        self.path = path
        self.detail = message
        where = []
        if case_id is not None:
            where.append(f"case {case_id!r}")
        if path is not None:
            where.append(f"file {path}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class BadCasesError(DataError):
    """Several cases failed the pre-flight check and the configuration says to stop before training."""

    def __init__(self, problems: list[DataError]):
        self.problems = problems
        lines = [f"{len(problems)} case(s) failed the pre-flight check (set data.on_bad_case='skip' to leave them "
                 "out and train on the rest):"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))
