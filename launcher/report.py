"""`moe-launch report`: a run's (or a sweep's) summary from metrics.jsonl and its launch log, and
the picture of it (loss, learning rate, per-layer expert load over steps) drawn with matplotlib.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from launcher import launch_log
from launcher.run_metrics import fmt, read_records, summarize
from launcher.sweep import format_table, sweep_rows


def _launch_lines(events: list[dict]) -> list[str]:
    """One line per launch: which job and restart, and how it ended."""
    lines = []
    for start_index, event in enumerate(events):
        if event["event"] != "start":
            continue
        end = next((e for e in events[start_index + 1 :] if e["event"] in ("start", "exit")), None)
        how = launch_log.describe_exit(end["code"]) if end and end["event"] == "exit" else "running or died"
        where = f"SLURM job {event['job_id']} restart {event['restart_count']}" if event["job_id"] else "local"
        lines.append(f"  {where} on {event['nodes']} node(s): {how}")
    return lines


def run_report(run_dir: Path, png: str | None) -> str:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    records = read_records(run_dir)
    n = summarize(records)
    events = launch_log.read(run_dir)
    launches = _launch_lines(events)
    restarts = max((e.get("restart_count", 0) for e in events), default=0)
    best = f"best {fmt(n.best_val_loss)} at step {n.best_val_step}" if n.best_val_loss is not None else "best -"
    lines = [
        f"run:        {run_dir}",
        f"experiment: {cfg.experiment} ({cfg.launcher.name} launcher)",
        f"steps:      {fmt(n.last_step, 'd')}/{cfg.train.steps}",
        f"tokens:     {fmt(n.tokens_seen, ',d')}",
        f"train loss: final {fmt(n.final_loss)}",
        f"val loss:   final {fmt(n.final_val_loss)}, {best}",
        f"tokens/s:   {fmt(n.tokens_per_s, ',.0f')} (median over logged windows)",
        f"launches:   {len(launches)} ({restarts} SLURM restarts)",
        *launches,
        f"resumes:    {len(n.resumes)}",
        *[f"  at step {step} from {Path(path).name}" for step, path in n.resumes],
    ]
    if png is not None:
        draw_run(records, n.resumes, f"{cfg.experiment}: {run_dir.name}", png)
    return "\n".join(lines)


def sweep_report(sweep_dir: Path, sweep: dict, png: str | None) -> str:
    rows = sweep_rows(sweep_dir)
    if png is not None:
        points = {r["overrides"] or f"point {r['point']}": read_records(r["run_dir"]) for r in rows}
        draw_sweep(points, f"sweep {sweep_dir.name} ({len(rows)} points)", png)
    return f"sweep: {sweep_dir}\n" + format_table(rows).rstrip("\n")


# ---- pictures ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    picked = [r for r in records if key in r]
    return [r["step"] for r in picked], [r[key] for r in picked]


def _load_grid(records: list[dict], key: str) -> tuple[list[int], list[list[float]]]:
    """(steps, rows) of a per-layer value logged with the losses: rows[i][j] is step j of layer i."""
    picked = [r for r in records if key in r]
    if not picked:
        return [], []
    layers = len(picked[0][key])
    return [r["step"] for r in picked], [[r[key][i] for r in picked] for i in range(layers)]


def draw_run(records: list[dict], resumes: list[tuple[int, str]], title: str, png: str) -> None:
    """Loss (train and validation), learning rate, load imbalance per MoE layer and the token share
    of each expert in the most imbalanced layer, all over steps."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (loss_ax, lr_ax), (imb_ax, share_ax) = axes
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        steps, values = _series(records, key)
        loss_ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
    for step, _ in resumes:
        loss_ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
    loss_ax.set(title="loss" + (" (dashed: resumed)" if resumes else ""), xlabel="step")
    loss_ax.legend()
    lr_ax.plot(*_series(records, "lr"))
    lr_ax.set(title="learning rate", xlabel="step")
    steps, imbalance = _load_grid(records, "load_imbalance")
    if imbalance:
        extent = [steps[0], steps[-1], len(imbalance) - 0.5, -0.5]
        im = imb_ax.imshow(imbalance, aspect="auto", cmap="viridis", extent=extent, interpolation="nearest")
        fig.colorbar(im, ax=imb_ax, label="max / mean tokens per expert")
        imb_ax.set(title="expert load imbalance per MoE layer", xlabel="step", ylabel="MoE layer")
        worst = max(range(len(imbalance)), key=lambda i: sum(imbalance[i]))
        counts = [r["expert_tokens"][worst] for r in records if "expert_tokens" in r]
        shares = [[c[e] / max(1, sum(c)) for c in counts] for e in range(len(counts[0]))]
        im = share_ax.imshow(shares, aspect="auto", cmap="magma", extent=[steps[0], steps[-1], len(shares) - 0.5, -0.5])
        fig.colorbar(im, ax=share_ax, label="share of routed tokens")
        share_ax.set(title=f"token share per expert, MoE layer {worst}", xlabel="step", ylabel="expert")
        for ax in (imb_ax, share_ax):
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        for ax in (imb_ax, share_ax):
            ax.text(0.5, 0.5, "no expert load logged yet", ha="center", va="center")
            ax.set_axis_off()
    _save(plt, fig, title, png)


def draw_sweep(points: dict[str, list[dict]], title: str, png: str) -> None:
    """Every point's train and validation loss and learning rate on shared axes, and each point's
    final load imbalance per MoE layer."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for (key, ax_title), ax in zip(
        (("loss", "train loss"), ("val_loss", "validation loss"), ("lr", "learning rate")),
        axes.flat,
        strict=False,
    ):
        for label, records in points.items():
            ax.plot(*_series(records, key), label=label)
        ax.set(title=ax_title, xlabel="step")
    axes[0][0].legend(fontsize="small")
    heat_ax = axes[1][1]
    finals = [
        next((r["load_imbalance"] for r in reversed(rec) if "load_imbalance" in r), None) for rec in points.values()
    ]
    if any(finals):
        width = max(len(f) for f in finals if f)
        grid = [f if f else [float("nan")] * width for f in finals]
        im = heat_ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=heat_ax, label="max / mean tokens per expert")
        heat_ax.set_yticks(range(len(points)), labels=list(points), fontsize="small")
        heat_ax.set(title="final load imbalance per MoE layer", xlabel="MoE layer")
        heat_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        heat_ax.text(0.5, 0.5, "no expert load logged yet", ha="center", va="center")
        heat_ax.set_axis_off()
    _save(plt, fig, title, png)


def _save(plt, fig, title: str, png: str) -> None:
    """Title, lay out, write the PNG and free the figure (pyplot keeps every open one)."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
