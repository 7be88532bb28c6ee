"""Reading darknet ``.cfg`` files into sections that remember where they came from.

Darknet's own reader strips every whitespace character from a line, skips blank lines and
lines starting with ``#`` or ``;``, opens a section on ``[name]`` and otherwise expects
``key=value``. This reader does the same, and keeps each section's and option's line number
so that every later error can point at the cfg.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from visionserve.darknet.errors import DarknetError

T = TypeVar("T")

# Darknet accepts a few short spellings of section names.
SECTION_ALIASES = {
    "network": "net",
    "conv": "convolutional",
    "max": "maxpool",
}


@dataclass
class Section:
    """One ``[name]`` block: its options, line numbers, and which options a layer has read."""

    name: str  # as written in the cfg
    line: int
    options: dict[str, str] = field(default_factory=dict)
    option_lines: dict[str, int] = field(default_factory=dict)
    _read: set[str] = field(default_factory=set, repr=False)

    @property
    def kind(self) -> str:
        """The canonical section name (aliases resolved)."""
        return SECTION_ALIASES.get(self.name, self.name)

    def error(self, message: str, key: str | None = None) -> DarknetError:
        """A ``DarknetError`` naming this section (and the option's own line when given)."""
        line = self.option_lines.get(key, self.line) if key else self.line
        if key and key in self.option_lines:
            message = f"option {key}={self.options[key]!r} (line {line}): {message}"
        return DarknetError(message, section=self.name, line=self.line)

    def has(self, key: str) -> bool:
        return key in self.options

    def _raw(self, key: str) -> str | None:
        self._read.add(key)
        return self.options.get(key)

    def _get(self, key: str, default: T | None, convert: Callable[[str], T], what: str) -> T:
        raw = self._raw(key)
        if raw is None:
            if default is None:
                raise self.error(f"missing required option {key!r}")
            return default
        try:
            return convert(raw)
        except ValueError:
            raise self.error(f"not {what}", key) from None

    def get_int(self, key: str, default: int | None = None) -> int:
        return self._get(key, default, int, "an integer")

    def get_float(self, key: str, default: float | None = None) -> float:
        return self._get(key, default, float, "a number")

    def get_str(self, key: str, default: str | None = None) -> str:
        return self._get(key, default, str, "text")

    def get_ints(self, key: str, default: list[int] | None = None) -> list[int]:
        found = self._get(key, default, lambda raw: [int(v) for v in raw.split(",") if v != ""],
                          "a comma-separated list of integers")
        return list(found)

    def get_floats(self, key: str, default: list[float] | None = None) -> list[float]:
        found = self._get(key, default, lambda raw: [float(v) for v in raw.split(",") if v != ""],
                          "a comma-separated list of numbers")
        return list(found)

    def reject_unread(self, ignorable: Iterable[str] = ()) -> None:
        """Raises on any option that the layer did not read and that is not known to be training-only."""
        skip = set(ignorable)
        for key in self.options:
            if key not in self._read and key not in skip:
                raise self.error(f"unsupported option {key!r} in [{self.name}]", key)


def parse_cfg_text(text: str) -> list[Section]:
    """Sections in file order. The first must be ``[net]`` (or ``[network]``)."""
    sections: list[Section] = []
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = "".join(raw_line.split())  # darknet drops all whitespace, even inside values
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]") or len(line) < 3:
                raise DarknetError(f"malformed section header {raw_line.strip()!r}", line=number)
            sections.append(Section(name=line[1:-1], line=number))
            continue
        if not sections:
            raise DarknetError(f"option {raw_line.strip()!r} before any [section]", line=number)
        section = sections[-1]
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise DarknetError(
                f"expected key=value, got {raw_line.strip()!r}", section=section.name, line=section.line
            )
        if key in section.options and section.options[key] != value:
            raise DarknetError(
                f"option {key!r} given twice (lines {section.option_lines[key]} and {number})",
                section=section.name,
                line=section.line,
            )
        section.options[key] = value
        section.option_lines.setdefault(key, number)
    if not sections:
        raise DarknetError("the cfg has no sections (expected [net] first)")
    if sections[0].kind != "net":
        first = sections[0]
        raise DarknetError("the cfg must start with a [net] section", section=first.name, line=first.line)
    return sections


def parse_cfg(path: Path) -> list[Section]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DarknetError(f"cannot read cfg {path}: {e}") from None
    if b"\x00" in data[:4096]:  # a .weights file (or any binary) given as the cfg
        raise DarknetError(f"{path} is not a darknet cfg: a cfg is text ([net], then key=value lines); this is binary")
    return parse_cfg_text(data.decode("utf-8", errors="replace"))
