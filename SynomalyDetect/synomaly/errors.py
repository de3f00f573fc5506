"""Errors a user can act on, each with the exit code the command line returns for it."""

from __future__ import annotations

from . import contract


class SynomalyError(Exception):
    """Base class: a problem the user can understand and fix."""

    exit_code = contract.EXIT_FAILED


class InputError(SynomalyError):
    """The input image cannot be used (unreadable, wrong shape, no contrast, ...)."""

    exit_code = contract.EXIT_INPUT


class SettingsError(InputError):
    """An option has an impossible value (refused before any work)."""


class ModelError(SynomalyError):
    """The model file cannot be used or does not suit the input."""

    exit_code = contract.EXIT_MODEL


class OutputError(SynomalyError):
    """The results cannot be written (folder exists, disk full, permission)."""

    exit_code = contract.EXIT_OUTPUT


class ResourceError(SynomalyError):
    """Not enough memory or device capacity for this input."""

    exit_code = contract.EXIT_RESOURCE


class PartialFailure(SynomalyError):
    """Some items of a batch (scans of a cohort) failed; the others have their results."""

    exit_code = contract.EXIT_PARTIAL


class Cancelled(SynomalyError):
    """The run was interrupted (Ctrl-C, SIGTERM or a cancel request)."""

    exit_code = contract.EXIT_CANCELLED
