"""Rendering and splitting: escaped correctly, every chunk well-formed and within the limit."""

from __future__ import annotations

import re

from nightlab.bot.format import SLACK_RICH, TELEGRAM_HTML, bold, italic, plain, pre, slack_spans, utf16_len


def test_telegram_html_escapes_and_marks_up() -> None:
    (out,) = TELEGRAM_HTML.render([bold("a<b>&c"), plain(" x > y"), pre("\nif a < b: pass")])
    assert out == "<b>a&lt;b&gt;&amp;c</b> x &gt; y<pre>\nif a &lt; b: pass</pre>"


def test_slack_bodies_hold_the_spans_as_written() -> None:
    """Slack gets rich_text (literal text, styles as flags): a body gives back exactly its spans,
    mrkdwn's characters and Slack's reserved ones untouched."""
    spans = [bold("new best"), plain(' "q" <@U1> & *co* _x_ ~y~ `z`\n'), italic("a_b"), pre("\n```\nlog")]
    (out,) = SLACK_RICH.render(spans)
    assert slack_spans(out) == spans
    assert slack_spans(f"{out}\n\n{out}") == [*spans, plain("\n\n"), *spans]  # bodies joined (the outbox's hourly pack)


def test_a_split_pre_block_is_closed_and_reopened_at_line_ends() -> None:
    log = "".join(f"step {i:05d} loss & <nan>\n" for i in range(600))
    parts = TELEGRAM_HTML.render([bold("💥 #7 crash\n"), pre(log)])
    assert len(parts) > 1
    for part in parts:
        visible = re.sub(r"</?(b|pre)>", "", part).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
        assert utf16_len(visible) <= 4096
        assert part.count("<pre>") == part.count("</pre>")  # well-formed on its own
        assert part.endswith("\n</pre>")  # cut at a line end, not mid-line
    assert "".join(re.sub(r"</?(b|pre)>", "", p) for p in parts).count("step") == 600


def test_a_line_longer_than_the_limit_is_cut_without_breaking_an_entity() -> None:
    parts = TELEGRAM_HTML.render([plain("&" * 5000)])  # the limit counts the text as shown
    assert [len(p.replace("&amp;", "&")) for p in parts] == [4096, 904]
    assert all(p.replace("&amp;", "") == "" for p in parts)


def test_pack_and_summary_respect_the_limit() -> None:
    bodies = ["a" * 1500, "b" * 1500, "c" * 10]
    assert [len(p) for p in SLACK_RICH.pack(bodies)] == [1500, 1500 + 2 + 10]
    summary = SLACK_RICH.render_summary("head\n", [f"item {i}" for i in range(1000)])
    assert len(summary) <= 3000 and summary.endswith("more\n")


def test_a_code_block_split_for_slack_is_a_code_block_in_every_message() -> None:
    log = "".join(f"step {i:05d} *loss* _nan_\n" for i in range(300))
    parts = SLACK_RICH.render([bold("💥 #7 crash"), plain("\n"), pre(log)])
    assert len(parts) > 1 and all(utf16_len(p) <= 3000 for p in parts)
    assert [s.style for s in slack_spans(parts[-1])] == ["pre"]
    assert "".join(s.text for p in parts for s in slack_spans(p) if s.style == "pre") == log


def test_no_message_is_only_the_marks_of_a_blank_line() -> None:
    """A code block's blank line that begins a message, then a line longer than a message (a log's
    dump of a tensor): the blank line alone was a message, '<pre>\\n</pre>' (Telegram: 'message text
    is empty') or, for Slack, a rich_text block of nothing (a code block's edge lines are not shown)."""
    for flavour, marks in ((TELEGRAM_HTML, r"</?pre>"), (SLACK_RICH, "[\x06\x07]")):
        parts = flavour.render([pre("\n" + "a" * 5000 + "\nend")])
        assert all(re.sub(marks, "", part).strip() for part in parts), (flavour.name, parts)
        assert "".join(re.sub(marks, "", part) for part in parts).replace("\n", "") == "a" * 5000 + "end"
