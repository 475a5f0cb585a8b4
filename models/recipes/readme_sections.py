"""Generated sections of a README: the text between `<!-- NAME -->` and `<!-- /NAME -->`."""
import pathlib


def replace_section(path: pathlib.Path, name: str, body: str):
    """Replace the text between `<!-- name -->` and `<!-- /name -->` in path with body (the end
    marker is added when missing). Exits naming the file when the start marker is missing."""
    text = path.read_text()
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if start not in text:
        raise SystemExit(f"{path} has no {start} marker")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1] if end in rest else "\n"
    path.write_text(f"{head}{start}\n{body}\n{end}{tail}")
