"""A self-contained visual report of one evaluation (PNG, or HTML embedding that PNG).

Panels: 2-D embedding of real vs generated cells colored by source and by label; per-gene
mean and variance of log-normalized expression, real vs generated; the metrics as text.
Rendered with matplotlib's Agg canvas directly (no pyplot, no global backend change);
matplotlib and umap-learn are imported lazily.
"""

from __future__ import annotations

import base64
import html
import io
import warnings

import numpy as np

from scldm_scale.io import write_bytes_atomic

__all__ = ["write_report", "embed_2d"]


def embed_2d(ref_np: np.ndarray, gen_np: np.ndarray, method: str = "auto",
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """2-D coordinates for the real and generated cells, and the method used.

    ``"pca"``: the first two columns of the shared representation (its PC1 / PC2, fitted on
    the reference). ``"umap"``: UMAP (umap-learn, ``random_state=seed``) fitted on the pooled
    cells. ``"auto"``: UMAP when ``import umap`` works (and the fit succeeds), else PCA.
    """
    ref_np = np.asarray(ref_np, dtype=np.float64)
    gen_np = np.asarray(gen_np, dtype=np.float64)
    if method not in ("auto", "pca", "umap"):
        raise ValueError(f"embedding method must be 'auto', 'pca' or 'umap', got {method!r}")
    if method in ("auto", "umap"):
        try:
            import umap  # noqa: F401
        except Exception:
            if method == "umap":
                raise
        else:
            z = np.concatenate([ref_np, gen_np], axis=0)
            n_nb = int(min(15, max(2, len(z) - 1)))
            try:
                emb = umap.UMAP(n_neighbors=n_nb, random_state=seed, n_jobs=1).fit_transform(z)
            except Exception as e:  # e.g. too few cells for UMAP
                if method == "umap":
                    raise
                warnings.warn(f"write_report: UMAP failed ({e}); using PCA-2", stacklevel=3)
            else:
                return emb[: len(ref_np)], emb[len(ref_np):], "UMAP"

    def pc2(a):
        if a.shape[1] >= 2:
            return a[:, :2]
        return np.concatenate([a, np.zeros((len(a), 2 - a.shape[1]))], axis=1)

    return pc2(ref_np), pc2(gen_np), "PCA"


def _flat_metrics(metrics: dict) -> list[tuple[str, str]]:
    rows = []
    for key, val in metrics.items():
        if isinstance(val, dict):
            continue
        if val is None:
            txt = "-"
        elif isinstance(val, (float, np.floating)):
            txt = f"{float(val):.4g}"
        else:
            txt = str(val)
        rows.append((str(key), txt))
    return rows


def _label_colors(labels: list[str]):
    from matplotlib import colormaps

    cats = sorted(set(labels))
    cmap = colormaps["tab20"]
    return {c: cmap(i % 20) for i, c in enumerate(cats)}


def _render_png(ref_np, gen_np, labels_ref, labels_gen, metrics, gene_stats,
                embedding: str, seed: int) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    e_ref, e_gen, emb_name = embed_2d(ref_np, gen_np, embedding, seed)
    fig = Figure(figsize=(16, 10), dpi=90)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 3)

    ax = fig.add_subplot(gs[0, 0])
    ax.scatter(e_ref[:, 0], e_ref[:, 1], s=3, alpha=0.5, c="tab:blue", label=f"real (n={len(e_ref)})",
               rasterized=True)
    ax.scatter(e_gen[:, 0], e_gen[:, 1], s=3, alpha=0.5, c="tab:orange",
               label=f"generated (n={len(e_gen)})", rasterized=True)
    ax.set_title(f"{emb_name}: real vs generated")
    ax.set_xlabel(f"{emb_name}1")
    ax.set_ylabel(f"{emb_name}2")
    ax.legend(loc="best", markerscale=4, fontsize=8)

    ax = fig.add_subplot(gs[0, 1])
    if labels_ref is not None and labels_gen is not None:
        lr = [str(v) for v in np.asarray(labels_ref)]
        lg = [str(v) for v in np.asarray(labels_gen)]
        colors = _label_colors(lr + lg)
        ax.scatter(e_ref[:, 0], e_ref[:, 1], s=4, marker="o", alpha=0.5,
                   c=[colors[v] for v in lr], rasterized=True)
        ax.scatter(e_gen[:, 0], e_gen[:, 1], s=6, marker="x", alpha=0.5,
                   c=[colors[v] for v in lg], rasterized=True)
        for cat, col in list(colors.items())[:20]:
            ax.scatter([], [], s=20, color=col, label=cat)
        ax.legend(loc="best", fontsize=7, ncol=1 + len(colors) // 12)
        ax.set_title(f"{emb_name} by label (o real, x generated)")
    else:
        ax.text(0.5, 0.5, "no labels", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("by label")

    for col, (stat, title) in enumerate((("mean", "per-gene mean"), ("var", "per-gene variance"))):
        ax = fig.add_subplot(gs[1, col])
        if gene_stats is not None and f"{stat}_real_g" in gene_stats:
            a = np.asarray(gene_stats[f"{stat}_real_g"], dtype=np.float64)
            b = np.asarray(gene_stats[f"{stat}_gen_g"], dtype=np.float64)
            ax.scatter(a, b, s=4, alpha=0.5, rasterized=True)
            lim = [0.0, float(max(np.nanmax(a, initial=0.0), np.nanmax(b, initial=0.0))) * 1.05 or 1.0]
            ax.plot(lim, lim, "k--", lw=0.8)
            r2 = metrics.get(f"{stat}_r2")
            if r2 is not None:
                title += f" (R2={float(r2):.3f})"
            ax.set_xlabel("real (log1p normalized)")
            ax.set_ylabel("generated")
        else:
            ax.text(0.5, 0.5, "no gene stats", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)

    ax = fig.add_subplot(gs[:, 2])
    ax.axis("off")
    rows = _flat_metrics(metrics)
    width = max([len(k) for k, _ in rows] + [6])
    text = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows) or "(no metrics)"
    ax.text(0.0, 1.0, "metrics\n\n" + text, va="top", ha="left", family="monospace", fontsize=10,
            transform=ax.transAxes)

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(path_png_or_html: str, ref_np, gen_np, labels_ref, labels_gen, metrics: dict,
                 gene_stats: dict | None, embedding: str = "auto", seed: int = 0) -> str:
    """Write the report to ``path_png_or_html`` atomically and return the path.

    ``ref_np`` / ``gen_np``: the cells in the shared representation (already subsampled for
    plotting). ``labels_ref`` / ``labels_gen``: one label per cell, or ``None``.
    ``metrics``: the evaluation dict (scalar entries are shown; nested dicts skipped).
    ``gene_stats``: ``{"mean_real_g", "mean_gen_g", "var_real_g", "var_gen_g"}`` arrays, or
    ``None``. ``embedding``: ``"auto"`` (UMAP if umap-learn imports, else PCA-2), ``"pca"``
    or ``"umap"``. A path ending in ``.html`` gets an HTML page with the PNG embedded as
    base64 and an HTML metric table; anything else gets the PNG.
    """
    png = _render_png(ref_np, gen_np, labels_ref, labels_gen, metrics or {}, gene_stats,
                      embedding, seed)
    if str(path_png_or_html).lower().endswith((".html", ".htm")):
        rows = "\n".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                         for k, v in _flat_metrics(metrics or {}))
        page = (
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>scldm-scale evaluation"
            "</title>\n<style>body{font-family:sans-serif}table{border-collapse:collapse}"
            "td,th{border:1px solid #999;padding:2px 8px;text-align:left}</style></head><body>\n"
            "<h1>scldm-scale evaluation</h1>\n<table>\n<tr><th>metric</th><th>value</th></tr>\n"
            f"{rows}\n</table>\n<img alt=\"evaluation report\" src=\"data:image/png;base64,"
            f"{base64.b64encode(png).decode('ascii')}\"/>\n</body></html>\n"
        )
        write_bytes_atomic(path_png_or_html, page.encode("utf-8"))
    else:
        write_bytes_atomic(path_png_or_html, png)
    return str(path_png_or_html)
