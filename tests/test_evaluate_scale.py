"""``python -m trainer.evaluate`` on several processes and on benchmark prompt sets (issue 26 item 4): two CPU
processes under torchrun (gloo) write the one-process ``scores.csv`` byte for byte, a resume works whatever number
of processes wrote the rows, prompts come from a folder of .txt files (DPG-Bench's layout) or a .jsonl field named
by ``--prompt-field``, and the report says how many prompts the token budget cut and by how much."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("diffusers")

from test_evaluate import FAST, PROMPTS, evaluate, files, pixels  # noqa: E402,F401  (files: fixture)
from trainer_support import merged_tokens, one_thread  # noqa: E402,F401  (autouse: one intra-op thread)

HEADER = "arm,lora,strength,prompt,seed,sentence,text,score,text_relevant,text_irrelevant,reweighted\n"


def torchrun(out, files, *args, port: int, nproc: int = 2):
    """``torchrun --nproc_per_node N -m trainer.evaluate`` on the CPU (gloo), the test's settings."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(port), "-m", "trainer.evaluate", *FAST, "--prompts", str(files["prompts"]), "--output-dir", str(out),
           *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def before_time(report) -> str:
    return report.read_text().split("## Time")[0]


def test_two_processes_write_the_one_process_scores(tmp_path, files):
    """torchrun, 2 CPU processes: the 6 groups (2 arms × 3 one-prompt groups) are dealt out 3 and 3, each
    process writes its own part file, and the main process merges them: scores.csv, the images and the report
    (but its time) are the one-process run's; the banner, the progress and the summary come once."""
    lora = ["--lora", str(files["lora_a"])]
    one, two = tmp_path / "one", tmp_path / "two"
    evaluate(one, files, *lora)
    proc = torchrun(two, files, *lora, port=29541)
    assert (two / "scores.csv").read_bytes() == (one / "scores.csv").read_bytes()
    assert before_time(two / "report.md") == before_time(one / "report.md")
    for arm in ("base", "a@1"):
        for p in range(3):
            assert (pixels(two, arm, p, 1) == pixels(one, arm, p, 1)).all()
    assert not list(two.glob("scores.part*"))  # merged and removed
    assert proc.stdout.count("***** LongAlign evaluation") == 1 and proc.stdout.count("evaluated 2 arm(s)") == 1
    assert "6 prompt groups dealt out to 2 processes, about 3 each" in proc.stdout
    bars = re.findall(r"evaluating \(process 0 of 2\): 100%\S* (\d+)/(\d+)", proc.stderr)
    assert bars and set(bars) == {("3", "3")}, proc.stderr[-2000:]  # the main process did its half, not all 6
    assert "the main process of several, waiting for the others" in (two / "report.md").read_text()


def test_resume_with_another_number_of_processes(tmp_path, files):
    """One process stopped after 3 of 6 groups (the last row cut mid-write) is finished by 2 processes; and the
    part files four processes left (some groups complete, one cut mid-line, one row written twice) are finished
    by one: both give the uninterrupted scores.csv byte for byte, and only the incomplete groups are redone."""
    lora = ["--lora", str(files["lora_a"])]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    evaluate(whole, files, *lora)
    full = (whole / "scores.csv").read_text()

    def stop(n):
        if n == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(cut, files, *lora, on_unit=stop)
    written = (cut / "scores.csv").read_text()
    (cut / "scores.csv").write_text(written[:-5])
    proc = torchrun(cut, files, *lora, "--resume", port=29542)
    assert "resuming: 2 of 6 prompt groups already scored" in proc.stdout
    assert "4 prompt groups dealt out to 2 processes, about 2 each" in proc.stdout
    assert (cut / "scores.csv").read_text() == full

    # what four processes would leave: group g of the to-do list went to process g % 4, appended to its part
    parts = tmp_path / "parts"
    parts.mkdir()
    for name in ("evaluation.json", "prompts.txt", "prompt_tokens.json"):
        (parts / name).write_bytes((whole / name).read_bytes())
    (parts / "scores.csv").write_text(HEADER)
    rows = list(csv.DictReader(io.StringIO(full)))
    groups = [[r for r in rows if (r["arm"], r["prompt"]) == (arm, str(p))] for arm in ("base", "a@1")
              for p in range(3)]
    written_by = {0: [0, 4], 1: [1, 5], 2: [2], 3: [3]}
    kept = {0, 1, 2, 3, 4}  # 5 (process 1's second group) was never written
    for proc_id, gs in written_by.items():
        text = "".join(line_of(r) for g in gs if g in kept for r in groups[g])
        if proc_id == 2:
            text = text[:-7]  # killed mid-write: group 2 lacks its last row's end
        if proc_id == 3:
            text += line_of(groups[3][0])  # a row written twice (a merge interrupted before its clean-up)
        (parts / f"scores.part{proc_id}.csv").write_text(text)
    redone = []
    evaluate(parts, files, *lora, "--resume", on_unit=redone.append)
    assert len(redone) == 2  # groups 2 and 5: the cut one and the missing one
    assert (parts / "scores.csv").read_text() == full
    assert not list(parts.glob("scores.part*"))


def line_of(row: dict) -> str:
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=HEADER.strip().split(","), lineterminator="\n").writerow(row)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------------
# Prompt sets: a folder of .txt files, a .jsonl field, and what the token budget cut
# ------------------------------------------------------------------------------------------------------------


def test_prompt_folder_and_jsonl_field(tmp_path):
    from trainer.data import load_prompts, read_prompts

    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "b.txt").write_text("A red fox.\n")
    (folder / "a.txt").write_text("A cat on a mat.\nIt sleeps.\n\n")  # lines of one file are one prompt
    (folder / "10.txt").write_text("A heron.")
    (folder / "notes.md").write_text("not a prompt")
    assert read_prompts(str(folder)) == (["A heron.", "A cat on a mat. It sleeps.", "A red fox."],
                                         ["10.txt", "a.txt", "b.txt"])
    assert load_prompts(str(folder)) == ["A heron.", "A cat on a mat. It sleeps.", "A red fox."]  # the trainer's
    jsonl = tmp_path / "long.jsonl"
    jsonl.write_text(json.dumps({"id": 1, "prompt": "short", "long_prompt": "A long one."}) + "\n"
                     + json.dumps({"id": 2, "long_prompt": "Another long one."}) + "\n")
    assert load_prompts(str(jsonl), field="long_prompt") == ["A long one.", "Another long one."]


@pytest.mark.parametrize("case", ["empty_folder", "no_txt", "empty_file", "missing_field", "field_not_jsonl",
                                  "same_prompt_twice"])
def test_bad_prompt_sets_are_one_message(tmp_path, case, capsys):
    from longalign_core.errors import run_cli
    from trainer.evaluate import main

    folder = tmp_path / "prompts"
    folder.mkdir()
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "A fox."}\n{"caption": "A cat.", "id": 7}\n')
    args, expected = {
        "empty_folder": ([str(folder)], r"--prompts .*prompts: a folder of prompts needs \.txt files, one prompt "
                                        r"per file \(DPG-Bench's prompts/ layout\), and it is empty"),
        "no_txt": ([str(folder)], r"and it holds 2 other entries \(a\.png, b\.json\)"),
        "empty_file": ([str(folder)], r"b\.txt: empty prompt file \(--prompts .*: each \.txt file in the folder "
                                      r"is one prompt\)"),
        "missing_field": ([str(jsonl), "--prompt-field", "prompt"],
                          r"p\.jsonl:2: no 'prompt' field \(--prompt-field prompt\); the fields on this line: "
                          r"'caption', 'id'"),
        "field_not_jsonl": ([str(folder), "--prompt-field", "text"], r"--prompt-field text: it names the prompt's "
                                                                     r"field in a \.jsonl file"),
        "same_prompt_twice": ([str(folder)], r"c\.txt repeats a\.txt \('A fox\.'"),
    }[case]
    if case == "no_txt":
        (folder / "a.png").write_bytes(b"\x89PNG")
        (folder / "b.json").write_text("{}")
    if case in ("empty_file", "field_not_jsonl", "same_prompt_twice"):
        (folder / "a.txt").write_text("A fox.")
        (folder / "b.txt").write_text("\n  \n" if case == "empty_file" else "A cat.")
        (folder / "c.txt").write_text("A fox.\n")
    out = tmp_path / "out"
    assert run_cli(main, [*FAST, "--output-dir", str(out), "--prompts", *args], prog="python -m trainer.evaluate") == 2
    err = capsys.readouterr().err
    assert re.search(expected, err), err
    assert err.startswith("python -m trainer.evaluate: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_folder_prompts_named_and_cut_prompts_counted(tmp_path, files, capsys):
    """DPG-Bench's layout with a token budget the prompts exceed: the prompts in the order of their file names,
    the names in prompt_files.txt and the report, and report.md and the printed summary state how many prompts
    were cut and by how many tokens (counted here with the CLIP tokenizer: one start token per sentence plus its
    words' tokens, minus the budget); --report-only states the same; --overflow extend cuts none."""
    from longalign_core.errors import run_cli
    from trainer.evaluate import main

    folder = tmp_path / "dpg"
    folder.mkdir()
    for name, prompt in zip(("p2_fox.txt", "p0_keeper.txt", "p1_bridge.txt"), PROMPTS):
        (folder / name).write_text(prompt + "\n")
    by_name = dict(sorted(zip(("p2_fox.txt", "p0_keeper.txt", "p1_bridge.txt"), PROMPTS)))
    budget = 20
    lost = {name: merged_tokens(p) - budget for name, p in by_name.items() if merged_tokens(p) > budget}
    assert len(lost) == 2  # the fox (27 tokens) and the bridge; the keeper fits
    out = tmp_path / "out"
    said = []
    evaluate(out, files, "--prompts", str(folder), "--lora", str(files["lora_a"]), "--seeds", "1",
             "--token-budget", str(budget), announce=said.append)
    assert (out / "prompts.txt").read_text() == "".join(p + "\n" for p in by_name.values())
    assert (out / "prompt_files.txt").read_text() == "p0_keeper.txt\np1_bridge.txt\np2_fox.txt\n"
    worst = max(lost, key=lost.get)
    expected = (f"2 of 3 prompts were cut (token budget {budget}, --overflow truncate): {sum(lost.values())} tokens "
                f"lost, {sum(lost.values()) / 2:.1f} per cut prompt on average and at most {lost[worst]} (prompt "
                f"{list(by_name).index(worst)}, {worst}), "
                f"{sum(lost.values()) / sum(merged_tokens(by_name[n]) for n in lost):.0%} of those prompts' tokens")
    report = (out / "report.md").read_text()
    assert f"Text: {expected}." in report
    assert any(expected in s for s in said)  # the banner and the printed summary
    assert re.search(r"\| (gained|lost) \| [+-]\d+\.\d\d \| \d \(p\d_\w+\.txt\) \|", report)
    assert run_cli(main, ["--report-only", "--output-dir", str(out)]) == 0
    assert f"Text: {expected}." in (out / "report.md").read_text() and expected in capsys.readouterr().out

    extended = tmp_path / "extended"
    evaluate(extended, files, "--prompts", str(folder), "--seeds", "1", "--token-budget", str(budget),
             "--overflow", "extend", "--num-prompts", "2")
    longest = max(merged_tokens(by_name[n]) for n in list(by_name)[:2])
    assert (f"1 of 2 prompts exceed the token budget {budget}; --overflow extend encoded them whole (the longest "
            f"{longest} tokens, prompt 1, p1_bridge.txt); no prompt was cut") in (extended / "report.md").read_text()
