"""The shipped dataset descriptions (`descriptions/*.toml`), by name or by path; the format is
`recsys_mtl.data.description`."""

from pathlib import Path

from recsys_mtl.data.description import Description, read_description

DESCRIPTIONS = Path(__file__).parent / "descriptions"


def load_description(path: Path | str) -> Description:
    """Load a description: a path, or the name of a shipped one ("synthetic", "ali_ccp", "reviews").

    Raises:
        MissingInputError: neither a file nor a shipped description.
        InputError: invalid TOML, an unknown key or a bad value, or hashed tables too large for this machine's memory.
    """
    path = Path(path)
    if not path.suffix and not path.exists():
        path = DESCRIPTIONS / f"{path}.toml"
    return read_description(path)
