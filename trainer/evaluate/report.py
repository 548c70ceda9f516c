"""What ``python -m trainer.evaluate`` writes after scoring: ``report.md`` (the numbers and what they say),
``report.png`` (means and differences with their intervals) and ``grids/`` (per prompt, the arms side by side
with the score under each image). Everything is rebuilt from ``scores.csv``, the saved images and
``evaluation.json``, so ``--report-only`` gives the same report."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from longalign_core.io_utils import atomic_path, atomic_write_text, read_json_file

from .files import SETTINGS_FILE, read_settings
from .stats import BASE_ARM, METRICS, Estimate, Summary, image_values, read_scores, summarize

LABELS = {"score": "Denscore", "text_relevant": "text-relevant", "text_irrelevant": "text-irrelevant",
          "reweighted": "reweighted"}
#: Phases that make the images (the rest of an evaluation is its scoring overhead).
GENERATION_PHASES = ("base model", "LoRA files", "LoRA merge", "text encoding", "sampling", "decoding")
TIMINGS_FILE = "timings.json"
#: Smallest and largest side of an image in a grid (small images are enlarged so the numbers under them fit).
GRID_CELL = (192, 256)


@dataclass
class PromptTokens:
    """What the token budget did to an evaluation's prompts, from the segment encoder's report of each: how many
    exceed the budget, which were cut (``--overflow truncate``, or a sentence past the encoder's window with
    ``--long-segments truncate``) and by how many tokens."""

    prompts: int
    budget: int
    overflow: str
    over_budget: int  # prompts with more merged tokens than the budget
    longest: int  # the most merged tokens of one prompt
    longest_label: str
    lost: list[int]  # tokens lost by each cut prompt
    tokens_of_cut: int  # the cut prompts' tokens before cutting
    most_lost_label: str = ""

    @classmethod
    def of(cls, reports, budget: int, overflow: str, names: list[str] | None = None) -> "PromptTokens":
        label = lambda i: f"prompt {i}" + (f", {names[i]}" if names else "")  # noqa: E731
        longest = max(range(len(reports)), key=lambda i: reports[i].merged)
        cut = [i for i, r in enumerate(reports) if not r.lossless]
        lost = [reports[i].dropped + reports[i].truncated for i in cut]
        most = cut[max(range(len(cut)), key=lambda k: lost[k])] if cut else None
        return cls(len(reports), budget, overflow, sum(r.merged > budget for r in reports), reports[longest].merged,
                   label(longest), lost, sum(reports[i].merged + reports[i].truncated for i in cut),
                   label(most) if most is not None else "")

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One sentence for the console and report.md."""
        n, lost = self.prompts, self.lost
        if lost:
            text = (f"{len(lost)} of {n} prompts were cut (token budget {self.budget}, --overflow {self.overflow}): "
                    f"{sum(lost)} tokens lost, {sum(lost) / len(lost):.1f} per cut prompt on average and at most "
                    f"{max(lost)} ({self.most_lost_label}), {sum(lost) / self.tokens_of_cut:.0%} of those prompts' "
                    f"tokens")
            return text + (f"; {self.over_budget} exceed the budget and were encoded whole up to "
                           f"{self.longest} tokens" if self.overflow == "extend" and self.over_budget else "")
        if self.over_budget:
            return (f"{self.over_budget} of {n} prompts exceed the token budget {self.budget}; --overflow "
                    f"{self.overflow} encoded them whole (the longest {self.longest} tokens, {self.longest_label}); "
                    f"no prompt was cut")
        return f"all {n} prompts fit the token budget {self.budget} (the longest {self.longest} tokens); none was cut"


def fmt(e: Estimate, signed: bool = False, scale: float = 100.0) -> str:
    """``mean [lo, hi]`` ×``scale`` to two decimals (a rounding error never shows as "-0.00")."""
    sign = "+" if signed else ""
    mean, lo, hi = (round(v * scale, 2) + 0.0 for v in (e.mean, e.lo, e.hi))
    return f"{mean:{sign}.2f} [{lo:{sign}.2f}, {hi:{sign}.2f}]"


def overhead(timings: dict) -> tuple[float, float, float]:
    """(total, generation, rest) seconds of an evaluation's timings; under several processes, the main
    process's, its ``waiting`` for the others counted in neither part."""
    generation = sum(timings.get(k, 0.0) for k in GENERATION_PHASES)
    return timings["total"], generation, timings["total"] - generation - timings.get("waiting", 0.0)


def _waited(timings: dict) -> str:
    waited = timings.get("waiting")
    return f"; the main process of several, waiting for the others {waited:.1f} s" if waited is not None else ""


def verdict(arm) -> str:
    """One line: what the intervals of the paired differences say."""
    rel, score = arm.diffs["text_relevant"], arm.diffs["score"]
    if arm.hacking:
        return "**possible reward hacking** (see below)"
    if rel.lo > 0:
        return f"**helps**: text-relevant {fmt(rel, True)}, interval above 0"
    if rel.hi < 0:
        return f"**hurts**: text-relevant {fmt(rel, True)}, interval below 0"
    if score.excludes_zero:
        return (f"Denscore moved ({fmt(score, True)}) but the text-relevant part did not: not a change in "
                f"alignment")
    return "**no measurable difference** on these prompts (every interval includes 0): more prompts or seeds, " \
           "or the LoRA changes little"


def write_evaluation_report(out: str | Path, n_boot: int, boot_seed: int, timings: dict | None = None,
                            tokens: PromptTokens | None = None) -> str:
    """report.md, report.png and grids/ in ``out``; returns a short text summary for the console."""
    import time

    from .files import PROMPT_NAMES_FILE, TOKENS_FILE

    started = time.perf_counter()
    out = Path(out)
    if tokens is None and (out / TOKENS_FILE).is_file():
        tokens = PromptTokens(**json.loads((out / TOKENS_FILE).read_text(encoding="utf-8")))
    names = (out / PROMPT_NAMES_FILE).read_text(encoding="utf-8").splitlines() \
        if (out / PROMPT_NAMES_FILE).is_file() else []
    rows = read_scores(out / "scores.csv")
    summary = summarize(rows, n_boot, boot_seed)
    settings = read_settings(out) if (out / SETTINGS_FILE).is_file() else {}
    prompts = [p for p in (out / "prompts.txt").read_text(encoding="utf-8").splitlines() if p] \
        if (out / "prompts.txt").is_file() else []
    _plot(summary, out / "report.png")
    grids = _grids(out, rows, prompts, [a.name for a in summary.arms], names)
    if timings is not None:  # the run's phases so far, plus this report's own time
        spent = time.perf_counter() - started
        timings = {**timings, "report": timings.get("report", 0.0) + spent, "total": timings["total"] + spent}
        with atomic_path(out / TIMINGS_FILE) as tmp:
            Path(tmp).write_text(json.dumps(timings, indent=2), encoding="utf-8")
    elif (out / TIMINGS_FILE).is_file():
        timings = read_json_file(out / TIMINGS_FILE, "the evaluation's timings file", "delete it (it only feeds the "
                                 "report's time section) and run --report-only again")
    atomic_write_text(out / "report.md", _markdown(summary, settings, names, timings, tokens, grids))
    lines = [f"evaluated {len(summary.arms)} arm(s) on {summary.prompts} prompts × {summary.seeds} seed(s) "
             f"(×100, 95 % bootstrap interval over prompts):"]
    for arm in summary.arms:
        lines.append(f"  {arm.name}: Denscore {fmt(arm.means['score'])}, text-relevant "
                     f"{fmt(arm.means['text_relevant'])}")
        if arm.diffs:
            lines.append(f"    vs base: Denscore {fmt(arm.diffs['score'], True)}, text-relevant "
                         f"{fmt(arm.diffs['text_relevant'], True)}, wins {arm.wins['score'].mean:.0%}; "
                         + verdict(arm).replace("**", ""))
    if tokens is not None:
        lines.append(f"  text: {tokens.summary()}")
    if timings is not None:
        total, gen, rest = overhead(timings)
        lines.append(f"  time {total:.1f} s: generating the images {gen:.1f} s, scoring and writing {rest:.1f} s "
                     f"({rest / total:.1%})" + _waited(timings))
    lines.append(f"wrote {out / 'report.md'}, {out / 'report.png'}, {out / 'scores.csv'} and {len(grids)} grids "
                 f"in {out / 'grids'}")
    return "\n".join(lines)


def _markdown(summary: Summary, settings: dict, names: list[str], timings, tokens, grids) -> str:
    lines = ["# LongAlign evaluation: did the LoRA help?", ""]
    if settings:
        lines += [f"Base model `{settings['model']}`; judge `{settings['reward_model']}` (V from the shipped "
                  f"reference prompt set); prompts `{settings['prompts']}` ({settings['num_prompts']} prompts, "
                  f"{settings['seeds']} seed(s) each, the same noise for every arm); DDIM {settings['steps']} "
                  f"steps, CFG {settings['guidance']:g}, {settings['resolution']} px, {settings['precision']}; "
                  f"text budget {settings['token_budget']}, overflow {settings['overflow']}, split "
                  f"{settings['split_mode']}; ω = {settings['omega']:g}.", ""]
    if tokens is not None:
        lines += [f"Text: {tokens.summary()}.", ""]
    lines += ["Values ×100 (cosines, as the paper reports them), each with its 95 % bootstrap interval over "
              f"prompts ({summary.n_boot} resamples, seed {summary.boot_seed}). An image's value is the mean of its "
              "sentences' values.", "", "## Means", "",
              "| arm | images | " + " | ".join(LABELS[m] for m in METRICS) + " |",
              "|---|---|" + "---|" * len(METRICS)]
    for arm in summary.arms:
        lines.append(f"| {arm.name} | {arm.images} | " + " | ".join(fmt(arm.means[m]) for m in METRICS) + " |")
    lines.append("")
    others = [a for a in summary.arms if a.name != BASE_ARM]
    if others:
        lines += ["## Against the base", "",
                  "Paired by prompt and seed (the same noise): arm minus base. A difference means something when "
                  "its interval excludes 0; the win rate is the share of images that score higher than the base's "
                  "from the same noise (ties count half; 50 % = no difference).", "",
                  "| arm | " + " | ".join(f"Δ {LABELS[m]}" for m in METRICS)
                  + " | wins (Denscore) | wins (text-relevant) |", "|---|" + "---|" * (len(METRICS) + 2)]
        for arm in others:
            wins = [f"{w.mean:.0%} [{w.lo:.0%}, {w.hi:.0%}]" for w in (arm.wins["score"], arm.wins["text_relevant"])]
            lines.append(f"| {arm.name} | " + " | ".join(fmt(arm.diffs[m], True) for m in METRICS)
                         + " | " + " | ".join(wins) + " |")
        lines.append("")
        for arm in others:
            lines.append(f"* **{arm.name}**: {verdict(arm)}.")
        lines += ["", "## Reward-hacking check", ""]
        for arm in others:
            lines.append(f"* {arm.name}: " + (f"**WARNING: {arm.hacking}.**" if arm.hacking else
                                              f"no sign ({arm.hacking_checked})."))
        lines += ["", "## Sentences that gained and lost most", "",
                  "Text-relevant part of one sentence, arm minus base, mean over the seeds (one sentence of one "
                  "prompt: noisy on its own; look for what the top ones share).", ""]
        for arm in others:
            lines += [f"**{arm.name}**", "", "| | Δ ×100 | prompt | sentence |", "|---|---|---|---|"]
            for kind, changes in (("gained", arm.gained), ("lost", arm.lost)):
                for c in changes:
                    prompt = f"{c.prompt} ({names[c.prompt]})" if c.prompt < len(names) else c.prompt
                    lines.append(f"| {kind} | {c.delta * 100:+.2f} | {prompt} | {c.text.replace('|', '/')} |")
            lines.append("")
    if timings:
        total, gen, rest = overhead(timings)
        lines += ["## Time", "", f"{total:.1f} s in the last run (a resumed evaluation counts only its own part): "
                  f"generating the images (loading the base model and LoRAs, text encoding, sampling, decoding) "
                  f"{gen:.1f} s; loading the judge, scoring, writing the images and scores and this report "
                  f"{rest:.1f} s ({rest / total:.1%}){_waited(timings)}.", ""]
    lines += ["## Pictures", "", "![means and differences](report.png)", "",
              f"`grids/`: {len(grids)} grids, one per prompt: the arms side by side (columns), one row per seed, "
              "the Denscore and its two parts (×100) under each image. `images/<arm>/pNNN-sSEED.png`: every "
              "image. `prompts.txt`: the prompts by number (0 = first line)"
              + ("; `prompt_files.txt`: their files' names." if names else "."), ""]
    if grids:
        lines += [f"![prompt 0]({grids[0].relative_to(grids[0].parents[1])})", ""]
    return "\n".join(lines)


#: Colours of the arms in report.png (the base first).
ARM_COLOURS = ("#555555", "#2b7bba", "#d1495b", "#edae49", "#66a182", "#8d6a9f", "#00798c", "#f28e2b")


def _plot(summary: Summary, path: Path) -> None:
    """A forest plot: per number, each arm's mean (dot) and 95 % interval (line); left the means, right the
    paired differences against the base with the zero line. Drawn with Pillow (no plotting library to import:
    the report is part of the evaluation's overhead)."""
    from PIL import Image, ImageDraw, ImageFont

    from .files import save_png

    arms, others = summary.arms, [a for a in summary.arms if a.diffs]
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    row_h, label_w, panel_w, top, pad = 16, 130, 430, 48, 24
    group_h = row_h * len(arms) + 14
    height = top + group_h * len(METRICS) + 48
    img = Image.new("RGB", (label_w + 2 * (panel_w + pad) + pad, height), "white")
    draw = ImageDraw.Draw(img)
    panels = [("means x100 (95 % interval over prompts)", arms, lambda a, m: a.means[m]),
              ("arm - base x100, paired (95 % interval)" if others else "no LoRA arm: nothing to compare",
               others, lambda a, m: a.diffs[m])]
    for k, (title, members, value) in enumerate(panels):
        x0 = label_w + pad + k * (panel_w + pad)
        draw.text((x0, 8), title, font=font, fill="black")
        estimates = [value(a, m) for a in members for m in METRICS]
        if not estimates:
            continue
        lo = min(min(e.lo for e in estimates), 0.0 if k else min(e.lo for e in estimates)) * 100
        hi = max(max(e.hi for e in estimates), 0.0 if k else max(e.hi for e in estimates)) * 100
        margin = (hi - lo) * 0.08 or 1.0
        ticks = np.linspace(lo, hi, 4)
        lo, hi = lo - margin, hi + margin
        x = lambda v: x0 + (v * 100 - lo) / (hi - lo) * panel_w  # noqa: E731
        y_end = top + group_h * len(METRICS)
        for tick in ticks:
            tx = x0 + (tick - lo) / (hi - lo) * panel_w
            draw.line([(tx, top - 6), (tx, y_end)], fill="#e6e6e6")
            draw.text((tx, y_end + 4), f"{tick:.2f}", font=small, fill="#444444", anchor="ma")
        if k:
            draw.line([(x(0), top - 6), (x(0), y_end)], fill="black", width=1)
        for g, m in enumerate(METRICS):
            for r, arm in enumerate(members):
                e = value(arm, m)
                colour = ARM_COLOURS[arms.index(arm) % len(ARM_COLOURS)]
                y = top + g * group_h + r * row_h + row_h // 2
                draw.line([(x(e.lo), y), (x(e.hi), y)], fill=colour, width=2)
                draw.ellipse([x(e.mean) - 4, y - 4, x(e.mean) + 4, y + 4], fill=colour)
    for g, m in enumerate(METRICS):
        draw.text((pad, top + g * group_h + 2), LABELS[m], font=font, fill="black")
    legend_x = pad  # the legend, along the bottom
    for r, arm in enumerate(arms):
        colour = ARM_COLOURS[r % len(ARM_COLOURS)]
        draw.ellipse([legend_x, height - 18, legend_x + 8, height - 10], fill=colour)
        draw.text((legend_x + 12, height - 20), arm.name, font=small, fill="black")
        legend_x += 24 + int(draw.textlength(arm.name, font=small))
    save_png(np.asarray(img), path)


def latin1(text: str) -> str:
    """``text`` in what Pillow's bitmap font can draw (Latin-1; anything else becomes "?")."""
    return text.encode("latin-1", "replace").decode("latin-1")


def _grids(out: Path, rows: list[dict], prompts: list[str], arms: list[str], names: list[str]) -> list[Path]:
    """grids/pNNN.jpg: per prompt, one column per arm and one row per seed, the Denscore and its parts under each
    image (JPEG: a grid is for looking; the images themselves are PNGs in images/)."""
    from PIL import Image, ImageDraw, ImageFont

    from .files import arm_folder

    values = image_values(rows)
    by_prompt: dict[int, set[int]] = {}
    for arm_images in values.values():
        for p, s in arm_images:
            by_prompt.setdefault(p, set()).add(s)
    small = ImageFont.load_default_imagefont()  # Pillow's bitmap font: a tenth of the time of a scalable one
    first = next((out / "images").glob("*/*.png"), None)
    side = Image.open(first).size[0] if first else GRID_CELL[1]
    cell, caption = min(GRID_CELL[1], max(GRID_CELL[0], side)), 34
    width = cell * len(arms)
    paths = []
    for p in sorted(by_prompt):
        seeds = sorted(by_prompt[p])
        name = f" ({names[p]})" if p < len(names) else ""
        title = textwrap.wrap(f"prompt {p}{name}: {prompts[p] if p < len(prompts) else ''}", max(30, width // 7))
        title = title[:3] + [title[3] + (" ..." if len(title) > 4 else "")] if len(title) > 3 else title
        head = 8 + 13 * len(title)
        grid = Image.new("RGB", (width, head + len(seeds) * (cell + caption)), "white")
        draw = ImageDraw.Draw(grid)
        draw.multiline_text((6, 4), latin1("\n".join(title)), font=small, fill="black", spacing=2)
        for c, arm in enumerate(arms):
            for r, s in enumerate(seeds):
                x, y = c * cell, head + r * (cell + caption)
                img_path = out / "images" / arm_folder(arm) / f"p{p:03d}-s{s}.png"
                if img_path.is_file():
                    with Image.open(img_path) as img:
                        resample = Image.NEAREST if min(img.size) < cell else Image.LANCZOS
                        grid.paste(img.convert("RGB").resize((cell, cell), resample), (x, y))
                v = values.get(arm, {}).get((p, s))
                numbers = "" if v is None else f"S {v[0] * 100:.2f} = rel {v[1] * 100:.2f} + irr {v[2] * 100:.2f}"
                draw.multiline_text((x + 4, y + cell + 2), latin1(f"{arm}, seed {s}\n{numbers}"), font=small,
                                    fill="black", spacing=3)
        path = out / "grids" / f"p{p:03d}.jpg"
        path.parent.mkdir(exist_ok=True)
        with atomic_path(path) as tmp:  # derived from scores.csv and images/: rebuilt by any report
            grid.save(tmp, format="JPEG", quality=90)
        paths.append(path)
    return paths
