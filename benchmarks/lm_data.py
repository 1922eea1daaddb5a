"""Distil through data (issue 10): every data-level method on the offline LM demo, one section each.

    python benchmarks/lm_data.py                      # run every item, then assemble the table
    python benchmarks/lm_data.py miniplm ddk          # run only these items, then assemble
    python benchmarks/lm_data.py --quick              # smoke: tiny budgets
    python benchmarks/lm_data.py --assemble           # only rebuild lm_data.md from the sections on disk

Each item is a module ``benchmarks/lm_data/<item>.py`` with ``run(quick, out_dir) -> markdown``;
its section is saved as ``benchmarks/results/lm_data/<item>.md`` (stating its own command, date
and machine, since items are run at different times), and ``benchmarks/results/lm_data.md`` is
assembled from those files in the order of ``ITEMS`` -- no figure is copied by hand.
"""
from __future__ import annotations

import datetime as dt
import importlib.util
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = HERE / "results" / "lm_data"
ITEMS = ("miniplm", "ddk", "teacher_hacking", "symbolic", "arte", "promptmix", "pgkd", "redi", "mgsr", "competitive")


def machine() -> str:
    import torch

    from distillery.report.metrics import machine_description

    return f"{machine_description()}; torch {torch.__version__}"


def _module(item: str):
    path = HERE / "lm_data" / f"{item}.py"
    if not path.is_file():
        raise SystemExit(f"no benchmark module {path}; items: {', '.join(ITEMS)}")
    spec = importlib.util.spec_from_file_location(f"lm_data_{item}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_item(item: str, quick: bool) -> None:
    import torch

    torch.set_num_threads(1)
    SECTIONS.mkdir(parents=True, exist_ok=True)
    body = _module(item).run(quick=quick, out_dir=SECTIONS)
    stamp = (f"\n_Command: `{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/lm_data.py', item] + (['--quick'] if quick else []))}`"
             f" · {dt.date.today().isoformat()} · {machine()}_\n")
    target = SECTIONS / f"{item}{'-quick' if quick else ''}.md"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(body.rstrip() + "\n" + stamp)
    tmp.replace(target)


def assemble() -> Path:
    parts = ["# Distil through data — results on the offline LM demo\n",
             "Teacher: the demo's GPT-2 (`distillery lm prepare`: byte-level BPE 4k, 4 layers x 192, trained on "
             "this interpreter's standard-library sources) unless a section says otherwise; students are GPT-2 "
             "2 x 96 or smaller. Each section was produced by its module (`python benchmarks/lm_data/ITEM.py`, or "
             "`python benchmarks/lm_data.py ITEM`) and states its budget, command, date and machine. Several items ran side by side on the 2-core machine, so wall "
             "times (where shown) are inflated; quality figures are not affected.\n",
             f"_Assembled {dt.date.today().isoformat()} by `python benchmarks/lm_data.py --assemble`._\n"]
    missing = []
    for item in ITEMS:
        path = SECTIONS / f"{item}.md"
        if path.is_file():
            parts.append(path.read_text().rstrip() + "\n")
        else:
            missing.append(item)
    if missing:
        parts.append("## Not yet measured\n\n" + ", ".join(f"`{m}`" for m in missing) +
                     f" — run `python benchmarks/lm_data.py {' '.join(missing)}`.\n")
    out = HERE / "results" / "lm_data.md"
    out.write_text("\n".join(parts))
    return out


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    items = [a for a in argv if not a.startswith("--")]
    unknown = sorted(set(items) - set(ITEMS))
    if unknown:
        raise SystemExit(f"unknown item(s) {unknown}; items: {', '.join(ITEMS)}")
    if "--assemble" not in argv:
        for item in items or ITEMS:
            print(f"== {item}", flush=True)
            run_item(item, quick)
    if not quick:
        print(assemble())


if __name__ == "__main__":
    main(sys.argv[1:])
