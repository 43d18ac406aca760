#!/usr/bin/env python3
"""The structure figures the project holds itself to, counted over src/ (tests included):

- files over 500 lines (`wc -l`), the three longest;
- functions over 80 lines (from the line with `fn` to its closing brace), the five longest;
- functions returning `Result<_, String>` (directly or through a `type` alias), which belong
  only at the command edge.

Usage: python3 scripts/sizes.py [--check]   (--check exits 1 when a limit is passed)
"""

import re
import sys
from pathlib import Path

FILE_LIMIT = 500
FN_LIMIT = 80
STRING_ERROR_LIMIT = 20

FN_START = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?((const|async|unsafe|extern\s+\"C\")\s+)*fn\s+(\w+)")
STRING_ALIAS = re.compile(r"\btype\s+(\w+)(<[^=]*>)?\s*=\s*Result<.*,\s*String\s*>\s*;")


def blank_literals(text):
    """The source with comments, strings and char literals blanked (newlines kept), so that
    counting braces sees only code."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif (m := re.match(r'b?r(#*)"', text[i:i + 40])) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            end = '"' + m.group(1)
            j = text.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "'" and (m := re.match(r"'(\\.[^']*|[^\\'])'", text[i:i + 12])):
            out.append(" " * m.end())
            i += m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def functions(path):
    """(name, first line, length in lines, signature) of every fn with a body."""
    code = blank_literals(path.read_text())
    lines = code.split("\n")
    found = []
    for start, line in enumerate(lines):
        m = FN_START.match(line)
        if not m:
            continue
        depth, signature, end = 0, [], None
        for k in range(start, len(lines)):
            for ch in lines[k]:
                if depth == 0 and ch == ";":
                    end = -1
                    break
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        end = k
                        break
                if depth == 0:
                    signature.append(ch)
            if end is not None:
                break
            if depth == 0:
                signature.append(" ")
        if end is not None and end >= 0:
            found.append((m.group(5), start + 1, end - start + 1, "".join(signature)))
    return found


def returns_string_error(signature, aliases):
    # The return type follows the parameter list's closing parenthesis (a parameter may itself
    # be `impl Fn(T) -> U`).
    depth, after = 0, len(signature)
    for i, ch in enumerate(signature):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                after = i + 1
                break
    rest = signature[after:]
    ret = rest.split("->", 1)[1] if "->" in rest else ""
    ret = ret.split(" where ", 1)[0].strip()
    if re.fullmatch(r"(std::result::)?Result<.*,\s*String\s*>", ret):
        return True
    return any(re.fullmatch(rf"{a}(<.*>)?", ret) for a in aliases)


def main():
    check = "--check" in sys.argv[1:]
    root = Path(__file__).resolve().parent.parent / "src"
    files = sorted(root.rglob("*.rs"))
    lengths = sorted(((len(p.read_text().splitlines()), p) for p in files), reverse=True)
    aliases = {m.group(1) for p in files for m in STRING_ALIAS.finditer(blank_literals(p.read_text()))}
    fns = [(length, p, name, line, sig) for p in files for name, line, length, sig in functions(p)]
    fns.sort(key=lambda f: f[0], reverse=True)
    string_errors = [f for f in fns if returns_string_error(f[4], aliases)]

    rel = lambda p: p.relative_to(root.parent)
    long_files = [f for f in lengths if f[0] > FILE_LIMIT]
    long_fns = [f for f in fns if f[0] > FN_LIMIT]
    print(f"{len(files)} files in src/; over {FILE_LIMIT} lines: {len(long_files)}; longest:")
    for n, p in lengths[:3]:
        print(f"  {n:5}  {rel(p)}")
    print(f"{len(fns)} functions; over {FN_LIMIT} lines: {len(long_fns)}; longest:")
    for n, p, name, line, _ in fns[:5]:
        print(f"  {n:5}  {rel(p)}:{line} {name}")
    print(f"returning Result<_, String>: {len(string_errors)} (limit {STRING_ERROR_LIMIT})")
    for _, p, name, line, _ in sorted(string_errors, key=lambda f: (str(f[1]), f[3])):
        print(f"         {rel(p)}:{line} {name}")
    if check and (long_files or long_fns or len(string_errors) > STRING_ERROR_LIMIT):
        sys.exit(1)


if __name__ == "__main__":
    main()
