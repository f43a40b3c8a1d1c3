"""The parity tool's reports: console table, summary line, markdown and JSON files."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence


def _fmt(v, spec=".3e"):
    return "-" if v is None else format(v, spec)


def _shape(r):
    return "x".join(str(s) for s in r.get("shape", [])) or "-"


def _status(r):
    if r["pass"]:
        return "PASS"
    return "FAIL" + (f" ({r['error']})" if "error" in r else "")


def format_table(report: dict) -> str:
    """The console table: one line per row (module, shape, max_abs, rel_fro, cos, result)."""
    rows = report["rows"]
    w = max([len("module")] + [len(r["module"]) for r in rows])
    ws = max([len("shape")] + [len(_shape(r)) for r in rows])
    head = f"{'module':<{w}}  {'shape':<{ws}}  {'max_abs':>10}  {'rel_fro':>10}  {'cos':>12}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["module"] == "generate.greedy_ids":
            extra = f"ours {r['ours']} ref {r['ref']}"
            if "mismatch_step" in r:
                extra += f", first mismatch at step {r['mismatch_step']}"
            lines.append(f"{r['module']:<{w}}  {_shape(r):<{ws}}  {'exact':>10}  {'':>10}  {'':>12}  "
                         f"{_status(r)}  {extra}")
            continue
        lines.append(f"{r['module']:<{w}}  {_shape(r):<{ws}}  {_fmt(r.get('max_abs')):>10}  "
                     f"{_fmt(r.get('rel_fro')):>10}  {_fmt(r.get('cos'), '.8f'):>12}  {_status(r)}")
    return "\n".join(lines)


def summary_line(report: dict) -> str:
    """PASS: all N modules ... / FAIL: first failing module: NAME (k of N modules failed)."""
    if report["passed"]:
        return f"PASS: all {report['n_rows']} modules within the {report['dtype']} tolerance"
    return (f"FAIL: first failing module: {report['first_failure']} "
            f"({report['n_failed']} of {report['n_rows']} modules failed)")


def to_markdown(report: dict, command: Optional[str] = None) -> str:
    """The .md report: summary, run facts, one table row per module, how to read it."""
    tol = report["tolerance"]
    ms_model = f" (MindSpore side: `{report['ms_model']}`)" if report["ms_model"] else ""
    times = ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items())
    out = ["# ixc25-parity report", ""]
    if command:
        out += ["Command:", "", "```", command, "```", ""]
    out += [f"**{summary_line(report)}**", "",
            f"- model: `{report['model']}`{ms_model}",
            f"- images: {', '.join('`' + i + '`' for i in report['images']) or 'none'}; "
            f"query: {report['query']!r}",
            f"- MindSpore dtype {report['dtype']}, mode {report['mode']}; reference (PyTorch) dtype "
            f"{report['ref_dtype']}; infer_mode {report['infer_mode']}; greedy steps {report['steps']}",
            f"- prompt: {report['seq_len']} tokens, {report['n_image_tokens']} of them image tokens",
            f"- tolerance ({report['dtype']}): rel_fro <= {tol['rel_fro']:g} and "
            f"max_abs <= {tol['max_abs_rel']:g} * max|ref|"
            + (f"; per-module overrides {report['tolerance_overrides']}" if report["tolerance_overrides"] else ""),
            f"- time: {report['total_s']:.1f} s in all ({times}); "
            f"peak RSS {report['peak_rss_mb']['after_mindspore']:.0f} MB after the MindSpore side, "
            f"{report['peak_rss_mb']['after_reference']:.0f} MB overall", "",
            "| # | module | shape | max abs err | rel Frobenius | cosine | result |",
            "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(report["rows"]):
        if r["module"] == "generate.greedy_ids":
            note = f"ours {r['ours']}, ref {r['ref']}"
            if "mismatch_step" in r:
                note += f"; first mismatch at step {r['mismatch_step']} (ref top-2 margin {r['ref_top2_margin']:.3g})"
            out.append(f"| {i} | `{r['module']}` | {_shape(r)} | exact match | | | "
                       f"{'PASS' if r['pass'] else '**FAIL**'}: {note} |")
            continue
        res = "PASS" if r["pass"] else "**FAIL**" + (f" ({r['error']})" if "error" in r else "")
        out.append(f"| {i} | `{r['module']}` | {_shape(r)} | {_fmt(r.get('max_abs'))} | {_fmt(r.get('rel_fro'))} | "
                   f"{_fmt(r.get('cos'), '.8f')} | {res} |")
    out += ["", "Rows: MindSpore output vs our PyTorch reference on the same weights and inputs. Each side runs "
            "its own chain (errors accumulate as in real use). `generate.stepK.logits` are the cached-decode "
            "logits of step K with the reference teacher-forced on the MindSpore ids, so they stay comparable "
            "after a divergence; `generate.greedy_ids` must match exactly.", ""]
    return "\n".join(out)


def write_reports(report: dict, paths: Sequence[str], command: Optional[str] = None) -> None:
    """Write each of `paths` (.md or .json; ValueError otherwise), under a temporary name then renamed."""
    for p in paths:
        d = os.path.dirname(os.path.abspath(p))
        os.makedirs(d, exist_ok=True)
        if p.lower().endswith(".md"):
            text = to_markdown(report, command)
        elif p.lower().endswith(".json"):
            text = json.dumps(dict(report, command=command), indent=1)
        else:
            raise ValueError(f"{p}: report must end in .json or .md")
        with open(p + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(p + ".tmp", p)
