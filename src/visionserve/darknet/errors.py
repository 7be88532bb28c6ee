"""The one error the darknet importer raises."""

from __future__ import annotations

from visionserve.errors import ModelError


class DarknetError(ModelError):
    """A cfg or weights file that cannot be imported; names the cfg section and line when known."""

    code = "darknet_import_error"

    def __init__(self, message: str, *, section: str | None = None, line: int | None = None) -> None:
        where = ""
        if section is not None and line is not None:
            where = f"[{section}] at line {line}: "
        elif line is not None:
            where = f"line {line}: "
        super().__init__(where + message)
        self.section = section
        self.line = line
