"""The benchmark's results as a terminal table, a Markdown report, a bar chart and JSON.

A results file holds a list of runs (one model, device and frame set each), so runs made with
different options, or on another machine, can be appended to one report. Every figure in the
report comes from the JSON; the targets of the project's issue are checked against it.

Schema 2 added to every row its thread count (``threads``) and the competing load it was measured
under (``load_cores`` busy processes, ``load_busy_cores`` the CPU they really got, ``load_held``),
and to every run the backend ``auto`` picks per precision. A schema-1 file is read as schema 2: its
rows ran with the process's PyTorch threads and no competing load.
"""
import json
import os
from pathlib import Path

from uncertain_seg_ros.atomic_io import atomic_write_text

from .profiling import STAGES

SCHEMA = "uncertain_seg_ros.benchmark/2"
SCHEMA_1 = "uncertain_seg_ros.benchmark/1"
ALL_STAGES = (*STAGES, "convert", "publish")
TARGET_CPU_ORT_SPEEDUP = 1.8
TARGET_CPU_BEST_SPEEDUP = 3.0
TARGET_GPU_E2E_RATIO = 1.3
TARGET_GPU_VITS14_MS = 3.0
TARGET_AGREEMENT = 0.995


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _cell(summary: dict | None) -> str:
    """``median (p95)`` in milliseconds."""
    if not summary or summary.get("median_ms") is None:
        return "-"
    return f"{_ms(summary['median_ms'])} ({_ms(summary['p95_ms'])})"


def _ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def _agree(agreement: dict | None) -> str:
    return f"{agreement['label_agreement']:.3%}" if agreement else "-"


def _load(row: dict, key: str = "other_load_cores") -> str:
    """CPU cores other processes used (or the hypervisor stole) during the stage timing / the end-to-end run."""
    values = (row.get(key), _e2e(row).get(key))
    return " / ".join("-" if v is None else f"{v:.1f}" for v in values)


def _competing(row: dict) -> str:
    """The competing load: busy processes started (cores' worth of CPU they got during the stage timing)."""
    n, busy = row["load_cores"], row.get("load_busy_cores")
    if not n:
        return "0"
    got = "?" if busy is None else f"{busy:.1f}"
    return f"{n} ({got}{'' if row.get('load_held', True) else ', cut short'})"


def _e2e(row: dict) -> dict:
    return row.get("e2e") or {}


def upgrade(doc: dict) -> dict:
    """``doc`` as schema 2 (a schema-1 file's rows ran with the process's threads and no competing load)."""
    if doc.get("schema") == SCHEMA_1:
        for run in doc["runs"]:
            threads = run["environment"]["torch_threads"]
            run.setdefault("threads", [threads])
            run.setdefault("threads_passed_to_node", False)
            run.setdefault("load_cores", [0])
            for row in run["rows"]:
                row.setdefault("threads", threads)
                row.setdefault("load_cores", 0)
        doc["schema"] = SCHEMA
    return doc


def _unloaded_batch_1(rows: list[dict]) -> dict[int, list[dict]]:
    """Rows at batch 1 with no competing load, by thread count."""
    out: dict[int, list[dict]] = {}
    for r in rows:
        if r["batch"] == 1 and r["load_cores"] == 0:
            out.setdefault(r["threads"], []).append(r)
    return out


def _agreements(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Label agreement per backend and precision (measured once, at the largest batch)."""
    return {(r["backend"], r["precision"]): r["agreement"] for r in rows if r.get("agreement")}


def _inference_ms(row: dict) -> float:
    return row["stages"]["inference"]["median_ms"]


def auto_lines(run: dict) -> list[str]:
    """Which backend ``auto`` picks per precision here, beside the fastest one measured at that precision
    (batch 1, no competing load, each backend at its fastest thread count, labels >= the bar); where
    they differ, factory.AUTO_ORDER is what to change."""
    lines, agreements = [], _agreements(run["rows"])
    unloaded = [r for group in _unloaded_batch_1(run["rows"]).values() for r in group]
    for precision, picked in (run.get("auto") or {}).items():
        ok = [r for r in unloaded if r["precision"] == precision
              and agreements.get((r["backend"], precision), {}).get("label_agreement", 0) >= TARGET_AGREEMENT]
        if not ok:
            continue
        best = min(ok, key=_inference_ms)
        mine = min((r for r in ok if r["backend"] == picked), key=_inference_ms, default=None)
        verdict = "the same" if best["backend"] == picked else "they differ: factory.AUTO_ORDER is what to change"
        lines.append(f"auto picks {picked} for {precision} (factory.AUTO_ORDER, an order from measurements)"
                     + (f", {_ms(_inference_ms(mine))} ms here" if mine else "")
                     + f"; fastest {precision} with labels >= {TARGET_AGREEMENT:.1%} as fp32 (batch 1, no competing load): "
                     f"{best['backend']}, {best['threads']} thread(s), {_ms(_inference_ms(best))} ms; {verdict}")
    return lines


def _floor_ms(row: dict) -> float:
    return row["floor"]["floor_s"] * 1e3


def targets(run: dict) -> list[dict]:
    """The issue's targets that apply to this run, each with the measured figure and whether it is met."""
    rows, out = run["rows"], []
    if run["device"] == "cpu":
        # against eager at its fastest thread count: a thread pool that collapses under the machine's
        # other load is no baseline (eager with 2 threads on a busy 2-core CPU: 12x its 1-thread time)
        eager: dict[int, dict] = {}
        for r in rows:
            if r["backend"] == "torch" and r["precision"] == "fp32" and r["load_cores"] == 0:
                if r["batch"] not in eager or _inference_ms(r) < _inference_ms(eager[r["batch"]]):
                    eager[r["batch"]] = r
        for r in rows:
            base = eager.get(r["batch"])
            if r["backend"] == "onnxruntime" and r["load_cores"] == 0 and base:
                ratio = _inference_ms(base) / _inference_ms(r)
                out.append({"target": f"CPU: ONNX Runtime >= {TARGET_CPU_ORT_SPEEDUP}x faster than PyTorch eager "
                                      f"(inference, ONNX Runtime {r['precision']} with {r['threads']} thread(s) vs eager "
                                      f"fp32 with {base['threads']}, batch {r['batch']})",
                            "measured": f"{ratio:.2f}x ({_ms(_inference_ms(base))} ms -> {_ms(_inference_ms(r))} ms)",
                            "met": ratio >= TARGET_CPU_ORT_SPEEDUP})
        agreements = _agreements(rows)
        unloaded = [r for group in _unloaded_batch_1(rows).values() for r in group]
        eagers = [r for r in unloaded if r["backend"] == "torch" and r["precision"] == "fp32"]
        ok = [r for r in unloaded
              if agreements.get((r["backend"], r["precision"]), {}).get("label_agreement", 0) >= TARGET_AGREEMENT]
        if eagers and ok:
            base, best = min(eagers, key=_inference_ms), min(ok, key=_inference_ms)
            ratio = _inference_ms(base) / _inference_ms(best)
            out.append({"target": f"CPU: the best backend >= {TARGET_CPU_BEST_SPEEDUP:g}x PyTorch eager fp32 with labels "
                                  f">= {TARGET_AGREEMENT:.1%} as fp32 ({run['model']['name']}, inference, batch 1, each "
                                  "at its fastest thread count, no competing load)",
                        "measured": f"{best['backend']} {best['precision']}, {best['threads']} thread(s): {ratio:.2f}x "
                                    f"(eager, {base['threads']} thread(s), {_ms(_inference_ms(base))} ms -> "
                                    f"{_ms(_inference_ms(best))} ms)",
                        "met": ratio >= TARGET_CPU_BEST_SPEEDUP})
    else:
        for r in rows:
            ratio = r.get("e2e_over_inference")
            if ratio is not None:
                out.append({"target": f"GPU: end-to-end <= {TARGET_GPU_E2E_RATIO}x inference ({r['backend']} {r['precision']}, "
                                      f"batch {r['batch']})",
                            "measured": f"{ratio:.2f}x", "met": ratio <= TARGET_GPU_E2E_RATIO})
        model = run["model"]
        if model["backbone"].startswith("dinov2_vits14") and model["input_hw"] == [476, 644]:
            best = min((r for r in rows if r["batch"] == 1 and r["load_cores"] == 0), key=_inference_ms, default=None)
            if best:
                ms = best["stages"]["inference"]["median_ms"]
                out.append({"target": f"GPU: ViT-S/14 at 644x476, batch 1, model time < {TARGET_GPU_VITS14_MS} ms "
                                      "(H100-class)",
                            "measured": f"{ms:.2f} ms ({best['backend']} {best['precision']} on {run['environment']['gpu']})",
                            "met": ms < TARGET_GPU_VITS14_MS})
    for r in rows:
        a = r.get("agreement")
        if a:
            out.append({"target": f"labels = PyTorch fp32 on >= {TARGET_AGREEMENT:.1%} of pixels ({r['backend']} {r['precision']})",
                        "measured": f"{a['label_agreement']:.4%} over {a['frames']} frames (worst frame {a['worst_frame']:.4%}, "
                                    f"max uncertainty difference {a['max_uncertainty_diff']:.1e})",
                        "met": a["label_agreement"] >= TARGET_AGREEMENT})
    return out


def _columns(run: dict) -> list[str]:
    return [s for s in ALL_STAGES if any(s in r["stages"] for r in run["rows"])]


def table(run: dict) -> str:
    """A plain-text table of one run for the terminal: median (p95) ms per stage, end to end, throughput."""
    stages = _columns(run)
    head = ["backend", "prec", "B", "thr", "load", *stages, "pipeline", "fps", "e2e", "e2e fps", "e2e batch", "e2e/inf",
            "floor", "agree", "vs eager", "other load", "steal"]
    lines = [head]
    for r in run["rows"]:
        a = r.get("agreement")
        lines.append([r["backend"], r["precision"], str(r["batch"]), str(r["threads"]), _competing(r),
                      *(_cell(r["stages"].get(s)) for s in stages),
                      _cell(r["pipeline"]), f"{r['pipeline_fps']:.1f}", _cell(_e2e(r).get("latency")),
                      f"{_e2e(r)['throughput_fps']:.1f}" if "throughput_fps" in _e2e(r) else _e2e(r).get("error", "-")[:20],
                      _batch(_e2e(r)), _ratio(r.get("e2e_over_inference")), _ms(_floor_ms(r)),
                      _agree(a), _ratio(r["speedup_vs_torch_fp32"]["inference"]), _load(r),
                      _load(r, "steal_cores")])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    m = run["model"]
    title = (f"{m['name']} ({m['backbone']}, input {m['input_hw'][1]}x{m['input_hw'][0]}) on {run['device']}, "
             f"{run['frames']['count']} frames of {run['frames']['camera_hw'][1]}x{run['frames']['camera_hw'][0]} "
             f"{run['frames']['encoding']}; times in ms, median (p95)")
    lines = [title, *text, _floor_line(run)]
    for s in run["skipped"]:
        lines.append(f"not run: {s['backend']} {s['precision']}: {s['reason']}")
    for t in targets(run):
        lines.append(f"{'MET' if t['met'] else 'NOT MET'}: {t['target']}: {t['measured']}")
    return "\n".join(lines + auto_lines(run))


def _floor_line(run: dict) -> str:
    peak = run["device_peak"]
    rates = ", ".join(f"{p} {v / 1e9:.0f} {'GOP' if p == 'int8' else 'GFLOP'}/s" for p, v in peak["flops_per_s"].items())
    one = next((r for r in run["rows"] if r["batch"] == 1), None)
    per_frame = ""
    if one:
        c = one["cost"]
        per_frame = (f"; per frame {c['flops'] / 1e9:.2f} GFLOP and {c['bytes'] / 1e6:.1f} MB -> floor "
                     f"{_ms(_floor_ms(one))} ms ({one['floor']['bound']}-bound, {one['precision']})")
    return (f"Floor: measured peak {rates} ({peak['gemm_size']}^2 GEMM), copy {peak['bytes_per_s'] / 1e9:.1f} GB/s"
            f"{per_frame}")


def _batch(e2e: dict) -> str:
    value = e2e.get("batch_size_mean")
    return "-" if value is None else f"{value:.2f}"


def markdown(doc: dict, chart_link: str | None = None) -> str:
    """The Markdown report of every run in ``doc``; ``chart_link``: the chart's path relative to the report."""
    out = ["# Inference benchmark", "",
           "Produced by `uncertain-seg benchmark` ([../README.md](../README.md) says how to run it). Times in ms, "
           "median (p95). Stage columns: wall time of the node's path for one round of frames (one per camera) in the "
           "benchmark's process, the device synchronised after each stage:", "",
           "- **decode**: message payload -> RGB array (the node's image_encoding code)",
           "- **preprocess**: upload, resize, normalise; **inference**: the backend's network call; **postprocess**: "
           "decode, calibrate, uncertainty, colour, overlay, download of the subscribed outputs",
           "- **convert**: arrays -> `sensor_msgs/Image`; **publish**: rclpy publish to a subscriber in the benchmark's "
           "process (the publish calls, what the node's thread pays; the subscriber's taking them is waited for "
           "untimed before the next round)",
           "- **e2e**: perception_node in its own process on a private ROS 2 domain, frames published reliable at a "
           "fixed rate (half the node's measured capacity unless `--rate`), latency = arrival of a frame's last output "
           "- its publish time; **e2e fps**: frames answered per second while frames come at three times that capacity "
           "(the node keeps the newest frame per camera and drops the rest, as with a fast camera); **e2e batch**: "
           "frames per network call as the node reported it on /diagnostics during the latency run (the node waits "
           "up to the run's `batch_window_ms` for every camera's frame)",
           "- **floor**: max(FLOPs / peak FLOP/s, bytes / peak bandwidth) of one network call, both peaks measured on "
           "the device (int8: the quantised linear layers at ONNX Runtime's int8 GEMM peak, attention and convolutions "
           "at the fp32 peak); **labels = fp32**: fraction of pixels labelled as by PyTorch fp32 eager; **vs eager**: "
           "inference speed-up over PyTorch fp32 eager at the same batch, in the same run",
           "- **threads**: the CPU threads of PyTorch, ONNX Runtime and OpenVINO (`--threads`); **competing load**: "
           "processes busy-looping on that many cores during the measurement (`--load-cores`), with the cores' worth "
           "of CPU they got during the stage timing in brackets (on a small machine they compete with the benchmark "
           "as much as it competes with them); **vs eager**: against PyTorch fp32 eager with the same threads and load",
           "- **other load**: CPU cores used by other processes during the stage timing / the end-to-end run "
           "(machine-wide busy time minus the benchmark's and the node's own); **steal**: cores' worth of time the "
           "hypervisor gave to other virtual machines, same two periods; timings with other load or steal are inflated", ""]
    for run in doc["runs"]:
        out += _run_markdown(run)
    if chart_link:
        out += [f"![median stage times per configuration; ticks: end-to-end median through the node]({chart_link})", ""]
    if not any(r["device"].startswith("cuda") for r in doc["runs"]):
        out += ["## GPU", "", "No GPU was available for these runs; the GPU targets are not measured here. "
                "The commands for a GPU machine are in [../README.md](../README.md).", ""]
    return "\n".join(out)


def _run_markdown(run: dict) -> list[str]:
    m, env, f = run["model"], run["environment"], run["frames"]
    stages = _columns(run)
    weights = " (random weights: timing only, labels meaningless)" if m["random_weights"] else ""
    out = [f"## {m['name']}: {m['backbone']} at {m['input_hw'][1]}x{m['input_hw'][0]}, "
           f"{f['camera_hw'][1]}x{f['camera_hw'][0]} camera, {run['device']}", "",
           f"```\n{run['command']}\n```", "",
           f"- Model: {m['parameters'] / 1e6:.1f} M parameters, id `{m['model_id']}`{weights}.",
           f"- Frames: {f['count']} ({', '.join(f['folders'])}), {f['encoding']}, {f['camera_hw'][1]}x{f['camera_hw'][0]}; "
           f"outputs: {', '.join(run['outputs'])}; {run['iterations']} timed rounds after {run['warmup']} warm-up"
           + (f"; {run['e2e_frames']} frames per camera end to end"
              + (f", node batch_window_ms {run['batch_window_ms']:g}." if run.get("batch_window_ms") is not None else ".")
              if run.get("e2e_frames") else "; no ROS graph (--skip-ros)."),
           f"- Machine: {run['device_peak'].get('name')}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads"
           + (f", GPU {env['gpu']}" if env.get("gpu") else "") + f"; torch {env['torch']}"
           + (f", onnxruntime {env['onnxruntime']}" if env.get("onnxruntime") else "")
           + (f", openvino {env['openvino']}" if env.get("openvino") else "")
           + f"; load average at start {', '.join(f'{v:.2f}' for v in env['load_average_1_5_15'] or [])}; {run['started']}.",
           f"- {_floor_line(run)}."]
    out.append(f"- Threads measured: {', '.join(map(str, run['threads']))}"
               + (" (passed to the node too)" if run.get("threads_passed_to_node") else " (the node: its own default)")
               + f"; competing loads: {', '.join(map(str, run['load_cores']))} busy core(s).")
    if run.get("note"):
        out.append(f"- Note: {run['note']}")
    out += ["", "| backend | precision | cameras | threads | competing load | " + " | ".join(stages)
            + " | pipeline | e2e | e2e fps | e2e batch | e2e / inference | floor | inference / floor | labels = fp32 "
            "| vs eager | other load | steal |", "|" + "---|" * (len(stages) + 16)]
    for r in run["rows"]:
        a, e = r.get("agreement"), _e2e(r)
        fps = f"{e['throughput_fps']:.1f}" if "throughput_fps" in e else ("failed" if "error" in e else "-")
        out.append(f"| {r['backend']} | {r['precision']} | {r['batch']} | {r['threads']} | {_competing(r)} | "
                   + " | ".join(_cell(r["stages"].get(s)) for s in stages)
                   + f" | {_cell(r['pipeline'])} | {_cell(e.get('latency'))} | {fps} | {_batch(e)} "
                   f"| {_ratio(r.get('e2e_over_inference'))} "
                   f"| {_ms(_floor_ms(r))} | {_ratio(r['stages']['inference']['median_ms'] / _floor_ms(r), 1)} "
                   f"| {_agree(a)} | {_ratio(r['speedup_vs_torch_fp32']['inference'])} | {_load(r)} "
                   f"| {_load(r, 'steal_cores')} |")
    if run["skipped"]:
        out += ["", "Not run here:"] + [f"- {s['backend']} {s['precision']}: {s['reason']}" for s in run["skipped"]]
    checks = targets(run)
    if checks:
        out += ["", "Targets:"] + [f"- **{'met' if t['met'] else 'not met'}**: {t['target']}: {t['measured']}" for t in checks]
    auto = auto_lines(run)
    if auto:
        out += ["", "Backend choice:"] + [f"- {line}" for line in auto]
    return out + [""]


def chart(doc: dict, path: Path) -> Path | None:
    """Stacked bars of the median stage times per row, one panel per run; None without matplotlib."""
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError:
        return None
    runs = doc["runs"]
    fig = Figure(figsize=(9, 1.2 + 0.45 * sum(len(r["rows"]) for r in runs) + 0.8 * len(runs)))
    axes = fig.subplots(len(runs), 1, squeeze=False)
    colours = dict(zip(ALL_STAGES, colormaps["tab10"].colors))
    for ax, run in zip(axes[:, 0], runs):
        names = [f"{r['backend']} {r['precision']} x{r['batch']} t{r['threads']} l{r['load_cores']}" for r in run["rows"]]
        left = [0.0] * len(names)
        for stage in _columns(run):
            widths = [(r["stages"].get(stage) or {}).get("median_ms") or 0.0 for r in run["rows"]]
            ax.barh(names, widths, left=left, color=colours[stage], label=stage)
            left = [a + b for a, b in zip(left, widths)]
        e2e = [(_e2e(r).get("latency") or {}).get("median_ms") for r in run["rows"]]
        for i, v in enumerate(e2e):
            if v:
                ax.plot([v], [i], "k|", markersize=14, label="e2e (node)" if i == 0 else None)
        m = run["model"]
        ax.set_title(f"{m['backbone']} at {m['input_hw'][1]}x{m['input_hw'][0]} on {run['device']}", fontsize=10)
        ax.set_xlabel("ms per round (median)")
        ax.invert_yaxis()
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return Path(path)


def write_results(run: dict, json_path: Path | None, markdown_path: Path | None, chart_path: Path | None,
                  append: bool = False) -> dict:
    """Write ``run`` (after the runs already in ``json_path`` when ``append``) as JSON, Markdown and a chart."""
    doc = {"schema": SCHEMA, "runs": []}
    if append and json_path and Path(json_path).is_file():
        doc = upgrade(json.loads(Path(json_path).read_text()))
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"{json_path} is not a benchmark results file ({doc.get('schema')!r})")
    doc["runs"].append(run)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(json_path), json.dumps(doc, indent=2) + "\n")
    link = None
    if chart_path and chart(doc, Path(chart_path)):
        link = os.path.relpath(chart_path, Path(markdown_path).parent) if markdown_path else None
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(markdown_path), markdown(doc, link))
    return doc
