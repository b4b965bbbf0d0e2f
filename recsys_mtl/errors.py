"""User errors: bad input (a file, a column, a flag, a config value) as its own exception type.

The CLI prints an InputError as one line and exits 2; any other exception is a bug and shows its traceback. Raise
these where input is read, naming the file, the column or the flag and what was expected.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class InputError(ValueError):
    """The user's input is wrong; the message names where and what was expected."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named (or that one of their files names) does not exist."""


class OutputExistsError(InputError, FileExistsError):
    """The output exists, or is another run's, and may not be replaced."""


@contextmanager
def reading(source: Path | str) -> Iterator[None]:
    """Turn a library's complaint about input it reads (polars, pyarrow, the OS) into an InputError naming `source`.

    Raises:
        InputError: the block raised a polars, pyarrow or OS error (MissingInputError for a missing file).
    """
    import polars as pl
    import pyarrow as pa

    try:
        yield
    except InputError:
        raise
    except FileNotFoundError as err:
        raise MissingInputError(f"{source}: {err}") from err
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError, UnicodeDecodeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "; give the description's read.encoding (e.g. latin-1)" if "utf-8" in message.lower() else ""
        raise InputError(f"{source}: cannot read it ({type(err).__name__}: {message}){hint}") from err
