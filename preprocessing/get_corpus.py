"""Step 0: a Russian sentence corpus (`ru_sentences.txt`) and a topic-classification set (`topics.tsv`) from
Debian packages.

    python preprocessing/get_corpus.py --out DIR [--packages P ...] [--workers 2] [--stats_json FILE]

The packages (DEFAULT_PACKAGES: fortunes-ru, manpages-ru(-dev), libreoffice-help/-l10n-ru, gimp-help-ru, the
Debian guides in Russian, debian-handbook, gnome-user-docs, kicad-doc-ru, doublecmd-help-ru, freeciv-data and
the Wesnoth data and campaign packages; `a|b` tries a, then b) are fetched with `apt-get download` into
DIR/debs (a .deb already there is reused) and unpacked with `dpkg-deb -x` into DIR/extracted/<package> (kept
while it comes from the same .deb); nothing is installed and the hub is never contacted. A package that
cannot be downloaded or unpacked is skipped with a warning; when none can be had the step fails with a
one-line error (exit code 2).

Only Russian content is read (a `ru`/`ru-RU` directory or a `*.ru.*` file name): HTML and Mallard/XHP help
pages (block elements become line breaks; scripts, navigation and code blocks are dropped), man pages,
gettext .mo catalogues (markup, accelerators removed) and the `%`-separated fortunes-ru files (attribution
lines removed). Man pages are rendered to UTF-8 text by groff, in batches; when groff is not installed they
are read by `roff_to_text`, a simple roff stripper (font and character escapes translated, no-fill blocks
such as code examples dropped), which gives slightly fewer, slightly rougher sentences.

Texts are split into sentences (. ! ? … before a capital, a quote or a dash; Russian abbreviations and
initials do not split), and a sentence is kept when it has 20-300 characters, at least 70% Cyrillic among its
letters, no code-like characters, URLs, file names or removed code/placeholders, starts like a sentence and
ends with final punctuation (--allow_fragments drops the last two rules). Exact duplicates are removed, the
first occurrence (in package and path order) wins, so the output is deterministic.

topics.tsv (`text<TAB>topic` with a header line) holds every fortune of 20-1000 characters, labelled by its
file name, under these rules: files that are not topics are excluded (DEFAULT_TOPIC_EXCLUDE: dated and
numbered collections, author, collection and form files), near-synonymous files are merged
(DEFAULT_TOPIC_MERGES, e.g. love_s, lovers, amur -> love), a text found under two topics is dropped as
ambiguous, and topics left with fewer than --min_topic_examples (100) rows are dropped.

Also written: SOURCES.md (package versions and contributions) and, with --stats_json, the statistics. All
outputs are written atomically. Measured on Debian bookworm (2 cores, shared): 107,490 sentences, 9.0M
characters, 11,455 topic rows in 30 topics; about 45 s with a warm DIR/debs cache (~34 CPU-seconds with 2
workers), plus the first download (~410 MB of .debs, ~80 s here).
"""

from __future__ import annotations

import argparse
import gzip
import html
import os
import re
import shutil
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from urllib.parse import unquote

import _bootstrap  # noqa: F401
from common import timed
from kdcore.errors import UserError, run_cli
from kdcore.fsutil import atomic_write_json, atomic_write_text, staged_dir

WESNOTH_BRANCHES = ("1.16", "1.18")  # bookworm ships 1.16; a newer release may ship 1.18
WESNOTH_CAMPAIGNS = ("httt", "trow", "utbs", "low", "nr", "sof", "tsg", "ei", "did", "dm", "dw", "l", "sota", "sotbe",
                     "thot", "ttb")


def wesnoth(part: str) -> str:
    """The package spec of a Wesnoth data or campaign package: any branch."""
    return "|".join(f"wesnoth-{branch}-{part}" for branch in WESNOTH_BRANCHES)


DEFAULT_PACKAGES = (
    "fortunes-ru", "manpages-ru", "manpages-ru-dev", "libreoffice-help-ru", "gimp-help-ru", "debian-faq-ru",
    "developers-reference-ru", "maint-guide-ru", "aptitude-doc-ru", "debian-handbook", "gnome-user-docs",
    "freeciv-data", wesnoth("data") + "|wesnoth-data", "libreoffice-l10n-ru", "kicad-doc-ru", "doublecmd-help-ru",
    *(wesnoth(campaign) for campaign in WESNOTH_CAMPAIGNS),
)
SENTENCES_FILE = "ru_sentences.txt"
TOPICS_FILE = "topics.tsv"
SOURCES_FILE = "SOURCES.md"
STAMP_FILE = ".unpacked-from"
# fortune files that are not topics: dated (2001.03) and numbered (b12) collections, files named after an author
# (fomenko, polyakov, feano), a collection (citates, other, eshe "more", disa, adv, adv_v, just4fun) or a form
# (haiku, if: every line starts with "Если", armenian: "Армянское радио" jokes)
DEFAULT_TOPIC_EXCLUDE = (r"\d{4}\.\d\d|[a-z]\d+|fomenko|polyakov|feano|citates|other|eshe|disa|adv|adv_v|just4fun"
                         r"|haiku|if|armenian")
# near-synonymous files merged into one topic
DEFAULT_TOPIC_MERGES = ("love_s=love", "lovers=love", "amur=love", "life_k=life", "truth_and_lie=truth",
                        "M$=computer")
DEFAULT_MIN_TOPIC_EXAMPLES = 100
CHUNK_FILES = 32
HOLE = "\ufffc"  # marks removed code or an unfilled placeholder: a sentence containing it is dropped


def words(text: str) -> frozenset[str]:
    """The set of space-separated words of `text`."""
    return frozenset(text.split())


RUSSIAN_DIRS = {"ru", "ru-ru", "ru_ru"}
CYRILLIC_RE = re.compile(r"[А-Яа-яЁё]")
LETTER_RE = re.compile(r"[^\W\d_]")
CODE_RE = re.compile(r"[{}\[\]<>=\\|#$@^~`*]|://|/\*|\B/\w+/|\b\w+\.(?:h|c|py|sh|conf|html)\b")
SPACE_RE = re.compile(r"\s+")
INVISIBLE_RE = re.compile("[\u00ad\u200b-\u200d\u2060\ufeff]")
MOJIBAKE_RE = re.compile("[\u00c2-\u00f4][\u0080-\u00bf]{1,3}")  # UTF-8 bytes read as Latin-1
GARBAGE_RE = re.compile("[\u0000-\u0008\u000e-\u001f\u007f-\u009f\u2500-\u257f\ufffd]")
SENTENCE_START_RE = re.compile(r"(?:[«\"„“(—–\-]\s?|\.\.\.|…)*[A-ZА-ЯЁ0-9]")
BULLET_RE = re.compile(r"^(?:[•◦▪‣∙·]\s*)+")
SENTENCE_END_RE = re.compile(r"[.!?…][»\"”)]*$")
BOUNDARY_RE = re.compile(r"(?:[.!?]+|…)[»\"”)]*\s+(?=[«\"„“]*[A-ZА-ЯЁ]|[—–-]\s*[«\"„“]*[A-ZА-ЯЁ])")
# "т.д.", "т.п.", "др." are not listed: followed by a capital letter they almost always end the sentence
ABBREVIATIONS = words(
    "т.е т.к т.н т.ч т.о см ср напр г гг в вв им ул д стр рис табл прим англ лат греч рус млн млрд тыс руб "
    "коп проф акад доц св ст гл п пп с сс обл р н.э и.о кв пер ред изд"
)
INITIAL_RE = re.compile(r"(?:[A-ZА-ЯЁ]\.){1,3}$")

ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
OVERSTRIKE_RE = re.compile(r".\x08")
MAN_PAGE_BREAK = "GETCORPUSMANPAGEBREAK"
GROFF_CMD = ("groff", "-k", "-Kutf-8", "-t", "-Tutf8", "-man", "-P", "-cbou", "-rHY=0", "-rLL=4000n", "-dAD=l")

MO_MAGIC = 0x950412DE
WESNOTH_MARKUP_RE = re.compile(r"<(\w+)>[^<]*?\btext='([^']*)'[^<]*</\1>")
WESNOTH_BLOCK_RE = re.compile(r"</?(?:header|h\d)>")
MARKUP_TOKEN_RE = re.compile(
    r"""(?P<text>[^<]+)|<!--.*?(?:-->|\Z)|<!\[CDATA\[(?P<cdata>.*?)(?:\]\]>|\Z)|<[!?][^>]*>?"""
    r"""|<(?P<end>/)?(?P<tag>[A-Za-z][^\s/>]*)(?P<attrs>(?:[^>"']|"[^"]*"|'[^']*')*)>|<""", re.DOTALL)
RAW_TEXT_TAGS = {"script", "style"}
TAG_RE = re.compile(r"</?[A-Za-z][^<>]*>")
PLACEHOLDER_RE = re.compile(r"%(?:\([^)]*\))?[-+ #0]*\d*(?:\.\d+)?[a-zA-Z]|%\d+\$?[a-z]?|\{[^{}]*\}|\$\w[\w.]*\|?")
ACCELERATOR_RE = re.compile(r"(?<!\w)[_&](?=\w)")
ATTRIBUTION_RE = re.compile(r"^(?:\s+(?:--|—)|--)\s*\S")


# ---------------------------------------------------------------- packages


def split_deb_name(deb: Path) -> tuple[str, str]:
    """(package, version) from a `name_version_arch.deb` file name (`%3a` is the epoch colon)."""
    name, version = unquote(deb.name).split("_")[:2]
    return name, version


def cached_deb(debs_dir: Path, package: str) -> Path | None:
    """The newest .deb of `package` already in `debs_dir`, or None."""
    found = sorted(debs_dir.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def download(spec: str, debs_dir: Path) -> Path | None:
    """The .deb for `spec` ('name' or 'alt1|alt2|...'), downloaded with `apt-get download` unless cached."""
    for package in spec.split("|"):
        deb = cached_deb(debs_dir, package)
        if deb is not None:
            return deb
        try:
            proc = subprocess.run(["apt-get", "download", package], cwd=debs_dir, capture_output=True, text=True)
        except FileNotFoundError:
            print("warning: apt-get not found; cannot download packages", file=sys.stderr)
            return None
        deb = cached_deb(debs_dir, package)
        if proc.returncode == 0 and deb is not None:
            return deb
    print(f"warning: could not download {spec.replace('|', ' or ')}; skipping it", file=sys.stderr)
    return None


def unpack(deb: Path, extracted_dir: Path) -> Path | None:
    """`dpkg-deb -x` the .deb into extracted_dir/<package> (kept when already unpacked from the same file);
    None, with a warning, when the .deb is broken."""
    target = extracted_dir / split_deb_name(deb)[0]
    stamp = target / STAMP_FILE
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == deb.name:
        return target
    if shutil.which("dpkg-deb") is None:
        raise UserError("dpkg-deb is not installed; install the dpkg package or pass your own corpus files to the "
                        "preprocessing steps")
    try:
        with staged_dir(target) as tmp:
            proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise OSError(proc.stderr.strip())
            (tmp / STAMP_FILE).write_text(deb.name, encoding="utf-8")
    except OSError as err:
        print(f"warning: cannot unpack {deb} ({err}); skipping it (delete the file to download it again)",
              file=sys.stderr)
        return None
    return target


def fetch_packages(specs: Iterable[str], out: Path) -> tuple[dict[str, tuple[Path, str]], list[str]]:
    """Download and unpack the packages: ({package: (unpacked dir, version)}, specs that could not be had)."""
    debs_dir, extracted_dir = out / "debs", out / "extracted"
    debs_dir.mkdir(parents=True, exist_ok=True)
    extracted_dir.mkdir(parents=True, exist_ok=True)
    trees, missing = {}, []
    for spec in specs:
        deb = download(spec, debs_dir)
        root = unpack(deb, extracted_dir) if deb is not None else None
        if deb is None or root is None:
            missing.append(spec)
        else:
            trees[split_deb_name(deb)[0]] = (root, split_deb_name(deb)[1])
    return trees, missing


# ---------------------------------------------------------------- file selection


def is_russian(rel: str) -> bool:
    """Whether a path inside a package holds Russian content (a `ru`/`ru-RU` directory or `*.ru.*` name)."""
    parts = rel.split("/")
    return any(p.lower() in RUSSIAN_DIRS for p in parts[:-1]) or ".ru." in parts[-1]


def file_kind(rel: str) -> str | None:
    """The extractor key for a path inside a package, or None when the file is not read."""
    if not is_russian(rel):
        return None
    name = rel.rsplit("/", 1)[-1]
    if "/games/fortunes/" in rel:
        return None if "." in name and name.rsplit(".", 1)[-1] in {"dat", "u8"} else "fortune"
    if "/man/" in rel and re.search(r"\.\d\w*(?:\.gz)?$", name):
        return "man"
    if "/LC_MESSAGES/" in rel and name.endswith(".mo"):
        return "mo"
    if name.endswith((".html", ".htm", ".xhtml")):
        return "html"
    if name.endswith((".page", ".xhp")):
        return "xml"
    return None


def list_files(trees: dict[str, tuple[Path, str]]) -> list[tuple[str, str, Path]]:
    """(source, kind, path) of every file to read, sorted by source and path; symlinks are skipped."""
    tasks = []
    for source in sorted(trees):
        root = trees[source][0]
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            kind = file_kind(path.relative_to(root).as_posix())
            if kind is not None:
                tasks.append((source, kind, path))
    return tasks


# ---------------------------------------------------------------- extractors


@dataclass(frozen=True)
class MarkupRules:
    """How a markup language's elements become text. `skip`: dropped with their content; `block`: line breaks;
    `hole`: dropped, leaving a hole that discards the sentence around them (inline code); `void_hole` and
    `empty_hole`: holes at a start tag (`<img>`) or at a self-closing tag (`<link/>`, which the help viewer
    fills in); `joiners`: text put between two adjacent elements (`<key>Ctrl</key><key>C</key>`)."""

    skip: frozenset[str]
    block: frozenset[str]
    hole: frozenset[str] = frozenset()
    void_hole: frozenset[str] = frozenset()
    empty_hole: frozenset[str] = frozenset()
    joiners: dict[str, str] = field(default_factory=dict)


HTML_RULES = MarkupRules(
    skip=words("script style pre head nav header footer aside button noscript svg math select textarea "
               "object iframe template"),
    block=words("p div br li ul ol dl dt dd h1 h2 h3 h4 h5 h6 table tr td th caption title section article "
                "blockquote figure figcaption hr body main form tbody thead tfoot"),
    hole=words("code kbd samp var tt"),
    void_hole=words("img"),
)
MALLARD_RULES = MarkupRules(
    skip=words("info screen comment synopsis its:rules embed bookmark_value ahelp"),
    block=words("page section title subtitle p item list steps terms tree table tr td th thead tbody note "
                "figure caption desc example quote paragraph h1 h2 h3 listitem"),
    hole=words("code cmd var sys input output file media"),
    empty_hole=words("link xref media"),
    joiners={"key": "+", "gui": " ▸ "},
)


class MarkupText:
    """Collects the text of an HTML or XML document; block elements become line breaks.

    `feed` is a small regex tokenizer (twice as fast as `html.parser.HTMLParser` on these pages, with the same
    result on all of them): tags, comments, CDATA, declarations and text; entities are decoded in text;
    `<script>`/`<style>` content is raw text up to the closing tag.
    """

    def __init__(self, rules: MarkupRules) -> None:
        self.rules = rules
        self.skipping = 0
        self.last_end = ""
        self.parts: list[str] = []

    def feed(self, document: str) -> None:
        """Tokenize a whole document and dispatch its tags and text to the handlers."""
        pos, pending = 0, []
        while pos < len(document):
            match = MARKUP_TOKEN_RE.match(document, pos)
            pos = match.end()
            if match["text"] is not None or match[0] == "<":
                pending.append(match[0])  # a lone "<" is text, as in HTMLParser
                continue
            if pending:
                self.handle_data(html.unescape("".join(pending)))
                pending = []
            tag = match["tag"]
            if match["cdata"] is not None:
                self.handle_data(match["cdata"])
            elif tag is None:
                continue  # comment, declaration or processing instruction
            elif match["end"]:
                self.handle_endtag(tag.lower())
            elif match["attrs"].rstrip().endswith("/"):
                self.handle_startendtag(tag.lower(), [])
            else:
                self.handle_starttag(tag.lower(), [])
                if tag.lower() in RAW_TEXT_TAGS:
                    close = re.compile(rf"</{tag}\s*>", re.IGNORECASE).search(document, pos)
                    end = close.start() if close else len(document)
                    if end > pos:
                        self.handle_data(document[pos:end])
                    pos = end
        if pending:
            self.handle_data(html.unescape("".join(pending)))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.rules.skip or tag in self.rules.hole:
            self.parts.append("" if self.skipping or tag in self.rules.skip else HOLE)
            self.skipping += 1
        elif self.skipping:
            return
        elif tag in self.rules.block:
            self.parts.append("\n")
        elif tag in self.rules.void_hole:
            self.parts.append(HOLE)
        elif tag == self.last_end and tag in self.rules.joiners:
            self.parts.append(self.rules.joiners[tag])
        self.last_end = ""

    def handle_endtag(self, tag: str) -> None:
        if tag in self.rules.skip or tag in self.rules.hole:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.rules.block:
            self.parts.append("\n")
        self.last_end = tag

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skipping:
            return
        if tag in self.rules.empty_hole or tag in self.rules.void_hole:
            self.parts.append(HOLE)
        elif tag in self.rules.block:
            self.parts.append("\n")
        self.last_end = ""

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(SPACE_RE.sub(" ", data))
            self.last_end = self.last_end if data.isspace() else ""


def extract_markup(path: Path, rules: MarkupRules) -> list[str]:
    """Paragraphs of an HTML/XHTML page or an XML help page."""
    parser = MarkupText(rules)
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return "".join(parser.parts).split("\n")


def render_man(sources: list[str]) -> list[str] | None:
    """Man pages rendered to plain UTF-8 text by one groff run (groff's start-up costs more than a page), or
    None when groff is not installed. Pages are separated by a marker line; if one swallows it (an unclosed
    block), every page is rendered on its own."""
    if shutil.which(GROFF_CMD[0]) is None:
        return None
    joined = f"\n.br\n{MAN_PAGE_BREAK}\n".join(sources)
    proc = subprocess.run(GROFF_CMD, input=joined.encode("utf-8"), capture_output=True)
    pages = OVERSTRIKE_RE.sub("", ANSI_RE.sub("", proc.stdout.decode("utf-8", errors="replace"))).split(MAN_PAGE_BREAK)
    if len(pages) == len(sources):
        return pages
    return [page for source in sources for page in render_man([source]) or []]


ROFF_ESCAPES = (
    (r"\\f(?:\[[^\]]*\]|\(..|.)", ""), (r"\\s[-+]?\d+", ""), (r"\\\*(?:\[[^\]]*\]|\(..|.)", ""),
    (r"\\\((?:em|en)", "—"), (r"\\\((?:lq|Fo)", "«"), (r"\\\((?:rq|Fc)", "»"), (r"\\\((?:aq|cq|oq)", "'"),
    (r"\\\(..|\\\[[^\]]*\]", ""), (r"\\-", "-"), (r"\\e", "\\\\"), (r"\\[&c:%]", ""), (r"\\[ ~0|^]", " "),
)
ROFF_FONT_MACROS = {"B", "I", "SM", "SB", "BR", "RB", "IR", "RI", "BI", "IB"}
ROFF_BREAK_MACROS = {"PP", "P", "LP", "TP", "IP", "HP", "sp", "br", "SH", "SS", "RS", "RE", "TH", "in", "ti"}
ROFF_NOFILL = {"nf": False, "EX": False, "TS": False, "fi": True, "EE": True, "TE": True}


def roff_unescape(text: str) -> str:
    """Remove roff comments and font, size and string escapes; translate the common character escapes."""
    text = re.sub(r'\\".*', "", text)
    for pattern, repl in ROFF_ESCAPES:
        text = re.sub(pattern, repl, text)
    return text


def roff_macro_text(name: str, args: str) -> str:
    """The text of a font macro line (`.B a b`, `.BR a b` alternates fonts without spaces) or a heading."""
    parts = [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', args)]
    return roff_unescape((" " if name in {"B", "I", "SM", "SB", "SH", "SS"} else "").join(parts))


def roff_to_text(source: str) -> str:
    """A plain-text approximation of a man page for when groff is missing (no-fill blocks are dropped)."""
    pieces: list[str] = []
    fill = True
    for line in source.splitlines():
        if line[:1] not in ".'":
            pieces.append(roff_unescape(line) if fill else "\n")
            continue
        name, _, args = line[1:].strip().partition(" ")
        fill = ROFF_NOFILL.get(name, fill)
        if name in ROFF_BREAK_MACROS:
            pieces.append("\n" + (roff_macro_text(name, args) + "\n" if name in {"SH", "SS"} else ""))
        elif name in ROFF_FONT_MACROS and fill:
            pieces.append(roff_macro_text(name, args))
    return " ".join(pieces)


def read_man_source(path: Path) -> str:
    """The roff source of a (possibly gzipped) man page; empty for a `.so` redirection."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    source = raw.decode("utf-8", errors="replace")
    return "" if source.lstrip().startswith(".so ") else source


def extract_man_pages(paths: list[Path]) -> list[list[str]]:
    """Paragraphs of each man page, rendered with groff in one run (or by `roff_to_text` without groff)."""
    sources = [read_man_source(p) for p in paths]
    rendered = render_man(sources)
    if rendered is None:
        rendered = [roff_to_text(s) for s in sources]
    return [text.split("\n") if source else [] for source, text in zip(sources, rendered)]


def extract_man(path: Path) -> list[str]:
    """Paragraphs of one man page."""
    return extract_man_pages([path])[0]


def parse_mo(data: bytes) -> dict[str, str]:
    """{msgid: msgstr} of a binary gettext catalogue (either byte order); plural forms stay NUL-joined."""
    if len(data) < 20:
        raise ValueError("file too short for a .mo catalogue")
    for order in "<>":
        magic, _revision, count, ids_at, strs_at = struct.unpack(order + "5I", data[:20])
        if magic == MO_MAGIC:
            break
    else:
        raise ValueError("bad .mo magic number")
    raw: dict[bytes, bytes] = {}
    for i in range(count):
        id_len, id_at = struct.unpack_from(order + "2I", data, ids_at + 8 * i)
        str_len, str_at = struct.unpack_from(order + "2I", data, strs_at + 8 * i)
        raw[data[id_at:id_at + id_len]] = data[str_at:str_at + str_len]
    charset = re.search(rb"charset=([\w-]+)", raw.get(b"", b""))
    encoding = charset[1].decode("ascii") if charset else "utf-8"
    return {k.decode(encoding, "replace"): v.decode(encoding, "replace") for k, v in raw.items()}


def clean_message(text: str) -> str:
    """A translated UI string without markup and accelerators; placeholders become holes."""
    text = WESNOTH_BLOCK_RE.sub("\n", WESNOTH_MARKUP_RE.sub(r"\2", text.replace("\\n", "\n")))
    text = TAG_RE.sub("", text).replace("%%", "%")
    return ACCELERATOR_RE.sub("", PLACEHOLDER_RE.sub(HOLE, text))


def extract_mo(path: Path) -> list[str]:
    """The cleaned translations (first plural form) of a .mo catalogue, split into paragraphs."""
    catalogue = parse_mo(path.read_bytes())
    texts = []
    for msgid, msgstr in catalogue.items():
        if msgid and msgstr:
            texts.extend(clean_message(msgstr.split("\0")[0]).split("\n"))
    return texts


def extract_fortunes(path: Path) -> list[str]:
    """The fortunes of a `%`-separated fortune file, attribution lines (`-- Author`) removed."""
    text = path.read_text(encoding="utf-8", errors="replace")
    fortunes = []
    for chunk in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        lines = chunk.strip("\n").split("\n")
        while lines and (not lines[-1].strip() or ATTRIBUTION_RE.match(lines[-1])):
            lines.pop()
        body = normalize(" ".join(lines))
        if body:
            fortunes.append(body)
    return fortunes


EXTRACTORS: dict[str, Callable[[Path], list[str]]] = {
    "html": partial(extract_markup, rules=HTML_RULES),
    "xml": partial(extract_markup, rules=MALLARD_RULES),
    "man": extract_man,
    "mo": extract_mo,
    "fortune": extract_fortunes,
}
BATCH_EXTRACTORS: dict[str, Callable[[list[Path]], list[list[str]]]] = {"man": extract_man_pages}
READ_ERRORS = (OSError, ValueError, LookupError, EOFError, struct.error)


# ---------------------------------------------------------------- sentences


def repair_mojibake(match: re.Match) -> str:
    """The character whose UTF-8 bytes were decoded as Latin-1 (unchanged when they are not valid UTF-8)."""
    try:
        return match[0].encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return match[0]


def normalize(text: str) -> str:
    """Whitespace collapsed to single spaces, invisible characters removed, UTF-8-as-Latin-1 repaired."""
    return SPACE_RE.sub(" ", MOJIBAKE_RE.sub(repair_mojibake, INVISIBLE_RE.sub("", text))).strip()


def cyrillic_share(text: str) -> float:
    """Share of Cyrillic letters among all letters (0 when there are none)."""
    letters = len(LETTER_RE.findall(text))
    return len(CYRILLIC_RE.findall(text)) / letters if letters else 0.0


def is_abbreviation(before: str) -> bool:
    """Whether the period ending `before` belongs to an abbreviation ("т.е.", "т. е.", "см.") or an initial."""
    tokens = [t.lstrip("(«\"") for t in before.split()[-2:]]
    if not tokens:
        return False
    last = tokens[-1].lower().rstrip(".")
    pair = tokens[0].lower() + last if len(tokens) == 2 else ""
    return last in ABBREVIATIONS or pair in ABBREVIATIONS or INITIAL_RE.match(tokens[-1]) is not None


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph: split after . ! ? … (and closing quotes) before a capital, quote or dash."""
    return split_normalized(normalize(text))


def split_normalized(text: str) -> list[str]:
    """`split_sentences` of a text that is already `normalize`d."""
    sentences, start = [], 0
    for match in BOUNDARY_RE.finditer(text):
        punct = match[0].rstrip()
        bare = punct.rstrip("»\"”)")
        if bare == "." and is_abbreviation(text[start:match.start() + 1]):
            continue
        sentences.append(text[start:match.start() + len(punct)].strip())
        start = match.end()
    sentences.append(text[start:].strip())
    return [s for s in (BULLET_RE.sub("", s) for s in sentences) if s]


@dataclass(frozen=True)
class Filters:
    """Sentence filters: length range, minimal Cyrillic share, whether a sentence must look complete."""

    min_chars: int = 20
    max_chars: int = 300
    min_cyrillic: float = 0.7
    allow_fragments: bool = False


def keep_sentence(sentence: str, filters: Filters) -> bool:
    """Whether a normalised sentence passes the length, Cyrillic, code and completeness filters."""
    if not filters.min_chars <= len(sentence) <= filters.max_chars or HOLE in sentence:
        return False
    if GARBAGE_RE.search(sentence):
        return False
    if CODE_RE.search(sentence) or cyrillic_share(sentence) < filters.min_cyrillic:
        return False
    return filters.allow_fragments or (SENTENCE_START_RE.match(sentence) is not None
                                       and SENTENCE_END_RE.search(sentence) is not None)


# ---------------------------------------------------------------- per-file work


@dataclass
class FileResult:
    """What one file contributed: its texts, the sentences that passed the filters and fortune rows."""

    source: str
    path: str
    texts: int = 0
    candidates: int = 0
    sentences: list[str] = field(default_factory=list)
    topic_rows: list[tuple[str, str]] = field(default_factory=list)
    error: str = ""


Chunk = tuple[str, str, list[Path]]  # (source, kind, files)


def make_chunks(tasks: list[tuple[str, str, Path]], size: int = CHUNK_FILES) -> list[Chunk]:
    """Consecutive files of the same source and kind, grouped by up to `size`."""
    chunks: list[Chunk] = []
    for source, kind, path in tasks:
        if chunks and chunks[-1][:2] == (source, kind) and len(chunks[-1][2]) < size:
            chunks[-1][2].append(path)
        else:
            chunks.append((source, kind, [path]))
    return chunks


def extract_chunk(kind: str, paths: list[Path]) -> list[list[str] | str]:
    """The paragraphs of each file, or an error message for a file that cannot be read."""
    if kind in BATCH_EXTRACTORS:
        try:
            return list(BATCH_EXTRACTORS[kind](paths))
        except READ_ERRORS:
            pass  # retried one file at a time below, which isolates the unreadable one
    texts: list[list[str] | str] = []
    for path in paths:
        try:
            texts.append(EXTRACTORS[kind](path))
        except READ_ERRORS as err:
            texts.append(f"{type(err).__name__}: {err}")
    return texts


def file_result(source: str, kind: str, path: Path, paragraphs: list[str], filters: Filters,
                fortune_chars: tuple[int, int]) -> FileResult:
    """Split and filter the paragraphs of one file; fortunes also become topic rows."""
    result = FileResult(source, str(path))
    texts = [t for t in map(normalize, paragraphs) if t]
    result.texts = len(texts)
    for text in texts:
        pieces = split_normalized(text)
        result.candidates += len(pieces)
        result.sentences.extend(s for s in pieces if keep_sentence(s, filters))
        if kind == "fortune" and fortune_chars[0] <= len(text) <= fortune_chars[1] and HOLE not in text \
                and cyrillic_share(text) >= filters.min_cyrillic:
            result.topic_rows.append((text, path.name))
    return result


def process_chunk(chunk: Chunk, filters: Filters, fortune_chars: tuple[int, int]) -> list[FileResult]:
    """Extract, split and filter the files of one chunk (runs in a worker process)."""
    source, kind, paths = chunk
    results = []
    for path, paragraphs in zip(paths, extract_chunk(kind, paths)):
        if isinstance(paragraphs, str):
            results.append(FileResult(source, str(path), error=paragraphs))
        else:
            results.append(file_result(source, kind, path, paragraphs, filters, fortune_chars))
    return results


def run_files(tasks: list[tuple[str, str, Path]], filters: Filters, fortune_chars: tuple[int, int],
              workers: int) -> list[FileResult]:
    """Results for all files, in task order, computed by `workers` processes."""
    work = partial(process_chunk, filters=filters, fortune_chars=fortune_chars)
    chunks = make_chunks(tasks)
    if workers <= 1:
        return [r for chunk in chunks for r in work(chunk)]
    with Pool(workers) as pool:
        return [r for results in pool.imap(work, chunks) for r in results]


# ---------------------------------------------------------------- assembling outputs


@dataclass
class SourceStats:
    """Per-package counts printed in the statistics table and written with --stats_json."""

    version: str = ""
    files: int = 0
    errors: int = 0
    texts: int = 0
    candidates: int = 0
    sentences: int = 0
    chars: int = 0


def dedup_sentences(results: list[FileResult], versions: dict[str, str]) -> tuple[list[str], dict[str, SourceStats]]:
    """Exactly de-duplicated sentences in result order (first occurrence wins) and per-source statistics."""
    stats = {source: SourceStats(version=version) for source, version in sorted(versions.items())}
    seen: set[str] = set()
    kept: list[str] = []
    for result in results:
        entry = stats[result.source]
        entry.files += 1
        entry.errors += bool(result.error)
        entry.texts += result.texts
        entry.candidates += result.candidates
        for sentence in result.sentences:
            if sentence not in seen:
                seen.add(sentence)
                kept.append(sentence)
                entry.sentences += 1
                entry.chars += len(sentence)
    return kept, stats


def select_topics(rows: list[tuple[str, str]], min_examples: int, exclude: str,
                  merge: dict[str, str]) -> tuple[list[tuple[str, str]], dict]:
    """Fortune rows with unique texts and kept topics, and the topic statistics.

    Topics are renamed by `merge`; file names matching the `exclude` regex (dated or numbered collections)
    are not topics; a text found under two topics is dropped as ambiguous, one found once is kept in first
    occurrence order; topics with fewer than `min_examples` rows are dropped.
    """
    excluded = re.compile(exclude) if exclude else None
    labels: dict[str, set[str]] = {}
    excluded_counts: Counter[str] = Counter()
    for text, topic in rows:
        topic = merge.get(topic, topic)
        entry = labels.setdefault(text, set())
        if excluded is not None and excluded.fullmatch(topic):
            excluded_counts[topic] += 1
        else:
            entry.add(topic)
    unique = [(text, next(iter(topics))) for text, topics in labels.items() if len(topics) == 1]
    counts = Counter(topic for _, topic in unique)
    keep = {topic for topic, n in counts.items() if n >= min_examples}
    stats = {"kept": {t: counts[t] for t in sorted(keep, key=lambda t: (-counts[t], t))},
             "too_small": {t: n for t, n in sorted(counts.items()) if t not in keep},
             "excluded": dict(sorted(excluded_counts.items())),
             "ambiguous_texts": sum(len(topics) > 1 for topics in labels.values())}
    return [(text, topic) for text, topic in unique if topic in keep], stats


def format_table(stats: dict[str, SourceStats]) -> str:
    """A fixed-width statistics table with a total line."""
    head = f"{'source':<24} {'version':<20} {'files':>6} {'texts':>8} {'sentences':>10} {'chars':>10}"
    lines = [head, "-" * len(head)]
    for name, s in stats.items():
        lines.append(f"{name:<24} {s.version:<20} {s.files:>6} {s.texts:>8} {s.sentences:>10} {s.chars:>10}")
    total = [sum(getattr(s, key) for s in stats.values()) for key in ("files", "texts", "sentences", "chars")]
    lines += ["-" * len(head), f"{'total':<24} {'':<20} {total[0]:>6} {total[1]:>8} {total[2]:>10} {total[3]:>10}"]
    return "\n".join(lines)


def sources_markdown(stats: dict[str, SourceStats], topics: dict) -> str:
    """SOURCES.md: the Debian package versions the corpus was built from, with their contributions."""
    lines = ["# Corpus sources", "", "Built by `preprocessing/get_corpus.py` from these Debian packages.", "",
             "| package | version | files | sentences | characters |", "|---|---|---:|---:|---:|"]
    lines += [f"| {n} | {s.version} | {s.files} | {s.sentences} | {s.chars} |" for n, s in stats.items()]
    lines += ["", "Topics in topics.tsv (fortunes-ru file names): "
              + ", ".join(f"{t} ({n})" for t, n in topics["kept"].items()), ""]
    return "\n".join(lines)


def write_outputs(out: Path, sentences: list[str], topic_rows: list[tuple[str, str]], stats: dict[str, SourceStats],
                  topics: dict) -> None:
    """Write ru_sentences.txt, topics.tsv and SOURCES.md atomically."""
    atomic_write_text(out / SENTENCES_FILE, "".join(s + "\n" for s in sentences))
    atomic_write_text(out / TOPICS_FILE, "text\ttopic\n" + "".join(f"{t}\t{c}\n" for t, c in topic_rows))
    atomic_write_text(out / SOURCES_FILE, sources_markdown(stats, topics))


# ---------------------------------------------------------------- command line


def parse_merge(items: list[str]) -> dict[str, str]:
    """{old: new} from OLD=NEW arguments."""
    merge = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise UserError(f"--merge_topic {item!r} is not OLD=NEW (e.g. --merge_topic love_s=love)")
        merge[old] = new
    return merge


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (debs/ and extracted/ are kept there as cache)")
    p.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES),
                   help="Debian packages to read; 'a|b' tries a, then b")
    p.add_argument("--min_chars", type=int, default=20, help="shortest sentence kept")
    p.add_argument("--max_chars", type=int, default=300, help="longest sentence kept")
    p.add_argument("--min_cyrillic", type=float, default=0.7, help="minimal share of Cyrillic among letters")
    p.add_argument("--allow_fragments", action="store_true",
                   help="also keep lines that do not start like a sentence or lack final punctuation")
    p.add_argument("--fortune_min_chars", type=int, default=20, help="shortest fortune kept in topics.tsv")
    p.add_argument("--fortune_max_chars", type=int, default=1000, help="longest fortune kept in topics.tsv")
    p.add_argument("--min_topic_examples", type=int, default=DEFAULT_MIN_TOPIC_EXAMPLES,
                   help="topics with fewer fortunes (after merging) are dropped")
    p.add_argument("--topic_exclude", default=DEFAULT_TOPIC_EXCLUDE,
                   help="regex of fortune file names that are not topics (default: dated and numbered files)")
    p.add_argument("--merge_topic", action="append", default=[], metavar="OLD=NEW",
                   help="rename a topic, after the default merges " + " ".join(DEFAULT_TOPIC_MERGES)
                   + " (OLD=OLD cancels a default merge)")
    p.add_argument("--workers", type=int, default=2, help="processes extracting files")
    p.add_argument("--apt_update", choices=("auto", "always", "never"), default="auto",
                   help="refresh apt's package lists first (always), only when no package could be downloaded "
                        "(auto; as root), or never")
    p.add_argument("--stats_json", help="also write the statistics as JSON here")
    return p


def apt_update() -> bool:
    """Refresh apt's package lists (root only; nothing is installed). True when it ran successfully."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return False
    print("no package lists or no package found: running `apt-get update`", file=sys.stderr)
    proc = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"warning: apt-get update failed: {proc.stderr.strip()[:300]}", file=sys.stderr)
    return proc.returncode == 0


def check_args(a: argparse.Namespace) -> Filters:
    """Validate the numeric options; returns the sentence filters."""
    if not 1 <= a.min_chars <= a.max_chars:
        raise UserError(f"need 1 <= --min_chars ({a.min_chars}) <= --max_chars ({a.max_chars})")
    if not 0.0 <= a.min_cyrillic <= 1.0:
        raise UserError(f"--min_cyrillic must be within [0, 1], got {a.min_cyrillic}")
    if a.min_topic_examples < 1:
        raise UserError(f"--min_topic_examples must be at least 1, got {a.min_topic_examples}")
    if not 1 <= a.fortune_min_chars <= a.fortune_max_chars:
        raise UserError(f"need 1 <= --fortune_min_chars ({a.fortune_min_chars}) <= --fortune_max_chars "
                        f"({a.fortune_max_chars})")
    if a.workers < 1:
        raise UserError(f"--workers must be at least 1, got {a.workers}")
    try:
        re.compile(a.topic_exclude)
    except re.error as err:
        raise UserError(f"--topic_exclude {a.topic_exclude!r} is not a valid regex ({err})") from err
    return Filters(a.min_chars, a.max_chars, a.min_cyrillic, a.allow_fragments)


def report(stats: dict[str, SourceStats], topics: dict, missing: list[str], seconds: dict[str, float]) -> str:
    """The statistics printed at the end of a run."""
    lines = [format_table(stats),
             f"topics.tsv: {sum(topics['kept'].values())} rows in {len(topics['kept'])} topics: "
             + ", ".join(f"{t}={n}" for t, n in topics["kept"].items()),
             f"topics dropped (fewer rows than --min_topic_examples): {topics['too_small'] or 'none'}; "
             f"fortune files excluded by --topic_exclude: {len(topics['excluded'])}; "
             f"ambiguous fortunes dropped: {topics['ambiguous_texts']}",
             f"time: download+unpack {seconds['fetch']} s, extraction {seconds['extract']} s"]
    if missing:
        lines.append(f"packages not obtained: {', '.join(missing)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    filters = check_args(a)
    merge = parse_merge([*DEFAULT_TOPIC_MERGES, *a.merge_topic])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with timed(seconds, "fetch"):
        if a.apt_update == "always":
            apt_update()
        trees, missing = fetch_packages(a.packages, out)
        if not trees and a.apt_update == "auto" and apt_update():
            trees, missing = fetch_packages(a.packages, out)
    if not trees:
        raise UserError("no package could be downloaded; run `apt-get update` (as root) and retry, or skip this "
                        "step and pass your own corpus files to the preprocessing steps")
    with timed(seconds, "extract"):
        results = run_files(list_files(trees), filters, (a.fortune_min_chars, a.fortune_max_chars), a.workers)
        sentences, stats = dedup_sentences(results, {name: version for name, (_, version) in trees.items()})
        if not sentences:
            raise UserError(f"no Russian sentences found in {', '.join(trees)}; check --packages and the filters")
        topic_rows, topics = select_topics([row for r in results for row in r.topic_rows], a.min_topic_examples,
                                           a.topic_exclude, merge)
        write_outputs(out, sentences, topic_rows, stats, topics)
    for r in results:
        if r.error:
            print(f"warning: skipped {r.path}: {r.error}", file=sys.stderr)
    print(report(stats, topics, missing, seconds))
    if a.stats_json:
        atomic_write_json(a.stats_json, {"sources": {n: asdict(s) for n, s in stats.items()},
                                         "total": {"sentences": len(sentences), "chars": sum(map(len, sentences))},
                                         "topics": topics, "missing_packages": missing, "filters": asdict(filters),
                                         "seconds": seconds})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
