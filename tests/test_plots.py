"""``fedlit plot``: PNG and PDF figures of real runs (accuracy per round, client spread, expert attention,
base/novel/HM), different pictures for different runs, and one line naming the extra when matplotlib is missing."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
from PIL import Image

from fedlit.command import main
from fedlit.federation.experiment import build_job
from fedlit.plots import (
    attention_colorbar,
    attention_runs,
    draw_accuracy,
    draw_attention,
    draw_clients,
    expert_attention,
    group_styles,
    labelled_groups,
    plot_results,
    pyplot,
)
from tests.helpers import fast_config, read_results

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """pFedMoAP with diagnostics (seeds 0 and 1), PromptFL (seed 0), and a base-to-novel PromptFL run."""
    root = tmp_path_factory.mktemp("plots")
    cells = {"moap0": ["algorithm=pfedmoap", "eval.diagnostics=true"],
             "moap1": ["algorithm=pfedmoap", "eval.diagnostics=true", "seed=1"],
             "promptfl": ["algorithm=promptfl"],
             "b2n": ["algorithm=promptfl", "eval.protocol=base2novel", "data.num_clients=2"]}
    for name, overrides in cells.items():
        build_job(fast_config(root, "fed.rounds=2", *overrides)).orchestrator(root / name).run()
    return root


def pixels(path) -> np.ndarray:
    """The RGB pixels of a PNG."""
    return np.asarray(Image.open(path).convert("RGB"))


def test_figures_of_two_runs_are_written_and_differ(runs, tmp_path, capsys):
    assert main(["plot", str(runs / "moap0"), str(runs / "moap1"), str(runs / "promptfl"), "--out",
                 str(tmp_path / "a")]) == 0
    listed = capsys.readouterr().out.split()
    names = {"accuracy", "clients", "expert_attention", "overview"}
    assert sorted(listed) == sorted(str(tmp_path / "a" / f"{n}.{ext}") for n in names for ext in ("png", "pdf"))
    assert main(["plot", str(runs / "promptfl"), "--out", str(tmp_path / "b")]) == 0
    assert not (tmp_path / "b" / "expert_attention.png").exists()  # no pFedMoAP run, no heatmap
    for name in ("accuracy", "clients"):
        a, b = pixels(tmp_path / "a" / f"{name}.png"), pixels(tmp_path / "b" / f"{name}.png")
        assert a.shape == b.shape and a.std() > 0 and not np.array_equal(a, b)
    for path in (tmp_path / "a").iterdir():
        assert path.stat().st_size > 1000
    assert (tmp_path / "a" / "accuracy.pdf").read_bytes().startswith(b"%PDF")


def test_expert_attention_heatmap_is_the_last_rounds_diagnostics(runs, tmp_path):
    result = read_results(runs / "moap0")
    table = expert_attention(result)
    recorded = result["rounds"][-1]["diagnostics"]["expert_attention"]
    assert table.shape == (4, 3)  # 4 clients x (local + K = 2 experts)
    np.testing.assert_allclose(table, np.asarray(recorded))
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-5)
    assert expert_attention(read_results(runs / "promptfl")) is None
    one = plot_results([{**result, "_path": "x"}], tmp_path / "one")
    other = plot_results([{**read_results(runs / "moap1"), "_path": "y"}], tmp_path / "other")
    assert tmp_path / "one" / "expert_attention.png" in one and tmp_path / "other" / "expert_attention.png" in other
    first, second = (pixels(tmp_path / d / "expert_attention.png") for d in ("one", "other"))
    assert not np.array_equal(first, second)


def test_base_novel_bars_when_reported(runs, tmp_path):
    written = plot_results([{**read_results(runs / "b2n"), "_path": "b2n"}], tmp_path)
    assert tmp_path / "base_novel.png" in written and pixels(tmp_path / "base_novel.png").std() > 0


def test_missing_matplotlib_names_the_extra(runs, tmp_path, monkeypatch, capsys):
    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["plot", str(runs / "promptfl"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("error: fedlit plot needs matplotlib: pip install 'fedlit[plots]'")


def test_a_subset_rounds_heatmap_rows_are_labelled_by_their_clients(tmp_path):
    diagnostics = {"expert_attention": [[0.75, 0.25], [0.5, 0.5]]}
    result = {"algorithm": "pfedmoap", "seed": 0, "_path": str(tmp_path), "final": {},
              "rounds": [{"round": 4, "evaluated_clients": [3, 17], "accuracy": [0.5, 1.0],
                          "diagnostics": diagnostics}]}
    [(title, table, clients)] = attention_runs([result])
    assert clients == [3, 17] and np.array_equal(table, np.array([[0.75, 0.25], [0.5, 0.5]]))
    fig, ax = pyplot().subplots()
    draw_attention(ax, table, title, clients)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["3", "17"]
    pyplot().close(fig)


def _results(methods: list[str], rounds: int = 3) -> list[dict]:
    """Synthetic finished runs (one per method) with distinct accuracy curves."""
    return [{"algorithm": m, "seed": 0, "_path": f"/x/{m}", "config": {"algorithm": m, "seed": 0},
             "final": {}, "rounds": [{"round": r, "acc_mean": (i + r) / 40, "accuracy": [(i + r) / 40]}
                                     for r in range(1, rounds + 1)]} for i, m in enumerate(methods)]


def test_twelve_methods_get_distinct_styles_and_the_legend_sits_outside_the_curves():
    methods = [f"method{i:02d}" for i in range(12)]
    styles = group_styles(99)
    assert len(set(styles)) == 99 and len({c for c, _ in styles[:11]}) == 11  # 11 methods: 11 colours
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
    groups = labelled_groups(_results(methods))
    draw_accuracy(ax, groups)
    lines = ax.get_lines()
    assert len({(line.get_color(), line.get_marker()) for line in lines}) == 12
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"{m} (n=1)" for m in methods]
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1  # entirely right of the plotted area
    fig2, ax2 = plt.subplots()
    draw_clients(ax2, groups)
    boxes = [p.get_facecolor()[:3] for p in ax2.patches]
    from matplotlib.colors import to_rgb

    assert boxes == [to_rgb(c) for c, _ in group_styles(12)]  # each box in its method's colour
    assert [t.get_text() for t in ax2.get_xticklabels()] == methods
    plt.close(fig), plt.close(fig2)


def test_groups_are_labelled_by_their_method_even_when_it_does_not_differ():
    runs = _results(["pfedmoap", "pfedmoap"])
    runs[0]["config"]["method"] = {"num_experts": 2}
    runs[1]["config"]["method"] = {"num_experts": 4}
    assert [label for label, _ in labelled_groups(runs)] == ["pfedmoap, method.num_experts=2",
                                                             "pfedmoap, method.num_experts=4"]


def test_expert_attention_is_coloured_around_uniform_with_its_range_stated(tmp_path):
    table = np.array([[0.30, 0.24, 0.23, 0.23], [0.25, 0.26, 0.25, 0.24]])  # K + 1 = 4 slots: uniform 0.25
    plt = pyplot()
    fig, ax = plt.subplots()
    image = draw_attention(ax, table, "pfedmoap seed 0")
    bar = attention_colorbar(fig, image, ax, table)
    low, high = image.norm.vmin, image.norm.vmax
    assert np.isclose((low + high) / 2, 0.25) and np.isclose(high - 0.25, 0.05)  # centred, largest deviation
    assert image.get_cmap().name == "RdBu_r"
    assert bar.ax.get_ylabel() == "gate weight (white = uniform 1/4 = 0.25;\nweights 0.2300 to 0.3000)"
    assert ax.get_title() == "pfedmoap seed 0\n(within ±0.05 of uniform 0.25)"
    plt.close(fig)


def test_plot_writes_into_the_first_run_directory_by_default(runs, capsys):
    assert main(["plot", str(runs / "promptfl")]) == 0
    assert (runs / "promptfl" / "plots" / "accuracy.png").is_file()
    assert str(runs / "promptfl" / "plots" / "overview.png") in capsys.readouterr().out.split()
