"""Rendering and splitting: escaped correctly, every chunk well-formed and within the limit."""

from __future__ import annotations

import re

from nightlab.bot.format import SLACK_MRKDWN, TELEGRAM_HTML, Text, bold, plain, pre, utf16_len


def test_telegram_html_escapes_and_marks_up() -> None:
    (out,) = TELEGRAM_HTML.render([bold("a<b>&c"), plain(" x > y"), pre("\nif a < b: pass")])
    assert out == "<b>a&lt;b&gt;&amp;c</b> x &gt; y<pre>\nif a &lt; b: pass</pre>"


def test_slack_escapes_only_its_three_characters() -> None:
    (out,) = SLACK_MRKDWN.render([bold("new best"), plain(' "q" <@U1> & co')])
    assert out == '*new best* "q" &lt;@U1&gt; &amp; co'


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
    parts = SLACK_MRKDWN.render([plain("&" * 2000)])  # 10000 characters once escaped
    assert [len(p) for p in parts] == [3000, 3000, 3000, 1000]
    assert all(p.replace("&amp;", "") == "" for p in parts)


def test_pack_and_summary_respect_the_limit() -> None:
    bodies = ["a" * 1500, "b" * 1500, "c" * 10]
    assert [len(p) for p in SLACK_MRKDWN.pack(bodies)] == [1500, 1500 + 2 + 10]
    summary = SLACK_MRKDWN.render_summary("head\n", [f"item {i}" for i in range(1000)])
    assert len(summary) <= 3000 and summary.endswith("more\n")


def test_slack_marks_hug_their_text() -> None:
    """Slack shows "*  NEW BEST*" and "_\\ntext_" with the marks as written: no space or line break
    may sit just inside a bold or italic mark of a digest."""
    from nightlab.bot.digest import experiment_digest

    digest = experiment_digest({"status": "keep", "number": 7, "metric": 1.38, "new_best": True,
                                "description": "MATRIX_LR 0.02→0.028", "hypothesis": "raising it should help"}, 20)
    assert isinstance(digest, Text)
    (out,) = SLACK_MRKDWN.render(digest.spans)
    assert "  *NEW BEST*" in out and "\n_raising it should help_" in out
    assert not re.search(r"(^|\s)[*_]\s|\s[*_](\s|$)", out)
