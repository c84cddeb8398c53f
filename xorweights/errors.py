"""One exception hierarchy for the whole library, and the CLI's exit codes.

Every error carries a ``hint`` that tells the user how to fix it, and an
``exit_code``: the class of failure a script can branch on. The CLI prints
``message`` and ``hint`` on one line; the library never prints. The codes are
documented in one table, docs/decoding.md's "Exit codes"; a test keeps the two
in step.
"""

from __future__ import annotations

# The exit codes, one per class of failure (0 is success, 130 an interrupt:
# entry.INTERRUPTED_EXIT). Usage stays 2, as Click and most Unix tools use it.
EXIT_VERIFY_FAILED = 1  # verification failed, or the base is not the one the delta needs
EXIT_USAGE = 2  # the command line is wrong
EXIT_BAD_INPUT = 3  # an input (delta, base, fine-tune, checksum manifest) is missing, malformed or damaged
EXIT_HUB = 4  # the Hugging Face Hub refused a request or could not be reached
EXIT_OS = 5  # the output can't be written, the disk or memory ran short, or any other OSError
EXIT_UNPROTECTED = 6  # encode refused to publish tensor bytes in the clear
EXIT_INTERNAL = 7  # a bug: any other exception


class XorWeightsError(Exception):
    """Base class. ``exit_code`` is what the CLI returns for this error."""

    exit_code = EXIT_INTERNAL  # every concrete error names its own class below
    default_hint = "set XORWEIGHTS_DEBUG=1 for the full traceback"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint or self.default_hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})"


class UsageError(XorWeightsError):
    """The command line or API call itself is wrong."""

    exit_code = EXIT_USAGE
    default_hint = "see `xorweights --help`"


class InputFileError(XorWeightsError):
    """A file we read is missing, unreadable or malformed."""

    exit_code = EXIT_BAD_INPUT
    default_hint = "re-download or re-create the file"


class CheckpointError(InputFileError):
    """A folder does not hold a checkpoint we can read."""

    default_hint = "point at a folder holding model.safetensors or model-*.safetensors shards"


class ManifestError(InputFileError):
    """A delta or checksum manifest is malformed or unsupported."""

    default_hint = "re-download the delta; it must be a folder made by `xorweights encode`"


class BaseMismatchError(XorWeightsError):
    """The base the user holds is not the one the delta was made from."""

    exit_code = EXIT_VERIFY_FAILED
    default_hint = (
        "your base differs from the one this delta was made from; "
        "run `xorweights inspect DELTA` to see which base it needs"
    )


class DeltaCorruptError(XorWeightsError):
    """The delta's data does not decode to what its manifest promises."""

    exit_code = EXIT_BAD_INPUT
    default_hint = "the delta is damaged; re-download it"


class OutputError(XorWeightsError):
    """The output location can't be used as asked."""

    exit_code = EXIT_OS
    default_hint = "choose another output folder"


class NotEnoughMemoryError(XorWeightsError):
    """Holding what was asked for would take more memory than the machine has available."""

    exit_code = EXIT_OS
    default_hint = "use iter_state_dict to take one tensor at a time, or decode to disk with `xorweights decode`"


class VerifyFailed(XorWeightsError):
    """A checkpoint does not match the checksums it was verified against."""

    exit_code = EXIT_VERIFY_FAILED
    default_hint = "re-run decode into a fresh folder, or re-download the files listed"


class UnprotectedError(XorWeightsError):
    """encode would publish tensor bytes in the clear, beyond what the releaser allowed."""

    exit_code = EXIT_UNPROTECTED
    default_hint = "use the right base, map names with --rename FROM=TO, or pass --allow-unprotected"


class HubError(XorWeightsError):
    """The Hugging Face Hub refused a request or could not be reached.

    Raised as is for pushes (the delta on disk is unaffected); downloads raise
    :class:`HubDownloadError`.
    """

    exit_code = EXIT_HUB
    default_hint = "the delta on disk is complete; push it again with `xorweights push DELTA REPO`"


class HubAuthError(HubError):
    """The Hub needs a token with write access to the repository."""

    default_hint = "set HF_TOKEN to a token with write access, or run `hf auth login`"


class HubDownloadError(HubError):
    """A Hub repo named as DELTA, --base or FINETUNED could not be fetched, nor found in the local cache."""

    default_hint = "check the repo id, your connection and HF_TOKEN, or pass a local folder instead"


class XorWeightsWarning(UserWarning):
    """Something the user should know that does not stop the command; the CLI prints it on one line."""
