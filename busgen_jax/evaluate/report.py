"""Reports: JSON (every number), Markdown and a self-contained HTML page (tables, ROC and reliability plots)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Mapping, Sequence

from busgen_jax import paths


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _line_plot(path: Path, series, *, xlabel: str, ylabel: str, title: str, legend: str, ymax: float) -> Path:
  """series: (x, y, label, plot kwargs); plus the diagonal (chance / perfect calibration)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=110)
  for x, y, label, kw in series:
    ax.plot(x, y, label=label, **kw)
  ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, ymax))
  ax.legend(loc=legend, fontsize=7)
  fig.tight_layout()
  return save_figure(fig, path)


def save_log_x(fig, ax, path: Path, ticks) -> Path:
  """Finish a curve over counts (k, images): log x with the counts as plain tick labels, a small legend; save."""
  ax.set_xscale("log")
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.minorticks_off()
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  return save_figure(fig, path)


def save_figure(fig, path) -> Path:
  """A PNG through the path layer (a gs:// report folder too); closes the figure."""
  path = paths.path(path)
  with path.open("wb") as f:
    fig.savefig(f, format="png")
  _plt().close(fig)
  return path


def roc_plot(path: Path, curves: Mapping[str, dict], title: str = "ROC") -> Path:
  """curves: label -> {"fpr", "tpr", "auc", "auc_ci95"}."""
  series = [(c["fpr"], c["tpr"], f"{label}: AUC {c['auc']:.3f} [{c['auc_ci95'][0]:.3f}, {c['auc_ci95'][1]:.3f}]",
             {"lw": 1.6}) for label, c in curves.items()]
  return _line_plot(path, series, xlabel="1 - specificity", ylabel="sensitivity", title=title,
                    legend="lower right", ymax=1.01)


def reliability_plot(path: Path, curves: Mapping[str, dict], title: str = "Calibration") -> Path:
  """curves: label -> a binary report (its "reliability" points and "ece")."""
  series = [(c["reliability"]["mean_predicted"], c["reliability"]["fraction_positive"],
             f"{label}: ECE {c['ece']:.3f}", {"marker": "o", "ms": 3}) for label, c in curves.items()]
  return _line_plot(path, series, xlabel="predicted probability", ylabel="observed frequency", title=title,
                    legend="upper left", ymax=1.0)


def _ci(r: dict, key="auc") -> str:
  lo, hi = r.get(f"{key}_ci95", [float("nan")] * 2)
  return f"{r[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def binary_rows(reports: Mapping[str, dict]) -> list[list[str]]:
  rows = [["model", "n (positive)", "AUC [95% CI]", "balanced acc.", "sens. / spec. @0.5",
           "sens. @ spec. 0.9", "ECE"]]
  for name, r in reports.items():
    op = r["at_specificity_0.9"]
    rows.append([name, f"{r['n']} ({r['n_positive']})", _ci(r), f"{r['balanced_accuracy']:.3f}",
                 f"{r['sensitivity']:.3f} / {r['specificity']:.3f}", f"{op['sensitivity']:.3f}", f"{r['ece']:.3f}"])
  return rows


def multiclass_rows(reports: Mapping[str, dict]) -> list[list[str]]:
  rows = [["model", "n", "macro AUC", "balanced acc.", "accuracy"]]
  for name, r in reports.items():
    rows.append([name, str(r["n"]), f"{r['macro_auc']:.3f}", f"{r['balanced_accuracy']:.3f}", f"{r['accuracy']:.3f}"])
  return rows


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
  out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
  out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
  return "\n".join(out)


def html_table(rows: Sequence[Sequence[str]]) -> str:
  head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
  body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
  return f"<table><tr>{head}</tr>{body}</table>"


def img_tag(path: Path, alt: str = "", width: int | None = None) -> str:
  data = base64.b64encode(paths.path(path).read_bytes()).decode()
  w = f' width="{width}"' if width else ""
  return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"{w}>'


CSS = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
       "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:90%}"
       "th{background:#f3f3f3}img{margin:4px;image-rendering:pixelated}p.note{color:#555;font-size:90%}")


def html_page(title: str, body: str) -> str:
  return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
          f"<style>{CSS}</style></head><body>{body}</body></html>")


def write_classifier_report(prefix: Path, rep: dict, *, title: str) -> dict[str, Path]:
  """prefix.json, prefix.md, prefix.html (+ prefix.roc.png, prefix.calibration.png for binary tasks)."""
  prefix = paths.path(prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  out = {"json": prefix.with_suffix(".json")}
  out["json"].write_text(json.dumps(rep, indent=1))
  if "auc" in rep and "roc_curve" in rep:
    roc = roc_plot(prefix.with_suffix(".roc.png"), {"model": {**rep["roc_curve"], **rep}}, title)
    cal = reliability_plot(prefix.with_suffix(".calibration.png"), {"model": rep}, title)
    rows = binary_rows({"model": rep})
    figs_md = f"![ROC]({roc.name}) ![calibration]({cal.name})"
    figs_html = img_tag(roc, "ROC") + img_tag(cal, "calibration")
  else:
    rows, figs_md, figs_html = multiclass_rows({"model": rep}), "", ""
  out["md"] = prefix.with_suffix(".md")
  out["md"].write_text(f"# {title}\n\n{markdown_table(rows)}\n\n{figs_md}\n")
  out["html"] = prefix.with_suffix(".html")
  out["html"].write_text(html_page(title, f"<h1>{html.escape(title)}</h1>{html_table(rows)}{figs_html}"))
  return out


# ------------------------------------------------------------------------------------------------ TSTR / TRTR

def tstr_config():
  import ml_collections
  return ml_collections.ConfigDict({
      "synthetic": "",   # a `busgen-jax classify` workdir trained on generated data only
      "real": "",        # one trained on real data only
      "test": "real_test"})   # the test set both were evaluated on (DIR/eval/<test>.json)


def tstr_headline(c) -> dict | None:
  """Train-on-synthetic-test-on-real over train-on-real-test-on-real: the AUCs of two classify runs on the same
  real test set, and their ratio (near 1: the generated repository carries the diagnostic signal)."""
  if not c or not c.get("synthetic") or not c.get("real"):
    return None
  test = c.get("test") or "real_test"

  def auc(d):
    p = paths.path(d) / "eval" / f"{test}.json"
    if not p.is_file():
      raise FileNotFoundError(f"{p}: no evaluation of {test!r} in this classify run (tstr.synthetic / tstr.real "
                              "name `busgen-jax classify` workdirs)")
    rep = json.loads(p.read_text())
    return float(rep.get("auc", rep.get("macro_auc"))), rep.get("auc_ci95"), int(rep["n"])

  (a_s, ci_s, n), (a_r, ci_r, _) = auc(c["synthetic"]), auc(c["real"])
  return {"ratio": a_s / a_r if a_r else float("nan"), "tstr_auc": a_s, "tstr_auc_ci95": ci_s, "trtr_auc": a_r,
          "trtr_auc_ci95": ci_r, "n_test": n, "test": test, "synthetic": str(c["synthetic"]), "real": str(c["real"])}


def tstr_line(t: dict | None) -> str:
  if not t:
    return ("TSTR / TRTR: not computed (give --config.tstr.synthetic and --config.tstr.real: `busgen-jax classify` "
            "workdirs trained on generated and on real data).")
  return (f"**TSTR / TRTR = {t['ratio']:.2f}**: AUC {t['tstr_auc']:.3f} trained on synthetic vs {t['trtr_auc']:.3f} "
          f"trained on real, both on the real test set `{t['test']}` ({t['n_test']} images).")


def inline(text: str) -> str:
  """One line of Markdown's **bold** and `code` as escaped HTML."""
  import re
  text = html.escape(text)
  text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
  return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def markdown_to_html(md: str, base: Path) -> str:
  """The Markdown subset our reports write: # headings, paragraphs, - lists, | tables, ![alt](file) images
  (embedded from `base`), **bold** and `code`."""
  import re
  out, lines, i = [], md.splitlines(), 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("#"):
      level = len(line) - len(line.lstrip("#"))
      out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
    elif line.startswith("|"):
      table = []
      while i < len(lines) and lines[i].startswith("|"):
        cells = [x.strip() for x in lines[i].strip().strip("|").split("|")]
        if not all(set(x) <= {"-"} for x in cells):
          table.append(cells)
        i += 1
      out.append(html_table(table))
      continue
    elif line.startswith("- "):
      items = []
      while i < len(lines) and lines[i].startswith("- "):
        items.append(f"<li>{inline(lines[i][2:])}</li>")
        i += 1
      out.append("<ul>" + "".join(items) + "</ul>")
      continue
    elif re.fullmatch(r"(!\[[^\]]*\]\([^)]+\)\s*)+", line.strip()):
      for alt, name in re.findall(r"!\[([^\]]*)\]\(([^)]+)\)", line):
        p = Path(base) / name
        out.append(img_tag(p, alt) if p.is_file() else f"<p>[{html.escape(alt)}: {html.escape(name)} missing]</p>")
    elif line.strip():
      out.append(f"<p>{inline(line)}</p>")
    i += 1
  return "".join(out)


def write_section(path: Path, md: str, begin: str, end: str, heading: str | None) -> None:
  """Replace the generated section of a Markdown file (between `begin` and `end`), or append one under
  `heading` (none when `md` starts with its own): how docs keep figures that a command wrote."""
  text = path.read_text() if path.exists() else ""
  block = f"{begin}\n{md}{end}"
  if begin in text and end in text:
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
  else:
    text = text.rstrip("\n") + (f"\n\n## {heading}" if heading else "") + f"\n\n{block}\n"
  path.write_text(text)
