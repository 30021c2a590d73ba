#!/usr/bin/env python
"""Write the embedded code task world: one-line Python programs for an arithmetic, string or list rule.

    python data/code/prepare.py [--seed 0] [--out data/code]

Deterministic: the same arguments give byte-identical files (one `random.Random(seed:file)` per file). Schemas are in
data/README.md. Standard library only; takes about a second. A task is a rule (`x plus 7`, `s reversed`, `the sum of
xs`) asked either as a function (`Write a Python function f(x) that returns x plus 7.`, checked by hidden asserts)
or as a program (`... reads an integer x and prints x plus 7.`, checked by stdin/stdout pairs).
"""
from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

# The R1-Zero template (DeepSeek-R1 v1 Table 1), verbatim; stages/templates.py holds the same text.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)

FUNCTION_NAMES = ["f", "g", "h", "solve", "rule", "calc"]
WORDS = ["cat", "apple", "river", "moon", "book", "tree", "house", "sun", "code", "green", "paper", "lamp", "bird",
         "stone", "water", "cloud", "robot", "music", "tiger", "pencil"]
VOWELS = "aeiou"

# ---------------------------------------------------------------------------------------------------------------------
# Rules: (family, params) -> en phrase, ru phrase (None: English only), Python expression, argument kind, difficulty
# ---------------------------------------------------------------------------------------------------------------------


def int_rules() -> list[dict]:
    out = []

    def add(family, params, en, ru, expr, difficulty):
        out.append({"key": f"{family}:{params}", "arg": "int", "en": en, "ru": ru, "expr": expr,
                    "difficulty": difficulty})

    for k in range(1, 21):
        add("add", k, f"x plus {k}", f"x плюс {k}", f"x + {k}", 1)
        add("sub", k, f"x minus {k}", f"x минус {k}", f"x - {k}", 1)
        add("max", k, f"the larger of x and {k}", f"большее из x и {k}", f"max(x, {k})", 2)
        add("min", k, f"the smaller of x and {k}", f"меньшее из x и {k}", f"min(x, {k})", 2)
        add("dist", k, f"the distance between x and {k}", f"расстояние между x и {k}", f"abs(x - {k})", 2)
    for k in range(2, 10):
        add("mul", k, f"x times {k}", f"x умножить на {k}", f"x * {k}", 1)
        add("mod", k, f"the remainder of x divided by {k}", f"остаток от деления x на {k}", f"x % {k}", 2)
        add("div", k, f"x divided by {k}, rounded down", f"x, делённое на {k} с округлением вниз", f"x // {k}", 2)
        for b in range(1, 11):
            add("affine", (k, b), f"x times {k} plus {b}", f"x умножить на {k} плюс {b}", f"x * {k} + {b}", 3)
    add("square", 0, "the square of x", "квадрат x", "x * x", 1)
    add("double", 0, "twice x", "удвоенное x", "x * 2", 1)
    add("neg", 0, "minus x", "минус x", "-x", 1)
    return out


def str_rules() -> list[dict]:
    out = []

    def add(family, params, en, expr, difficulty):
        out.append({"key": f"{family}:{params}", "arg": "str", "en": en, "ru": None, "expr": expr,
                    "difficulty": difficulty})

    add("reverse", 0, "s reversed", "s[::-1]", 1)
    add("upper", 0, "s in upper case", "s.upper()", 1)
    add("length", 0, "the length of s", "len(s)", 1)
    add("first", 0, "the first character of s", "s[0]", 1)
    add("last", 0, "the last character of s", "s[-1]", 1)
    for k in range(2, 6):
        add("repeat", k, f"s repeated {k} times", f"s * {k}", 2)
    for k in range(1, 6):
        add("prefix", k, f"the first {k} characters of s", f"s[:{k}]", 2)
    for w in WORDS[:10]:
        add("suffix", w, f"s followed by '{w}'", f"s + '{w}'", 2)
    for c in string.ascii_lowercase:
        add("count", c, f"the number of times '{c}' appears in s", f"s.count('{c}')", 2)
    for a in VOWELS:
        for b in "xyz*-":
            add("replace", (a, b), f"s with every '{a}' replaced by '{b}'", f"s.replace('{a}', '{b}')", 3)
    return out


def list_rules() -> list[dict]:
    out = []

    def add(family, params, en, expr, difficulty):
        out.append({"key": f"{family}:{params}", "arg": "list", "en": en, "ru": None, "expr": expr,
                    "difficulty": difficulty})

    add("sum", 0, "the sum of the numbers in xs", "sum(xs)", 1)
    add("max", 0, "the largest number in xs", "max(xs)", 1)
    add("min", 0, "the smallest number in xs", "min(xs)", 1)
    add("len", 0, "how many numbers xs has", "len(xs)", 1)
    add("sorted", 0, "the numbers of xs sorted", "sorted(xs)", 1)
    add("even", 0, "how many numbers in xs are even", "len([x for x in xs if x % 2 == 0])", 3)
    for k in range(2, 10):
        add("scale", k, f"every number of xs times {k}", f"[x * {k} for x in xs]", 3)
    for k in range(1, 11):
        add("shift", k, f"every number of xs plus {k}", f"[x + {k} for x in xs]", 3)
        add("above", k, f"the numbers of xs greater than {k}", f"[x for x in xs if x > {k}]", 3)
    return out


ALL_RULES = int_rules() + str_rules() + list_rules()

# ---------------------------------------------------------------------------------------------------------------------
# Tasks: a rule asked as a function (asserts) or as a program (stdin/stdout)
# ---------------------------------------------------------------------------------------------------------------------
ARG_NAME = {"int": "x", "str": "s", "list": "xs"}
READ = {"int": "x = int(input())", "str": "s = input()", "list": "xs = list(map(int, input().split()))"}
READS_EN = {"int": "reads an integer x", "str": "reads a line s", "list": "reads a line of integers xs"}
READS_RU = {"int": "читает целое число x"}
TEXT = {
    "en": {"function": "Write a Python function {name}({arg}) that returns {rule}.",
           "program": "Write a Python program that {reads} and prints {rule}.",
           "python": "{rule} is {expr} in Python.", "check": "Check: {call} gives {result}.",
           "brief_function": "{name}({arg}) returns {expr}.", "brief_program": "Read {arg}, print {expr}.",
           "summary_function": "Here is the function:", "summary_program": "Here is the program:",
           "task": "Task", "code": "Code", "reasoning": "Reasoning"},
    "ru": {"function": "Напишите функцию {name}({arg}) на Python, которая возвращает {rule}.",
           "program": "Напишите программу на Python, которая {reads} и печатает {rule}.",
           "python": "{rule} на Python это {expr}.", "check": "Проверка: {call} даёт {result}.",
           "brief_function": "{name}({arg}) возвращает {expr}.", "brief_program": "Читаем {arg}, печатаем {expr}.",
           "summary_function": "Вот функция:", "summary_program": "Вот программа:",
           "task": "Задача", "code": "Код", "reasoning": "Рассуждение"},
}


def sample_input(rng: random.Random, arg: str, rule: dict):
    if arg == "int":
        return rng.randint(0, 60) if rule["key"].startswith(("mod", "div")) else rng.randint(-20, 60)
    if arg == "str":  # the letter a count rule counts is frequent, so its tests tell rules apart
        letters = "abcdeiouxyz" + (rule["key"][-1] * 4 if rule["key"].startswith("count:") else "")
        return "".join(rng.choice(letters) for _ in range(rng.randint(1, 8)))
    return [rng.randint(-5, 20) for _ in range(rng.randint(1, 6))]


def evaluate(rule: dict, value):
    return eval(rule["expr"], {"__builtins__": {"max": max, "min": min, "abs": abs, "len": len, "sum": sum,
                                                "sorted": sorted}}, {ARG_NAME[rule["arg"]]: value})


def stdin_text(arg: str, value) -> str:
    return (" ".join(map(str, value)) if arg == "list" else str(value)) + "\n"


def make_task(rng: random.Random, rule: dict, mode: str, language: str, n_tests: int) -> dict:
    arg = ARG_NAME[rule["arg"]]
    name = rng.choice(FUNCTION_NAMES)
    t = TEXT[language]
    phrase = rule[language]
    if mode == "function":
        prompt = t["function"].format(name=name, arg=arg, rule=phrase)
        solution = f"def {name}({arg}):\n    return {rule['expr']}"
    else:
        reads = (READS_EN if language == "en" else READS_RU)[rule["arg"]]
        prompt = t["program"].format(reads=reads, rule=phrase)
        solution = f"{READ[rule['arg']]}\nprint({rule['expr']})"
    values, seen = [], set()
    for _ in range(50 * n_tests):
        v = sample_input(rng, rule["arg"], rule)
        if repr(v) not in seen:
            seen.add(repr(v))
            values.append(v)
        if len(values) == n_tests:
            break
    if mode == "function":
        tests = [{"type": "assert", "code": f"assert {name}({v!r}) == {evaluate(rule, v)!r}"} for v in values]
    else:
        tests = [{"type": "stdin_stdout", "input": stdin_text(rule["arg"], v), "output": f"{evaluate(rule, v)}\n"}
                 for v in values]
    return {"rule": rule, "mode": mode, "language": language, "name": name, "arg": arg, "prompt": prompt,
            "solution": solution, "tests": tests, "example": values[0]}


def reasoning(task: dict, brief: bool) -> str:
    t, rule, arg = TEXT[task["language"]], task["rule"], task["arg"]
    if brief:
        return t[f"brief_{task['mode']}"].format(name=task["name"], arg=arg, expr=rule["expr"])
    v = task["example"]
    call = f"{task['name']}({v!r})" if task["mode"] == "function" else stdin_text(rule["arg"], v).strip()
    phrase = rule[task["language"]]
    return "\n".join([t["python"].format(rule=phrase[0].upper() + phrase[1:], expr=rule["expr"]),
                      t["check"].format(call=call, result=repr(evaluate(rule, v)))])


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def completion(task: dict, brief: bool) -> str:
    """The R1 format: `<think>` reasoning `</think>`, then a summary with exactly one fenced python block."""
    summary = TEXT[task["language"]][f"summary_{task['mode']}"]
    return f"<think>\n{reasoning(task, brief)}\n</think>\n{summary}\n{fenced(task['solution'])}"


def rl_row(task: dict, pid: str) -> dict:
    return {"id": pid, "prompt": task["prompt"], "kind": "code", "language": task["language"],
            "difficulty": task["rule"]["difficulty"], "tests": task["tests"], "solution": task["solution"]}


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


def split_rules(rng: random.Random, eval_share: float) -> tuple[list[tuple[dict, str]], list[tuple[dict, str]]]:
    """(rule, mode) pairs split into train and held-out: no held-out pair is ever seen in training data."""
    pairs = [(r, m) for r in ALL_RULES for m in ("function", "program")]
    rng.shuffle(pairs)
    n_eval = round(eval_share * len(pairs))
    return pairs[n_eval:], pairs[:n_eval]


def draw_tasks(rng: random.Random, pairs: list, n: int, *, ru_share: float, program_share: float,
               n_tests: int) -> list[dict]:
    by_mode = {m: [p for p in pairs if p[1] == m] for m in ("function", "program")}
    out = []
    for _ in range(n):
        mode = "program" if rng.random() < program_share else "function"
        rule, _ = rng.choice(by_mode[mode])
        language = "ru" if rule["ru"] is not None and rng.random() < ru_share else "en"
        out.append(make_task(rng, rule, mode, language, n_tests))
    return out


def dump(path: Path, rows: list[dict]) -> int:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return len(text.encode("utf-8"))


def build(seed: int, *, n_train: int, n_eval: int, n_cold: int, n_pretrain: int, eval_share: float, ru_share: float,
          program_share: float, brief_share: float, worked_share: float, tagged_share: float,
          n_tests: int) -> dict[str, list[dict]]:
    def rng_for(name: str) -> random.Random:  # one stream per file: changing one file's size leaves others alone
        return random.Random(f"{seed}:{name}")

    train_pairs, eval_pairs = split_rules(rng_for("split"), eval_share)
    draw = dict(ru_share=ru_share, program_share=program_share, n_tests=n_tests)
    files: dict[str, list[dict]] = {}
    # held-out: every held-out (rule, mode) pair once before any repeats, so the split covers them all
    r = rng_for("rl_eval")
    order = list(eval_pairs)
    r.shuffle(order)
    ev = []
    for i in range(n_eval):
        rule, mode = order[i % len(order)]
        language = "ru" if rule["ru"] is not None and r.random() < ru_share else "en"
        ev.append(make_task(r, rule, mode, language, n_tests))
    files["rl_eval"] = [rl_row(t, f"code-eval-{i:04d}") for i, t in enumerate(ev)]
    files["rl_train"] = [rl_row(t, f"code-train-{i:05d}")
                         for i, t in enumerate(draw_tasks(rng_for("rl_train"), train_pairs, n_train, **draw))]

    r = rng_for("cold_start")
    cold = draw_tasks(r, train_pairs, n_cold, **draw)
    briefs = [r.random() < brief_share for _ in cold]
    files["cold_start"] = [
        {"id": f"code-cold-{i:04d}", "prompt": t["prompt"], "kind": "code", "language": t["language"],
         "messages": [{"role": "user", "content": t["prompt"]},
                      {"role": "assistant", "content": completion(t, brief)}],
         "brief": brief}
        for i, (t, brief) in enumerate(zip(cold, briefs))]

    # pre-training: task + code (the corpus where Python syntax and the phrase -> expression mapping are learnt),
    # worked lines with the reasoning in plain text, and a few R1-Zero template lines with the tags.
    r = rng_for("pretrain")
    pretrain = []
    for t in draw_tasks(r, train_pairs, n_pretrain, **draw):
        w = TEXT[t["language"]]
        u = r.random()
        if u < tagged_share:
            pretrain.append({"text": R1_ZERO_TEMPLATE.format(prompt=t["prompt"]) + f" <think> {reasoning(t, False)} "
                                     f"</think> <answer> {fenced(t['solution'])} </answer>"})
        elif u < tagged_share + worked_share:
            pretrain.append({"text": f"{w['task']}: {t['prompt']}\n{w['reasoning']}: {reasoning(t, False)}\n"
                                     f"{w['code']}:\n{fenced(t['solution'])}"})
        else:
            pretrain.append({"text": f"{w['task']}: {t['prompt']}\n{w['code']}:\n{fenced(t['solution'])}"})
    files["pretrain"] = pretrain
    return files


def main(argv: list[str] | None = None) -> dict[str, int]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--rl-train", type=int, default=2000)
    ap.add_argument("--rl-eval", type=int, default=200)
    ap.add_argument("--cold-start", type=int, default=1500)
    ap.add_argument("--pretrain", type=int, default=5000, help="lines in pretrain.jsonl")
    ap.add_argument("--eval-share", type=float, default=0.2,
                    help="share of (rule, function/program) pairs held out: never in any training file")
    ap.add_argument("--ru-share", type=float, default=0.10, help="share of integer-rule prompts in Russian")
    ap.add_argument("--program-share", type=float, default=0.25,
                    help="share of tasks asked as a stdin/stdout program instead of a function")
    ap.add_argument("--brief-share", type=float, default=0.5,
                    help="share of cold-start samples that think briefly (the expression, no check)")
    ap.add_argument("--worked-share", type=float, default=0.4,
                    help="share of pre-training lines with the reasoning written out before the code")
    ap.add_argument("--tagged-share", type=float, default=0.03,
                    help="share of pre-training lines in the R1-Zero template with <think>/<answer> tags")
    ap.add_argument("--tests", type=int, default=4, help="hidden test cases per task")
    args = ap.parse_args(argv)
    if not 0 < args.eval_share < 1 or args.tests < 1:
        ap.error("--eval-share must be in (0, 1) and --tests at least 1")
    files = build(args.seed, n_train=args.rl_train, n_eval=args.rl_eval, n_cold=args.cold_start,
                  n_pretrain=args.pretrain, eval_share=args.eval_share, ru_share=args.ru_share,
                  program_share=args.program_share, brief_share=args.brief_share, worked_share=args.worked_share,
                  tagged_share=args.tagged_share, n_tests=args.tests)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {name: dump(out / f"{name}.jsonl", rows) for name, rows in files.items()}
    for name, rows in files.items():
        print(f"{name:18s} {len(rows):6d} rows {sizes[name] / 1e3:8.1f} kB")
    print(f"{'total':18s} {'':6s}      {sum(sizes.values()) / 1e6:8.2f} MB -> {out}")
    return sizes


if __name__ == "__main__":
    main()
