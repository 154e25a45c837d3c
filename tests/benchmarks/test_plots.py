"""The benchmark plots' titles: the environment line (CPU, threads, versions, commit, time) is wider than a
small figure and was cut off at both ends; it is wrapped to the figure's width now."""

from __future__ import annotations

import pytest

from benchmarks import common

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ENVIRONMENT = (
    "aqcf-bench conv — Intel(R) Xeon(R) Platinum 8480+ Processor, 2 threads, torch 2.13.0+cpu, triton 3.9.0, "
    "commit 866ec60+dirty, 2026-12-06T14:32:56+00:00"
)


@pytest.mark.parametrize(("width", "fontsize"), [(8.0, 9), (5.0, 9), (18.0, 8)])
def test_a_long_title_fits_its_figure(width: float, fontsize: float) -> None:
    fig = plt.figure(figsize=(width, 3.0))
    try:
        text = fig.suptitle(common.wrap_title(ENVIRONMENT, width, fontsize), fontsize=fontsize)
        fig.canvas.draw()
        box, frame = text.get_window_extent(), fig.bbox
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1, (box, frame)
        assert text.get_text().replace("\n", " ") == ENVIRONMENT
    finally:
        plt.close(fig)


def test_the_conv_plot_keeps_its_title_inside(tmp_path, monkeypatch) -> None:
    """grouped_bars (every conv/model/rnn plot) on two groups: the smallest figure it makes."""
    seen = {}
    original = plt.Figure.savefig

    def savefig(fig, *args, **kwargs):
        fig.canvas.draw()
        seen["title"], seen["frame"] = fig._suptitle.get_window_extent(), fig.bbox
        seen["axes_top"] = max(ax.get_window_extent().y1 for ax in fig.axes)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    panels = [("fwd: speedup", "x", {"a": [1.1, 0.9], "b": [0.5, None]})]
    common.grouped_bars(tmp_path / "plot.png", ["2d 16q k3 N4 32x32 fwd", "1d 16q k3 N8 1024 fwd"], panels, ENVIRONMENT)
    title, frame = seen["title"], seen["frame"]
    assert frame.x0 <= title.x0 and title.x1 <= frame.x1, (title, frame)
    assert seen["axes_top"] < title.y0  # the panel below it, not under it
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_an_empty_panel_says_so_without_a_warning(tmp_path, recwarn) -> None:
    """The attention plot of a --no-memory run: its peak-memory panel has no line (matplotlib warned "No artists
    with labels found to put in legend")."""
    from benchmarks import attention

    case = attention.Case(tokens=64, channels_q=2, heads=1)
    timing = common.Timing.of([1e-3, 2e-3])
    results = [attention.Result(case, "fwd", {"sdpa": timing, "ours": timing}, {})]
    seen = {}
    original = plt.Figure.savefig

    def savefig(fig, *args, **kwargs):
        seen["texts"] = [t.get_text() for ax in fig.axes for t in ax.texts]
        seen["legends"] = [ax.get_legend() is not None for ax in fig.axes]
        return original(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(plt.Figure, "savefig", savefig)
        attention.plot(tmp_path / "attention.png", results, {"command": "x", **_environment()})
    assert not [w for w in recwarn if "legend" in str(w.message)], [str(w.message) for w in recwarn]
    assert seen["legends"] == [True, False] and seen["texts"] == ["not measured in this run"]


def _environment() -> dict:
    import torch

    return common.environment(torch.device("cpu"), 1, 0)
