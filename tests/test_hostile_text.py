"""Hostile text stays inert wherever crossdiff shows it (docs/reliability.md).

A cache is collected from texts that carry HTML and script payloads, terminal escape
sequences (ANSI, OSC, BEL), other control characters, U+2028/U+2029, a right-to-left
override and a 1 MB line; an LLM's explanations carry the same. The report must run none
of it and show it as text; `crossdiff inspect` and the summaries must print it escaped.
"""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch

from crossdiff.analysis.examples import _ANSI_LEVELS, _ANSI_RESET
from crossdiff.cli import main
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.analysis.inspect import Analysis
from crossdiff.terminal import latent_ids, printable, quoted

pytestmark = pytest.mark.usefixtures("one_thread")

PAYLOADS = {
    "img": '<img src=x onerror="window.__pwned=1">',
    "script": "</script><script>window.__pwned=2</script>",
    "ansi": "clear\x1b[2J\x1b[31mred\x07bell",
    "osc": "\x1b]0;owned title\x07after",
    "separators": "one\u2028two\u2029three",
    "rtl": "abc\u202edcba",
    "controls": "nul\x00 del\x7f csi\x9b end",
}
# Characters no terminal output may carry raw: what the payloads would make a terminal obey.
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
EXPLANATION = '<img src=x onerror="window.__pwned=3"> \x1b[2J explains\u202e'


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, tiny_pair_paths):
    root = tmp_path_factory.mktemp("hostile")
    lines = [f"{name}: {text} and some ordinary words" for name, text in PAYLOADS.items()]
    lines.insert(3, "word " * 200_000)  # a single 1 MB line
    (root / "web.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with open(root / "chat.jsonl", "w", encoding="utf-8") as f:
        for text in PAYLOADS.values():
            f.write(json.dumps({"messages": [{"role": "user", "content": text},
                                             {"role": "assistant", "content": f"you wrote {text}"}]}) + "\n")
    cache, run = root / "cache", root / "run"
    assert main(["collect", "--base", str(tiny_pair_paths[0]), "--chat", str(tiny_pair_paths[1]), "--layer", "1",
                 "--source", f"web:text:{root / 'web.txt'}", "--source", f"chat:chat:{root / 'chat.jsonl'}",
                 "--max-len", "64", "--batch-size", "4", "--shard-tokens", "512", "--model-dtype", "float32",
                 "--device", "cpu", "--quiet", "--out", str(cache)]) == 0
    crosscoder = CrossCoder(CrossCoderConfig(d_in=32, d_sae=16, activation="relu", layer=1,
                                             model_names=[str(p) for p in tiny_pair_paths]), seed=0)
    with torch.no_grad():  # every latent live: each fires on about half the tokens
        crosscoder.W_enc.normal_(generator=torch.Generator().manual_seed(0))
        crosscoder.b_enc.zero_()
        crosscoder.W_dec[:8, 0] = 0.0  # chat-only: listed, with their top example, in analyze's summary
    crosscoder.save_pretrained(root / "cc")
    # Windows wider than a document: every example shows its whole (short) payload document.
    (root / "analysis.toml").write_text("window_before = 64\nwindow_after = 64\nn_top = 6\n")
    analysis = run / "cc" / "analysis"
    assert main(["analyze", str(root / "cc"), str(cache), "--config", str(root / "analysis.toml"),
                 "--out", str(analysis), "--quiet", "--allow-mismatch"]) == 0
    latents = pd.read_parquet(analysis / "latents.parquet")["latent"]
    pd.DataFrame({"latent": latents, "explanation": [EXPLANATION] * len(latents)}).to_parquet(
        analysis / "explanations.parquet")
    return {"root": root, "analysis": analysis, "run": run}


def _shown(analysis: Analysis) -> dict[str, int]:
    """payload name -> a latent with a stored example that holds the whole payload."""
    found = {}
    for name, text in PAYLOADS.items():
        hits = analysis.search(text, limit=1)
        if len(hits):
            found[name] = int(hits["latent"].iloc[0])
    return found


def test_printable_escapes_what_a_terminal_would_obey():
    for text in PAYLOADS.values():
        assert not RAW.search(printable(text)) and printable(printable(text)) == printable(text)
    assert printable("\x1b[2J\x07\u2028\u202e\udcff") == "\\x1b[2J\\x07\\u2028\\u202e\\udcff"
    assert printable("plain words, accents é and 日本") == "plain words, accents é and 日本"
    assert quoted(" fox\n") == "' fox\\n'"


def test_latent_ids_name_the_first_and_count_the_rest():
    assert latent_ids([3, 17, 42], 5) == "3, 17, 42"
    assert latent_ids(list(range(200)), 3) == "0, 1, 2 (+197)"
    assert latent_ids([], 3) == ""


def test_inspect_prints_the_datas_escapes_escaped(hostile_run, capsys):
    analysis = Analysis(hostile_run["analysis"])
    shown = _shown(analysis)
    assert {"img", "script", "ansi", "osc"} <= set(shown), shown  # the payloads reached the stored examples
    latent = shown["ansi"]
    runs = [["--search", "red", "--color", "never"], ["--search", "clear", "--regex"],
            ["--latent", str(latent), "--color", "never", "--kind", "all"],
            ["--latent", str(latent), "--color", "always", "--kind", "all"],
            ["--token", "red"], ["--columns", "latent,explanation", "-n", "3"],
            ["-n", "40"], ["--summary"], ["--findings"]]  # the listing's context column; the end screen; the full summary
    for argv in runs:
        assert main(["inspect", str(hostile_run["analysis"]), *argv]) == 0
        out = capsys.readouterr().out
        ours = out
        for code in (*_ANSI_LEVELS, _ANSI_RESET):  # --color always adds its own highlighting, nothing else
            ours = ours.replace(code, "")
        assert not RAW.search(ours), (argv, RAW.findall(ours))
    assert main(["inspect", str(hostile_run["analysis"]), "--search", "red", "--color", "never"]) == 0
    assert "\\x1b[2J\\x1b[31mred\\x07" in capsys.readouterr().out  # shown, as text


def test_terminal_summaries_print_the_datas_escapes_escaped(hostile_run, capsys):
    """analyze's end screen quotes each top latent's example; a one-line error may quote the data."""
    root = hostile_run["root"]
    assert main(["analyze", str(root / "cc"), str(root / "cache"), "--config", str(root / "analysis.toml"),
                 "--out", str(root / "again"), "--quiet", "--allow-mismatch"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("  latent ") and "'" in line for line in out.splitlines()), out
    assert not RAW.search(out), RAW.findall(out)
    (root / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + '{"te\x1b[2Jxt": 1' + "\n")
    assert main(["collect", "--base", "b", "--chat", "c", "--layer", "1", "--source", f"web:text:{root / 'bad.jsonl'}",
                 "--out", str(root / "bad-cache"), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not RAW.search(err)


def test_invalid_utf8_in_a_jsonl_file_is_one_line(tmp_path, tiny_pair_paths, capsys):
    (tmp_path / "chat.jsonl").write_bytes(b'{"messages": [{"role": "user", "content": "caf\xe9 \xff\xfe"}]}\n')
    assert main(["collect", "--base", str(tiny_pair_paths[0]), "--chat", str(tiny_pair_paths[1]), "--layer", "1",
                 "--source", f"chat:chat:{tmp_path / 'chat.jsonl'}", "--out", str(tmp_path / "cache"),
                 "--max-len", "64", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"crossdiff: error: {tmp_path / 'chat.jsonl'}:1: not valid UTF-8 (byte 0xe9 at column 47); convert the file to UTF-8\n"


@pytest.mark.slow
def test_the_report_runs_no_payload_and_shows_each_as_text(hostile_run, tmp_path):
    from test_report import _browser_or_skip

    from crossdiff.report.browser import chromium

    _browser_or_skip()
    out = tmp_path / "report"
    assert main(["report", str(hostile_run["run"]), "--out", str(out)]) == 0
    shown = _shown(Analysis(hostile_run["analysis"]))
    assert {"img", "script"} <= set(shown), shown
    url = (out / "index.html").as_uri()
    errors: list[str] = []
    with chromium() as browser:
        page = browser.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("dialog", lambda dialog: errors.append(f"a dialog opened: {dialog.message}"))
        for view in ["", "#latents/cc", *{f"#latent/cc/{latent}" for latent in shown.values()}]:
            page.goto(url + view)
            page.wait_for_selector("body[data-ready]")
            if view.startswith("#latent/"):
                page.wait_for_selector("#examples[data-state=loaded]")
                text = page.evaluate("document.querySelector('#examples').textContent")
                for name, latent in shown.items():
                    if view == f"#latent/cc/{latent}":
                        assert PAYLOADS[name] in text, name
                assert page.locator("#examples img, #examples script").count() == 0
                assert EXPLANATION.split(" \x1b")[0] in page.evaluate("document.body.textContent")
            assert page.evaluate("typeof window.__pwned") == "undefined", view
    assert errors == []
