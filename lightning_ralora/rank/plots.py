"""Every matplotlib figure of the package, in one style: the GID plots and the run comparison.

Figures use matplotlib's object API on their own Agg canvas (`Figure` + `FigureCanvasAgg`, never pyplot): no
global backend switch (`matplotlib.use` would close a notebook's open figures), no pyplot figure registry to
leak into, no display needed. matplotlib is imported lazily, inside the functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_ralora.rank.spectra import cumulative_energy

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

    from lightning_ralora.adapters.plan import AdapterPlan
    from lightning_ralora.rank.estimate import GIDStat

Curve = Sequence[tuple[int, float]]  # (step, value) points

# the package's one plot style, applied as an rcParams context while a figure is built and saved
STYLE: dict[str, Any] = {
    "figure.constrained_layout.use": True,
    "savefig.dpi": 120,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.titlesize": "medium",
    "legend.fontsize": "small",
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
}


@contextlib.contextmanager
def styled_figure(
    path: str | Path, nrows: int = 1, ncols: int = 1, *, width: float, height: float
) -> Iterator[tuple[Figure, np.ndarray]]:
    """An nrows x ncols grid of axes (always a 2-D array) in the package style; saved to `path` when the block ends."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        yield fig, fig.subplots(nrows, ncols, squeeze=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)


def module_type(name: str) -> str:
    """The module type a target belongs to: the last component of its qualified name (q_proj, fc1, ...)."""
    return name.rsplit(".", 1)[-1]


def _by_type(names: Iterable[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(module_type(n), []).append(n)
    return groups


def plot_gid(plan: AdapterPlan, path: str | Path) -> Path:
    """gid.png: erank per layer (by module type, with the equivalent rank n_l·r_l), chosen ranks and block counts."""
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    with styled_figure(path, 3, width=9.0, height=9.0) as (_, axes):
        ax_e, ax_r, ax_n = axes[:, 0]
        for mtype, names in _by_type(plan.entries).items():
            es = [plan.entries[n] for n in names]
            x = list(range(len(es)))
            erank = [e.erank if e.erank is not None else float("nan") for e in es]
            line = ax_e.plot(x, erank, "o-", label=mtype)[0]
            ax_e.plot(x, [e.spec.r * e.spec.n_blocks for e in es], "--", color=line.get_color(), alpha=0.6)
            ax_r.plot(x, [e.spec.r for e in es], "o-", color=line.get_color(), label=mtype)
            ax_n.plot(x, [e.spec.n_blocks for e in es], "o-", color=line.get_color(), label=mtype)
        ax_e.set_yscale("log")
        ax_e.set_ylabel("erank(Ḡ)  (dashed: n_l·r_l)")
        ax_r.set_ylabel("rank r_l")
        ax_n.set_ylabel("blocks n_l")
        ax_n.set_yscale("log", base=2)
        ax_n.set_xlabel("layer index within module type")
        for ax in (ax_e, ax_r, ax_n):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_e.set_title(f"{plan.variant}: gradient intrinsic dimensionality and plan")
        ax_e.legend(ncol=4)
    return path


def plot_cumulative_energy(stats: Mapping[str, GIDStat], path: str | Path, max_rank: int | None = None) -> Path:
    """Cumulative energy C(r) of each target's averaged gradient, coloured by module type, with the 0.9 line."""
    path = Path(path)
    with styled_figure(path, width=9.0, height=4.5) as (_, axes):
        ax = axes[0, 0]
        colors: dict[str, Any] = {}
        for mtype, names in _by_type(stats).items():
            for i, n in enumerate(names):
                c = cumulative_energy(stats[n].sigma)
                if max_rank is not None:
                    c = c[:max_rank]
                kw = {"color": colors[mtype]} if mtype in colors else {}
                line = ax.plot(range(1, len(c) + 1), c.numpy(), alpha=0.7, label=mtype if i == 0 else None, **kw)[0]
                colors.setdefault(mtype, line.get_color())
        ax.axhline(0.9, color="k", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel("C(r) = Σ_{i≤r} σ_i² / Σ σ_i²")
        ax.set_ylim(0, 1.02)
        ax.set_title("cumulative energy of the warm-up gradient per layer")
        ax.legend(ncol=4)
    return path


def plot_comparison(runs: Sequence[tuple[str, Curve, Curve]], path: str | Path, loss_key: str, align_key: str) -> Path:
    """Loss (left) and alignment (right) against the step for runs given as (label, loss, alignment) curves."""
    path = Path(path)
    with styled_figure(path, 1, 2, width=12.0, height=4.5) as (_, axes):
        ax_loss, ax_align = axes[0]
        for i, (label, loss, align) in enumerate(runs):
            color = f"C{i % 10}"  # the same colour for a run in both panels
            if loss:
                ax_loss.plot([s for s, _ in loss], [v for _, v in loss], color=color, label=label)
            if align:
                ax_align.plot([s for s, _ in align], [v for _, v in align], "o-", color=color, label=label)
        ax_loss.set(xlabel="step", ylabel=loss_key, title="training loss")
        ax_align.set(xlabel="step", ylabel=align_key, title="gradient alignment")
        if not any(align for _, _, align in runs):
            ax_align.text(
                0.5,
                0.5,
                f"no {align_key} logged\n(train with callbacks=alignment)",
                ha="center",
                va="center",
                transform=ax_align.transAxes,
            )
        for ax in (ax_loss, ax_align):
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
    return path
