"""The report page's skeleton and CSS, as Python strings so that they ship without package-data rules.

No web fonts, scripts or remote resources: the Content-Security-Policy lets the page load inline styles and
``data:`` images only, so opening a report can never reach the network.
"""

from __future__ import annotations

from string import Template

CSS = """
:root{--fg:#1f2933;--muted:#616e7c;--line:#e4e7eb;--bg:#f5f7fa;--card:#fff;--bad:#c81e1e;--good:#0e7c3a;--acc:#2563eb}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
 "Helvetica Neue",Arial,sans-serif}
main{max-width:1240px;margin:0 auto;padding:24px 28px 48px}
header h1{margin:0;font-size:24px;font-weight:650}
header p{margin:4px 0 0;color:var(--muted)}
h2{font-size:17px;margin:32px 0 10px;padding-bottom:4px;border-bottom:2px solid var(--line)}
h3{font-size:14px;margin:18px 0 8px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(220px,1fr));gap:12px;margin-top:18px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px;
 border-top:4px solid var(--acc)}
.card.bad{border-top-color:var(--bad)}.card.good{border-top-color:var(--good)}
.card .k{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}
.card .v{font-size:26px;font-weight:650;margin:2px 0}
.card .s{color:var(--muted);font-size:13px;overflow-wrap:anywhere}
.card.text .v{font-size:19px;line-height:1.25;margin:4px 0}
.note{background:#fff8e1;border:1px solid #f5d77a;border-radius:8px;padding:8px 12px;margin:12px 0;
 white-space:pre-wrap;font-size:13px}
table{border-collapse:collapse;width:100%;background:var(--card);border:1px solid var(--line);border-radius:8px}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:right;vertical-align:top}
th{background:#eef2f7;font-weight:600;font-size:12px;color:#3e4c59;position:sticky;top:0}
td.l,th.l{text-align:left}
tr.group td{background:#f8fafc;font-weight:600;text-align:left;color:var(--muted);font-size:12px;
 text-transform:uppercase;letter-spacing:.04em}
tr.worst td:first-child{box-shadow:inset 4px 0 0 var(--bad)}
.pill{display:inline-block;min-width:64px;padding:1px 7px;border-radius:10px;font-variant-numeric:tabular-nums}
.bar{position:relative;width:120px;height:10px;background:#eef2f7;border-radius:5px;display:inline-block}
.bar i{position:absolute;top:0;height:10px;border-radius:5px}
.bar b{position:absolute;left:50%;top:-2px;width:1px;height:14px;background:#9aa5b1}
td small{display:block;color:var(--muted);font-size:11px}
.prompt{max-width:420px;text-align:left;overflow-wrap:anywhere}
.badge{display:inline-block;background:var(--bad);color:#fff;border-radius:8px;font-size:11px;padding:0 6px;
 margin-right:6px}
figure{margin:8px 0 0;background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px}
figure img{max-width:100%;height:auto;display:block}
figcaption{color:var(--muted);font-size:12px;margin-top:6px}
.strip{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 12px;margin:10px 0}
.strip.worst{border-left:4px solid var(--bad)}
.strip h3{font-size:14px;font-weight:600;margin:0;overflow-wrap:anywhere}
.strip .legend{margin:2px 0 8px}
.strip .row{display:grid;grid-template-columns:86px 1fr;align-items:center;gap:8px;margin:3px 0}
.strip .row span{color:var(--muted);font-size:12px;text-align:right}
.strip img{max-width:100%;height:auto;display:block;border-radius:3px}
.kv{display:grid;grid-template-columns:220px 1fr;gap:2px 16px;background:var(--card);border:1px solid var(--line);
 border-radius:8px;padding:10px 14px}
.kv dt{color:var(--muted)}.kv dd{margin:0;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px;
 overflow-wrap:anywhere}
.legend{color:var(--muted);font-size:12px;margin:6px 0}
footer{color:var(--muted);font-size:12px;margin-top:36px}
"""

PAGE = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>$css</style>
</head>
<body>
<main>
<header><h1>$title</h1><p>$subtitle</p></header>
$body
<footer>$footer</footer>
</main>
</body>
</html>
""")


def page(title: str, subtitle: str, body: str, footer: str) -> str:
    """The whole document; every argument must already be HTML (escaped by the caller)."""
    return PAGE.substitute(title=title, subtitle=subtitle, body=body, footer=footer, css=CSS)
