"""PNG plots of bench_loss.py records: time and extra peak memory against vocabulary and tokens.

    python benchmarks/plot.py benchmarks/results/cpu/bench_loss.json   # writes *_vocab.png, *_tokens.png
"""

from __future__ import annotations

import json
import os
import sys

STYLE = {"naive": ("black", "o", "--"), "compile": ("grey", "s", "--"), "torch": ("tab:blue", "o", "-"),
         "triton": ("tab:red", "D", "-"), "triton-single-pass": ("tab:orange", "D", ":"),
         "liger": ("tab:green", "^", "-"), "cce": ("tab:purple", "v", "-")}


def _series(records, sweep, x_key, provider, mode, y_key):
    pts = sorted((r[x_key], r[y_key]) for r in records
                 if sweep in r.get("sweeps", []) and r["provider"] == provider and r["mode"] == mode
                 and r["status"] == "ok" and r.get(y_key) is not None)
    oom = sorted(r[x_key] for r in records if sweep in r.get("sweeps", []) and r["provider"] == provider
                 and r["mode"] == mode and r["status"] == "OOM")
    return pts, oom


def plot_records(records, json_path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = os.path.splitext(json_path)[0]
    first = records[0]
    modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in records)]
    providers = [p for p in STYLE if any(r["provider"] == p and r["status"] == "ok" for r in records)]
    written = []
    for sweep, x_key, x_label, fixed in (("vocab", "vocab", "vocabulary V", "tokens"),
                                         ("tokens", "tokens", "tokens N", "vocab")):
        rows = [r for r in records if sweep in r.get("sweeps", [])]
        if not rows:
            continue
        fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
        for j, mode in enumerate(modes):
            for i, (y_key, y_label) in enumerate((("median_ms", "median time (ms), p20-p80 band"),
                                                  ("peak_mem_mb", "extra peak memory (MiB)"))):
                ax = axes[i][j]
                for p in providers:
                    color, marker, ls = STYLE[p]
                    pts, oom = _series(records, sweep, x_key, p, mode, y_key)
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, ys, color=color, marker=marker, ls=ls, label=p)
                        if y_key == "median_ms":
                            band = sorted((r[x_key], r["p20_ms"], r["p80_ms"]) for r in rows
                                          if r["provider"] == p and r["mode"] == mode and r["status"] == "ok")
                            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                                            color=color, alpha=0.15)
                    for x in oom:
                        ax.axvline(x, color=color, ls=":", alpha=0.6)
                        ax.annotate(f"{p} OOM", (x, 0.95), xycoords=("data", "axes fraction"), rotation=90,
                                    fontsize=7, color=color, va="top")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(x_label)
                ax.set_ylabel(y_label)
                ax.grid(True, which="both", alpha=0.3)
                fixed_val = sorted({r[fixed] for r in rows})
                ax.set_title(f"{mode}: {fixed} = {', '.join(map(str, fixed_val))}, D = {rows[0]['hidden']}",
                             fontsize=10)
                ax.legend(fontsize=8)
        fig.suptitle(f"RL-PLUS / GRPO loss head, {first['dtype']}, {first['device_name']}\n"
                     f"torch {first['torch_version']}, triton {first.get('triton_version')}, "
                     f"liger {first.get('liger_version')}", fontsize=10)
        fig.tight_layout()
        path = f"{stem}_{sweep}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # model heads (GPU runs): grouped bars per (model, tokens)
    model_rows = [r for r in records if any(s not in ("vocab", "tokens") for s in r.get("sweeps", []))]
    if model_rows:
        fig, axes = plt.subplots(2, len(modes), figsize=(7 * len(modes), 8), squeeze=False)
        for j, mode in enumerate(modes):
            keys = sorted({(next(s for s in r["sweeps"] if s not in ("vocab", "tokens")), r["tokens"])
                           for r in model_rows if r["mode"] == mode})
            width = 0.8 / max(1, len(providers))
            for i, y_key in enumerate(("median_ms", "peak_mem_mb")):
                ax = axes[i][j]
                for k, p in enumerate(providers):
                    ys = []
                    for model, n in keys:
                        r = next((r for r in model_rows if r["provider"] == p and r["mode"] == mode
                                  and r["tokens"] == n and model in r["sweeps"]), None)
                        ys.append(r[y_key] if r and r["status"] == "ok" and r[y_key] is not None else 0)
                    ax.bar([x + k * width for x in range(len(keys))], ys, width, label=p, color=STYLE[p][0])
                ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))])
                ax.set_xticklabels([f"{m}\nN={n}" for m, n in keys], fontsize=7)
                ax.set_yscale("log")
                ax.set_ylabel("median time (ms)" if y_key == "median_ms" else "extra peak memory (MiB)")
                ax.set_title(f"{mode}: real LM heads (a missing bar: OOM or skipped)", fontsize=10)
                ax.legend(fontsize=8)
                ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(f"{first['dtype']}, {first['device_name']}", fontsize=10)
        fig.tight_layout()
        path = f"{stem}_models.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="plot bench_loss.py records (PNG beside the JSON)")
    p.add_argument("json", nargs="+", help="record files; several are merged (e.g. one per mode)")
    p.add_argument("--merge", metavar="PATH", help="write the merged records there and plot them")
    args = p.parse_args(argv)
    if args.merge:
        records = []
        for path in args.json:
            with open(path) as f:
                records += json.load(f)
        with open(args.merge, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {args.merge}")
        todo = [(records, args.merge)]
    else:
        todo = []
        for path in args.json:
            with open(path) as f:
                todo.append((json.load(f), path))
    for records, path in todo:
        try:
            written = plot_records(records, path)
        except ImportError as e:  # as bench_loss.py says it: the records are written, only the plots are missing
            print(f"plots skipped: {e} (pip install matplotlib)", file=sys.stderr)
            return 1
        for out in written:
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
