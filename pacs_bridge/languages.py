"""The words a report says to a person, per language, from data files.

``pacs_bridge/languages/<tag>.toml`` holds one language (``en`` is the source): finding names by
code, the summary's phrases and the fixed statements (see ``en.toml``). Translations live in these
files, never in code, so a reviewer of medical terms reads one file and adding a language is adding
one. A report always carries English; a destination may ask for one more (``[[peers]] language``).
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nidaan.core.errors import ConfigError
from nidaan.core.findings import CodedValue

__all__ = ["Language", "available", "load_language"]

_DIR = Path(__file__).with_name("languages")
#: Where a language's ``burn_fonts`` are looked for (the FHS's font folders).
FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))


@dataclass(frozen=True)
class Language:
    """One language's report texts (see ``languages/en.toml`` for the keys)."""

    tag: str
    name: str
    reviewed_by: str
    terms: dict[str, str]
    findings: dict[str, str]
    #: Font files that draw the language's script, relative to one of FONT_DIRS.
    burn_fonts: tuple[str, ...] = ()

    def term(self, key: str, **values: object) -> str:
        """The text ``key`` with ``values`` filled in."""
        return self.terms[key].format(**values)

    def finding(self, code: CodedValue) -> str:
        """The finding's name in this language (the code's meaning when the file lacks it)."""
        return self.findings.get(f"{code.scheme}:{code.value}", code.meaning)

    def burn_font(self, font_dirs: Sequence[Path] | None = None) -> Path | None:
        """The first of ``burn_fonts`` installed under ``font_dirs`` (default FONT_DIRS); None
        when none is (or the language names none)."""
        for name in self.burn_fonts:
            for folder in FONT_DIRS if font_dirs is None else font_dirs:
                path = folder / name
                if path.is_file():
                    return path
        return None


def available() -> list[str]:
    """Tags of the languages shipped (``en`` first)."""
    tags = sorted(p.stem for p in _DIR.glob("*.toml"))
    return ["en"] + [t for t in tags if t != "en"]


@functools.cache
def load_language(tag: str) -> Language:
    """The language ``tag`` (e.g. ``hi``); ConfigError naming what is wrong with its file."""
    path = _DIR / f"{tag}.toml"
    if not tag.replace("-", "").isalnum() or not path.is_file():
        raise ConfigError(
            f"no report language {tag!r} (available: {', '.join(available())}); "
            f"add pacs_bridge/languages/{tag}.toml to provide one"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"report language file {path.name} does not load: {exc}") from exc
    meta = data.get("language", {})
    terms = {str(k): str(v) for k, v in data.get("terms", {}).items()}
    findings = {str(k): str(v) for k, v in data.get("findings", {}).items()}
    if tag != "en":
        english = load_language("en")
        missing = sorted(set(english.terms) - set(terms))
        if missing:
            raise ConfigError(f"report language file {path.name} lacks {', '.join(missing)}")
    if meta.get("tag") != tag:
        raise ConfigError(f"report language file {path.name} says its tag is {meta.get('tag')!r}")
    fonts = meta.get("burn_fonts", [])
    if not isinstance(fonts, list) or not all(
        isinstance(f, str) and f and not Path(f).is_absolute() and ".." not in Path(f).parts
        for f in fonts
    ):
        raise ConfigError(
            f"report language file {path.name}: burn_fonts must list font files relative to "
            'the font folders, e.g. "truetype/lohit-devanagari/Lohit-Devanagari.ttf"'
        )
    return Language(
        tag,
        str(meta.get("name", tag)),
        str(meta.get("reviewed_by", "")),
        terms,
        findings,
        tuple(fonts),
    )
