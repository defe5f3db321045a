"""The failures a user can act on.

An input that is wrong, a model or a manifest that is not there, a config that does not
fit: each is raised as a subclass of :class:`LdmflowError` with a message that says what is
wrong and, where it can, what to do. The command line prints such a failure as one line,
``error: …``, wherever it was raised (in the driver, a Prefect task, a Ray actor or a Ray
Train worker), with the traceback only under ``-v``. Any other exception is a bug, and
keeps its traceback.
"""

from __future__ import annotations


class LdmflowError(Exception):
    """A failure of the input or the setting, not of ldmflow: reported in one line."""

    exit_code = 1


class InputError(LdmflowError, ValueError):
    """An input that cannot serve this stage as it is (say, unlabelled data for class conditioning)."""


class UsageError(LdmflowError):
    """A command line or a config file that cannot be used as written."""

    exit_code = 2
