"""preprocessing/get_corpus.py: extractors, sentence splitting and filters, outputs, errors (offline)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

import get_corpus as gc
from kdcore.errors import run_cli

HOLE = gc.HOLE


def write_mo(path: Path, messages: dict[str, str], order: str = "<") -> Path:
    """Write a binary gettext catalogue (no hash table) with the given byte order."""
    keys = sorted(messages)
    ids = [k.encode("utf-8") for k in keys]
    strs = [messages[k].encode("utf-8") for k in keys]
    ids_at = 28
    strs_at = ids_at + 8 * len(keys)
    data_at = strs_at + 8 * len(keys)
    blob, id_table, str_table = b"", [], []
    for raw, table in [(s, id_table) for s in ids] + [(s, str_table) for s in strs]:
        table.append((len(raw), data_at + len(blob)))
        blob += raw + b"\0"
    header = struct.pack(order + "7I", gc.MO_MAGIC, 0, len(keys), ids_at, strs_at, 0, 0)
    tables = b"".join(struct.pack(order + "2I", *entry) for entry in id_table + str_table)
    path.write_bytes(header + tables + blob)
    return path


def sentences_of(paragraphs: list[str]) -> list[str]:
    """Normalised, non-empty paragraphs."""
    return [p for p in map(gc.normalize, paragraphs) if p]


# ---------------------------------------------------------------- extractors


def test_html_extractor_skips_scripts_and_breaks_blocks(tmp_path):
    page = tmp_path / "page.ru.html"
    page.write_text("""<!DOCTYPE html><html><head><title>Заголовок окна</title>
<style>p { color: red }</style><script>var x = "Скрипт";</script></head>
<body><header><nav>Меню сайта</nav></header>
<div><h1>Первая глава</h1><p>Текст абзаца
 продолжается <b>здесь</b> &amp; там.<br>Новая строка.</p>
<ul><li>Пункт <i>один</i></li><li>Пункт два</li></ul>
<pre>int main() { return 0; }</pre>
<p>Вызовите <code>make</code> в каталоге.</p><p>Значок <img src="i.png"> открывает меню.</p></div>
<footer>Подвал</footer></body></html>""", encoding="utf-8")
    texts = sentences_of(gc.EXTRACTORS["html"](page))
    assert texts == ["Первая глава", "Текст абзаца продолжается здесь & там.", "Новая строка.", "Пункт один",
                     "Пункт два", f"Вызовите {HOLE} в каталоге.", f"Значок {HOLE} открывает меню."]


def test_html_tokenizer_edge_cases(tmp_path):
    page = tmp_path / "edge.ru.html"
    page.write_text("""<HTML><BODY><SCRIPT type="text/javascript">if (a<b && c>d) { s = "<p>Скрипт<pre>"; }</SCRIPT>
<!-- <p>Комментарий.</p> --><P CLASS='x'>Если a &lt; b и b &gt; c, то &laquo;a&raquo; меньше&nbsp;c.</P>
<p>Строка<br/>вторая <![CDATA[данные]]> и знак < без тега.</p><style>p>b { x: 1 }</style>
<p title="a > b">Атрибут с угловой скобкой.</p><p>Конец<!-- незакрытый комментарий <p>Скрыто.</p>""",
                    encoding="utf-8")
    texts = sentences_of(gc.EXTRACTORS["html"](page))
    assert texts == ["Если a < b и b > c, то «a» меньше c.", "Строка", "вторая данные и знак < без тега.",
                     "Атрибут с угловой скобкой.", "Конец"]


def test_mallard_extractor(tmp_path):
    page = tmp_path / "help.page"
    page.write_text("""<?xml version="1.0" encoding="utf-8"?>
<page xmlns="http://projectmallard.org/1.0/" id="x"><info><credit><name>Автор Имя</name></credit>
<desc>Краткое описание.</desc></info><title>Настройка часов</title>
<p>Нажмите <keyseq><key>Ctrl</key><key>C</key></keyseq> и выберите <guiseq><gui>Файл</gui>
<gui>Открыть</gui></guiseq>. Можно <link xref="clock">установить время</link> вручную.</p>
<p>Смотрите <link xref="other"/>.</p><screen>$ ls -l</screen></page>""", encoding="utf-8")
    texts = sentences_of(gc.EXTRACTORS["xml"](page))
    assert texts == ["Настройка часов",
                     "Нажмите Ctrl+C и выберите Файл ▸ Открыть. Можно установить время вручную.",
                     f"Смотрите {HOLE}."]


MAN_PAGE = r""".\" -*- coding: UTF-8 -*-
.TH TEST 7 2023-01-01 "Linux" "Руководство"
.SH ИМЯ
test \- проверочная страница
.SH ОПИСАНИЕ
Эта страница описывает \fBпроверочную\fP программу, которая существует исключительно для
тестирования высокопроизводительного, многопоточного и чрезвычайно длинного предложения без переносов.
.PP
Второй абзац содержит \fIкурсив\fR и ссылку на
.BR signal (7).
.nf
int main(void) { return 0; }
.fi
"""


def write_man(tmp_path: Path) -> Path:
    path = tmp_path / "test.7.gz"
    path.write_bytes(gzip.compress(MAN_PAGE.encode("utf-8")))
    return path


def test_man_extractor_with_groff(tmp_path):
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    texts = sentences_of(gc.EXTRACTORS["man"](write_man(tmp_path)))
    joined = "\n".join(texts)
    assert "\x08" not in joined and "\x1b" not in joined
    assert ("Эта страница описывает проверочную программу, которая существует исключительно для тестирования "
            "высокопроизводительного, многопоточного и чрезвычайно длинного предложения без переносов.") in texts
    assert "Второй абзац содержит курсив и ссылку на signal(7)." in texts
    assert "ИМЯ" in texts


def test_man_batch_matches_single_pages(tmp_path):
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    first = write_man(tmp_path)
    second = tmp_path / "other.7"
    second.write_text(MAN_PAGE.replace("Второй абзац", "Другой абзац"), encoding="utf-8")
    stub = tmp_path / "stub.7"
    stub.write_text(".so man7/test.7\n", encoding="utf-8")
    batch = gc.extract_man_pages([first, stub, second])
    assert batch[1] == []
    def body(paragraphs: list[str]) -> list[str]:  # page footers may land after the page break marker
        return [s for p in sentences_of(paragraphs) for s in gc.split_sentences(p) if gc.keep_sentence(s, gc.Filters())]

    assert body(batch[0]) == body(gc.extract_man(first)) != []
    assert "Другой абзац содержит курсив и ссылку на signal(7)." in sentences_of(batch[2])


def test_roff_fallback_without_groff(tmp_path, monkeypatch):
    monkeypatch.setattr(gc.shutil, "which", lambda name: None)
    texts = sentences_of(gc.EXTRACTORS["man"](write_man(tmp_path)))
    assert "Второй абзац содержит курсив и ссылку на signal(7)." in texts
    assert any(t.startswith("Эта страница описывает проверочную программу") for t in texts)
    assert not any("int main" in t or "\\f" in t for t in texts)


@pytest.mark.parametrize("order", ["<", ">"])
def test_mo_extractor_both_byte_orders(tmp_path, order):
    mo = write_mo(tmp_path / "app.mo", {
        "": "Content-Type: text/plain; charset=UTF-8\n",
        "Open": "_Открыть файл <b>немедленно</b>",
        "Saved %s": "Файл %s сохранён",
        "{n} files": "Найдено {n} файлов",
        "apple\0apples": "яблоко\0яблока",
        "ctx\x04Help": "<ref>dst='x' text='Справка'</ref> по &игре.\nВторая строка.",
        "Untranslated": "",
    }, order)
    assert gc.parse_mo(mo.read_bytes())["Open"] == "_Открыть файл <b>немедленно</b>"
    texts = sentences_of(gc.extract_mo(mo))
    assert sorted(texts) == sorted(["Открыть файл немедленно", f"Файл {HOLE} сохранён", f"Найдено {HOLE} файлов",
                                    "яблоко", "Справка по игре.", "Вторая строка."])


def test_mo_compiled_by_msgfmt(tmp_path):
    if shutil.which("msgfmt") is None:
        pytest.skip("msgfmt is not installed")
    po = tmp_path / "app.po"
    po.write_text('msgid ""\nmsgstr "Content-Type: text/plain; charset=UTF-8\\n"\n\n'
                  'msgid "Quit"\nmsgstr "Выйти из программы немедленно."\n\n'
                  'msgctxt "menu"\nmsgid "File"\nmsgstr "_Файл"\n\n'
                  'msgid "One file"\nmsgid_plural "%d files"\nmsgstr[0] "Один файл"\nmsgstr[1] "%d файла"\n'
                  'msgstr[2] "%d файлов"\n', encoding="utf-8")
    mo = tmp_path / "app.mo"
    assert os.system(f"msgfmt -o {mo} {po}") == 0
    assert sorted(sentences_of(gc.extract_mo(mo))) == ["Выйти из программы немедленно.", "Один файл", "Файл"]


def test_mo_with_bad_magic_is_an_error_not_a_crash(tmp_path):
    bad = tmp_path / "bad.mo"
    bad.write_bytes(b"\0" * 40)
    with pytest.raises(ValueError):
        gc.extract_mo(bad)
    assert gc.extract_chunk("mo", [bad])[0].startswith("ValueError")


def test_fortune_extractor(tmp_path):
    path = tmp_path / "love"
    path.write_text("Любовь - это\nвзаимное чувство.\n\t\t-- Автор Неизвестный\n%\n"
                    "— Ты придёшь?\n— Приду.\n%\n%\nКороткая.\n", encoding="utf-8")
    assert gc.extract_fortunes(path) == ["Любовь - это взаимное чувство.", "— Ты придёшь? — Приду.", "Короткая."]


# ---------------------------------------------------------------- sentences and filters


@pytest.mark.parametrize("text, expected", [
    ("Он пришёл домой. Было поздно!", ["Он пришёл домой.", "Было поздно!"]),
    ("Фрукты: яблоки, груши и т.д. Потом овощи.", ["Фрукты: яблоки, груши и т.д.", "Потом овощи."]),
    ("Это, т.е. Москва, столица. См. Рис. 5 ниже.", ["Это, т.е. Москва, столица.", "См. Рис. 5 ниже."]),
    ("Речь о т. е. Главном вопросе.", ["Речь о т. е. Главном вопросе."]),
    ("В 1998 г. Иван уехал. Он вернулся.", ["В 1998 г. Иван уехал.", "Он вернулся."]),
    ("Стихи написал А. С. Пушкин. Они известны.", ["Стихи написал А. С. Пушкин.", "Они известны."]),
    ("Аппетит приходит... и уходит. Подожди… Я скоро.", ["Аппетит приходит... и уходит.", "Подожди…", "Я скоро."]),
    ("Он сказал: «Привет!» Потом ушёл.", ["Он сказал: «Привет!»", "Потом ушёл."]),
    ("«Ты придёшь?» — спросил он. — Да, — ответила она.",
     ["«Ты придёшь?» — спросил он.", "— Да, — ответила она."]),
    ("Версия 2.0 вышла. Что?! Не может быть.", ["Версия 2.0 вышла.", "Что?!", "Не может быть."]),
    ("• Первый пункт списка.", ["Первый пункт списка."]),
])
def test_split_sentences(text, expected):
    assert gc.split_sentences(text) == expected


@pytest.mark.parametrize("sentence, kept", [
    ("Это обычное русское предложение.", True),
    ("Вызов signal() устанавливает обработчик SIG_IGN.", True),
    ("This sentence is written in English only.", False),
    ("Вызовите apt-get install python3-numpy now.", False),
    ("Коротко.", False),
    ("x = y[1]; // присваивание значения", False),
    ("Смотрите https://example.org для подробностей.", False),
    (f"Выполните команду {HOLE} для установки.", False),
    ("настройку клавиатуры в консоли;", False),
    ("Заголовок раздела без точки в конце", False),
    ("Текст с мусором ╕ внутри предложения.", False),
])
def test_keep_sentence(sentence, kept):
    assert gc.keep_sentence(sentence, gc.Filters()) is kept


def test_filter_options():
    long = "Очень длинное предложение " * 20 + "конец."
    assert not gc.keep_sentence(long, gc.Filters())
    assert gc.keep_sentence(long, gc.Filters(max_chars=1000))
    assert gc.keep_sentence("Заголовок раздела без точки в конце", gc.Filters(allow_fragments=True))
    mixed = "Нажмите кнопку OK в окне Settings."
    assert gc.cyrillic_share(mixed) < 0.7
    assert not gc.keep_sentence(mixed, gc.Filters())
    assert gc.keep_sentence(mixed, gc.Filters(min_cyrillic=0.5))


def test_normalize_repairs_mojibake_and_invisible_characters():
    assert gc.normalize(" Новости\u00ad  â\x80\x94\n хорошие ") == "Новости — хорошие"


@pytest.mark.parametrize("rel, kind", [
    ("usr/share/man/ru/man7/signal.7.gz", "man"),
    ("usr/share/man/man7/signal.7.gz", None),
    ("usr/share/locale/ru/LC_MESSAGES/app.mo", "mo"),
    ("usr/share/locale/uk/LC_MESSAGES/app.mo", None),
    ("usr/share/games/fortunes/ru/love", "fortune"),
    ("usr/share/games/fortunes/ru/love.dat", None),
    ("usr/share/doc/maint-guide-ru/html/index.ru.html", "html"),
    ("usr/share/doc/debian-handbook/html/ru-RU/index.html", "html"),
    ("usr/share/doc/debian-handbook/html/de-DE/index.html", None),
    ("usr/share/help/ru/gnome-help/clock.page", "xml"),
    ("usr/share/help/ru/gnome-help/figures/clock.png", None),
])
def test_file_kind(rel, kind):
    assert gc.file_kind(rel) == kind


def test_select_topics():
    rows = [(f"Текст номер {i}", "love") for i in range(5)] + [("Общий текст", "love"), ("Общий текст", "sex")]
    rows += [(f"Фраза {i}", "love_s") for i in range(3)] + [("Фраза 0", "2001.03"), ("Иное", "b12")]
    rows += [("Редкий", "drink")]
    kept, stats = gc.select_topics(rows, 2, gc.DEFAULT_TOPIC_EXCLUDE, {"love_s": "love"})
    assert stats["kept"] == {"love": 8}
    assert stats["too_small"] == {"drink": 1}
    assert stats["excluded"] == {"2001.03": 1, "b12": 1}
    assert stats["ambiguous_texts"] == 1
    assert ("Фраза 0", "love") in kept and all(topic == "love" for _, topic in kept)


# ---------------------------------------------------------------- whole runs on fake trees


def fake_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


FORTUNES = "".join(f"Это поучительная мысль номер {i} о любви и жизни.\n\t\t-- Автор\n%\n" for i in range(60))
POLITICS = "".join(f"Это политическая шутка номер {i} о выборах.\n%\n" for i in range(55))


@pytest.fixture()
def fake_packages(tmp_path, monkeypatch):
    """Two fake unpacked packages; `fetch_packages` returns them instead of downloading."""
    fortunes = fake_tree(tmp_path / "trees" / "fortunes-ru", {
        "usr/share/games/fortunes/ru/love": FORTUNES + "Общая фраза для двух пакетов.\n%\nNot Russian at all, sorry.\n",
        "usr/share/games/fortunes/ru/love.dat": b"\0\1\2",
        "usr/share/games/fortunes/ru/polit": POLITICS,
        "usr/share/games/fortunes/ru/religion": "Единственная фраза о вере.\n",
        "usr/share/games/fortunes/ru/love_s": "".join(f"Любовь бывает разной, вариант {i}.\n%\n" for i in range(5)),
        "usr/share/games/fortunes/ru/fomenko": "Это фраза из авторского сборника.\n%\nЕщё одна фраза автора.\n",
        "usr/share/doc/fortunes-ru/README": "Не читается.",
    })
    (fortunes / "usr/share/games/fortunes/ru/love.u8").symlink_to("love")
    docs = fake_tree(tmp_path / "trees" / "aaa-doc-ru", {
        "usr/share/doc/aaa/ru/index.html": "<p>Общая фраза для двух пакетов. Документация на русском языке.</p>"
                                           "<p>English documentation sentence only.</p>",
        "usr/share/doc/aaa/en/index.html": "<p>Эта фраза лежит не в русском каталоге.</p>",
    })
    trees = {"fortunes-ru": (fortunes, "1.52-3.1"), "aaa-doc-ru": (docs, "1:2.0-1")}
    monkeypatch.setattr(gc, "fetch_packages", lambda specs, out: (trees, ["missing-pkg"]))
    return trees


@pytest.mark.parametrize("workers", [1, 2])
def test_main_writes_outputs(tmp_path, fake_packages, capsys, workers):
    out = tmp_path / "out"
    rc = run_cli(gc.main, ["--out", str(out), "--workers", str(workers), "--stats_json", str(tmp_path / "s.json"),
                           "--min_topic_examples", "50"])
    assert rc == 0
    lines = (out / gc.SENTENCES_FILE).read_text(encoding="utf-8").splitlines()
    assert lines[:2] == ["Общая фраза для двух пакетов.", "Документация на русском языке."]
    assert lines.count("Общая фраза для двух пакетов.") == 1
    assert "Эта поучительная" not in lines and "Это поучительная мысль номер 0 о любви и жизни." in lines
    assert not any("English" in s or "русском каталоге" in s or "Автор" in s for s in lines)
    assert "Это фраза из авторского сборника." in lines  # an excluded topic file still feeds the corpus
    assert len(lines) == 2 + 60 + 55 + 1 + 5 + 2
    rows = (out / gc.TOPICS_FILE).read_text(encoding="utf-8").splitlines()
    assert rows[0] == "text\ttopic"
    topics = [row.split("\t") for row in rows[1:]]
    assert all(len(row) == 2 for row in topics)
    # love_s is merged into love by default, fomenko (an author) is not a topic, religion is too small
    assert sum(t == "love" for _, t in topics) == 61 + 5 and sum(t == "polit" for _, t in topics) == 55
    assert len(topics) == 61 + 5 + 55
    assert ["Это поучительная мысль номер 0 о любви и жизни.", "love"] in topics
    assert ["Любовь бывает разной, вариант 0.", "love"] in topics
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["sources"]["fortunes-ru"]["files"] == 5 and stats["sources"]["aaa-doc-ru"]["files"] == 1
    assert stats["sources"]["aaa-doc-ru"]["sentences"] == 2 and stats["sources"]["aaa-doc-ru"]["version"] == "1:2.0-1"
    assert stats["topics"]["too_small"] == {"religion": 1}
    assert stats["topics"]["excluded"] == {"fomenko": 2}
    assert stats["missing_packages"] == ["missing-pkg"]
    assert "| fortunes-ru | 1.52-3.1 |" in (out / gc.SOURCES_FILE).read_text(encoding="utf-8")
    printed = capsys.readouterr().out
    assert "total" in printed and "polit=55" in printed and "missing-pkg" in printed
    assert not list(out.glob("*.tmp*"))


def test_output_is_deterministic(tmp_path, fake_packages):
    for name in ("a", "b"):
        assert gc.main(["--out", str(tmp_path / name), "--workers", "2"]) == 0
    for name in (gc.SENTENCES_FILE, gc.TOPICS_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_no_sentences_leaves_previous_output(tmp_path, monkeypatch, capsys):
    empty = fake_tree(tmp_path / "trees" / "x-ru", {"usr/share/doc/x/ru/a.html": "<p>English only text here.</p>"})
    monkeypatch.setattr(gc, "fetch_packages", lambda specs, out: ({"x-ru": (empty, "1")}, []))
    out = tmp_path / "out"
    out.mkdir()
    (out / gc.SENTENCES_FILE).write_text("старое\n", encoding="utf-8")
    rc = run_cli(gc.main, ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no Russian sentences" in err and "\n" not in err
    assert (out / gc.SENTENCES_FILE).read_text(encoding="utf-8") == "старое\n"


def fake_apt_get(tmp_path: Path, monkeypatch, script: str) -> Path:
    """Put an `apt-get` shell script first on PATH; its calls are logged to the returned file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    tool = bin_dir / "apt-get"
    tool.write_text(f'#!/bin/sh\necho "$@" >> {log}\n{script}\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_nothing_obtained_exits_2(tmp_path, monkeypatch, capsys):
    log = fake_apt_get(tmp_path, monkeypatch, 'echo "E: Unable to locate package $2" >&2; exit 100')
    rc = run_cli(gc.main, ["--out", str(tmp_path / "out"), "--packages", "no-such-pkg", "other-a|other-b",
                           "--apt_update", "never"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "could not download no-such-pkg" in err and "other-a or other-b" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "apt-get update" in last and "own corpus" in last
    assert log.read_text().split("\n")[:3] == ["download no-such-pkg", "download other-a", "download other-b"]
    assert not (tmp_path / "out" / gc.SENTENCES_FILE).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="apt-get update is only tried as root")
def test_auto_apt_update_then_retry(tmp_path, monkeypatch, capsys):
    log = fake_apt_get(tmp_path, monkeypatch, '[ "$1" = update ] && exit 0; exit 100')
    rc = run_cli(gc.main, ["--out", str(tmp_path / "out"), "--packages", "a-ru"])
    assert rc == 2
    assert log.read_text().splitlines() == ["download a-ru", "update -qq", "download a-ru"]
    assert "running `apt-get update`" in capsys.readouterr().err


def test_download_uses_cached_deb(tmp_path, monkeypatch):
    log = fake_apt_get(tmp_path, monkeypatch, 'touch "$2_9.9-1_all.deb"')
    debs = tmp_path / "debs"
    debs.mkdir()
    cached = debs / "fortunes-ru_1.52-3.1_all.deb"
    cached.write_bytes(b"")
    assert gc.download("fortunes-ru", debs) == cached
    assert not log.exists()
    assert gc.download("wesnoth-1.16-data|wesnoth-data", debs) == debs / "wesnoth-1.16-data_9.9-1_all.deb"
    assert log.read_text().split() == ["download", "wesnoth-1.16-data"]
    assert gc.split_deb_name(debs / "libreoffice-help-ru_4%3a7.4.7-1_all.deb") == ("libreoffice-help-ru", "4:7.4.7-1")


def test_unpack_is_cached(tmp_path, capsys):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    src = fake_tree(tmp_path / "pkg", {"DEBIAN/control": "Package: tiny-ru\nVersion: 1.0\nArchitecture: all\n"
                                                         "Maintainer: T <t@example.org>\nDescription: test\n",
                                       "usr/share/doc/tiny/ru/a.html": "<p>Привет.</p>"})
    deb = tmp_path / "tiny-ru_1.0_all.deb"
    assert os.system(f"dpkg-deb --build --root-owner-group {src} {deb} >/dev/null 2>&1") == 0
    target = gc.unpack(deb, tmp_path / "extracted")
    page = target / "usr/share/doc/tiny/ru/a.html"
    assert page.read_text(encoding="utf-8") == "<p>Привет.</p>"
    page.write_text("<p>Изменено.</p>", encoding="utf-8")
    assert gc.unpack(deb, tmp_path / "extracted") == target
    assert page.read_text(encoding="utf-8") == "<p>Изменено.</p>"
    broken = tmp_path / "broken-ru_1.0_all.deb"
    broken.write_bytes(b"not a deb")
    assert gc.unpack(broken, tmp_path / "extracted") is None
    assert "cannot unpack" in capsys.readouterr().err
    assert not (tmp_path / "extracted" / "broken-ru").exists()


def test_bad_options_are_user_errors(tmp_path, capsys):
    for argv in (["--min_chars", "50", "--max_chars", "10"], ["--min_cyrillic", "2"], ["--workers", "0"],
                 ["--topic_exclude", "("], ["--merge_topic", "love"]):
        rc = run_cli(gc.main, ["--out", str(tmp_path / "o"), *argv])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_default_topic_rules(tmp_path, fake_packages, capsys):
    out = tmp_path / "out"
    assert gc.main(["--out", str(out), "--merge_topic", "love_s=love_s"]) == 0
    assert (out / gc.TOPICS_FILE).read_text(encoding="utf-8") == "text\ttopic\n"  # every topic < 100 rows
    printed = capsys.readouterr().out
    assert "0 rows in 0 topics" in printed
    assert "'love': 61" in printed and "'love_s': 5" in printed and "'polit': 55" in printed
    assert "fortune files excluded by --topic_exclude: 1;" in printed  # fomenko


def build_deb(tmp_path: Path, package: str, files: dict[str, str]) -> Path:
    """A real .deb (dpkg-deb --build) of `files`."""
    src = fake_tree(tmp_path / f"src-{package}", {
        "DEBIAN/control": f"Package: {package}\nVersion: 1.0\nArchitecture: all\nMaintainer: T <t@example.org>\n"
                          "Description: test\n", **files})
    deb = tmp_path / f"{package}_1.0_all.deb"
    assert os.system(f"dpkg-deb --build --root-owner-group {src} {deb} >/dev/null 2>&1") == 0
    return deb


def test_missing_package_is_skipped_with_warning(tmp_path, monkeypatch, capsys):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    deb = build_deb(tmp_path, "tiny-doc-ru", {"usr/share/doc/tiny/ru/a.html": "<p>Первое предложение пакета.</p>"})
    fake_apt_get(tmp_path, monkeypatch, f'if [ "$2" = tiny-doc-ru ]; then cp {deb} .; else exit 100; fi')
    out = tmp_path / "out"
    rc = run_cli(gc.main, ["--out", str(out), "--packages", "gone-ru", "tiny-doc-ru"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "warning: could not download gone-ru; skipping it" in captured.err
    assert "packages not obtained: gone-ru" in captured.out
    assert (out / gc.SENTENCES_FILE).read_text(encoding="utf-8") == "Первое предложение пакета.\n"
    assert (out / "debs" / deb.name).is_file() and (out / "extracted" / "tiny-doc-ru" / gc.STAMP_FILE).is_file()


def test_nothing_obtained_through_the_command_line(tmp_path, monkeypatch):
    import subprocess
    import sys

    fake_apt_get(tmp_path, monkeypatch, "exit 100")
    script = Path(gc.__file__)
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "out"), "--packages", "a-ru",
                           "--apt_update", "never"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "warning: could not download a-ru; skipping it"
    assert len(lines) == 2 and lines[1].startswith("error: no package could be downloaded")


def test_outputs_are_replaced_atomically(tmp_path, fake_packages, monkeypatch):
    """A run killed while publishing its outputs leaves the previous files whole."""
    out = tmp_path / "out"
    out.mkdir()
    (out / gc.SENTENCES_FILE).write_text("Старый корпус.\n", encoding="utf-8")
    from kdcore import fsutil

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(fsutil.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        gc.main(["--out", str(out)])
    assert (out / gc.SENTENCES_FILE).read_text(encoding="utf-8") == "Старый корпус.\n"
    assert not (out / gc.TOPICS_FILE).exists()
