"""`edge-moe profile`: run a workload while recording it (runtime.trace), then write trace.json (Chrome
trace events), summary.md and summary.json, and with matplotlib (the `plots` extra) memory.png and
experts.png."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_moe.api import load
from edge_moe.config import format_size
from edge_moe.runtime.trace import Sampler, Trace

PLAN_TERMS = ("baseline", "dense", "kv_cache", "activations", "margin", "cache_bytes")


def profile(model, out: str | Path, prompt: str, max_tokens: int = 64, knobs: dict | None = None,
            interval: float = 0.005, **options) -> dict:
    """Load `model` with `options`, generate from `prompt`, and write the recording to `out`; returns
    the summary. RSS is sampled every `interval` seconds from before the load to after the last token."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trace = Trace()
    sampler = Sampler(trace, interval)
    try:
        with load(model, trace=trace, **options) as m:
            sampler.io = lambda: (int(m.cache.evictions.sum()), m.reader.bytes_read, m.cache.bytes_by_chunk())
            ids = m.encode(prompt)
            list(m.generate_ids(ids, max_tokens=max_tokens, **(knobs or {})))
            summary = _summary(trace, m)
    finally:
        sampler.stop()
    summary.update(_peaks(trace))
    (out / "trace.json").write_text(json.dumps(trace.chrome()))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.md").write_text(_markdown(summary))
    summary["plots"] = _plots(trace, summary, out)
    return summary


def _summary(trace: Trace, m) -> dict:
    plan = m.memory_plan
    stalls = sorted((s for s in trace.spans if s[0] == "stall"), key=lambda s: s[3] - s[4])[:5]
    return {"model": str(m.path), "memory_budget": plan.budget,
            "memory_plan": {t: getattr(plan, t) for t in PLAN_TERMS},
            "stats": {k: v for k, v in m.stats.items() if not isinstance(v, dict)},
            "bits_histogram": m.stats.get("bits_histogram", {}),
            "longest_stalls": [{"layer": s[5].get("layer"), "expert": s[5].get("expert"),
                                "ms": round(1e3 * (s[4] - s[3]), 3), "at_s": round(s[3] - trace.t0, 3)}
                               for s in stalls]}


def _peaks(trace: Trace) -> dict:
    """The sampled peak (when, and in which span of the main threads) and the kernel's high-water mark."""
    t, rss, hwm = max(((s[0], s[1], s[2]) for s in trace.samples), key=lambda s: s[1])
    during = [s[0] for s in trace.spans if s[3] <= t <= s[4] and s[1] in ("load", "step")]
    return {"peak_rss_sampled": rss, "peak_rss_at_s": round(t - trace.t0, 3), "peak_during": during or ["-"],
            "vm_hwm": trace.samples[-1][2], "samples": len(trace.samples)}


def _markdown(s: dict) -> str:
    st, plan = s["stats"], s["memory_plan"]
    widths = ", ".join(f"{b} bits: {n}" for b, n in s["bits_histogram"].items())
    budget = format_size(s["memory_budget"]) if s["memory_budget"] else "none"
    lines = [f"# Profile of {s['model']}", "",
             f"- peak RSS {format_size(s['peak_rss_sampled'])} (sampled, {s['samples']} samples) at "
             f"{s['peak_rss_at_s']} s, during {', '.join(s['peak_during'])}; the kernel's high-water mark "
             f"{format_size(s['vm_hwm'])}; budget {budget}",
             "- memory plan: " + ", ".join(f"{k} {format_size(v)}" for k, v in plan.items()),
             f"- decode {st.get('decode_tokens_per_s', 0):.2f} tokens/s, stall fraction "
             f"{st.get('stall_fraction', 0):.3f}, {format_size(st.get('bytes_read_per_token', 0))} read per "
             "token, "
             f"hit rate {st.get('hit_rate', 0):.3f}, mean width {st.get('mean_bits', 0):.2f} bits",
             f"- widths (token, expert pairs): {widths}",
             "", "| longest stalls | layer | expert | ms | at s |", "|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {x['layer']} | {x['expert']} | {x['ms']} | {x['at_s']} |"
              for i, x in enumerate(s["longest_stalls"])]
    return "\n".join(lines) + "\n"


def _plots(trace: Trace, s: dict, out: Path) -> list[str]:
    """memory.png and experts.png, or none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    t = np.array([x[0] - trace.t0 for x in trace.samples])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bottom = 0.0
    for (name, size), color in zip(s["memory_plan"].items(), plt.cm.Pastel1.colors, strict=False):
        ax.axhspan(bottom / 1e6, (bottom + size) / 1e6, color=color, alpha=0.5, label=f"plan: {name}")
        bottom += size
    ax.plot(t, [x[1] / 1e6 for x in trace.samples], color="black", lw=1, label="RSS")
    if s["memory_budget"]:
        ax.axhline(s["memory_budget"] / 1e6, color="red", ls="--", label="budget")
    for name, cat, _, start, end, _ in trace.spans:
        if cat == "load":
            ax.axvspan(start - trace.t0, end - trace.t0, color="gray", alpha=0.15)
            ax.text(start - trace.t0, ax.get_ylim()[1] * 0.97, name, fontsize=7, rotation=90, va="top")
    ax.set(xlabel="seconds", ylabel="MB", title="memory over the run")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)
    layers = sorted({k[0] for k in trace.uses})
    experts = 1 + max((k[1] for k in trace.uses), default=0)
    count, width = np.zeros((len(layers), experts)), np.zeros((len(layers), experts))
    for (layer, e, b), n in trace.uses.items():
        count[layers.index(layer), e] += n
        width[layers.index(layer), e] += b * n
    fig, axes = plt.subplots(2, 1, figsize=(10, 1.5 + 0.5 * len(layers) * 2))
    for ax, data, title in ((axes[0], count, "(token, expert) pairs"),
                            (axes[1], np.divide(width, count, out=np.zeros_like(width), where=count > 0),
                             "mean width, bits")):
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set(title=title, xlabel="expert", ylabel="MoE layer", yticks=range(len(layers)), yticklabels=layers)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "experts.png", dpi=110)
    plt.close(fig)
    return ["memory.png", "experts.png"]
